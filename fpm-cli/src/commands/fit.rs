//! `fpm fit`: feed a recording into one of Dynamo's planner models and print the fit.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fpm_subscriber::planner::{ModelConfig, ModelKind, PerfModel};
use fpm_subscriber::record::read_records;

/// Arguments of `fpm fit`.
#[derive(Debug, Args)]
#[command(after_help = "\
Every record of the file is fed, in file order, to the model as Dynamo's planner feeds its
add_observation (heartbeats update the moving averages but are not samples). With --json, one
object: {\"model\", \"fitted\", \"observations\", \"coef\", \"intercept\", \"avg_isl\",
\"avg_decode_length\"}, fields that do not apply to the model omitted.")]
pub struct FitArgs {
    /// A recording made by `fpm record` (JSON Lines).
    pub file: PathBuf,
    /// Which model: `prefill` (wall_time ~ sum_prefill_tokens), `decode` (~ num_decode_requests
    /// + sum_decode_kv_tokens) or `agg` (~ sum_prefill_tokens + sum_decode_kv_tokens).
    #[arg(long, value_parser = parse_kind)]
    pub model: ModelKind,
    /// Samples kept (Dynamo's max_num_fpm_samples).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000), allow_negative_numbers = true)]
    pub max_samples: u64,
    /// Buckets (Dynamo's fpm_sample_bucket_size; isqrt of it per axis for 2-D models).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1_000_000), allow_negative_numbers = true)]
    pub bucket_size: u64,
    /// Samples needed before fitting (Dynamo's load_min_observations).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000_000), allow_negative_numbers = true)]
    pub min_observations: u64,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(s: &str) -> Result<ModelKind, String> {
    s.parse::<ModelKind>()
        .map_err(|_| format!("{s:?}: use prefill, decode or agg"))
}

/// The model's feature names, in coefficient order.
pub(crate) fn feature_names(kind: ModelKind) -> &'static [&'static str] {
    match kind {
        ModelKind::Prefill => &["sum_prefill_tokens"],
        ModelKind::Decode => &["num_decode_requests", "sum_decode_kv_tokens"],
        ModelKind::Agg => &["sum_prefill_tokens", "sum_decode_kv_tokens"],
    }
}

/// A one-line description of a model's state: its formula, R² and residual p99.
pub(crate) fn describe(model: &mut PerfModel) -> String {
    let kind = model.kind();
    let summary = model.summary();
    let mut out = format!("{kind}: {} samples", summary.observations);
    match model.fit() {
        Ok(fit) => {
            out.push_str(&format!(", wall_time = {:.6} s", fit.intercept()));
            for (c, name) in fit.coef().iter().zip(feature_names(kind)) {
                out.push_str(&format!(" + {c:.4e} x {name}"));
            }
            if let Some(q) = model.quality() {
                out.push_str(&format!(
                    "; R² {:.4}, residual p99 {:.3} ms",
                    q.r_squared,
                    q.residual_p99 * 1e3
                ));
            }
        }
        Err(e) => out.push_str(&format!(", no fit ({e})")),
    }
    if let Some(v) = summary.avg_isl {
        out.push_str(&format!("; avg_isl {v:.1}"));
    }
    if let Some(v) = summary.avg_decode_length {
        out.push_str(&format!("; avg_decode_length {v:.1}"));
    }
    out
}

/// Runs `fpm fit`.
///
/// # Errors
/// An unreadable recording or bad model settings.
pub fn run(args: FitArgs) -> Result<()> {
    let config = ModelConfig {
        max_samples: args.max_samples as usize,
        bucket_size: args.bucket_size as usize,
        min_observations: args.min_observations as usize,
    };
    let mut model = PerfModel::new(args.model, &config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let f = std::fs::File::open(&args.file)
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let mut n = 0u64;
    for r in read_records(std::io::BufReader::new(f)) {
        let r = r.with_context(|| format!("{} is not an fpm recording", args.file.display()))?;
        model.observe(&r.metrics);
        n += 1;
    }
    if args.json {
        println!("{}", serde_json::to_string(&model.summary())?);
    } else {
        println!("{}: {n} records", args.file.display());
        println!("{}", describe(&mut model));
    }
    Ok(())
}

/// The three planner models fed from a live stream through a feeding policy (what `fpm
/// watch` and `fpm demo` show).
#[derive(Debug)]
pub struct ModelSet {
    feeder: fpm_subscriber::planner::TickFeeder,
    models: Vec<PerfModel>,
}

/// One model's state for `--json` output.
#[derive(Debug, serde::Serialize)]
pub struct ModelReport {
    /// Upstream's terms (what `fpm fit --json` prints).
    #[serde(flatten)]
    pub summary: fpm_subscriber::planner::FitSummary,
    /// R² of the fit over the retained samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r_squared: Option<f64>,
    /// 99th percentile of |wall_time - prediction|, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_p99: Option<f64>,
}

impl ModelSet {
    /// Prefill, decode and agg models with `config`, fed by `policy`.
    ///
    /// # Errors
    /// An invalid model configuration.
    pub fn new(
        config: &ModelConfig,
        policy: fpm_subscriber::planner::FeedingPolicy,
    ) -> Result<Self> {
        let models = [ModelKind::Prefill, ModelKind::Decode, ModelKind::Agg]
            .into_iter()
            .map(|k| PerfModel::new(k, config).map_err(|e| anyhow::anyhow!("{e}")))
            .collect::<Result<_>>()?;
        Ok(ModelSet {
            feeder: fpm_subscriber::planner::TickFeeder::new(policy),
            models,
        })
    }

    /// Takes one received message (fed to the models at the next tick).
    pub fn push(&mut self, fpm: &fpm_schema::ForwardPassMetrics) {
        self.feeder.push(fpm.clone());
    }

    /// A planner tick: feeds what the policy selected since the last one.
    pub fn tick(&mut self) {
        for fpm in self.feeder.tick() {
            for m in &mut self.models {
                m.observe(&fpm);
            }
        }
    }

    /// One line per model.
    pub fn describe(&mut self) -> Vec<String> {
        self.models.iter_mut().map(describe).collect()
    }

    /// Per-model reports.
    pub fn reports(&mut self) -> Vec<ModelReport> {
        self.models
            .iter_mut()
            .map(|m| {
                let summary = m.summary();
                let q = m.quality();
                ModelReport {
                    summary,
                    r_squared: q.map(|q| q.r_squared),
                    residual_p99: q.map(|q| q.residual_p99),
                }
            })
            .collect()
    }

    /// The models.
    pub fn models(&mut self) -> &mut [PerfModel] {
        &mut self.models
    }
}
