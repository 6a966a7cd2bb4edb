//! `fpm plot`: a recording's per-stream time series as a PNG.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fpm_subscriber::planner::{ModelConfig, ModelKind, PerfModel};
use fpm_subscriber::record::{read_records, Record};
use plotters::prelude::*;

/// Arguments of `fpm plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A recording made by `fpm record` (JSON Lines).
    pub file: PathBuf,
    /// The PNG to write (overwritten if it exists).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1400, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    pub width: u32,
    /// Height of each panel in pixels.
    #[arg(long, default_value_t = 260, value_parser = clap::value_parser!(u32).range(80..=4_000))]
    pub panel_height: u32,
    /// The planner model to fit over the whole recording (as `fpm fit` does) and draw against
    /// the samples: predicted vs measured wall_time of every iteration; `none` for no panel.
    #[arg(long, default_value = "agg", value_parser = parse_model)]
    pub model: PlotModel,
    /// Samples the model keeps (as `fpm fit --max-samples`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_samples: u64,
}

/// `--model`: a planner model, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlotModel(pub Option<ModelKind>);

fn parse_model(s: &str) -> Result<PlotModel, String> {
    if s == "none" {
        return Ok(PlotModel(None));
    }
    s.parse()
        .map(|k| PlotModel(Some(k)))
        .map_err(|_| format!("{s:?}: use prefill, decode, agg or none"))
}

/// One panel: a title and how to read its value off a record (`None`: not plotted).
pub(crate) struct Panel {
    pub title: &'static str,
    pub value: fn(&Record) -> Option<f64>,
}

/// The time-series panels, top to bottom.
pub(crate) const PANELS: [Panel; 5] = [
    Panel {
        title: "wall_time (ms), iterations",
        value: |r| (r.metrics.wall_time > 0.0).then_some(r.metrics.wall_time * 1e3),
    },
    Panel {
        title: "scheduled prefill tokens",
        value: |r| Some(r.metrics.scheduled_requests.sum_prefill_tokens as f64),
    },
    Panel {
        title: "scheduled decode requests",
        value: |r| Some(r.metrics.scheduled_requests.num_decode_requests as f64),
    },
    Panel {
        title: "scheduled decode KV tokens",
        value: |r| Some(r.metrics.scheduled_requests.sum_decode_kv_tokens as f64),
    },
    Panel {
        title: "queued prefill tokens",
        value: |r| Some(r.metrics.queued_requests.sum_prefill_tokens as f64),
    },
];

/// Points per stream and panel: (seconds since the first record, value).
pub(crate) type Series = BTreeMap<(String, i64), Vec<(f64, f64)>>;

/// Reads a recording.
pub(crate) fn load(file: &PathBuf) -> Result<Vec<Record>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let records: Vec<Record> = read_records(std::io::BufReader::new(f))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not an fpm recording", file.display()))?;
    if records.is_empty() {
        bail!("{} has no records", file.display());
    }
    Ok(records)
}

/// Every panel's series.
fn series_of(records: &[Record]) -> Vec<Series> {
    let t0 = records.iter().map(|r| r.received_at_ns).min().unwrap_or(0);
    PANELS
        .iter()
        .map(|p| {
            let mut s = Series::new();
            for r in records {
                if let Some(v) = (p.value)(r).filter(|v| v.is_finite()) {
                    let t = (r.received_at_ns - t0) as f64 / 1e9;
                    s.entry((r.metrics.worker_id.clone(), r.metrics.dp_rank))
                        .or_default()
                        .push((t, v));
                }
            }
            s
        })
        .collect()
}

/// Runs `fpm plot`.
///
/// # Errors
/// An unreadable or empty recording, or a PNG that cannot be written.
pub fn run(args: PlotArgs) -> Result<()> {
    let records = load(&args.file)?;
    let (streams, height) = draw(
        &records,
        &args.output,
        args.width,
        args.panel_height,
        args.model.0,
        args.max_samples,
    )?;
    println!(
        "{}: {} records, {streams} streams -> {} ({}x{height})",
        args.file.display(),
        records.len(),
        args.output.display(),
        args.width,
    );
    Ok(())
}

/// Draws `records` into the PNG `output`; returns (streams, image height).
///
/// # Errors
/// The PNG cannot be drawn or written.
pub(crate) fn draw(
    records: &[Record],
    output: &PathBuf,
    width: u32,
    panel_height: u32,
    model: Option<ModelKind>,
    max_samples: u64,
) -> Result<(usize, u32)> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("the embedded font cannot be loaded"))?;
    let series = series_of(records);
    // The fitted model, and (measured, predicted) wall_time in ms for every iteration.
    let fitted = match model {
        Some(kind) => {
            let config = ModelConfig {
                max_samples: max_samples as usize,
                ..ModelConfig::default()
            };
            let mut m = PerfModel::new(kind, &config).map_err(|e| anyhow::anyhow!("{e}"))?;
            for r in records {
                m.observe(&r.metrics);
            }
            let title = super::fit::describe(&mut m);
            let points: Vec<(f64, f64)> = match m.fit() {
                Ok(fit) => records
                    .iter()
                    .filter(|r| r.metrics.wall_time > 0.0 && r.metrics.wall_time.is_finite())
                    .map(|r| {
                        let x = kind.features(&r.metrics);
                        (r.metrics.wall_time * 1e3, fit.predict(&x) * 1e3)
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            Some((title, points))
        }
        None => None,
    };
    let panels = PANELS.len() + usize::from(fitted.is_some());
    let height = panel_height * panels as u32;
    let root = BitMapBackend::new(output, (width, height)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels, 1));
        let streams: Vec<&(String, i64)> = series[0]
            .keys()
            .chain(series.iter().flat_map(|s| s.keys()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let t_max = series
            .iter()
            .flat_map(|s| s.values().flatten())
            .map(|p| p.0)
            .fold(0.0f64, f64::max)
            .max(1e-3);
        for ((panel, s), area) in PANELS.iter().zip(&series).zip(&areas) {
            let y_max = s
                .values()
                .flatten()
                .map(|p| p.1)
                .fold(0.0f64, f64::max)
                .max(1.0)
                * 1.05;
            let mut chart = ChartBuilder::on(area)
                .caption(panel.title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .label_style(("sans-serif", 12))
                .draw()?;
            for (i, key) in streams.iter().enumerate() {
                let Some(points) = s.get(*key) else { continue };
                let colour = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        colour.stroke_width(1),
                    ))?
                    .label(format!("{} rank {}", key.0, key.1))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()?;
        }
        if let (Some((title, points)), Some(area)) = (&fitted, areas.get(PANELS.len())) {
            let hi = points
                .iter()
                .flat_map(|p| [p.0, p.1])
                .filter(|v| v.is_finite())
                .fold(1e-3f64, f64::max)
                * 1.05;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("model {title}"), ("sans-serif", 14))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..hi, 0.0..hi)?;
            chart
                .configure_mesh()
                .x_desc("measured wall_time (ms)")
                .y_desc("predicted (ms)")
                .label_style(("sans-serif", 12))
                .draw()?;
            chart.draw_series(LineSeries::new([(0.0, 0.0), (hi, hi)], BLACK.mix(0.5)))?;
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 2, BLUE.mix(0.4).filled())),
            )?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", output.display()))?;
    Ok((series[0].len().max(series[1].len()), height))
}
