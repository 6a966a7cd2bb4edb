//! Integration tests of the emitter: in-memory transport for the logic, real ZeroMQ sockets,
//! real upstream Python peers, and (ignored unless a GPU is present) CUDA timing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fpm_emitter::*;
use fpm_schema::{decode, QueuedRequestMetrics, ScheduledRequestMetrics, ScheduledRequestsBuilder};

/// Counts heap allocations made by threads that opted in (the test's scheduler thread).
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

fn config() -> EmitterConfig {
    EmitterConfig::new(Endpoint::Exact("memory".into()), "worker-t", 2).with_clock(ClockChoice::Cpu)
}

fn batch(decodes: i64) -> ScheduledRequestMetrics {
    let mut b = ScheduledRequestsBuilder::new();
    for i in 0..decodes {
        b.add_decode(100 + i);
    }
    b.build()
}

/// One iteration with a single (empty) segment on `stream`; returns what `submit` returned.
fn iteration(e: &mut Emitter, stream: u64) -> Option<DropReason> {
    e.begin_iteration();
    e.time_segment(StreamHandle(stream), || ());
    e.submit(batch(1), QueuedRequestMetrics::default())
}

/// An emitter on a [`ManualClock`] and a [`MemoryTransport`].
fn manual_emitter(cfg: EmitterConfig) -> (Arc<ManualClock>, MemoryTransport, Emitter) {
    let clock = Arc::new(ManualClock::default());
    let t = MemoryTransport::new();
    let e = Emitter::start_with_clock(cfg, t.clone(), clock.clone(), None).unwrap();
    (clock, t, e)
}

/// A clock whose spans complete only when the test says so.
#[derive(Default)]
struct ManualClock {
    next: Mutex<u32>,
    done: Mutex<HashSet<u32>>,
    released: AtomicU64,
}

impl ManualClock {
    fn complete(&self, slot: u32) {
        self.done.lock().unwrap().insert(slot);
    }
}

impl IterationClock for ManualClock {
    fn kind(&self) -> ClockKind {
        ClockKind::Cuda
    }
    fn begin(&self) -> Result<Span, TimingError> {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        Ok(Span {
            slot: *n - 1,
            start: 0,
            end: 0,
        })
    }
    fn mark_start(&self, _: &mut Span, _: StreamHandle) -> Result<(), TimingError> {
        Ok(())
    }
    fn mark_end(&self, _: &mut Span, _: StreamHandle) -> Result<(), TimingError> {
        Ok(())
    }
    fn poll(&self, span: &Span) -> TimingPoll {
        if self.done.lock().unwrap().contains(&span.slot) {
            TimingPoll::Ready(0.001 * (span.slot + 1) as f64)
        } else {
            TimingPoll::Pending
        }
    }
    fn release(&self, _: Span) {
        self.released.fetch_add(1, Ordering::Relaxed);
    }
}

mod logic {
    use super::*;

    #[test]
    fn publishes_every_iteration_with_contiguous_counters() {
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(config(), t.clone()).unwrap();
        assert_eq!(e.clock_kind(), ClockKind::Cpu);
        for i in 0..100 {
            e.begin_iteration();
            e.time_segment(StreamHandle(7), || {
                std::thread::sleep(Duration::from_micros(200))
            });
            assert_eq!(
                e.submit(batch(i % 5), QueuedRequestMetrics::default()),
                None
            );
        }
        let stats = e.shutdown(Duration::from_secs(2));
        assert_eq!(stats.submitted, 100);
        assert_eq!(stats.published, 100);
        assert_eq!(stats.dropped.total(), 0);
        assert_eq!(stats.clock, ClockKind::Cpu);
        let sent = t.sent();
        assert_eq!(sent.len(), 100);
        for (i, m) in sent.iter().enumerate() {
            assert_eq!(m.counter, i as u64);
            let fpm = decode(&m.payload).unwrap();
            assert_eq!(fpm.counter_id, i as i64);
            assert_eq!(fpm.worker_id, "worker-t");
            assert_eq!(fpm.dp_rank, 2);
            assert!(
                fpm.wall_time >= 0.0002 && fpm.wall_time < 0.5,
                "{}",
                fpm.wall_time
            );
            assert_eq!(fpm.scheduled_requests.num_decode_requests, i as i64 % 5);
        }
    }

