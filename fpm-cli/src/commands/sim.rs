//! `fpm sim`: a synthetic LLM engine publishing real FPM over ZeroMQ.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use fpm_emitter::Endpoint;
use fpm_sim::{self as sim, CostModel, Rate, SimConfig};

use super::parse_duration;

/// Arguments of `fpm sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Where each rank publishes: `ipc://PATH` (rank r binds `PATH.r`, SGLang's layout),
    /// `tcp://HOST:PORT` or a bare port (rank r binds port + r, Dynamo's vLLM layout).
    #[arg(long, env = "FPM_SIM_ENDPOINT", default_value = "ipc:///tmp/fpm-sim")]
    pub endpoint: String,
    /// Data-parallel ranks: one scheduler thread and one socket each.
    #[arg(long, env = "FPM_SIM_DP_SIZE", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024), allow_negative_numbers = true)]
    pub dp_size: u32,
    /// Engine identity stamped on every message.
    #[arg(long, env = "FPM_SIM_WORKER_ID", default_value = "fpm-sim")]
    pub worker_id: String,
    /// How long to run (`30s`, `2m`, `500ms`, or seconds); Ctrl-C stops earlier.
    #[arg(long, env = "FPM_SIM_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Request arrivals per second across all ranks (Poisson; > 0).
    #[arg(long, env = "FPM_SIM_RPS", default_value_t = 4.0, value_parser = positive, allow_negative_numbers = true)]
    pub rps: f64,
    /// Mean prompt length in tokens (log-normal; > 0).
    #[arg(long, env = "FPM_SIM_PROMPT_LEN", default_value_t = 1024.0, value_parser = positive, allow_negative_numbers = true)]
    pub prompt_len: f64,
    /// Mean output length in tokens (log-normal; > 0).
    #[arg(long, env = "FPM_SIM_OUTPUT_LEN", default_value_t = 256.0, value_parser = positive, allow_negative_numbers = true)]
    pub output_len: f64,
    /// Token budget per iteration: longer prompts are prefilled in chunks (≥ 1).
    #[arg(long, env = "FPM_SIM_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048, value_parser = clap::value_parser!(i64).range(1..), allow_negative_numbers = true)]
    pub max_num_batched_tokens: i64,
    /// Running requests per rank, at most (≥ 1).
    #[arg(long, env = "FPM_SIM_MAX_NUM_SEQS", default_value_t = 256, value_parser = at_least_one, allow_negative_numbers = true)]
    pub max_num_seqs: usize,
    /// KV-cache capacity per rank in tokens; when full, the newest request is preempted (≥ 1).
    #[arg(long, env = "FPM_SIM_KV_CAPACITY", default_value_t = 262_144, value_parser = clap::value_parser!(i64).range(1..), allow_negative_numbers = true)]
    pub kv_capacity: i64,
    /// Load-test mode: publish N messages per second per rank, or `max`, ignoring the model.
    #[arg(long, env = "FPM_SIM_RATE", value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// Random seed (rank r uses seed + r).
    #[arg(long, env = "FPM_SIM_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Cost model: fixed milliseconds per iteration (≥ 0).
    #[arg(long, env = "FPM_SIM_COST_BASE_MS", default_value_t = 4.0, value_parser = non_negative, allow_negative_numbers = true)]
    pub cost_base_ms: f64,
    /// Cost model: microseconds per prefill token (≥ 0).
    #[arg(long, env = "FPM_SIM_COST_PREFILL_US", default_value_t = 20.0, value_parser = non_negative, allow_negative_numbers = true)]
    pub cost_prefill_us: f64,
    /// Cost model: nanoseconds per KV token read by decode (≥ 0).
    #[arg(long, env = "FPM_SIM_COST_DECODE_KV_NS", default_value_t = 20.0, value_parser = non_negative, allow_negative_numbers = true)]
    pub cost_decode_kv_ns: f64,
    /// Cost model: microseconds per decode request (≥ 0).
    #[arg(long, env = "FPM_SIM_COST_DECODE_REQUEST_US", default_value_t = 10.0, value_parser = non_negative, allow_negative_numbers = true)]
    pub cost_decode_request_us: f64,
    /// Cost model: relative noise, the standard deviation as a fraction of the cost (0 to 1).
    #[arg(long, env = "FPM_SIM_NOISE", default_value_t = 0.03, value_parser = fraction, allow_negative_numbers = true)]
    pub noise: f64,
    /// Idle heartbeat interval.
    #[arg(long, env = "FPM_SIM_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
}

