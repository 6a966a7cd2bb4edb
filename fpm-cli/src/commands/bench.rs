//! `fpm bench`: the real pipeline (our emitter → a relay process → a private nats-server →
//! a subscriber) at fixed rates, one table per rate; with `--peer dynamo`, Dynamo 1.6.1's
//! `FpmEventRelay` in place of ours in the same run, and the ratio; with `--peer floor`, a
//! relay that does nothing but the kernel work every relay pays ([`floor`]), as a yardstick.
//!
//! Latency is from `submit` on the scheduler thread to receipt by the subscriber, paired by
//! `counter_id`, on one clock (both ends live in this process), over the window's first
//! [`LATENCY_SAMPLES`] iterations. Relay CPU time (nanoseconds, summed over its threads'
//! `schedstat`) and peak RSS come from `/proc/<pid>` of the relay process (for the floor, a
//! thread of the bench: its threads' `schedstat`, and no RSS); the subscriber's CPU from its
//! own thread's `/proc/self/task/<tid>/schedstat`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fpm_emitter::{ClockChoice, Emitter, EmitterConfig, Endpoint, StreamHandle};
use fpm_schema::{QueuedRequestMetrics, ScheduledRequestsBuilder};

use super::parse_duration;

mod floor;

/// The Dynamo namespace every relay in the bench publishes under (the subscriber's filter).
const NAMESPACE: &str = "bench";

/// A rate to drive the pipeline at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BenchRate {
    /// Messages per second.
    PerSecond(f64),
    /// As fast as the emitter's hot loop goes.
    Max,
}

impl std::fmt::Display for BenchRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchRate::PerSecond(r) => write!(f, "{r} msg/s"),
            BenchRate::Max => f.write_str("max"),
        }
    }
}

fn parse_rate(s: &str) -> Result<BenchRate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(BenchRate::Max);
    }
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(BenchRate::PerSecond(r)),
        _ => Err(format!(
            "{s:?}: a rate is messages per second (> 0) or `max`"
        )),
    }
}

/// Which relay to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// Dynamo 1.6.1's `FpmEventRelay` (ai-dynamo-runtime, from the contract venv).
    Dynamo,
    /// The floor: a thread of the bench doing one blocking read and one write per message
    /// (no validation, buffering, metrics or reconnects), the kernel work any relay pays.
    Floor,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Dynamo => "dynamo",
            Peer::Floor => "floor",
        }
    }
}

/// Arguments of `fpm bench`.
#[derive(Debug, Args)]
#[command(after_help = "\
Needs nats-server. With --peer dynamo, run it from the repository: the Python venv is made by
contract-tests/setup.sh. Results also go to a markdown file under --output-dir.")]
pub struct BenchArgs {
    /// Rates to drive, comma-separated: messages per second, or `max`.
    #[arg(long, value_delimiter = ',', default_value = "1000,20000,max", value_parser = parse_rate)]
    pub rates: Vec<BenchRate>,
    /// How long each rate is driven.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Also run these relays in place of ours, in the same run (comma-separated); ratios are
    /// to Dynamo's when it runs, else to the first peer.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub peer: Vec<Peer>,
    /// Where the markdown results are written (`off` for nowhere).
    #[arg(long, default_value = "bench/results")]
    pub output_dir: PathBuf,
    /// With --peer: drive each rate this many times per relay, each round starting with a
    /// different relay, and add the median and range of the rounds' ratios (a noisy machine
    /// moves single runs a lot).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
}