    #[test]
    fn deferred_completion_publishes_in_iteration_order() {
        let (clock, t, mut e) = manual_emitter(config());
        // Three iterations submitted before any of their GPU work completes.
        for _ in 0..3 {
            iteration(&mut e, 1);
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.sent().is_empty());
        assert_eq!(e.stats().pending_timings, 3);
        // The second completes first: nothing may overtake the first.
        clock.complete(1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.sent().is_empty(), "published out of order");
        clock.complete(0);
        assert!(wait_until(Duration::from_secs(2), || t.sent().len() == 2));
        clock.complete(2);
        assert!(wait_until(Duration::from_secs(2), || t.sent().len() == 3));
        let walls: Vec<f64> = t
            .sent()
            .iter()
            .map(|m| decode(&m.payload).unwrap().wall_time)
            .collect();
        assert_eq!(walls, vec![0.001, 0.002, 0.003]);
        let stats = e.shutdown(Duration::from_millis(100));
        assert_eq!(stats.pending_timings, 0);
        assert_eq!(clock.released.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn shutdown_counts_timings_that_never_complete() {
        let (clock, _t, mut e) = manual_emitter(config());
        for _ in 0..4 {
            iteration(&mut e, 1);
        }
        clock.complete(0);
        let stats = e.shutdown(Duration::from_millis(50));
        assert_eq!(stats.published, 1);
        assert_eq!(stats.dropped.shutdown, 3);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    #[test]
    fn full_queue_drops_are_counted_and_leave_counter_gaps() {
        let mut cfg = config().with_queue_capacity(4);
        cfg.poll_interval = Duration::from_millis(1);
        let (clock, t, mut e) = manual_emitter(cfg);
        // The publisher holds pending work it cannot finish; the queue fills behind it.
        let mut dropped = 0;
        for _ in 0..50 {
            if iteration(&mut e, 1) == Some(DropReason::QueueFull) {
                dropped += 1;
            }
        }
        assert!(dropped > 0);
        for slot in 0..=50 {
            clock.complete(slot);
        }
        assert!(wait_until(Duration::from_secs(2), || e
            .stats()
            .pending_timings
            == 0));
        // One more once the GPU has caught up: its counter sits after the dropped ones.
        assert_eq!(iteration(&mut e, 1), None);
        let stats = e.shutdown(Duration::from_secs(2));
        assert_eq!(stats.dropped.queue_full, dropped);
        assert_eq!(stats.submitted, 51);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
        let counters: Vec<u64> = t.sent().iter().map(|m| m.counter).collect();
        assert_eq!(counters.len() as u64, 51 - dropped);
        assert!(counters.windows(2).all(|w| w[0] < w[1]));
        assert!(
            counters.windows(2).any(|w| w[1] > w[0] + 1),
            "drops must show as gaps"
        );
    }

    #[test]
    fn multi_stream_spans_are_skipped_and_counted() {
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(config(), t.clone()).unwrap();
        e.begin_iteration();
        e.time_segment(StreamHandle(1), || ());
        e.time_segment(StreamHandle(2), || ());
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::MultiStream)
        );
        e.begin_iteration();
        e.time_segment(StreamHandle(1), || ());
        e.time_segment(StreamHandle(1), || ());
        assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
        // An end without a start cannot be measured: dropped and counted.
        e.begin_iteration();
        e.segment_end(StreamHandle(1));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::TimingUnavailable)
        );
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.dropped.timing_unavailable, 1);
        assert_eq!(stats.skipped_multi_stream(), 1);
        assert_eq!(stats.published, 1);
        // The skipped iteration consumed counter 0: the published one is 1.
        assert_eq!(t.sent()[0].counter, 1);
    }

    #[test]
    fn idle_heartbeats_continue_the_counter_sequence() {
        let t = MemoryTransport::new();
        let cfg = config().with_heartbeat_interval(Duration::from_millis(40));
        let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
        for _ in 0..3 {
            e.begin_iteration();
            e.time_segment(StreamHandle(0), || ());
            e.submit(batch(2), QueuedRequestMetrics::default());
        }
        // Not idle: no heartbeats.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(e.stats().heartbeats, 0);
        e.set_idle(true);
        assert!(wait_until(Duration::from_secs(2), || e.stats().heartbeats >= 3));
        e.set_idle(false);
        let stats = e.shutdown(Duration::from_secs(1));
        let sent = t.sent();
        let counters: Vec<u64> = sent.iter().map(|m| m.counter).collect();
        assert_eq!(counters, (0..counters.len() as u64).collect::<Vec<_>>());
        let hb = decode(&sent[3].payload).unwrap();
        assert_eq!(hb.wall_time, 0.0);
        assert_eq!((hb.worker_id.as_str(), hb.dp_rank), ("worker-t", 2));
        assert_eq!(hb.scheduled_requests, ScheduledRequestMetrics::default());
        assert_eq!(stats.heartbeats as usize, sent.len() - 3);
    }

    #[test]
    fn transport_refusals_are_counted_by_reason() {
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(config(), t.clone()).unwrap();
        t.refuse(Some(SendError::NoSubscriber));
        e.submit(batch(1), QueuedRequestMetrics::default());
        assert!(wait_until(Duration::from_secs(2), || e
            .stats()
            .dropped
            .no_subscriber
            == 1));
        t.refuse(Some(SendError::WouldBlock));
        e.submit(batch(1), QueuedRequestMetrics::default());
        assert!(wait_until(Duration::from_secs(2), || e
            .stats()
            .dropped
            .send_hwm
            == 1));
        t.refuse(None);
        e.submit(batch(1), QueuedRequestMetrics::default());
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.published, 1);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    #[test]
    fn submit_does_not_allocate() {
        let t = MemoryTransport::new();
        let mut e =
            Emitter::start_with_transport(config().with_queue_capacity(100_000), t).unwrap();
        let sched = batch(8);
        // Warm up (first use of thread-locals, channel internals).
        for _ in 0..100 {
            e.begin_iteration();
            e.time_segment(StreamHandle(0), || ());
            e.submit(sched, QueuedRequestMetrics::default());
        }
        std::thread::sleep(Duration::from_millis(20));
        ALLOCATIONS.store(0, Ordering::Relaxed);
        COUNTING.with(|c| c.set(true));
        for _ in 0..10_000 {
            e.begin_iteration();
            e.segment_start(StreamHandle(0));
            e.segment_end(StreamHandle(0));
            e.submit(sched, QueuedRequestMetrics::default());
        }
        COUNTING.with(|c| c.set(false));
        let allocs = ALLOCATIONS.load(Ordering::Relaxed);
        e.shutdown(Duration::from_secs(2));
        assert_eq!(
            allocs, 0,
            "the scheduler-side path allocated {allocs} times"
        );
    }

    #[test]
    fn cuda_required_without_gpu_is_a_clear_error_and_auto_falls_back() {
        let cfg = config().with_clock(ClockChoice::Cuda);
        match Emitter::start_with_transport(cfg, MemoryTransport::new()) {
            Err(EmitterError::CudaUnavailable(why)) => assert!(!why.is_empty()),
            Ok(e) => {
                // A machine with a GPU and the cuda feature: fine.
                assert_eq!(e.clock_kind(), ClockKind::Cuda);
            }
            Err(other) => panic!("{other}"),
        }
        let e = Emitter::start_with_transport(
            config().with_clock(ClockChoice::Auto),
            MemoryTransport::new(),
        )
        .unwrap();
        if !cfg!(feature = "cuda") {
            assert_eq!(e.stats().clock, ClockKind::Cpu);
        }
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(matches!(
            Emitter::start_with_transport(config().with_queue_capacity(0), MemoryTransport::new()),
            Err(EmitterError::Config(_))
        ));
        let cfg = EmitterConfig::new(
            Endpoint::TcpPortBase {
                host: "*".into(),
                port_base: 65535,
            },
            "w",
            3,
        );
        assert!(matches!(Emitter::start(cfg), Err(EmitterError::Config(_))));
    }
}

