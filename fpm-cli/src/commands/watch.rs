//! `fpm watch`: a live table of every engine stream, redrawn each interval; `--once` and
//! `--json` for scripts; `--metrics-addr` serves Prometheus metrics with Dynamo's labels.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use fpm_relay::http::{self, Status};
use fpm_subscriber::exporter::Exporter;
use fpm_subscriber::{unix_now_ns, StreamState, Subscriber, SubscriberStats};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::fit::{ModelReport, ModelSet};
use super::subscribe::{summary, SubscribeArgs};
use super::{parse_duration, shutdown_signal};
use fpm_subscriber::planner::{FeedingPolicy, ModelConfig};

/// Arguments of `fpm watch`.
#[derive(Debug, Args)]
#[command(after_help = "\
Columns: iterations per second, wall_time p50/p99 over recent iterations, the latest
iteration's scheduled prefill (requests/tokens) and decode (requests/KV tokens), the queue
(prefill requests/tokens), messages lost in counter gaps, and STALE for a silent stream.")]
pub struct WatchArgs {
    /// How often to redraw.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print one snapshot after one interval and exit.
    #[arg(long)]
    pub once: bool,
    /// JSON instead of a table: one object per interval, one line each.
    #[arg(long)]
    pub json: bool,
    /// Serve /metrics, /health and /live here (`off` disables). Default:
    /// 127.0.0.1:$DYN_SYSTEM_PORT when that is set, else off.
    #[arg(long, env = "FPM_WATCH_METRICS_ADDR", value_name = "ADDR|off")]
    pub metrics_addr: Option<String>,
    /// How the planner models are fed: `latest-per-tick` (Dynamo's: the newest message of
    /// each stream per --model-interval) or `every-iteration`.
    #[arg(long, default_value = "latest-per-tick", value_parser = parse_feed)]
    pub feed: FeedingPolicy,
    /// The planner models' tick (Dynamo's load_adjustment_interval).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub model_interval: Duration,
    /// Samples each model keeps (Dynamo's max_num_fpm_samples).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_samples: u64,
    /// What to subscribe to and how.
    #[command(flatten)]
    pub subscribe: SubscribeArgs,
}

fn parse_feed(s: &str) -> Result<FeedingPolicy, String> {
    s.parse()
        .map_err(|_| format!("{s:?}: use latest-per-tick or every-iteration"))
}

/// One stream in a snapshot.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Engine.
    pub worker_id: String,
    /// Rank.
    pub dp_rank: i64,
    /// `namespace/component/endpoint`.
    pub source: String,
    /// Iterations per second.
    pub iterations_per_s: f64,
    /// Median recent wall_time, seconds.
    pub wall_time_p50: Option<f64>,
    /// 99th percentile recent wall_time, seconds.
    pub wall_time_p99: Option<f64>,
    /// Latest iteration's scheduled prefill requests.
    pub prefill_requests: i64,
    /// ... and tokens.
    pub prefill_tokens: i64,
    /// Latest iteration's decode requests.
    pub decode_requests: i64,
    /// ... and KV tokens.
    pub decode_kv_tokens: i64,
    /// Queued prefill requests.
    pub queued_requests: i64,
    /// Queued prefill tokens.
    pub queued_tokens: i64,
    /// Messages lost in counter gaps.
    pub gap_messages: u64,
    /// Messages missed before the stream was first seen.
    pub missed_before_start: u64,
    /// Producer restarts.
    pub restarts: u64,
    /// Silent past the stale time.
    pub stale: bool,
}

impl Row {
    fn of(st: &StreamState, now: u64) -> Row {
        let m = &st.latest;
        Row {
            worker_id: st.key.worker_id.clone(),
            dp_rank: st.key.dp_rank,
            source: st.source.to_string(),
            iterations_per_s: st.iteration_rate(now),
            wall_time_p50: st.wall_time_quantile(0.5),
            wall_time_p99: st.wall_time_quantile(0.99),
            prefill_requests: m.scheduled_requests.num_prefill_requests,
            prefill_tokens: m.scheduled_requests.sum_prefill_tokens,
            decode_requests: m.scheduled_requests.num_decode_requests,
            decode_kv_tokens: m.scheduled_requests.sum_decode_kv_tokens,
            queued_requests: m.queued_requests.num_prefill_requests,
            queued_tokens: m.queued_requests.sum_prefill_tokens,
            gap_messages: st.counts.gap_messages,
            missed_before_start: st.counts.missed_before_start,
            restarts: st.counts.restarts,
            stale: st.stale,
        }
    }
}