/// One relay's figures at one rate.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// `fpm`, `dynamo` or `floor`.
    pub relay: &'static str,
    /// Iterations submitted during the measured window.
    pub sent: u64,
    /// Of which received by the subscriber.
    pub delivered: u64,
    /// Dropped by the emitter (queue full, no subscriber, ...).
    pub lost_emitter: u64,
    /// Lost between the emitter's socket and the subscriber (relay, NATS, subscriber).
    pub lost_after: u64,
    /// Of those, dropped or rejected by the relay by its own count (ours only).
    pub lost_relay: Option<u64>,
    /// Latency quantiles, microseconds: p50, p99, p99.9.
    pub latency_us: [f64; 3],
    /// Relay CPU time per delivered message, microseconds.
    pub relay_cpu_us: f64,
    /// Relay peak resident memory, MiB (NaN for the floor, a thread of the bench).
    pub relay_rss_mib: f64,
    /// Subscriber CPU time per delivered message, microseconds.
    pub subscriber_cpu_us: f64,
}

/// Kills and reaps on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The relay under test: a process (ours, Dynamo's) or the floor, a thread of the bench.
enum Relay {
    Process(Child),
    Floor(floor::FloorRelay),
}

impl Relay {
    fn cpu(&self) -> CpuSnapshot {
        match self {
            Relay::Process(c) => process_cpu(c.0.id()),
            Relay::Floor(f) => CpuSnapshot {
                ticks_s: 0.0,
                schedstat_s: f.cpu_ns() as f64 / 1e9,
            },
        }
    }

    /// Peak RSS of the process; NaN for the floor (its memory is the bench's).
    fn peak_rss_mib(&self) -> f64 {
        match self {
            Relay::Process(c) => process_peak_rss_mib(c.0.id()),
            Relay::Floor(_) => f64::NAN,
        }
    }
}

/// CPU time a process has used, read two ways: `/proc/<pid>/stat` (user + system, in 10 ms
/// ticks, including threads that have ended) and the sum of `/proc/<pid>/task/*/schedstat`
/// (nanoseconds, live threads only).
#[derive(Debug, Clone, Copy, Default)]
struct CpuSnapshot {
    ticks_s: f64,
    schedstat_s: f64,
}

fn process_cpu(pid: u32) -> CpuSnapshot {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return CpuSnapshot::default();
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            ns += thread_cpu_ns(&t.path().join("schedstat"));
        }
    }
    CpuSnapshot {
        // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'.
        ticks_s: (ticks(11) + ticks(12)) / 100.0,
        schedstat_s: ns as f64 / 1e9,
    }
}

impl CpuSnapshot {
    /// CPU seconds from `self` to `later`: the nanosecond count, unless a thread ended in
    /// between (the tick count is then more than two ticks above it), where the ticks are
    /// all there is.
    fn until(self, later: CpuSnapshot) -> f64 {
        let precise = later.schedstat_s - self.schedstat_s;
        let coarse = later.ticks_s - self.ticks_s;
        if coarse > precise + 0.02 {
            coarse
        } else {
            precise
        }
    }
}