mod zmq_socket {
    use super::*;

    fn sub(addr: &str) -> (zmq::Context, zmq::Socket) {
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::SUB).unwrap();
        s.set_subscribe(b"").unwrap();
        s.set_rcvtimeo(5000).unwrap();
        s.connect(addr).unwrap();
        (ctx, s)
    }

    /// Submits until the first message reaches `s` (the subscription takes a moment to reach
    /// the publisher); returns its frames.
    fn first_message(e: &mut Emitter, s: &zmq::Socket) -> Vec<Vec<u8>> {
        for _ in 0..200 {
            e.submit(batch(2), QueuedRequestMetrics::default());
            if let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                return frames;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no message reached the subscriber");
    }

    #[test]
    fn three_frames_over_ipc_with_stale_socket_file_removed() {
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "fpm");
        // A stale socket file from a crashed engine.
        std::fs::write(dir.path().join("fpm.1"), b"stale").unwrap();
        let cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "w-ipc", 1)
            .with_clock(ClockChoice::Cpu);
        let mut e = Emitter::start(cfg).unwrap();
        assert_eq!(e.endpoint(), format!("{base}.1"));
        // Before anyone subscribes, messages are counted as having no subscriber.
        e.submit(batch(1), QueuedRequestMetrics::default());
        assert!(wait_until(Duration::from_secs(2), || e
            .stats()
            .dropped
            .no_subscriber
            == 1));
        let (_ctx, s) = sub(&format!("{base}.1"));
        let frames = first_message(&mut e, &s);
        assert_eq!(frames.len(), 3);
        assert!(frames[0].is_empty());
        assert_eq!(frames[1].len(), 8);
        let counter = u64::from_be_bytes(frames[1].clone().try_into().unwrap());
        let m = decode(&frames[2]).unwrap();
        assert_eq!(m.counter_id as u64, counter);
        assert_eq!((m.worker_id.as_str(), m.dp_rank), ("w-ipc", 1));
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
        assert!(
            !dir.path().join("fpm.1").exists(),
            "socket file removed on shutdown"
        );
    }

    #[test]
    fn tcp_port_base_plus_rank() {
        let port = free_port();
        let cfg = EmitterConfig::new(
            Endpoint::TcpPortBase {
                host: "127.0.0.1".into(),
                port_base: port - 1,
            },
            "w-tcp",
            1,
        )
        .with_clock(ClockChoice::Cpu);
        let mut e = Emitter::start(cfg).unwrap();
        let (_ctx, s) = sub(&format!("tcp://127.0.0.1:{port}"));
        let frames = first_message(&mut e, &s);
        assert_eq!(decode(&frames[2]).unwrap().dp_rank, 1);
        e.shutdown(Duration::from_secs(1));
    }

    #[test]
    fn subscriber_leaving_is_noticed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "fpm");
        let cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "w", 0)
            .with_clock(ClockChoice::Cpu);
        let mut e = Emitter::start(cfg).unwrap();
        {
            let (_ctx, s) = sub(&format!("{base}.0"));
            first_message(&mut e, &s);
        } // the subscriber goes away
        let before = e.stats().dropped.no_subscriber;
        assert!(wait_until(Duration::from_secs(5), || {
            e.submit(batch(1), QueuedRequestMetrics::default());
            e.stats().dropped.no_subscriber > before
        }));
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    pub(crate) fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }
}