/// A whole snapshot (`--json`).
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// When (Unix ns).
    pub at_ns: u64,
    /// Every tracked stream, by worker and rank.
    pub streams: Vec<Row>,
    /// Workers whose dp-rank set differs from the others' (Attention-DP check).
    pub dp_rank_mismatches: Vec<(String, Vec<i64>)>,
    /// Totals.
    pub totals: Totals,
    /// The planner models' fits.
    pub models: Vec<ModelReport>,
}

/// The subscriber's totals in a snapshot.
#[derive(Debug, Serialize)]
pub struct Totals {
    /// Samples received.
    pub messages: u64,
    /// Rejected messages.
    pub rejected: u64,
    /// Lost in counter gaps.
    pub gap_messages: u64,
    /// Missed before streams were first seen.
    pub missed_before_start: u64,
    /// Relay envelopes missing.
    pub sequence_gap_messages: u64,
    /// Dropped by the NATS client (slow consumer).
    pub slow_consumer_drops: u64,
}

pub(crate) fn snapshot(sub: &Subscriber, models: &mut ModelSet, now: u64) -> Snapshot {
    let stats: SubscriberStats = sub.stats();
    Snapshot {
        at_ns: now,
        streams: sub
            .tracker()
            .sorted()
            .into_iter()
            .map(|st| Row::of(st, now))
            .collect(),
        dp_rank_mismatches: {
            let report = sub.tracker().dp_ranks();
            report
                .mismatched()
                .into_iter()
                .map(|w| (w.to_owned(), report.workers()[w].iter().copied().collect()))
                .collect()
        },
        totals: Totals {
            messages: stats.samples,
            rejected: stats.rejected.total(),
            gap_messages: stats.streams.gap_messages,
            missed_before_start: stats.streams.missed_before_start,
            sequence_gap_messages: stats.sequence.gap_messages,
            slow_consumer_drops: stats.slow_consumer_drops,
        },
        models: models.reports(),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.2}", s * 1e3))
}