/// Peak resident memory of a process (VmHWM), MiB.
fn process_peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Iterations per rate whose latency is measured (the window's first ones): bounds the
/// bench's memory at `--rate max` over a long `--duration` (40 B per iteration). Delivery is
/// counted over the whole window regardless.
const LATENCY_SAMPLES: u64 = 5_000_000;

/// The calling thread's `schedstat` path, for another thread to read its CPU time.
fn own_schedstat_path() -> std::io::Result<PathBuf> {
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    Ok(Path::new("/proc")
        .join(std::fs::read_link("/proc/thread-self")?)
        .join("schedstat"))
}

/// CPU nanoseconds of the thread whose `schedstat` is at `path` (0 if unreadable).
fn thread_cpu_ns(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The subscriber thread: receipt instants by counter (the window's first
/// [`LATENCY_SAMPLES`]), what it delivered, and its CPU time (read from outside it, so the
/// measurement costs it nothing).
struct SubscriberThread {
    received: Arc<Mutex<Vec<(u64, Instant)>>>,
    count: Arc<AtomicU64>,
    /// The window's first counter (`u64::MAX` before it opens).
    window_first: Arc<AtomicU64>,
    /// Iterations (heartbeats excluded) with a counter in the window, delivered.
    in_window: Arc<AtomicU64>,
    schedstat: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SubscriberThread {
    fn start(nats_url: &str) -> Result<Self> {
        let received = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let count = Arc::new(AtomicU64::new(0));
        let window_first = Arc::new(AtomicU64::new(u64::MAX));
        let in_window = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<PathBuf, String>>();
        let (r, c, wf, iw, url) = (
            received.clone(),
            count.clone(),
            window_first.clone(),
            in_window.clone(),
            nats_url.to_owned(),
        );
        let thread = std::thread::Builder::new()
            .name("fpm-bench-sub".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = match async_nats::ConnectOptions::new()
                        .subscription_capacity(1 << 20)
                        .connect(url.as_str())
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    // Our subscriber as users run it: envelope and payload decoded, stream
                    // tracked.
                    let filter = fpm_subscriber::SubjectFilter::parse(
                        NAMESPACE,
                        "*",
                        "*",
                        fpm_subscriber::ScopeFilter::Endpoint,
                    )
                    .expect("valid names");
                    let mut sub = match fpm_subscriber::Subscriber::subscribe(
                        &client,
                        fpm_subscriber::SubscriberConfig::new(filter),
                    )
                    .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = client.flush().await;
                    let _ = ready_tx.send(own_schedstat_path().map_err(|e| e.to_string()));
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => break,
                            s = sub.next() => {
                                let Some(s) = s else { break };
                                let now = Instant::now();
                                let counter = s.metrics.counter_id as u64;
                                let first = wf.load(Ordering::Relaxed);
                                if !s.is_heartbeat() && counter >= first {
                                    iw.fetch_add(1, Ordering::Relaxed);
                                    if counter - first < LATENCY_SAMPLES {
                                        if let Ok(mut v) = r.lock() {
                                            v.push((counter, now));
                                        }
                                    }
                                }
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            })
            .context("cannot start the subscriber thread")?;
        let schedstat = match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(path)) => path,
            Ok(Err(e)) => bail!("the bench subscriber cannot start: {e}"),
            Err(_) => bail!("the bench subscriber did not start"),
        };
        Ok(SubscriberThread {
            received,
            count,
            window_first,
            in_window,
            schedstat,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for SubscriberThread {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn batch(i: u64) -> fpm_schema::ScheduledRequestMetrics {
    let mut b = ScheduledRequestsBuilder::new();
    for k in 0..8 {
        b.add_decode(1000 + (i % 97) as i64 + 31 * k);
    }
    b.build()
}

/// One relay at one rate.
fn run_one(args: &BenchArgs, rate: BenchRate, peer: Option<Peer>, tmp: &Path) -> Result<Row> {
    let dir = tempfile::tempdir_in(tmp)?;
    let (nats_child, port) =
        fpm_relay::nats::spawn_local_server(dir.path(), None).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("nats-server is not installed: apt-get install nats-server")
            }
            _ => anyhow::anyhow!("cannot start nats-server: {e}"),
        })?;
    let _nats = Child(nats_child);
    let nats_url = format!("nats://127.0.0.1:{port}");
    let ipc_path = dir.path().join("eng.0");
    let endpoint = format!("ipc://{}", ipc_path.display());
    // The emitter binds first (Dynamo's relay does not pick up a PUB bound after it).
    let mut cfg = EmitterConfig::new(Endpoint::Exact(endpoint.clone()), "bench-worker", 0)
        .with_clock(ClockChoice::Cpu);
    cfg.queue_capacity = 100_000;
    let mut emitter = Emitter::start(cfg)?;
    let sub = SubscriberThread::start(&nats_url)?;
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let relay = match peer {
        None => Relay::Process(Child(
            Command::new(std::env::current_exe()?)
                .args(["-q", "relay", "--zmq-endpoint", &endpoint])
                .args(["--namespace", NAMESPACE, "--nats-url", &nats_url])
                .args(["--metrics-addr", &metrics_addr])
                .stdout(Stdio::null())
                .spawn()
                .context("cannot start the relay")?,
        )),
        Some(Peer::Floor) => {
            // Where ours publishes: its defaults, in the bench's namespace.
            let d = fpm_relay::RelayConfig::new(Vec::new());
            let subject =
                fpm_schema::FpmSubject::new(d.scope, NAMESPACE, &d.component, &d.endpoint)?
                    .subject();
            Relay::Floor(floor::FloorRelay::start(
                &ipc_path,
                &format!("127.0.0.1:{port}"),
                &subject,
            )?)
        }
        Some(Peer::Dynamo) => {
            let py = python()?;
            let kv = dir.path().join("kv");
            std::fs::create_dir_all(&kv)?;
            Relay::Process(Child(
                Command::new(py)
                    .arg("interop/dynamo_peer.py")
                    .args([
                        "dynamo-relay-only",
                        "--namespace",
                        NAMESPACE,
                        "--timeout",
                        "3600",
                    ])
                    .args(["--zmq-endpoint", &endpoint])
                    .env("DYN_FILE_KV", &kv)
                    .env("NATS_SERVER", &nats_url)
                    .env("DYN_LOG", "error")
                    .stdout(Stdio::null())
                    .spawn()
                    .context("cannot start Dynamo's relay")?,
            ))
        }
    };
    // Warm up: until messages come through end to end.
    let warm = Instant::now();
    while sub.count.load(Ordering::Relaxed) < 20 {
        if warm.elapsed() > Duration::from_secs(60) {
            bail!("nothing reached the subscriber within 60 s (relay not up?)");
        }
        emitter.begin_iteration();
        emitter.time_segment(StreamHandle::DEFAULT, || ());
        emitter.submit(batch(0), QueuedRequestMetrics::default());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let first = emitter.stats().submitted;
    let dropped_before = emitter.stats().dropped.total();
    let count_before = sub.count.load(Ordering::Relaxed);
    let relay_cpu0 = relay.cpu();
    let relay_counts0 = relay_counts(&metrics_addr, peer);
    let sub_cpu0 = thread_cpu_ns(&sub.schedstat);
    sub.window_first.store(first, Ordering::Relaxed);
    // Drive.
    let mut submitted_at: Vec<Instant> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < args.duration {
        if let BenchRate::PerSecond(r) = rate {
            let next = start + Duration::from_secs_f64(i as f64 / r);
            while Instant::now() < next {
                std::hint::spin_loop();
            }
        }
        emitter.begin_iteration();
        emitter.time_segment(StreamHandle::DEFAULT, || ());
        if i < LATENCY_SAMPLES {
            submitted_at.push(Instant::now());
        }
        emitter.submit(batch(i), QueuedRequestMetrics::default());
        i += 1;
    }
    let sent = i;
    // Drain: until everything arrived, or nothing moves for 2 s.
    let mut last = sub.count.load(Ordering::Relaxed);
    let mut still = Instant::now();
    while sub.count.load(Ordering::Relaxed) < count_before + sent
        && still.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(50));
        let now = sub.count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still = Instant::now();
        }
    }
    let relay_cpu = relay_cpu0.until(relay.cpu());
    let lost_relay = match (relay_counts0, relay_counts(&metrics_addr, peer)) {
        (Some((r0, p0)), Some((r1, p1))) => Some((r1 - r0).saturating_sub(p1 - p0)),
        _ => None,
    };
    let relay_rss = relay.peak_rss_mib();
    let sub_cpu = thread_cpu_ns(&sub.schedstat).saturating_sub(sub_cpu0);
    let lost_emitter = emitter.stats().dropped.total() - dropped_before;
    let mut latencies: Vec<f64> = Vec::new();
    // The emitter submits nothing after the window, and heartbeats are not counted.
    let delivered = sub.in_window.load(Ordering::Relaxed).min(sent);
    if let Ok(v) = sub.received.lock() {
        for &(c, at) in v.iter() {
            if let Some(sub_at) = submitted_at.get((c - first) as usize) {
                latencies.push(at.saturating_duration_since(*sub_at).as_secs_f64() * 1e6);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    drop(sub);
    drop(relay);
    emitter.shutdown(Duration::from_millis(200));
    let per = |x: f64| {
        if delivered > 0 {
            x / delivered as f64
        } else {
            f64::NAN
        }
    };
    Ok(Row {
        relay: peer.map_or("fpm", Peer::name),
        sent,
        delivered,
        lost_emitter,
        lost_after: sent.saturating_sub(delivered + lost_emitter),
        lost_relay,
        latency_us: [
            quantile(&latencies, 0.5),
            quantile(&latencies, 0.99),
            quantile(&latencies, 0.999),
        ],
        relay_cpu_us: per(relay_cpu * 1e6),
        relay_rss_mib: relay_rss,
        subscriber_cpu_us: per(sub_cpu as f64 / 1e3),
    })
}

/// Our relay's (received, published) from its /metrics; `None` for the peer or on failure.
fn relay_counts(addr: &str, peer: Option<Peer>) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    if peer.is_some() {
        return None;
    }
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let value = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    Some((
        value("fpm_relay_received_messages_total")?,
        value("fpm_relay_published_messages_total")?,
    ))
}

/// The contract venv's python (made by `contract-tests/setup.sh`, which this runs).
fn python() -> Result<PathBuf> {
    if !Path::new("contract-tests/setup.sh").is_file()
        || !Path::new("interop/dynamo_peer.py").is_file()
    {
        bail!("--peer dynamo runs from the repository root (it needs contract-tests/setup.sh and interop/dynamo_peer.py)");
    }
    let out = Command::new("bash")
        .arg("contract-tests/setup.sh")
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run contract-tests/setup.sh")?;
    if !out.status.success() {
        bail!("contract-tests/setup.sh failed: cannot make the Python venv with Dynamo's relay");
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

fn table(rate: BenchRate, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n### {rate}\n");
    let _ = writeln!(
        s,
        "| relay | sent | delivered | lost: emitter | lost: after the emitter | of which the relay's own count | latency p50 µs | p99 µs | p99.9 µs | relay CPU µs/msg | relay peak RSS MiB | subscriber CPU µs/msg |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {:.2} |",
            r.relay,
            r.sent,
            r.delivered,
            r.lost_emitter,
            r.lost_after,
            r.lost_relay.map_or("-".into(), |n| n.to_string()),
            r.latency_us[0],
            r.latency_us[1],
            r.latency_us[2],
            r.relay_cpu_us,
            if r.relay_rss_mib.is_finite() {
                format!("{:.1}", r.relay_rss_mib)
            } else {
                "-".into()
            },
            r.subscriber_cpu_us
        );
    }
    if let Some(reference) = reference(rows) {
        let q = |a: f64, b: f64| ratio(a, b).map_or("-".into(), |r| format!("{r:.2}"));
        for r in rows.iter().filter(|r| r.relay != reference.relay) {
            let _ = writeln!(
                s,
                "| {} / {} | | {} | | | | {} | {} | {} | {} | {} | {} |",
                r.relay,
                reference.relay,
                q(r.delivered as f64, reference.delivered as f64),
                q(r.latency_us[0], reference.latency_us[0]),
                q(r.latency_us[1], reference.latency_us[1]),
                q(r.latency_us[2], reference.latency_us[2]),
                q(r.relay_cpu_us, reference.relay_cpu_us),
                q(r.relay_rss_mib, reference.relay_rss_mib),
                q(r.subscriber_cpu_us, reference.subscriber_cpu_us)
            );
        }
    }
    s
}

/// `a / b` where both were measured (`b` above zero, `a` a number).
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// What the other rows are divided by: Dynamo's when it ran, else the first peer's; `None`
/// with ours alone.
fn reference(rows: &[Row]) -> Option<&Row> {
    rows.iter()
        .find(|r| r.relay == "dynamo")
        .or_else(|| rows.iter().find(|r| r.relay != "fpm"))
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let nats = Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{cores} cores, Linux {kernel}, {nats}, fpm {}",
        env!("CARGO_PKG_VERSION")
    )
}

/// A number from a one-line JSON object printed by a helper script.
fn json_field(text: &str, key: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    v.get(key)?.as_f64()
}

/// The scheduler-side cost of our `submit` (median of 20 batches of 1,000, the queue drained
/// between batches so every call is a real hand-over), ns per call.
fn submit_cost_ns(tmp: &Path) -> Result<f64> {
    let endpoint = format!("ipc://{}", tmp.join("cost.0").display());
    let mut cfg = EmitterConfig::new(Endpoint::Exact(endpoint), "bench-worker", 0)
        .with_clock(ClockChoice::Cpu);
    cfg.first_subscriber_wait = Duration::ZERO;
    let mut e = Emitter::start(cfg)?;
    let (sched, queued) = (batch(1), QueuedRequestMetrics::default());
    let mut per_call = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        while e.stats().pending_timings > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(e.submit(std::hint::black_box(sched), queued));
        }
        per_call.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    e.shutdown(Duration::from_millis(100));
    per_call.sort_by(f64::total_cmp);
    Ok(per_call[per_call.len() / 2])
}

/// Best of 5 runs of `n` calls, ns per call.
fn best_ns(n: u32, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Same-run comparisons with the upstream Python code (needs the contract venv): the
/// scheduler-side hand-over against SGLang's `_FpmPublisherThread.publish()`, and the codec
/// against msgspec, like for like.
fn upstream_comparisons(tmp: &Path) -> Result<String> {
    let py = python()?;
    let mut s =
        String::from("\n### Same run: scheduler-side hand-over and codec vs upstream Python\n\n");
    let _ = writeln!(s, "| what | fpm | upstream | upstream / fpm |");
    let _ = writeln!(s, "| --- | ---: | ---: | ---: |");
    let out = Command::new(&py)
        .args(["interop/dynamo_peer.py", "sglang-publish-cost"])
        .output()
        .context("cannot time SGLang's publisher")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ours = submit_cost_ns(tmp)?;
    if let (Some(p), Some(bp)) = (
        json_field(&text, "publish_ns"),
        json_field(&text, "build_and_publish_ns"),
    ) {
        let _ = writeln!(
            s,
            "| per-iteration hand-over: `Emitter::submit` vs SGLang `_FpmPublisherThread.publish()` | {ours:.0} ns | {p:.0} ns | {:.1}x |",
            p / ours
        );
        let _ = writeln!(
            s,
            "| … SGLang building the ForwardPassMetrics and publishing it | | {bp:.0} ns | {:.1}x |",
            bp / ours
        );
    } else {
        let _ = writeln!(s, "| SGLang publisher timing failed | | | |");
    }
    let iterations = 200_000u32;
    let out = Command::new(&py)
        .args([
            "contract-tests/python/fpmcontract.py",
            "bench",
            "--module",
            "dynamo",
        ])
        .args(["--iterations", &iterations.to_string()])
        .output()
        .context("cannot time msgspec")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap_or(""))
        .ok()
        .and_then(|v| v.get("hex").and_then(|h| h.as_str()).map(str::to_owned))
        .context("msgspec timing printed no message")?;
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect();
    let m = fpm_schema::decode(&bytes).context("msgspec's bench message does not decode")?;
    let mut buf = Vec::with_capacity(1024);
    let enc = best_ns(iterations, || {
        fpm_schema::encode_into(std::hint::black_box(&m), &mut buf)
    });
    let dec = best_ns(iterations, || {
        std::hint::black_box(fpm_schema::decode(std::hint::black_box(&bytes)).ok());
    });
    for (what, ours, key) in [
        (
            "encode into a reused buffer (msgspec `Encoder.encode_into`)",
            enc,
            "encode_into_ns",
        ),
        (
            "decode to a new struct (msgspec `Decoder(ForwardPassMetrics).decode`)",
            dec,
            "decode_ns",
        ),
    ] {
        if let Some(t) = json_field(&text, key) {
            let _ = writeln!(
                s,
                "| {what}, {} B | {ours:.1} ns | {t:.1} ns | {:.1}x |",
                bytes.len(),
                t / ours
            );
        }
    }
    Ok(s)
}

/// The median and range, over repeated rounds, of each relay's ratios to the reference
/// ([`reference`]): one table row per relay.
fn ratio_summary(rate: BenchRate, rounds: &[Vec<Row>]) -> String {
    let Some(reference) = rounds.first().and_then(|r| reference(r)).map(|r| r.relay) else {
        return String::new();
    };
    let mut names: Vec<&'static str> = Vec::new();
    for r in rounds.iter().flatten() {
        if r.relay != reference && !names.contains(&r.relay) {
            names.push(r.relay);
        }
    }
    let stat = |name: &str, f: &dyn Fn(&Row) -> f64| -> String {
        let mut r: Vec<f64> = rounds
            .iter()
            .filter_map(|round| {
                let of = |n: &str| round.iter().find(|r| r.relay == n).map(f);
                ratio(of(name)?, of(reference)?)
            })
            .collect();
        if r.is_empty() {
            return "-".into();
        }
        r.sort_by(f64::total_cmp);
        let n = r.len();
        let median = if n % 2 == 1 {
            r[n / 2]
        } else {
            (r[n / 2 - 1] + r[n / 2]) / 2.0
        };
        format!("{median:.2} ({:.2}–{:.2})", r[0], r[n - 1])
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n### {rate}: ratios to {reference} over {} rounds, median (min–max)\n",
        rounds.len()
    );
    let _ = writeln!(
        s,
        "| relay | latency p50 | p99 | p99.9 | relay CPU per message | relay peak RSS |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |");
    for name in names {
        let _ = writeln!(
            s,
            "| {name} / {reference} | {} | {} | {} | {} | {} |",
            stat(name, &|r| r.latency_us[0]),
            stat(name, &|r| r.latency_us[1]),
            stat(name, &|r| r.latency_us[2]),
            stat(name, &|r| r.relay_cpu_us),
            stat(name, &|r| r.relay_rss_mib)
        );
    }
    s
}

/// Runs `fpm bench`.
///
/// # Errors
/// A stage that cannot start, or results that cannot be written.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let tmp = tempfile::Builder::new().prefix("fpm-bench-").tempdir()?;
    let mut report = format!(
        "# fpm bench\n\nMachine: {}. Each rate driven for {:.1} s through emitter → relay process → nats-server → subscriber, all on this machine. Latency: submit on the scheduler thread → receipt by the subscriber (one clock). Relay CPU (summed over its threads' schedstat, ns) and peak RSS from /proc of the relay process; subscriber CPU from its thread.\n",
        machine(),
        args.duration.as_secs_f64()
    );
    let mut relays: Vec<Option<Peer>> = vec![None];
    for &p in &args.peer {
        if !relays.contains(&Some(p)) {
            relays.push(Some(p));
        }
    }
    for &rate in &args.rates {
        let mut rounds = Vec::new();
        for i in 0..args.repeat as usize {
            // Each round starts with the next relay, so drift on the machine favours none;
            // the table keeps one order.
            let mut rows: Vec<(usize, Row)> = Vec::new();
            for k in 0..relays.len() {
                let j = (i + k) % relays.len();
                rows.push((j, run_one(&args, rate, relays[j], tmp.path())?));
            }
            rows.sort_by_key(|(j, _)| *j);
            let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
            let t = table(rate, &rows);
            print!("{t}");
            report.push_str(&t);
            rounds.push(rows);
        }
        if relays.len() > 1 && rounds.len() > 1 {
            let t = ratio_summary(rate, &rounds);
            print!("{t}");
            report.push_str(&t);
        }
    }
    if args.peer.contains(&Peer::Dynamo) {
        let t = upstream_comparisons(tmp.path())?;
        print!("{t}");
        report.push_str(&t);
    } else {
        println!("\n(same-run comparisons with SGLang's publisher and msgspec: add --peer dynamo)");
    }
    if args.output_dir.as_os_str() != "off" {
        std::fs::create_dir_all(&args.output_dir)
            .with_context(|| format!("cannot create {}", args.output_dir.display()))?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = args.output_dir.join(format!("bench-{secs}.md"));
        std::fs::write(&path, &report)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nresults: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(relay: &'static str, p50: f64, cpu: f64) -> Row {
        Row {
            relay,
            latency_us: [p50, 2.0 * p50, 4.0 * p50],
            relay_cpu_us: cpu,
            relay_rss_mib: 10.0,
            ..Row::default()
        }
    }

    fn floor(p50: f64, cpu: f64) -> Row {
        Row {
            relay_rss_mib: f64::NAN,
            ..row("floor", p50, cpu)
        }
    }

    #[test]
    fn the_summary_is_the_median_and_range_of_the_round_ratios() {
        let rounds = vec![
            vec![
                row("fpm", 50.0, 10.0),
                row("dynamo", 100.0, 40.0),
                floor(20.0, 4.0),
            ],
            vec![
                row("fpm", 90.0, 30.0),
                row("dynamo", 100.0, 40.0),
                floor(40.0, 8.0),
            ],
            vec![
                row("fpm", 60.0, 20.0),
                row("dynamo", 100.0, 40.0),
                floor(30.0, 12.0),
            ],
            // A reference figure of zero (nothing measured) is left out, not divided by.
            vec![
                row("fpm", 60.0, 20.0),
                row("dynamo", 0.0, 0.0),
                floor(1.0, 1.0),
            ],
        ];
        let s = ratio_summary(BenchRate::PerSecond(1000.0), &rounds);
        assert!(s.contains("ratios to dynamo over 4 rounds"), "{s}");
        // p50 ratios 0.5, 0.9, 0.6: median 0.6; CPU 0.25, 0.75, 0.5: median 0.5; RSS 1.0.
        assert!(
            s.contains("| fpm / dynamo | 0.60 (0.50–0.90) | 0.60 (0.50–0.90) | 0.60 (0.50–0.90) | 0.50 (0.25–0.75) | 1.00 (1.00–1.00) |"),
            "{s}"
        );
        // The floor has no RSS of its own: no ratio, rather than NaN.
        assert!(
            s.contains("| floor / dynamo | 0.30 (0.20–0.40) | 0.30 (0.20–0.40) | 0.30 (0.20–0.40) | 0.20 (0.10–0.30) | - |"),
            "{s}"
        );
        // Without Dynamo the first peer is the reference.
        let t = table(
            BenchRate::PerSecond(1000.0),
            &[row("fpm", 50.0, 10.0), floor(25.0, 5.0)],
        );
        assert!(
            t.contains("| fpm / floor | | - | | | | 2.00 | 2.00 | 2.00 | 2.00 | - | - |"),
            "{t}"
        );
        assert!(
            t.contains("| floor | 0 | 0 | 0 | 0 | - | 25 | 50 | 100 | 5.00 | - | 0.00 |"),
            "{t}"
        );
        // Ours alone: no ratio row.
        let t = table(BenchRate::PerSecond(1000.0), &[row("fpm", 50.0, 10.0)]);
        assert!(!t.contains(" / "), "{t}");
    }
}
