//! `fpm demo`: the whole pipeline on one machine. A synthetic fleet (`fpm sim`: workers × dp
//! ranks) publishes over ZeroMQ, one `fpm relay` per worker republishes onto NATS, and a
//! subscriber tracks every stream and fits Dynamo's planner models; the live `fpm watch` table
//! runs meanwhile. At the end: per-stream counts, each model's fit next to the cost model the
//! simulator was given, predicted vs observed wall_time, and a one-line verdict.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use fpm_emitter::Endpoint;
use fpm_relay::{Relay, RelayConfig};
use fpm_sim::{self as sim, CostModel, RankReport, SimConfig};
use fpm_subscriber::planner::{FeedingPolicy, ModelConfig, ModelKind};
use fpm_subscriber::record::Record;
use fpm_subscriber::{unix_now_ns, ScopeFilter, SubjectFilter, Subscriber, SubscriberConfig};
use tokio_util::sync::CancellationToken;

use super::fit::{feature_names, ModelSet};
use super::subscribe::summary;
use super::{parse_duration, shutdown_signal};

/// Arguments of `fpm demo`.
#[derive(Debug, Args)]
#[command(after_help = "\
Event plane: --nats-url when given, else a private nats-server on a free port, else (no
nats-server installed) an in-process event plane, said in one line. Everything the demo starts is stopped when it ends,
also on Ctrl-C, and its temporary directory is removed. Exit 0 only when the verdict is PASS.")]
pub struct DemoArgs {
    /// How long the fleet runs.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Simulated workers (engines), each with its own relay.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,
    /// Data-parallel ranks per worker.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub dp_size: u32,
    /// Request arrivals per second per worker.
    #[arg(long, default_value_t = 40.0)]
    pub rps: f64,
    /// Samples each planner model keeps (Dynamo's default is 64; the demo feeds every
    /// iteration, so it keeps more to fit the whole operating range).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_samples: u64,
    /// Random seed of the simulated traffic.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use this NATS server instead of starting a private one.
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Save the run's `fpm plot` picture here.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
    /// How often the live table is redrawn.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// Where the relays publish and the subscriber reads.
enum Plane {
    Nats(String),
    Memory(fpm_relay::MemoryPlane),
}

/// A child process killed (and waited for) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The verdict's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Messages the emitters published (iterations and heartbeats).
    pub published: u64,
    /// Messages the relays handed to NATS.
    pub relayed: u64,
    /// Messages the subscriber received and decoded.
    pub received: u64,
    /// Dropped by the emitters (any reason; heartbeats included).
    pub emitter_dropped: u64,
    /// Rejected or dropped by the relays.
    pub relay_dropped: u64,
    /// Lost on the way to the subscriber, or rejected by it.
    pub subscriber_lost: u64,
}

impl Tally {
    /// `PASS: …` or `FAIL: …` naming what was lost where.
    pub fn verdict(&self) -> (bool, String) {
        let mut problems = Vec::new();
        if self.emitter_dropped > 0 {
            problems.push(format!("{} dropped by the emitters", self.emitter_dropped));
        }
        if self.relay_dropped > 0 {
            problems.push(format!("{} dropped by the relays", self.relay_dropped));
        }
        if self.relayed != self.published {
            problems.push(format!(
                "{} published but {} relayed",
                self.published, self.relayed
            ));
        }
        if self.received != self.relayed {
            problems.push(format!(
                "{} relayed but {} received",
                self.relayed, self.received
            ));
        }
        if self.subscriber_lost > 0 {
            problems.push(format!(
                "{} lost or rejected before the subscriber",
                self.subscriber_lost
            ));
        }
        if self.published == 0 {
            problems.push("nothing was published".into());
        }
        if problems.is_empty() {
            (
                true,
                format!(
                    "PASS: {} published, {} relayed, {} received, 0 lost",
                    self.published, self.relayed, self.received
                ),
            )
        } else {
            (false, format!("FAIL: {}", problems.join("; ")))
        }
    }
}

/// The coefficients the simulator's cost model implies for each planner model's features.
/// Samples kept for the plot and the predicted-vs-observed error: the run's last ones, so a
/// long run at a high rate stays bounded (about 200 B each).
const MAX_RECORDS: usize = 200_000;

/// Keeps `r`; past [`MAX_RECORDS`] the older half goes (amortised O(1)).
fn keep(records: &mut Vec<Record>, r: Record) {
    if records.len() >= MAX_RECORDS {
        records.drain(..MAX_RECORDS / 2);
    }
    records.push(r);
}