mod interop {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    fn script(name: &str) -> std::path::PathBuf {
        fpm_testkit::repo_root()
            .join("fpm-emitter/tests/python")
            .join(name)
    }

    /// Our emitter → a pyzmq SUB decoding with Dynamo's own `decode()`: every message decodes,
    /// counters are contiguous, heartbeats arrive when idle.
    #[test]
    fn pyzmq_subscriber_decodes_with_dynamo() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "fpm");
        let cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "worker-py", 0)
            .with_clock(ClockChoice::Cpu)
            .with_heartbeat_interval(Duration::from_millis(100));
        let mut e = Emitter::start(cfg).unwrap();
        let mut child = Command::new(py)
            .arg(script("zmq_sub_dynamo.py"))
            .args([
                "--endpoint",
                &format!("{base}.0"),
                "--iterations",
                "200",
                "--timeout",
                "30",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap().trim(), "ready");
        // Let the subscription reach the publisher (counted as no_subscriber until then).
        assert!(wait_until(Duration::from_secs(5), || {
            e.set_idle(true);
            e.stats().heartbeats > 0
        }));
        e.set_idle(false);
        let first = e.stats().heartbeats;
        for i in 0..200 {
            e.begin_iteration();
            e.time_segment(StreamHandle(0), || ());
            e.submit(batch(i % 7), QueuedRequestMetrics::default());
        }
        e.set_idle(true);
        let summary = lines.last().unwrap().unwrap();
        let _ = child.wait();
        let stats = e.shutdown(Duration::from_secs(1));
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(v["decode_failures"], 0, "{v}");
        assert_eq!(v["counter_gaps"], 0, "{v}");
        assert_eq!(v["bad_frames"], 0, "{v}");
        assert_eq!(v["iterations"], 200, "{v}");
        assert!(v["heartbeats"].as_u64().unwrap() >= first.max(1), "{v}");
        assert_eq!(v["heartbeats_after"], 1, "heartbeat after going idle: {v}");
        assert_eq!(v["worker_ids"], serde_json::json!(["worker-py"]), "{v}");
        assert_eq!(stats.published, 200);
    }

    /// Our emitter → Dynamo's own `FpmEventRelay` (ai-dynamo-runtime 1.6.1, file discovery,
    /// NATS event plane, a private nats-server) → Dynamo's `FpmEventSubscriber.recv()`: every
    /// message arrives and decodes with Dynamo's decoder.
    #[test]
    fn through_dynamos_relay_to_dynamos_subscriber() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let kv = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "fpm");
        let cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "worker-dyn", 0)
            .with_clock(ClockChoice::Cpu)
            .with_heartbeat_interval(Duration::from_millis(100));
        let mut e = Emitter::start(cfg).unwrap();
        let mut child = Command::new(py)
            .arg(fpm_testkit::repo_root().join("interop/dynamo_peer.py"))
            .args(["dynamo-relay", "--namespace", "fpmemit", "--zmq-endpoint"])
            .arg(format!("{base}.0"))
            .args(["--count", "100000", "--timeout", "60"])
            .env("DYN_FILE_KV", kv.path())
            .env("NATS_SERVER", nats.url())
            .env("DYN_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let next = |timeout: Duration| rx.recv_timeout(timeout).ok();
        loop {
            let v = next(Duration::from_secs(45)).expect("dynamo-relay never became ready");
            if v["ready"] == true {
                break;
            }
        }
        // Wait for Dynamo's relay to subscribe to our socket (heartbeats then go out).
        e.set_idle(true);
        assert!(wait_until(Duration::from_secs(10), || e.stats().heartbeats > 0));
        e.set_idle(false);
        for i in 0..100 {
            e.begin_iteration();
            e.time_segment(StreamHandle(0), || {
                std::thread::sleep(Duration::from_micros(100))
            });
            e.submit(batch(i % 9 + 1), QueuedRequestMetrics::default());
        }
        let mut counters = Vec::new();
        let mut iterations = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while iterations < 100 && Instant::now() < deadline {
            let Some(v) = next(Duration::from_secs(5)) else {
                break;
            };
            if v.get("hex").is_none() {
                continue;
            }
            let d = &v["decoded"];
            assert!(d.is_object(), "Dynamo could not decode: {v}");
            assert_eq!(d["worker_id"], "worker-dyn");
            counters.push(d["counter_id"].as_u64().unwrap());
            if d["wall_time"].as_f64().unwrap() > 0.0 {
                iterations += 1;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        drop(rx);
        let _ = reader.join();
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(
            iterations, 100,
            "Dynamo's subscriber got {iterations} of 100 iterations"
        );
        assert!(
            counters.windows(2).all(|w| w[1] == w[0] + 1),
            "counters not contiguous: {counters:?}"
        );
        assert_eq!(stats.published, 100);
    }
}

/// Needs an NVIDIA GPU: `cargo test -p fpm-emitter --features cuda -- --ignored --nocapture`.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::CudaContext;

    const BYTES: usize = 1 << 30; // 1 GiB per copy: tens of ms even on an H200

    fn cuda_config() -> EmitterConfig {
        EmitterConfig::new(Endpoint::Exact("memory".into()), "gpu-worker", 0)
            .with_clock(ClockChoice::Cuda)
    }

    /// GPU-timed device-to-device copies agree with an independent host measurement of the
    /// same copy taken after synchronisation.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn times_known_device_work() {
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let src = stream.alloc_zeros::<u8>(BYTES).unwrap();
        let mut dst = stream.alloc_zeros::<u8>(BYTES).unwrap();
        stream.memcpy_dtod(&src, &mut dst).unwrap(); // warm up
        stream.synchronize().unwrap();

        // Independent host measurement: launch, synchronise, wall clock.
        let mut host = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            stream.memcpy_dtod(&src, &mut dst).unwrap();
            stream.synchronize().unwrap();
            host.push(t.elapsed().as_secs_f64());
        }
        host.sort_by(f64::total_cmp);
        let host_median = host[2];

        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        assert_eq!(e.clock_kind(), ClockKind::Cuda);
        let raw = StreamHandle(stream.cu_stream() as u64);
        for _ in 0..5 {
            e.begin_iteration();
            e.time_segment(raw, || stream.memcpy_dtod(&src, &mut dst).unwrap());
            e.submit(batch(1), QueuedRequestMetrics::default());
            stream.synchronize().unwrap();
        }
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 5));
        let mut gpu: Vec<f64> = t
            .sent()
            .iter()
            .map(|m| decode(&m.payload).unwrap().wall_time)
            .collect();
        gpu.sort_by(f64::total_cmp);
        let gpu_median = gpu[2];
        let gbps = 2.0 * BYTES as f64 / gpu_median / 1e9;
        eprintln!(
            "1 GiB dtod copy: GPU events {:.3} ms, host after sync {:.3} ms, {gbps:.0} GB/s read+write",
            gpu_median * 1e3,
            host_median * 1e3
        );
        // GPU time excludes launch and sync overhead, so it is a little below the host figure.
        assert!(
            gpu_median > 0.0 && gpu_median <= host_median * 1.05,
            "{gpu_median} vs {host_median}"
        );
        assert!(
            gpu_median >= host_median * 0.7,
            "{gpu_median} vs {host_median}"
        );
        assert!(
            (50.0..20_000.0).contains(&gbps),
            "implausible bandwidth {gbps}"
        );
        let stats = e.shutdown(Duration::from_secs(5));
        assert_eq!(stats.published, 5);
    }

    /// Iterations are submitted before the previous ones' events complete (the scheduler runs
    /// ahead of the GPU); all are published, in order, once the GPU catches up.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn deferred_completion_under_overlap() {
        let ctx = CudaContext::new(0).unwrap();
        let stream = ctx.new_stream().unwrap();
        let src = stream.alloc_zeros::<u8>(BYTES).unwrap();
        let mut dst = stream.alloc_zeros::<u8>(BYTES).unwrap();
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        let raw = StreamHandle(stream.cu_stream() as u64);
        let launched = Instant::now();
        for _ in 0..10 {
            e.begin_iteration();
            // Two segments per iteration with a host gap: the span covers both.
            e.time_segment(raw, || stream.memcpy_dtod(&src, &mut dst).unwrap());
            e.time_segment(raw, || stream.memcpy_dtod(&src, &mut dst).unwrap());
            assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
        }
        let submit_time = launched.elapsed();
        let pending_while_running = e.stats().pending_timings;
        assert!(
            pending_while_running > 0,
            "GPU finished before the scheduler: not overlapped"
        );
        stream.synchronize().unwrap();
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 10));
        let sent = t.sent();
        let counters: Vec<u64> = sent.iter().map(|m| m.counter).collect();
        assert_eq!(counters, (0..10).collect::<Vec<_>>());
        let walls: Vec<f64> = sent
            .iter()
            .map(|m| decode(&m.payload).unwrap().wall_time)
            .collect();
        eprintln!(
            "10 iterations submitted in {:.3} ms while {pending_while_running} were pending; spans (ms): {:?}",
            submit_time.as_secs_f64() * 1e3,
            walls.iter().map(|w| (w * 1e5).round() / 100.0).collect::<Vec<_>>()
        );
        assert!(walls.iter().all(|&w| w > 0.0));
        let stats = e.shutdown(Duration::from_secs(5));
        assert_eq!(stats.published, 10);
        assert_eq!(stats.dropped.total(), 0);
    }

    /// Without a GPU the cuda build must still start (CPU stand-in) when the clock is `Auto`.
    #[test]
    fn auto_falls_back_when_no_gpu() {
        let e = Emitter::start_with_transport(
            cuda_config().with_clock(ClockChoice::Auto),
            MemoryTransport::new(),
        )
        .unwrap();
        let kind = e.clock_kind();
        assert!(kind == ClockKind::Cuda || kind == ClockKind::Cpu);
    }
}

