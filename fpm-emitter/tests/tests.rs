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
        let clock = Arc::new(ManualClock::default());
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_clock(config(), t.clone(), clock.clone(), None).unwrap();
        // Three iterations submitted before any of their GPU work completes.
        for _ in 0..3 {
            e.begin_iteration();
            e.time_segment(StreamHandle(1), || ());
            e.submit(batch(1), QueuedRequestMetrics::default());
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
        let clock = Arc::new(ManualClock::default());
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_clock(config(), t.clone(), clock.clone(), None).unwrap();
        for _ in 0..4 {
            e.begin_iteration();
            e.time_segment(StreamHandle(1), || ());
            e.submit(batch(1), QueuedRequestMetrics::default());
        }
        clock.complete(0);
        let stats = e.shutdown(Duration::from_millis(50));
        assert_eq!(stats.published, 1);
        assert_eq!(stats.dropped.shutdown, 3);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    #[test]
    fn full_queue_drops_are_counted_and_leave_counter_gaps() {
        let clock = Arc::new(ManualClock::default());
        let t = MemoryTransport::new();
        let mut cfg = config().with_queue_capacity(4);
        cfg.poll_interval = Duration::from_millis(1);
        let mut e = Emitter::start_with_clock(cfg, t.clone(), clock.clone(), None).unwrap();
        // The publisher holds pending work it cannot finish; the queue fills behind it.
        let mut dropped = 0;
        for _ in 0..50 {
            e.begin_iteration();
            e.time_segment(StreamHandle(1), || ());
            if e.submit(batch(1), QueuedRequestMetrics::default()) == Some(DropReason::QueueFull) {
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
        e.begin_iteration();
        e.time_segment(StreamHandle(1), || ());
        assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
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
        let stats = e.shutdown(Duration::from_secs(1));
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
        // Wait until the subscription reaches the publisher.
        let mut got = None;
        for _ in 0..200 {
            e.submit(batch(2), QueuedRequestMetrics::default());
            if let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                got = Some(frames);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let frames = got.expect("no message over ipc");
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
        let mut ok = false;
        for _ in 0..200 {
            e.submit(batch(1), QueuedRequestMetrics::default());
            if s.recv_multipart(zmq::DONTWAIT).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ok);
        e.shutdown(Duration::from_secs(1));
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
}