fn given(cost: &CostModel, kind: ModelKind) -> Vec<f64> {
    match kind {
        ModelKind::Prefill => vec![cost.prefill_token_s],
        ModelKind::Decode => vec![cost.decode_request_s, cost.decode_kv_token_s],
        ModelKind::Agg => vec![cost.prefill_token_s, cost.decode_kv_token_s],
    }
}

/// Runs `fpm demo`.
///
/// # Errors
/// The event plane or a stage cannot start; a FAIL verdict is an error too (exit 1) after
/// everything was printed.
pub fn run(args: DemoArgs) -> Result<()> {
    if !(args.rps > 0.0 && args.rps.is_finite()) {
        anyhow::bail!("--rps must be a positive number");
    }
    if args.interval.is_zero() || args.duration.is_zero() {
        anyhow::bail!("--duration and --interval must be positive");
    }
    let tmp = tempfile::Builder::new()
        .prefix("fpm-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    // The event plane: --nats-url, else a private nats-server, else one in this process.
    let (plane, _nats) = match &args.nats_url {
        Some(u) => (Plane::Nats(u.clone()), None),
        None => match fpm_relay::nats::spawn_local_server(tmp.path(), None) {
            Ok((child, port)) => (
                Plane::Nats(format!("nats://127.0.0.1:{port}")),
                Some(Child(child)),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "nats-server is not installed (apt-get install nats-server, or pass --nats-url): \
                     using an in-process event plane instead"
                );
                (
                    Plane::Memory(tokio::sync::broadcast::channel(1 << 16).0),
                    None,
                )
            }
            Err(e) => return Err(e).context("cannot start a private nats-server"),
        },
    };
    let plane_name = match &plane {
        Plane::Nats(u) => u.clone(),
        Plane::Memory(_) => "the in-process event plane".to_owned(),
    };
    let namespace = format!("fpm-demo-{}", std::process::id());
    let cost = CostModel::default();
    println!(
        "fpm demo: {} workers x {} dp ranks for {:.0} s; relays -> {plane_name} (namespace {namespace})",
        args.workers,
        args.dp_size,
        args.duration.as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stop = Arc::new(AtomicBool::new(false));
    let outcome = rt.block_on(async {
        let signal = shutdown_signal()?;
        tokio::pin!(signal);
        // The subscriber first, so it sees every stream from its first message.
        let filter = SubjectFilter::parse(&namespace, "*", "*", ScopeFilter::Endpoint)
            .map_err(|e| anyhow::anyhow!(e))?;
        let (client, mut sub) = match &plane {
            Plane::Nats(url) => {
                let client = async_nats::connect(url)
                    .await
                    .with_context(|| format!("cannot connect to NATS at {url}"))?;
                let sub = Subscriber::subscribe(&client, SubscriberConfig::new(filter)).await?;
                client.flush().await.context("NATS flush")?;
                (Some(client), sub)
            }
            Plane::Memory(tx) => (
                None,
                Subscriber::from_memory(tx.subscribe(), SubscriberConfig::new(filter)),
            ),
        };
        let mut models = ModelSet::new(
            &ModelConfig {
                max_samples: args.max_samples as usize,
                ..ModelConfig::default()
            },
            FeedingPolicy::EveryIteration,
        )?;
        // One relay per worker.
        let relay_stop = CancellationToken::new();
        let mut relays = Vec::new();
        let mut sims = Vec::new();
        for w in 0..args.workers {
            let base = format!("ipc://{}", tmp.path().join(format!("worker{w}")).display());
            let ranks: Vec<u32> = (0..args.dp_size).collect();
            let mut rc = RelayConfig::new(fpm_relay::ipc_endpoints(&base, &ranks));
            rc.namespace.clone_from(&namespace);
            match &plane {
                Plane::Nats(url) => rc.nats.url.clone_from(url),
                Plane::Memory(tx) => rc.plane = fpm_relay::EventPlane::Memory(tx.clone()),
            }
            rc.metrics_addr = None;
            relays.push(Relay::start(rc, relay_stop.clone()).await?);
            let mut sc = SimConfig::new(Endpoint::IpcBase(base), format!("demo-worker-{w}"));
            sc.dp_size = args.dp_size;
            sc.duration = args.duration;
            sc.rps = args.rps;
            sc.prompt_len_mean = 600.0;
            sc.output_len_mean = 200.0;
            sc.seed = args.seed.wrapping_add(u64::from(w) * 1000);
            sc.cost = cost;
            sims.push(sc);
        }
        // The fleet, in threads (the simulator blocks).
        let fleet: Vec<_> = sims
            .into_iter()
            .map(|sc| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    sim::run(&sc, stop).map(|r| {
                        r.into_iter()
                            .map(|x| (sc.worker_id.clone(), x))
                            .collect::<Vec<_>>()
                    })
                })
            })
            .collect();
        let started = Instant::now();
        let terminal = std::io::stdout().is_terminal();
        let redraw = if terminal { args.interval } else { args.interval.max(Duration::from_secs(5)) };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + redraw, redraw);
        let mut records: Vec<Record> = Vec::new();
        let mut interrupted = false;
        let deadline = tokio::time::Instant::now() + args.duration;
        loop {
            tokio::select! {
                biased;
                () = &mut signal => { interrupted = true; stop.store(true, Ordering::Relaxed); break; }
                () = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => {
                    models.tick();
                    let snap = super::watch::snapshot(&sub, &mut models, unix_now_ns());
                    let mut out = std::io::stdout().lock();
                    if terminal {
                        write!(out, "\x1b[H\x1b[2J")?;
                    }
                    writeln!(out, "fpm demo: {:.0}/{:.0} s", started.elapsed().as_secs_f64(), args.duration.as_secs_f64())?;
                    write!(out, "{}", super::watch::table(&snap))?;
                    for line in models.describe() {
                        writeln!(out, "model {line}")?;
                    }
                    out.flush()?;
                }
                s = sub.next() => if let Some(s) = s {
                    if sub.last_observation().is_some_and(|o| o.is_new_iteration()) {
                        models.push(&s.metrics);
                        keep(&mut records, Record::from(&s));
                    }
                },
            }
        }
        // The fleet stops (its emitters flush); then wait for the relays and the subscriber to
        // catch up with what was published, within a few seconds.
        let reports: Vec<(String, RankReport)> = tokio::task::spawn_blocking(move || {
            fleet
                .into_iter()
                // A panicked engine thread is an error, not a quietly missing worker.
                .map(|t| match t.join() {
                    Ok(r) => r.map_err(anyhow::Error::from),
                    Err(_) => Err(anyhow::anyhow!("a simulated engine thread panicked")),
                })
                .collect::<Result<Vec<Vec<(String, RankReport)>>, _>>()
        })
        .await??
        .into_iter()
        .flatten()
        .collect();
        let published: u64 = reports
            .iter()
            .map(|(_, r)| r.emitter.published + r.emitter.heartbeats)
            .sum();
        let settle = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let relayed: u64 = relays.iter().map(|r| r.stats().published).sum();
            if (relayed >= published && sub.stats().samples >= relayed)
                || tokio::time::Instant::now() >= settle
            {
                break;
            }
            if let Ok(Some(s)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
                if sub.last_observation().is_some_and(|o| o.is_new_iteration()) {
                    models.push(&s.metrics);
                    keep(&mut records, Record::from(&s));
                }
            }
        }
        relay_stop.cancel();
        let mut relay_stats = Vec::new();
        for r in relays {
            relay_stats.push(r.wait().await);
        }
        models.tick();
        if let Some(client) = client {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.drain()).await;
        }
        anyhow::Ok((reports, relay_stats, sub, models, records, interrupted))
    });
    stop.store(true, Ordering::Relaxed);
    let (reports, relay_stats, sub, mut models, records, interrupted) = outcome?;

    // Per stream.
    println!();
    println!("per stream (engine -> relay -> subscriber):");
    println!(
        "  {:<16} {:>4} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "worker", "rank", "iterations", "heartbeats", "dropped", "received", "lost"
    );
    for (worker, r) in &reports {
        let st = sub.tracker().get(worker, i64::from(r.dp_rank));
        println!(
            "  {:<16} {:>4} {:>10} {:>10} {:>9} {:>9} {:>8}",
            worker,
            r.dp_rank,
            r.emitter.published,
            r.emitter.heartbeats,
            r.emitter.dropped.total() + r.emitter.heartbeats_dropped,
            st.map_or(0, |s| s.counts.received),
            st.map_or(0, |s| s.counts.gap_messages + s.counts.missed_before_start),
        );
    }
    let stats = sub.stats();
    println!("subscriber: {}", summary(&stats));

    // The models against the cost model the simulator was given.
    println!();
    println!(
        "planner models (fed every iteration) vs the simulator's cost model: wall_time = {:.1} ms \
         + {:.1} us/prefill token + {:.1} ns/decode KV token + {:.1} us/decode request, {:.0}% noise",
        cost.base_s * 1e3,
        cost.prefill_token_s * 1e6,
        cost.decode_kv_token_s * 1e9,
        cost.decode_request_s * 1e6,
        cost.noise * 100.0
    );
    for m in models.models() {
        let kind = m.kind();
        let quality = m.quality();
        match m.fit() {
            Ok(fit) => {
                let coefs: Vec<String> = fit
                    .coef()
                    .iter()
                    .zip(given(&cost, kind))
                    .zip(feature_names(kind))
                    .map(|((c, g), n)| format!("{n} {c:.3e} (given {g:.3e})"))
                    .collect();
                // Predicted vs observed over the iterations kept (the run's last MAX_RECORDS at most).
                let (mut n, mut abs_rel) = (0usize, 0.0f64);
                for r in records.iter().filter(|r| r.metrics.wall_time > 0.0) {
                    let p = fit.predict(&kind.features(&r.metrics));
                    abs_rel += ((p - r.metrics.wall_time) / r.metrics.wall_time).abs();
                    n += 1;
                }
                println!(
                    "  {kind:<7} {}; intercept {:.3} ms; R² {}; predicted vs observed over {n} iterations: mean |error| {:.1}%",
                    coefs.join(", "),
                    fit.intercept() * 1e3,
                    quality.map_or("-".into(), |q| format!("{:.4}", q.r_squared)),
                    if n > 0 { 100.0 * abs_rel / n as f64 } else { 0.0 }
                );
            }
            Err(e) => println!("  {kind:<7} no fit: {e}"),
        }
        if kind == ModelKind::Decode {
            println!(
                "          (Dynamo fits the decode model on decode-only workers; in this aggregated \
                 fleet prefill iterations confound it: the agg model is the one to compare)"
            );
        }
    }
    if let Some(path) = &args.plot {
        if records.is_empty() {
            println!("plot: nothing to draw");
        } else {
            super::plot::draw(
                &records,
                path,
                1400,
                240,
                Some(ModelKind::Agg),
                args.max_samples,
            )?;
            println!("plot: {}", path.display());
        }
    }

    let tally = Tally {
        published: reports
            .iter()
            .map(|(_, r)| r.emitter.published + r.emitter.heartbeats)
            .sum(),
        relayed: relay_stats.iter().map(|s| s.published).sum(),
        received: stats.samples,
        emitter_dropped: reports
            .iter()
            .map(|(_, r)| r.emitter.dropped.total() + r.emitter.heartbeats_dropped)
            .sum(),
        relay_dropped: relay_stats
            .iter()
            .map(|s| s.dropped.total() + s.invalid.total())
            .sum(),
        subscriber_lost: stats.rejected.total()
            + stats.streams.gap_messages
            + stats.streams.missed_before_start
            + stats.sequence.gap_messages
            + stats.slow_consumer_drops,
    };
    drop(tmp);
    if interrupted {
        println!("(interrupted)");
    }
    let (pass, line) = tally.verdict();
    println!("{line}");
    if pass {
        Ok(())
    } else {
        Err(crate::Reported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_bounded_and_keep_the_latest() {
        let mut records = Vec::new();
        let n = MAX_RECORDS * 2 + 7;
        for i in 0..n {
            let mut metrics = fpm_schema::ForwardPassMetrics::heartbeat("w", 0);
            metrics.counter_id = i as i64;
            keep(
                &mut records,
                Record {
                    received_at_ns: 0,
                    publisher_id: 0,
                    sequence: i as u64,
                    metrics,
                },
            );
        }
        assert!(records.len() <= MAX_RECORDS);
        assert_eq!(records.last().unwrap().metrics.counter_id, n as i64 - 1);
        let first = records[0].metrics.counter_id;
        assert!(records
            .iter()
            .zip(first..)
            .all(|(r, c)| r.metrics.counter_id == c));
    }

    #[test]
    fn verdicts() {
        let ok = Tally {
            published: 10,
            relayed: 10,
            received: 10,
            ..Tally::default()
        };
        assert_eq!(
            ok.verdict(),
            (
                true,
                "PASS: 10 published, 10 relayed, 10 received, 0 lost".into()
            )
        );
        let lost = Tally {
            received: 9,
            subscriber_lost: 1,
            ..ok
        };
        let (pass, line) = lost.verdict();
        assert!(!pass);
        assert_eq!(
            line,
            "FAIL: 10 relayed but 9 received; 1 lost or rejected before the subscriber"
        );
        let (pass, line) = Tally::default().verdict();
        assert!(!pass && line.contains("nothing was published"), "{line}");
    }
}