mod simulation {
    use super::*;
    use fpm_emitter::sim::{self, CostModel, SimConfig};
    use std::sync::atomic::AtomicBool;

    /// Least squares for y = X b (normal equations, Gaussian elimination).
    #[allow(clippy::needless_range_loop)]
    fn fit(xs: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
        let k = xs[0].len();
        let mut a = vec![vec![0.0; k + 1]; k];
        for (x, y) in xs.iter().zip(ys) {
            for i in 0..k {
                for j in 0..k {
                    a[i][j] += x[i] * x[j];
                }
                a[i][k] += x[i] * y;
            }
        }
        for c in 0..k {
            let p = (c..k)
                .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
                .unwrap();
            a.swap(c, p);
            for r in 0..k {
                if r != c {
                    let f = a[r][c] / a[c][c];
                    for j in c..=k {
                        a[r][j] -= f * a[c][j];
                    }
                }
            }
        }
        (0..k).map(|i| a[i][k] / a[i][i]).collect()
    }

    /// The simulated engine publishes per rank through real sockets, with contiguous counters,
    /// and its timings carry the cost model (a regression recovers the prefill slope).
    #[test]
    fn two_ranks_emit_learnable_timings() {
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "sim");
        let mut cfg = SimConfig::new(Endpoint::IpcBase(base.clone()), "sim-worker");
        cfg.dp_size = 2;
        cfg.duration = Duration::from_secs(4);
        cfg.rps = 40.0;
        cfg.prompt_len_mean = 600.0;
        cfg.output_len_mean = 40.0;
        cfg.max_num_batched_tokens = 1024;
        cfg.cost = CostModel {
            base_s: 0.002,
            prefill_token_s: 10e-6,
            decode_kv_token_s: 0.0,
            decode_request_s: 50e-6,
            noise: 0.01,
        };
        let ctx = zmq::Context::new();
        let subs: Vec<zmq::Socket> = (0..2)
            .map(|r| {
                let s = ctx.socket(zmq::SUB).unwrap();
                s.set_subscribe(b"").unwrap();
                s.set_rcvtimeo(100).unwrap();
                s.connect(&format!("{base}.{r}")).unwrap();
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = {
            let cfg = cfg.clone();
            let stop = stop.clone();
            std::thread::spawn(move || sim::run(&cfg, stop))
        };
        let mut got: Vec<Vec<(u64, fpm_schema::ForwardPassMetrics)>> = vec![Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runner.is_finished() && Instant::now() < deadline {
            for (r, s) in subs.iter().enumerate() {
                while let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                    let c = u64::from_be_bytes(frames[1].clone().try_into().unwrap());
                    got[r].push((c, decode(&frames[2]).unwrap()));
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let reports = runner.join().unwrap().unwrap();
        for (r, s) in subs.iter().enumerate() {
            while let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                let c = u64::from_be_bytes(frames[1].clone().try_into().unwrap());
                got[r].push((c, decode(&frames[2]).unwrap()));
            }
        }
        assert_eq!(reports.len(), 2);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for (r, msgs) in got.iter().enumerate() {
            let report = &reports[r];
            assert!(report.iterations > 100, "rank {r}: {report:?}");
            assert!(msgs.len() > 100, "rank {r}: {} messages", msgs.len());
            // After the slow-joiner start, nothing is lost.
            assert!(
                msgs.windows(2).all(|w| w[1].0 == w[0].0 + 1),
                "rank {r} gap"
            );
            for (_, m) in msgs {
                assert_eq!((m.worker_id.as_str(), m.dp_rank), ("sim-worker", r as i64));
                if m.wall_time > 0.0 {
                    let s = &m.scheduled_requests;
                    xs.push(vec![
                        1.0,
                        s.sum_prefill_tokens as f64,
                        s.num_decode_requests as f64,
                    ]);
                    ys.push(m.wall_time);
                }
            }
            let e = report.emitter;
            assert_eq!(e.submitted, e.published + e.dropped.total(), "{e:?}");
        }
        let b = fit(&xs, &ys);
        eprintln!(
            "fit over {} samples: base {:.5} s, prefill {:.3e} s/token, decode {:.3e} s/request",
            ys.len(),
            b[0],
            b[1],
            b[2]
        );
        assert!((b[1] - 10e-6).abs() < 3e-6, "prefill slope {:e}", b[1]);
        assert!(b[0] > 0.0015 && b[0] < 0.004, "intercept {}", b[0]);
    }
}