/// The table, one line per stream, columns sized to their contents.
pub fn table(s: &Snapshot) -> String {
    let header = [
        "worker", "rank", "it/s", "p50 ms", "p99 ms", "pre req", "pre tok", "dec req", "dec kv",
        "q req", "q tok", "lost", "state",
    ];
    let rows: Vec<[String; 13]> = s
        .streams
        .iter()
        .map(|r| {
            [
                r.worker_id.clone(),
                r.dp_rank.to_string(),
                format!("{:.1}", r.iterations_per_s),
                ms(r.wall_time_p50),
                ms(r.wall_time_p99),
                r.prefill_requests.to_string(),
                r.prefill_tokens.to_string(),
                r.decode_requests.to_string(),
                r.decode_kv_tokens.to_string(),
                r.queued_requests.to_string(),
                r.queued_tokens.to_string(),
                (r.gap_messages + r.missed_before_start).to_string(),
                if r.stale { "STALE" } else { "ok" }.to_owned(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 || i == 12 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(&header.map(str::to_owned));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no streams yet)\n");
    }
    for (w, ranks) in &s.dp_rank_mismatches {
        out.push_str(&format!(
            "attention-DP: worker {w} reports dp ranks {ranks:?}, unlike the others\n"
        ));
    }
    out
}

/// What `/metrics` and `/health` serve for `fpm watch`.
struct WatchStatus {
    exporter: Arc<Mutex<Exporter>>,
    client: async_nats::Client,
}

impl Status for WatchStatus {
    fn metrics(&self) -> String {
        self.exporter.lock().map(|e| e.encode()).unwrap_or_default()
    }
    fn health(&self) -> (bool, String) {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        (
            connected,
            format!(
                "{}\nnats: {}\n",
                if connected { "ok" } else { "unhealthy" },
                if connected {
                    "connected"
                } else {
                    "disconnected"
                }
            ),
        )
    }
    fn rejected(&self) {}
}

fn metrics_addr(arg: Option<&str>) -> Result<Option<SocketAddr>> {
    Ok(match arg {
        Some("off" | "none" | "") => None,
        Some(a) => Some(a.parse::<SocketAddr>().with_context(|| {
            format!("--metrics-addr {a:?} is not an address: use HOST:PORT, e.g. 127.0.0.1:9092, or off")
        })?),
        None => match std::env::var("DYN_SYSTEM_PORT") {
            Ok(p) if !p.is_empty() => Some(SocketAddr::from((
                [127, 0, 0, 1],
                p.parse::<u16>()
                    .with_context(|| format!("DYN_SYSTEM_PORT={p:?} is not a port"))?,
            ))),
            _ => None,
        },
    })
}

/// Runs `fpm watch`.
///
/// # Errors
/// Bad flags, a metrics address that cannot be bound, or a failed subscription.
pub fn run(args: WatchArgs) -> Result<()> {
    let addr = metrics_addr(args.metrics_addr.as_deref())?;
    if args.interval.is_zero() {
        anyhow::bail!("--interval must be positive");
    }
    if args.model_interval.is_zero() {
        anyhow::bail!("--model-interval must be positive");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let signal = shutdown_signal()?;
        let listener =
            match addr {
                Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| {
                    format!("cannot listen on {a}: pick another --metrics-addr")
                })?),
                None => None,
            };
        let (client, mut sub) = args.subscribe.subscribe("fpm-watch").await?;
        let exporter = Arc::new(Mutex::new(Exporter::new()));
        let mut models = ModelSet::new(
            &ModelConfig {
                max_samples: args.max_samples as usize,
                ..ModelConfig::default()
            },
            args.feed,
        )?;
        let mut model_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + args.model_interval,
            args.model_interval,
        );
        let cancel = CancellationToken::new();
        if let Some(l) = listener {
            tracing::info!(addr = %l.local_addr()?, "serving /metrics, /health, /live");
            let status = Arc::new(WatchStatus {
                exporter: exporter.clone(),
                client: client.clone(),
            });
            tokio::spawn(http::serve(
                l,
                status,
                http::Limits::default(),
                cancel.clone(),
            ));
        }
        let terminal = std::io::stdout().is_terminal() && !args.json;
        tokio::pin!(signal);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + args.interval, args.interval);
        loop {
            tokio::select! {
                biased;
                () = &mut signal => break,
                _ = tick.tick() => {
                    let now = unix_now_ns();
                    sub.sweep(now);
                    if let Ok(mut e) = exporter.lock() {
                        e.update(sub.tracker(), &sub.stats(), now);
                    }
                    let snap = snapshot(&sub, &mut models, now);
                    let mut out = std::io::stdout().lock();
                    if args.json {
                        serde_json::to_writer(&mut out, &snap)?;
                        writeln!(out)?;
                    } else {
                        if terminal {
                            write!(out, "\x1b[H\x1b[2J")?;
                        }
                        write!(out, "{}", table(&snap))?;
                        for line in models.describe() {
                            writeln!(out, "model {line}")?;
                        }
                        writeln!(out, "{}", summary(&sub.stats()))?;
                        if !terminal {
                            writeln!(out)?;
                        }
                    }
                    out.flush()?;
                    if args.once {
                        break;
                    }
                }
                _ = model_tick.tick() => models.tick(),
                s = sub.next() => match s {
                    // A copy another relay delivered, or an untracked stream's sample, does
                    // not go into the histogram or the models: each iteration counts once.
                    Some(s) if sub.last_observation().is_some_and(|o| o.is_new_iteration()) => {
                        if let Ok(mut e) = exporter.lock() {
                            e.observe(&s);
                        }
                        models.push(&s.metrics);
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.drain()).await;
        anyhow::Ok(())
    })
}