fn number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a finite number")),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be greater than 0"))
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} must not be negative"))
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} must be between 0 and 1"))
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!("{s:?} must be a whole number, at least 1")),
    }
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
        _ => Err(format!(
            "{s:?}: expected messages per second (> 0) or `max`"
        )),
    }
}

/// Runs `fpm sim`.
///
/// # Errors
/// A bad endpoint or a socket that cannot be bound.
pub fn run(args: SimArgs) -> Result<()> {
    if args.dp_size == 0 {
        bail!("--dp-size must be at least 1");
    }
    if args.kv_capacity < args.max_num_batched_tokens {
        bail!(
            "--kv-capacity ({}) must be at least --max-num-batched-tokens ({}): \
             an iteration's tokens must fit in the KV cache",
            args.kv_capacity,
            args.max_num_batched_tokens
        );
    }
    let endpoint = Endpoint::parse(&args.endpoint).with_context(|| "invalid --endpoint")?;
    let mut cfg = SimConfig::new(endpoint, args.worker_id);
    cfg.dp_size = args.dp_size;
    cfg.duration = args.duration;
    cfg.rps = args.rps;
    cfg.prompt_len_mean = args.prompt_len;
    cfg.output_len_mean = args.output_len;
    cfg.max_num_batched_tokens = args.max_num_batched_tokens;
    cfg.max_num_seqs = args.max_num_seqs;
    cfg.kv_capacity = args.kv_capacity;
    cfg.rate = args.rate;
    cfg.seed = args.seed;
    cfg.heartbeat_interval = args.heartbeat_interval;
    cfg.cost = CostModel {
        base_s: args.cost_base_ms / 1e3,
        prefill_token_s: args.cost_prefill_us / 1e6,
        decode_kv_token_s: args.cost_decode_kv_ns / 1e9,
        decode_request_s: args.cost_decode_request_us / 1e6,
        noise: args.noise,
    };
    // The ranks are plain threads (they sleep through each simulated iteration); one
    // current-thread runtime on this thread waits for them and, as the relay does, for
    // `shutdown_signal`, and sets `stop` when a signal comes first.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(async move {
        let signal = super::shutdown_signal()?;
        tracing::info!(
            worker_id = %cfg.worker_id,
            dp_size = cfg.dp_size,
            duration_s = cfg.duration.as_secs_f64(),
            mode = if cfg.rate.is_some() { "fixed rate" } else { "model" },
            "fpm sim running"
        );
        let mut ranks = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || sim::run(&cfg, stop)
        });
        let reports = tokio::select! {
            biased;
            () = signal => {
                tracing::info!("stopping");
                stop.store(true, Ordering::Relaxed);
                ranks.await
            }
            r = &mut ranks => r,
        };
        print_reports(
            &reports
                .context("the simulated engine panicked")?
                .context("cannot start the simulated engine")?,
        );
        Ok(())
    })
}

/// The per-rank table on standard output.
fn print_reports(reports: &[sim::RankReport]) {
    let w = reports
        .iter()
        .map(|r| r.endpoint.chars().count())
        .max()
        .unwrap_or(0)
        .max("endpoint".len());
    println!(
        "{:>4}  {:<w$} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8}  dropped by reason",
        "rank",
        "endpoint",
        "iterations",
        "arrived",
        "finished",
        "preempt",
        "published",
        "heartbeat",
        "dropped"
    );
    for r in reports {
        let e = &r.emitter;
        let reasons: Vec<String> = e
            .dropped
            .by_reason()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        println!(
            "{:>4}  {:<w$} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8}  {}",
            r.dp_rank,
            r.endpoint,
            r.iterations,
            r.arrived,
            r.finished,
            r.preemptions,
            e.published,
            e.heartbeats,
            e.dropped.total(),
            if reasons.is_empty() {
                "-".into()
            } else {
                reasons.join(" ")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max").unwrap(), Rate::Max);
        assert_eq!(parse_rate("100").unwrap(), Rate::PerSecond(100.0));
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn number_flags() {
        assert!(positive("-5").is_err() && positive("0").is_err() && positive("NaN").is_err());
        assert_eq!(positive("2.5"), Ok(2.5));
        assert!(non_negative("-4").is_err() && non_negative("inf").is_err());
        assert_eq!(non_negative("0"), Ok(0.0));
        assert!(fraction("-1").is_err() && fraction("1.5").is_err());
        assert!(at_least_one("0").is_err() && at_least_one("-3").is_err());
    }
}
