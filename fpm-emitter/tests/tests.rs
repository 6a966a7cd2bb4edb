//! Integration tests of the emitter: in-memory transport for the logic, real ZeroMQ sockets,
//! real upstream Python peers, and (ignored unless a GPU is present) CUDA timing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fpm_emitter::*;
use fpm_schema::{decode, QueuedRequestMetrics, ScheduledRequestMetrics, ScheduledRequestsBuilder};

/// Counts heap allocations made by threads that opted in (the test's scheduler thread).
#[global_allocator]
static GLOBAL: fpm_testkit::CountingAlloc = fpm_testkit::CountingAlloc;

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

/// A stream handle for the CPU and manual clocks, which only compare handles.
fn stream_id(n: u64) -> StreamHandle {
    // SAFETY: these tests' clocks never pass the handle to CUDA.
    unsafe { StreamHandle::from_raw(n) }
}

/// One iteration with a single (empty) segment on `stream`; returns what `submit` returned.
fn iteration(e: &mut Emitter, stream: u64) -> Option<DropReason> {
    e.begin_iteration();
    e.time_segment(stream_id(stream), || ());
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

    /// An engine that measured the iteration itself: its wall time is published as given,
    /// in counter order with timed iterations, and a begun iteration's span is released.
    #[test]
    fn submit_measured_publishes_the_engines_wall_time() {
        let (clock, t, mut e) = manual_emitter(config());
        e.begin_iteration();
        e.time_segment(stream_id(1), || ());
        assert_eq!(
            e.submit_measured(0.0125, batch(2), QueuedRequestMetrics::default()),
            None
        );
        assert_eq!(
            clock.released.load(Ordering::Relaxed),
            1,
            "the begun span went back"
        );
        e.time_segment(stream_id(1), || ());
        assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
        clock.complete(1);
        assert_eq!(
            e.submit_measured(f64::NAN, batch(0), QueuedRequestMetrics::default()),
            None
        );
        assert!(wait_until(Duration::from_secs(5), || t.sent().len() == 3));
        let got: Vec<_> = t
            .sent()
            .iter()
            .map(|m| decode(&m.payload).unwrap())
            .collect();
        assert_eq!(
            got.iter().map(|m| m.counter_id).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(got[0].wall_time, 0.0125);
        assert_eq!(got[0].scheduled_requests.num_decode_requests, 2);
        assert_eq!(
            got[1].wall_time, 0.002,
            "the clock's time for the timed one"
        );
        assert!(got[2].wall_time.is_nan(), "passed through as given");
        e.shutdown(Duration::from_secs(1));
    }

    #[test]
    fn publishes_every_iteration_with_contiguous_counters() {
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(config(), t.clone()).unwrap();
        assert_eq!(e.clock_kind(), ClockKind::Cpu);
        for i in 0..100 {
            e.begin_iteration();
            e.time_segment(stream_id(7), || {
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
        e.time_segment(stream_id(1), || ());
        e.time_segment(stream_id(2), || ());
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::MultiStream)
        );
        e.begin_iteration();
        e.time_segment(stream_id(1), || ());
        e.time_segment(stream_id(1), || ());
        assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
        // An end without a start cannot be measured: dropped and counted as unpaired.
        e.begin_iteration();
        e.segment_end(stream_id(1));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::Unpaired)
        );
        // So is a start without an end (CPU clock too).
        e.begin_iteration();
        e.segment_start(stream_id(1));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::Unpaired)
        );
        // And pairs that are off: start, start, end and start, end, end.
        e.begin_iteration();
        e.segment_start(stream_id(1));
        e.segment_start(stream_id(1));
        e.segment_end(stream_id(1));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::Unpaired)
        );
        e.begin_iteration();
        e.segment_start(stream_id(1));
        e.segment_end(stream_id(1));
        e.segment_end(stream_id(1));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::Unpaired)
        );
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.dropped.unpaired_segment, 4);
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
            e.time_segment(stream_id(0), || ());
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
        // After a first delivery (no more start-up holding), refusals are drops.
        e.submit(batch(1), QueuedRequestMetrics::default());
        assert!(wait_until(Duration::from_secs(2), || e.stats().published == 1));
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
        assert_eq!(stats.published, 2);
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
            e.time_segment(stream_id(0), || ());
            e.submit(sched, QueuedRequestMetrics::default());
        }
        std::thread::sleep(Duration::from_millis(20));
        let before = fpm_testkit::CountingAlloc::allocations();
        fpm_testkit::CountingAlloc::count_this_thread(true);
        for _ in 0..10_000 {
            e.begin_iteration();
            e.segment_start(stream_id(0));
            e.segment_end(stream_id(0));
            e.submit(sched, QueuedRequestMetrics::default());
        }
        fpm_testkit::CountingAlloc::count_this_thread(false);
        let allocs = fpm_testkit::CountingAlloc::allocations() - before;
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
            Err(EmitterError::CudaUnavailable(why)) => {
                // Without the feature or the driver, the reason says which.
                assert!(
                    matches!(
                        why,
                        CudaError::NotBuilt
                            | CudaError::NoDriver
                            | CudaError::Device { .. }
                            | CudaError::Call { .. }
                    ),
                    "{why}"
                );
            }
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
        let mut cfg = config();
        cfg.poll_interval = Duration::ZERO; // would spin the publisher thread
        let err = Emitter::start_with_transport(cfg, MemoryTransport::new()).unwrap_err();
        assert!(err.to_string().contains("poll interval"), "{err}");
        let mut cfg = config();
        cfg.max_poll_interval = Duration::from_micros(10);
        assert!(Emitter::start_with_transport(cfg, MemoryTransport::new()).is_err());
    }

    /// Until the first subscriber is there, messages are held (in order, counted as
    /// pending), not dropped; past the window what is held is counted `no_subscriber`.
    #[test]
    fn start_up_messages_wait_for_the_first_subscriber_then_count() {
        let t = MemoryTransport::new();
        t.refuse(Some(SendError::NoSubscriber));
        let mut cfg = config().with_queue_capacity(6);
        cfg.first_subscriber_wait = Duration::from_millis(300);
        let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
        for _ in 0..8 {
            iteration(&mut e, 0);
            // One at a time (the publisher takes each at once), so the submission queue
            // never fills: only the hold limit (6) applies.
            std::thread::sleep(Duration::from_millis(30));
        }
        let s = e.stats();
        assert_eq!(
            (s.pending_timings, s.dropped.no_subscriber),
            (6, 2),
            "{s:?}"
        );
        assert_eq!(
            s.submitted,
            s.published + s.dropped.total() + s.pending_timings
        );
        // The window passes with no subscriber: the held six are counted too.
        assert!(wait_until(Duration::from_secs(3), || e
            .stats()
            .dropped
            .no_subscriber
            == 8));
        t.refuse(None);
        iteration(&mut e, 0);
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.published, 1);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
        assert_eq!(t.sent()[0].counter, 8);
    }

    /// A subscriber arriving within the window gets every held message, in counter order,
    /// before anything newer (and no heartbeat jumps the queue).
    #[test]
    fn held_messages_reach_a_late_subscriber_in_order() {
        let t = MemoryTransport::new();
        t.refuse(Some(SendError::NoSubscriber));
        let mut cfg = config().with_heartbeat_interval(Duration::from_millis(10));
        cfg.first_subscriber_wait = Duration::from_secs(10);
        let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
        for _ in 0..50 {
            iteration(&mut e, 0);
        }
        e.set_idle(true);
        std::thread::sleep(Duration::from_millis(100));
        assert!(t.sent().is_empty());
        t.refuse(None);
        assert!(wait_until(Duration::from_secs(2), || t.sent().len() >= 50));
        for _ in 0..5 {
            iteration(&mut e, 0);
        }
        let stats = e.shutdown(Duration::from_secs(1));
        let counters: Vec<u64> = t.sent().iter().map(|m| m.counter).collect();
        assert_eq!(counters, (0..counters.len() as u64).collect::<Vec<_>>());
        assert_eq!(stats.published, 55);
        assert_eq!(stats.dropped.total(), 0);
    }

    /// `pending` is counted before the hand-over, so a reader never sees it wrap below zero
    /// while the publisher races the scheduler.
    #[test]
    fn pending_never_wraps_under_a_racing_reader() {
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(config(), t.clone()).unwrap();
        let h = e.handle();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut worst = 0;
                while !stop.load(Ordering::Relaxed) {
                    worst = worst.max(h.stats().pending_timings);
                }
                worst
            })
        };
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_millis(500) {
            e.submit(batch(1), QueuedRequestMetrics::default());
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let worst = reader.join().unwrap();
        assert!(worst <= n, "pending read {worst} after {n} submits");
        let stats = e.shutdown(Duration::from_secs(2));
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    /// A transport that panics: the publisher thread dies. Later submits are counted
    /// `publisher_gone` (not `queue_full`), the panic is reported at shutdown, and what the
    /// dead thread held is counted too, so the totals still add up.
    #[test]
    fn a_dead_publisher_is_counted_as_such() {
        struct Panics;
        impl Transport for Panics {
            fn send(&mut self, _: u64, _: &[u8]) -> Result<(), SendError> {
                panic!("transport bug (test)");
            }
            fn close(&mut self, _: Duration) -> Unsent {
                Unsent::default()
            }
            fn describe(&self) -> String {
                "panics".into()
            }
        }
        let mut e = Emitter::start_with_transport(config(), Panics).unwrap();
        iteration(&mut e, 0);
        assert!(wait_until(Duration::from_secs(2), || {
            iteration(&mut e, 0) == Some(DropReason::PublisherGone)
        }));
        let stats = e.shutdown(Duration::from_secs(1));
        assert!(stats.dropped.publisher_gone >= 2, "{stats:?}");
        assert_eq!(stats.dropped.queue_full, 0);
        assert_eq!(stats.pending_timings, 0);
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }
}

mod zmq_socket {
    use super::*;

    pub(crate) fn sub(addr: &str) -> (zmq::Context, zmq::Socket) {
        let ctx = zmq::Context::new();
        let s = ctx.socket(zmq::SUB).unwrap();
        s.set_subscribe(b"").unwrap();
        s.set_rcvtimeo(5000).unwrap();
        s.connect(addr).unwrap();
        (ctx, s)
    }

    /// Submits until the first message reaches `s` (the subscription takes a moment to reach
    /// the publisher); returns its frames.
    /// Addresses the publisher cannot bind are one clear error at start, naming the address.
    #[test]
    fn unusable_addresses_fail_at_start() {
        let start = |addr: &str| {
            let cfg = EmitterConfig::new(Endpoint::Exact(addr.into()), "w", 0)
                .with_clock(ClockChoice::Cpu);
            Emitter::start(cfg).map(|_| ()).unwrap_err()
        };
        for addr in [
            "inproc://x",
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:port",
            "ipc://",
        ] {
            let err = start(addr);
            assert!(matches!(err, EmitterError::Config(_)), "{addr}: {err:?}");
            assert!(err.to_string().contains(addr), "{addr}: {err}");
        }
        // A port in use, and a host that does not resolve: the bind fails, naming both.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp://127.0.0.1:{}", taken.local_addr().unwrap().port());
        for addr in [addr.as_str(), "tcp://no-such-host.invalid:5555"] {
            let err = start(addr);
            assert!(matches!(err, EmitterError::Bind { .. }), "{addr}: {err:?}");
            let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
            assert!(chain.contains(addr), "{chain}");
        }
    }

    /// The normal start-up order: the engine binds and starts emitting, the relay's SUB
    /// connects a little later. Nothing is lost in between: every counter from 0 arrives.
    #[test]
    fn nothing_is_lost_before_the_relay_connects() {
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "fpm");
        let cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "w", 0)
            .with_clock(ClockChoice::Cpu);
        let mut e = Emitter::start(cfg).unwrap();
        for _ in 0..100 {
            iteration(&mut e, 0);
        }
        std::thread::sleep(Duration::from_millis(200));
        let (_ctx, s) = sub(&format!("{base}.0"));
        s.set_rcvtimeo(5000).unwrap();
        let mut got = Vec::new();
        while got.len() < 100 {
            let frames = s.recv_multipart(0).expect("held messages did not arrive");
            got.push(u64::from_be_bytes(frames[1].as_slice().try_into().unwrap()));
        }
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.dropped.no_subscriber, 0, "{stats:?}");
        assert_eq!(stats.published, 100);
    }

    /// One round of issue 15's check: the emitter at full speed into a libzmq SUB that
    /// pauses 1 ms every `pause_every` messages (`None`: reads as fast as it can), shut down
    /// with `timeout`. Returns the stats and what the subscriber received, after checking
    /// that the subscriber got every message counted `published` (in order) and at most the
    /// `shutdown` drops more, and that the counters add up.
    fn shutdown_round(
        tcp: bool,
        pause_every: Option<u64>,
        timeout: Duration,
        hwm: i32,
    ) -> (EmitterStats, u64) {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = if tcp {
            Endpoint::Exact("tcp://127.0.0.1:*".into())
        } else {
            Endpoint::IpcBase(fpm_testkit::ipc_base(dir.path(), "sd"))
        };
        let mut cfg = EmitterConfig::new(endpoint, "w", 0).with_clock(ClockChoice::Cpu);
        cfg.send_hwm = hwm;
        let mut e = Emitter::start(cfg).unwrap();
        let (_ctx, s) = sub(e.endpoint());
        // Until 1.5 s of silence (the emitter is done by then, even on a loaded machine).
        s.set_rcvtimeo(1500).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Ok(f) = s.recv_multipart(0) {
                got.push(u64::from_be_bytes(f[1].as_slice().try_into().unwrap()));
                if pause_every.is_some_and(|n| got.len() as u64 % n == 0) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            got
        });
        // Full speed for 500 ms; a slow subscriber's queue must also be full (so that the
        // deadline finds it behind), however slow the machine.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500)
            || (pause_every.is_some()
                && e.stats().dropped.send_hwm == 0
                && start.elapsed() < Duration::from_secs(20))
        {
            e.submit(batch(1), QueuedRequestMetrics::default());
        }
        let stats = e.shutdown(timeout);
        let got = reader.join().unwrap();
        let received = got.len() as u64;
        assert!(
            stats.published <= received && received <= stats.published + stats.dropped.shutdown,
            "published {} but the subscriber got {received} (counters {:?}..={:?}): {stats:?}",
            stats.published,
            got.first(),
            got.last(),
        );
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order");
        assert_eq!(
            stats.submitted,
            stats.published + stats.dropped.total(),
            "{stats:?}"
        );
        (stats, received)
    }

    /// Issue 15: at full speed into a live subscriber, then shutdown: what the emitter
    /// counted as published reached the subscriber, exactly (shutdown lets the queued
    /// messages leave, and waits until the subscriber has read them, before the socket goes).
    /// Repeated to catch the race.
    #[test]
    fn published_at_shutdown_means_received() {
        for tcp in [false, false, false, true] {
            let (stats, received) = shutdown_round(tcp, None, Duration::from_secs(10), 100_000);
            assert_eq!(stats.dropped.shutdown, 0, "tcp {tcp}: {stats:?}");
            assert_eq!(received, stats.published, "tcp {tcp}: {stats:?}");
        }
    }

    /// Issue 15, a slow subscriber over TCP: the deadline passes with messages still queued
    /// for it. Those (and the one the kernel took only part of) are counted as dropped
    /// `shutdown`, not `published`; what the kernel took is delivered after the close, so
    /// the subscriber's count is exactly `published`.
    #[test]
    fn a_slow_tcp_subscriber_at_shutdown_gets_exactly_what_was_published() {
        for _ in 0..3 {
            let (stats, received) =
                shutdown_round(true, Some(20), Duration::from_millis(100), 5_000);
            assert!(
                stats.dropped.shutdown > 0,
                "the deadline was not reached: {stats:?}"
            );
            assert_eq!(received, stats.published, "{stats:?}");
        }
    }

    /// Issue 15, a slow subscriber over ipc: what sits unread in its socket at the deadline
    /// may be lost when the connection closes (a libzmq SUB whose own queue is full discards
    /// it), so it is counted `shutdown` too: the subscriber gets at least every message
    /// counted `published`, and at most the `shutdown` drops more (checked in the round).
    #[test]
    fn a_slow_ipc_subscriber_at_shutdown_gets_every_published_message() {
        for _ in 0..3 {
            let (stats, _) = shutdown_round(false, Some(20), Duration::from_millis(100), 5_000);
            assert!(
                stats.dropped.shutdown > 0,
                "the deadline was not reached: {stats:?}"
            );
        }
    }

    pub(crate) fn first_message(e: &mut Emitter, s: &zmq::Socket) -> Vec<Vec<u8>> {
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
        let mut cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "w-ipc", 1)
            .with_clock(ClockChoice::Cpu);
        cfg.first_subscriber_wait = Duration::ZERO;
        let mut e = Emitter::start(cfg).unwrap();
        assert_eq!(e.endpoint(), format!("{base}.1"));
        // With start-up holding off, a message before anyone subscribes is counted as having
        // no subscriber.
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
        no_subscriber_noticed_then_shut_down(e);
    }

    /// Submits until one is dropped as `no_subscriber`, then shuts down; the counters add up.
    pub(crate) fn no_subscriber_noticed_then_shut_down(mut e: Emitter) {
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

/// The emitter's PUB socket against raw ZMTP peers: hostile ones are cut off without
/// affecting real subscribers; subscriptions and PINGs are honoured.
mod pub_socket {
    use super::zmq_socket::{first_message, no_subscriber_noticed_then_shut_down, sub};
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn tcp_emitter() -> Emitter {
        let mut cfg = EmitterConfig::new(Endpoint::Exact("tcp://127.0.0.1:*".into()), "w", 0)
            .with_clock(ClockChoice::Cpu);
        cfg.first_subscriber_wait = Duration::ZERO;
        Emitter::start(cfg).unwrap()
    }

    fn connect(e: &Emitter) -> TcpStream {
        let addr = e.endpoint().strip_prefix("tcp://").unwrap();
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Reads until the emitter closes the connection; panics if it does not within 5 s.
    fn closed_by_emitter(mut s: TcpStream, what: &str) {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("{what}: the emitter kept the connection open ({e})"),
            }
        }
    }

    /// A raw SUB: greeting, READY, and the emitter's greeting and READY read back.
    fn handshake(e: &Emitter) -> (TcpStream, Vec<u8>) {
        let mut s = connect(e);
        let mut hello = fpm_zmtp::greeting().to_vec();
        hello.extend(fpm_zmtp::ready("SUB"));
        s.write_all(&hello).unwrap();
        let mut buf = Vec::new();
        let unit = read_unit(&mut s, &mut buf, fpm_zmtp::GREETING_LEN);
        assert!(matches!(unit, fpm_zmtp::Unit::Command { .. }), "{unit:?}");
        buf.drain(..unit_len(&unit));
        (s, buf)
    }

    /// The next message or command from the emitter (after `skip` bytes of greeting).
    fn read_unit(s: &mut TcpStream, buf: &mut Vec<u8>, mut skip: usize) -> fpm_zmtp::Unit {
        let mut chunk = [0u8; 4096];
        loop {
            if buf.len() >= skip {
                buf.drain(..skip);
                skip = 0;
                if let Some(u) = fpm_zmtp::next(buf, 1 << 20).unwrap() {
                    return u;
                }
            }
            let n = s.read(&mut chunk).expect("the emitter sent nothing");
            assert!(n > 0, "the emitter closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn unit_len(u: &fpm_zmtp::Unit) -> usize {
        match u {
            fpm_zmtp::Unit::Message { len, .. } | fpm_zmtp::Unit::Command { len, .. } => *len,
        }
    }

    fn frame(more: bool, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        fpm_zmtp::frame_header(more, body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn hostile_peers_are_cut_off_and_a_real_subscriber_is_unaffected() {
        let mut e = tcp_emitter();
        let (_ctx, real) = sub(e.endpoint());
        first_message(&mut e, &real);

        let mut not_zmq = connect(&e);
        not_zmq.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        closed_by_emitter(not_zmq, "an HTTP client");

        let mut curve = connect(&e);
        let mut g = fpm_zmtp::greeting();
        g[12..17].copy_from_slice(b"CURVE");
        curve.write_all(&g).unwrap();
        closed_by_emitter(curve, "a CURVE peer");

        let mut publisher = connect(&e);
        let mut hello = fpm_zmtp::greeting().to_vec();
        hello.extend(fpm_zmtp::ready("PUB"));
        publisher.write_all(&hello).unwrap();
        closed_by_emitter(publisher, "a PUB where a SUB should be");

        // A header announcing 2^62 bytes after a good handshake: refused from the header.
        let (mut huge, _) = handshake(&e);
        let mut h = vec![0x02];
        h.extend_from_slice(&(1u64 << 62).to_be_bytes());
        huge.write_all(&h).unwrap();
        closed_by_emitter(huge, "a 2^62-byte frame");

        // A multipart message that never ends: cut off once it passes the inbound limit.
        let (mut endless, _) = handshake(&e);
        let tiny = frame(true, b"x");
        let mut sent = 0usize;
        while sent < 64 << 10 && endless.write_all(&tiny).is_ok() {
            sent += tiny.len();
        }
        closed_by_emitter(endless, "an endless multipart message");

        // Connections that never say anything, up to the limit of 256 (the real subscriber
        // holds one): the next one is refused at once; once they go, a new subscriber
        // connects.
        let idle: Vec<TcpStream> = (0..255).map(|_| connect(&e)).collect();
        std::thread::sleep(Duration::from_millis(200));
        closed_by_emitter(connect(&e), "a connection over the limit");
        drop(idle);

        // Through all of it the real subscriber kept receiving.
        let next = e.stats().submitted;
        assert!(
            wait_until(Duration::from_secs(10), || {
                e.submit(batch(1), QueuedRequestMetrics::default());
                std::iter::from_fn(|| real.recv_multipart(zmq::DONTWAIT).ok())
                    .any(|f| u64::from_be_bytes(f[1].as_slice().try_into().unwrap()) >= next)
            }),
            "the real subscriber stopped receiving: {:?}",
            e.stats()
        );
        let (_ctx2, late) = sub(e.endpoint());
        first_message(&mut e, &late);
        let stats = e.shutdown(Duration::from_secs(1));
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    #[test]
    fn only_the_empty_prefix_subscribes_and_pings_are_answered() {
        let mut e = tcp_emitter();
        let (mut s, mut buf) = handshake(&e);
        // Subscribed to another prefix only, then PING (TTL 0, context "ctx"): the PONG
        // echoing the context also says the subscription before it was read.
        s.write_all(&frame(false, b"\x01abc")).unwrap();
        let mut ping = vec![0x04, 10, 4];
        ping.extend_from_slice(b"PING\x00\x00ctx");
        s.write_all(&ping).unwrap();
        let u = read_unit(&mut s, &mut buf, 0);
        let fpm_zmtp::Unit::Command { name, body, len } = u else {
            panic!("{u:?}")
        };
        assert_eq!(&buf[name], b"PONG");
        assert_eq!(&buf[body], b"ctx");
        buf.drain(..len);
        // Our messages (empty topic frame) do not match "abc".
        e.submit(batch(1), QueuedRequestMetrics::default());
        let dropped = || e.stats().dropped.no_subscriber;
        assert!(wait_until(Duration::from_secs(5), || dropped() == 1));

        // A ZMTP 3.1 SUBSCRIBE command for the empty prefix: messages arrive, three frames.
        s.write_all(&[0x04, 10, 9]).unwrap();
        s.write_all(b"SUBSCRIBE").unwrap();
        assert!(wait_until(Duration::from_secs(5), || {
            e.submit(batch(1), QueuedRequestMetrics::default());
            e.stats().published > 0
        }));
        let u = read_unit(&mut s, &mut buf, 0);
        let fpm_zmtp::Unit::Message { frames, .. } = &u else {
            panic!("{u:?}")
        };
        let (f, n) = frames.slices(&buf);
        assert_eq!(n, 3);
        assert_eq!(f[0], b"");
        let counter = u64::from_be_bytes(f[1].try_into().unwrap());
        let msg = decode(f[2]).unwrap();
        assert_eq!(msg.counter_id as u64, counter);
        buf.drain(..unit_len(&u));

        // A subscriber that stops reading and leaves with messages queued for it: counted.
        let (mut stuck, _) = handshake(&e);
        stuck.write_all(&frame(false, b"\x01")).unwrap();
        assert!(wait_until(Duration::from_secs(10), || {
            for _ in 0..1000 {
                e.submit(batch(1), QueuedRequestMetrics::default());
            }
            // Its socket buffers are full once our reader has everything but it has not.
            e.stats().published > 50_000
        }));
        drop(stuck);
        assert!(
            wait_until(Duration::from_secs(5), || e.stats().lost_with_subscribers
                > 0),
            "{:?}",
            e.stats()
        );
        // The live one keeps receiving.
        let u = read_unit(&mut s, &mut buf, 0);
        assert!(matches!(u, fpm_zmtp::Unit::Message { .. }), "{u:?}");

        // Cancelled (ZMTP 3.0 form): no subscriber again.
        s.write_all(&frame(false, b"\x00")).unwrap();
        no_subscriber_noticed_then_shut_down(e);
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
            e.time_segment(stream_id(0), || ());
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
        let mut child =
            fpm_testkit::dynamo_relay(&py, "fpmemit", &format!("{base}.0"), kv.path(), &nats.url());
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
            e.time_segment(stream_id(0), || {
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
///
/// Every test takes one lock, so the harness's parallel threads never share the GPU, and sizes
/// its work from a measurement (tens of milliseconds whatever the card), so the bounds compare
/// like with like. The work is raw driver calls (`cuMemcpyDtoDAsync` on streams we create),
/// so nothing but the emitter records events.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use cudarc::driver::sys;
    use std::sync::{Mutex, MutexGuard};

    static GPU: Mutex<()> = Mutex::new(());

    fn gpu_lock() -> MutexGuard<'static, ()> {
        GPU.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ok(r: sys::CUresult, what: &str) {
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
    }

    fn cuda_config() -> EmitterConfig {
        EmitterConfig::new(Endpoint::Exact("memory".into()), "gpu-worker", 0)
            .with_clock(ClockChoice::Cuda)
    }

    fn current() -> sys::CUcontext {
        let mut c = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        ok(unsafe { sys::cuCtxGetCurrent(&mut c) }, "cuCtxGetCurrent");
        c
    }

    fn device_count() -> i32 {
        let mut n = 0;
        // SAFETY: plain driver calls.
        ok(unsafe { sys::cuInit(0) }, "cuInit");
        ok(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount");
        n
    }

    /// Device `d`'s primary context, retained and made current on this thread.
    fn use_primary(d: i32) -> sys::CUcontext {
        device_count();
        let (mut dev, mut ctx) = (0, std::ptr::null_mut());
        // SAFETY: out-pointers to locals.
        unsafe {
            ok(sys::cuDeviceGet(&mut dev, d), "cuDeviceGet");
            ok(sys::cuDevicePrimaryCtxRetain(&mut ctx, dev), "retain");
            ok(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
        }
        ctx
    }

    /// Two buffers and a stream in the current context; copies between them are the work.
    struct Work {
        src: sys::CUdeviceptr,
        dst: sys::CUdeviceptr,
        bytes: usize,
        stream: sys::CUstream,
    }

    impl Work {
        fn new(bytes: usize) -> Work {
            let (mut src, mut dst, mut stream) = (0, 0, std::ptr::null_mut());
            // SAFETY: out-pointers to locals; a context is current.
            unsafe {
                ok(sys::cuMemAlloc_v2(&mut src, bytes), "cuMemAlloc");
                ok(sys::cuMemAlloc_v2(&mut dst, bytes), "cuMemAlloc");
                ok(sys::cuStreamCreate(&mut stream, 1), "cuStreamCreate"); // non-blocking
            }
            let w = Work {
                src,
                dst,
                bytes,
                stream,
            };
            w.copies(2);
            w.sync();
            w
        }

        fn copies(&self, n: usize) {
            for _ in 0..n {
                // SAFETY: both buffers are `bytes` long and alive.
                ok(
                    unsafe {
                        sys::cuMemcpyDtoDAsync_v2(self.dst, self.src, self.bytes, self.stream)
                    },
                    "cuMemcpyDtoDAsync",
                );
            }
        }

        fn sync(&self) {
            // SAFETY: our stream.
            ok(unsafe { sys::cuStreamSynchronize(self.stream) }, "sync");
        }

        fn handle(&self) -> StreamHandle {
            // SAFETY: the stream lives until `drop`, after every emitter using it shut down.
            unsafe { StreamHandle::from_raw(self.stream as u64) }
        }

        /// Host time of `n` copies, launch to synchronised (median of 5).
        fn host_time(&self, n: usize) -> f64 {
            let mut t: Vec<f64> = (0..5)
                .map(|_| {
                    let s = Instant::now();
                    self.copies(n);
                    self.sync();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[2]
        }

        /// Copies needed for about `ms` milliseconds of GPU work.
        fn copies_for(&self, ms: f64) -> usize {
            let one = self.host_time(4) / 4.0;
            ((ms / 1e3 / one).ceil() as usize).max(1)
        }
    }

    // SAFETY: driver handles are process-wide and usable from any thread.
    unsafe impl Send for Work {}
    unsafe impl Sync for Work {}

    impl Drop for Work {
        fn drop(&mut self) {
            // SAFETY: created in `new`, freed once, after synchronising.
            unsafe {
                sys::cuStreamSynchronize(self.stream);
                sys::cuMemFree_v2(self.src);
                sys::cuMemFree_v2(self.dst);
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }

    const BYTES: usize = 256 << 20;

    fn walls(t: &MemoryTransport) -> Vec<f64> {
        t.sent()
            .iter()
            .map(|m| decode(&m.payload).unwrap().wall_time)
            .collect()
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// GPU-timed copies (about 20 ms per iteration) agree with a host measurement of the same
    /// work taken after synchronisation: GPU time excludes launch and sync overhead, so it is
    /// at most the host figure and, at this size, within 10% of it.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn times_known_device_work() {
        let _g = gpu_lock();
        use_primary(0);
        let w = Work::new(BYTES);
        let n = w.copies_for(20.0);
        let host = w.host_time(n);
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        assert_eq!(e.clock_kind(), ClockKind::Cuda);
        for _ in 0..5 {
            e.begin_iteration();
            e.time_segment(w.handle(), || w.copies(n));
            assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
            w.sync();
        }
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 5));
        let gpu = median(walls(&t));
        let gbps = 2.0 * (n * BYTES) as f64 / gpu / 1e9;
        eprintln!(
            "{n} x 256 MiB dtod copies: GPU events {:.3} ms, host after sync {:.3} ms (ratio {:.3}), {gbps:.0} GB/s read+write",
            gpu * 1e3,
            host * 1e3,
            gpu / host
        );
        assert!(gpu > 0.005, "work too small to judge: {gpu}");
        assert!(gpu <= host * 1.02, "GPU {gpu} > host {host}");
        assert!(gpu >= host * 0.9, "GPU {gpu} far below host {host}");
        let stats = e.shutdown(Duration::from_secs(5));
        assert_eq!(stats.published, 5);
        assert_eq!(stats.dropped.total(), 0);
    }

    /// The scheduler runs ahead of the GPU (10 iterations of about 10 ms queued in well under
    /// a millisecond each); all are published, in order, with their own spans, once the GPU
    /// catches up.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn deferred_completion_under_overlap() {
        let _g = gpu_lock();
        use_primary(0);
        let w = Work::new(BYTES);
        let n = w.copies_for(5.0);
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        let launched = Instant::now();
        for _ in 0..10 {
            e.begin_iteration();
            // Two segments with a host gap: the span covers both.
            e.time_segment(w.handle(), || w.copies(n));
            e.time_segment(w.handle(), || w.copies(n));
            assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
        }
        let submit_time = launched.elapsed();
        let pending_while_running = e.stats().pending_timings;
        assert!(
            pending_while_running > 0,
            "GPU finished first: not overlapped"
        );
        w.sync();
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 10));
        let counters: Vec<u64> = t.sent().iter().map(|m| m.counter).collect();
        assert_eq!(counters, (0..10).collect::<Vec<_>>());
        let walls = walls(&t);
        eprintln!(
            "10 iterations (2 x {n} copies) submitted in {:.3} ms while {pending_while_running} were pending; spans (ms): {:?}",
            submit_time.as_secs_f64() * 1e3,
            walls.iter().map(|w| (w * 1e5).round() / 100.0).collect::<Vec<_>>()
        );
        // Each span is its own iteration's work (about 10 ms), not the queue's backlog.
        let m = median(walls.clone());
        assert!(
            walls.iter().all(|&x| x > 0.5 * m && x < 2.0 * m),
            "{walls:?}"
        );
        let stats = e.shutdown(Duration::from_secs(5));
        assert_eq!(stats.published, 10);
        assert_eq!(stats.dropped.total(), 0);
    }

    /// The engine thread's current context is the same after start, iterations, shutdown and
    /// drop: with PyTorch's layout (a primary context current) and with none current.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn engine_thread_context_is_unchanged() {
        let _g = gpu_lock();
        let primary = use_primary(0) as usize;
        let w = Work::new(16 << 20);
        for with_ctx in [true, false] {
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    if with_ctx {
                        // SAFETY: a retained primary context.
                        ok(
                            unsafe { sys::cuCtxSetCurrent(primary as sys::CUcontext) },
                            "set",
                        );
                    }
                    let before = current();
                    assert_eq!(before.is_null(), !with_ctx);
                    let mut cfg = cuda_config();
                    if !with_ctx {
                        cfg.cuda_device = Some(0);
                    }
                    let t = MemoryTransport::new();
                    let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
                    assert_eq!(current(), before, "start changed the current context");
                    // Without a current context the work is launched inside a push/pop of the
                    // primary context (as a driver-API engine would); the markers run outside.
                    let in_ctx = |f: &dyn Fn()| {
                        if with_ctx {
                            f()
                        } else {
                            // SAFETY: a retained primary context; pushed and popped.
                            unsafe {
                                ok(sys::cuCtxPushCurrent_v2(primary as sys::CUcontext), "push");
                                f();
                                let mut c = std::ptr::null_mut();
                                ok(sys::cuCtxPopCurrent_v2(&mut c), "pop");
                            }
                        }
                    };
                    for _ in 0..20 {
                        e.begin_iteration();
                        e.time_segment(w.handle(), || in_ctx(&|| w.copies(1)));
                        assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
                        assert_eq!(current(), before, "an iteration changed the context");
                    }
                    in_ctx(&|| w.sync());
                    assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 20));
                    let stats = e.shutdown(Duration::from_secs(5));
                    assert_eq!(current(), before, "shutdown changed the current context");
                    assert_eq!(stats.published, 20, "{stats:?}");
                    eprintln!("context unchanged (engine thread had a context: {with_ctx})");
                });
            });
        }
    }

    /// A context other than device 0's primary (what a rank on device N sees; one GPU stands
    /// in with a created context): the events follow the engine's context and every
    /// iteration is timed. Before the fix every one was dropped `timing_unavailable`.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn a_non_primary_engine_context_is_followed() {
        let _g = gpu_lock();
        device_count();
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut ctx = std::ptr::null_mut();
                // SAFETY: creates and makes current a new context on device 0.
                ok(
                    unsafe { sys::cuCtxCreate_v2(&mut ctx, 0, 0) },
                    "cuCtxCreate",
                );
                let w = Work::new(64 << 20);
                let t = MemoryTransport::new();
                let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
                for _ in 0..10 {
                    e.begin_iteration();
                    e.time_segment(w.handle(), || w.copies(2));
                    assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
                }
                w.sync();
                assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 10));
                let stats = e.shutdown(Duration::from_secs(5));
                assert_eq!(stats.published, 10, "{stats:?}");
                assert!(walls(&t).iter().all(|&x| x > 0.0));
                assert_eq!(current(), ctx);
                drop(w);
                // SAFETY: ours, no longer used.
                unsafe { sys::cuCtxDestroy_v2(ctx) };
                eprintln!("non-primary context: 10/10 timed");
            });
        });
    }

    /// A rank on device 1 (`torch.cuda.set_device(1)`): timed on device 1, no context on
    /// device 0. Needs two GPUs.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn a_rank_on_device_one() {
        let _g = gpu_lock();
        if device_count() < 2 {
            eprintln!("SKIPPED a_rank_on_device_one: this machine has one GPU (needs two)");
            return;
        }
        std::thread::scope(|sc| {
            sc.spawn(|| {
                use_primary(1);
                let w = Work::new(64 << 20);
                let t = MemoryTransport::new();
                let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
                for _ in 0..10 {
                    e.begin_iteration();
                    e.time_segment(w.handle(), || w.copies(2));
                    e.submit(batch(1), QueuedRequestMetrics::default());
                }
                w.sync();
                assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 10));
                assert_eq!(e.shutdown(Duration::from_secs(5)).published, 10);
            });
        });
    }

    /// Segments on two streams: the span is ambiguous, skipped and counted; the pool is
    /// intact (the next single-stream iterations are timed).
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn segments_on_two_streams_are_counted() {
        let _g = gpu_lock();
        use_primary(0);
        let (a, b) = (Work::new(16 << 20), Work::new(16 << 20));
        let t = MemoryTransport::new();
        let mut cfg = cuda_config();
        cfg.cuda_event_pairs = 4;
        let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
        for _ in 0..8 {
            e.begin_iteration();
            e.time_segment(a.handle(), || a.copies(1));
            e.time_segment(b.handle(), || b.copies(1));
            assert_eq!(
                e.submit(batch(1), QueuedRequestMetrics::default()),
                Some(DropReason::MultiStream)
            );
        }
        for _ in 0..8 {
            e.begin_iteration();
            e.time_segment(a.handle(), || a.copies(1));
            assert_eq!(e.submit(batch(1), QueuedRequestMetrics::default()), None);
            a.sync();
            assert!(wait_until(Duration::from_secs(5), || e
                .stats()
                .pending_timings
                == 0));
        }
        let stats = e.shutdown(Duration::from_secs(5));
        assert_eq!(stats.dropped.multi_stream, 8);
        assert_eq!(stats.published, 8, "{stats:?}");
    }

    /// A CUDA graph captured in global mode while the publisher polls pending events (from
    /// iterations still running on another stream) is not invalidated; the graph's replay,
    /// timed around `cuGraphLaunch`, agrees with a host measurement; an iteration timed
    /// inside the capture is dropped as `graph_capture`.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn graph_capture_and_timed_replay() {
        let _g = gpu_lock();
        use_primary(0);
        let busy = Work::new(BYTES);
        let g = Work::new(BYTES);
        let n_busy = busy.copies_for(100.0);
        let n_graph = g.copies_for(20.0);
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        // Iterations pending on `busy` for about 100 ms: the publisher polls throughout.
        e.begin_iteration();
        e.time_segment(busy.handle(), || busy.copies(n_busy));
        e.submit(batch(1), QueuedRequestMetrics::default());
        std::thread::sleep(Duration::from_millis(2));
        let mut graph = std::ptr::null_mut();
        // SAFETY: capture on our stream; graph out-pointer to a local.
        unsafe {
            ok(
                sys::cuStreamBeginCapture_v2(
                    g.stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
                ),
                "begin capture",
            );
        }
        g.copies(n_graph);
        // An iteration timed inside the capture: not recorded, counted, never published.
        e.begin_iteration();
        e.time_segment(g.handle(), || std::thread::sleep(Duration::from_millis(20)));
        assert_eq!(
            e.submit(batch(1), QueuedRequestMetrics::default()),
            Some(DropReason::GraphCapture)
        );
        // For the record: what the driver says of raw events recorded inside a capture.
        let (mut r1, mut r2) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: events created and recorded on our capturing stream.
        unsafe {
            ok(sys::cuEventCreate(&mut r1, 0), "create");
            ok(sys::cuEventCreate(&mut r2, 0), "create");
            ok(sys::cuEventRecord(r1, g.stream), "record in capture");
            ok(sys::cuEventRecord(r2, g.stream), "record in capture");
        }
        std::thread::sleep(Duration::from_millis(20)); // the publisher keeps polling
                                                       // SAFETY: ends the capture begun above.
        let end = unsafe { sys::cuStreamEndCapture(g.stream, &mut graph) };
        assert_eq!(
            end,
            sys::CUresult::CUDA_SUCCESS,
            "capture invalidated while the publisher was polling"
        );
        let mut ms = 0f32;
        // SAFETY: events created above.
        let (q, el) = unsafe {
            (
                sys::cuEventQuery(r2),
                sys::cuEventElapsedTime(&mut ms, r1, r2),
            )
        };
        eprintln!("raw events recorded inside a capture, after it: cuEventQuery -> {q:?}, cuEventElapsedTime -> {el:?}");
        let mut exec = std::ptr::null_mut();
        // SAFETY: a graph just captured.
        ok(
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
            "instantiate",
        );
        let launch = || {
            // SAFETY: an instantiated graph on our stream.
            ok(unsafe { sys::cuGraphLaunch(exec, g.stream) }, "launch")
        };
        launch();
        g.sync();
        let mut host = Vec::new();
        for _ in 0..5 {
            let s = Instant::now();
            launch();
            g.sync();
            host.push(s.elapsed().as_secs_f64());
        }
        let host = median(host);
        busy.sync();
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 1));
        for _ in 0..5 {
            e.begin_iteration();
            e.time_segment(g.handle(), launch);
            e.submit(batch(1), QueuedRequestMetrics::default());
            g.sync();
        }
        assert!(wait_until(Duration::from_secs(10), || t.sent().len() == 6));
        let replay = median(walls(&t)[1..].to_vec());
        let stats = e.shutdown(Duration::from_secs(5));
        eprintln!(
            "graph of {n_graph} copies: replay timed {:.3} ms by GPU events, host {:.3} ms (ratio {:.3}); captured iteration dropped: {}",
            replay * 1e3,
            host * 1e3,
            replay / host,
            stats.dropped.graph_capture
        );
        assert_eq!(stats.dropped.graph_capture, 1, "{stats:?}");
        assert_eq!(stats.published, 6, "{stats:?}");
        assert!(
            replay <= host * 1.02 && replay >= host * 0.9,
            "{replay} vs {host}"
        );
        // SAFETY: ours, no longer used.
        unsafe {
            sys::cuGraphExecDestroy(exec);
            sys::cuGraphDestroy(graph);
        }
    }

    /// CPU time (ns) the publisher thread of rank 0 has used, from /proc's schedstat.
    fn publisher_cpu_ns() -> Option<u64> {
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == "fpm-publisher-0" {
                let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
                return stat.split_whitespace().next()?.parse().ok();
            }
        }
        None
    }

    /// The publisher thread's CPU while GPU timings are pending, at 100 and 10,000 iterations
    /// per second with each iteration's GPU work filling half its period: a fixed 200 us poll
    /// (the old design) against the doubling back-off (100 us up to 2 ms). Prints the figures.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn publisher_cpu_while_timings_pend() {
        let _g = gpu_lock();
        use_primary(0);
        let w = Work::new(8 << 20);
        let one = w.host_time(64) / 64.0;
        for rate in [100u32, 10_000] {
            let period = Duration::from_secs(1) / rate;
            let n = ((period.as_secs_f64() * 0.5 / one).round() as usize).max(1);
            for (label, min, max) in [
                (
                    "fixed 200us",
                    Duration::from_micros(200),
                    Duration::from_micros(200),
                ),
                (
                    "backoff 100us..2ms",
                    Duration::from_micros(100),
                    Duration::from_millis(2),
                ),
            ] {
                let t = MemoryTransport::new();
                let mut cfg = cuda_config();
                cfg.poll_interval = min;
                cfg.max_poll_interval = max;
                let mut e = Emitter::start_with_transport(cfg, t.clone()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                let cpu0 = publisher_cpu_ns().expect("publisher thread not found");
                let start = Instant::now();
                let run = Duration::from_secs(2);
                let mut k = 0u32;
                while start.elapsed() < run {
                    e.begin_iteration();
                    e.time_segment(w.handle(), || w.copies(n));
                    e.submit(batch(1), QueuedRequestMetrics::default());
                    k += 1;
                    let next = start + period * k;
                    while Instant::now() < next {
                        std::hint::spin_loop();
                    }
                }
                let elapsed = start.elapsed().as_secs_f64();
                let cpu = publisher_cpu_ns().unwrap() - cpu0;
                w.sync();
                let stats = e.shutdown(Duration::from_secs(5));
                eprintln!(
                    "publisher CPU at {rate} it/s ({n} copies = ~{:.0} us GPU per iteration), {label}: {:.2}% of a core ({} published, {} dropped)",
                    n as f64 * one * 1e6,
                    100.0 * cpu as f64 / 1e9 / elapsed,
                    stats.published,
                    stats.dropped.total()
                );
                assert_eq!(stats.submitted, stats.published + stats.dropped.total());
            }
        }
    }

    /// The scheduler thread's cost per iteration with CUDA events (begin + one segment +
    /// submit: capture check, two `cuEventRecord`s, the queue hand-over), in batches of 500
    /// with the publisher drained between batches (untimed). Prints the figure.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn scheduler_side_cost_with_cuda_events() {
        let _g = gpu_lock();
        use_primary(0);
        let w = Work::new(1 << 20);
        let t = MemoryTransport::new();
        let mut e = Emitter::start_with_transport(cuda_config(), t.clone()).unwrap();
        let mut timed = Duration::ZERO;
        let mut per_batch = Vec::new();
        for _ in 0..40 {
            let s = Instant::now();
            for _ in 0..500 {
                e.begin_iteration();
                e.segment_start(w.handle());
                e.segment_end(w.handle());
                e.submit(batch(1), QueuedRequestMetrics::default());
            }
            let d = s.elapsed();
            timed += d;
            per_batch.push(d.as_secs_f64() / 500.0);
            assert!(wait_until(Duration::from_secs(5), || e
                .stats()
                .pending_timings
                == 0));
        }
        let stats = e.shutdown(Duration::from_secs(5));
        eprintln!(
            "scheduler side with CUDA events: mean {:.0} ns/iteration, median batch {:.0} ns ({} published, {} dropped)",
            timed.as_secs_f64() / 20_000.0 * 1e9,
            median(per_batch) * 1e9,
            stats.published,
            stats.dropped.total()
        );
        assert_eq!(stats.published, 20_000, "{stats:?}");
    }

    /// What each driver call on the scheduler side costs (mean of 20,000), to see where the
    /// per-iteration figure goes: the capture check, the context query, the record.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn driver_call_costs() {
        let _g = gpu_lock();
        use_primary(0);
        let w = Work::new(1 << 20);
        let mut ev = std::ptr::null_mut();
        // SAFETY: plain driver calls on our stream and event.
        ok(unsafe { sys::cuEventCreate(&mut ev, 0) }, "create");
        let n = 20_000;
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        };
        let capturing = time(&|| {
            let mut st = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
            // SAFETY: our stream, out-pointer to a local.
            unsafe { sys::cuStreamIsCapturing(w.stream, &mut st) };
        });
        let current = time(&|| {
            let mut c = std::ptr::null_mut();
            // SAFETY: out-pointer to a local.
            unsafe { sys::cuCtxGetCurrent(&mut c) };
        });
        let record = time(&|| {
            // SAFETY: our event and stream.
            unsafe { sys::cuEventRecord(ev, w.stream) };
        });
        w.sync();
        eprintln!(
            "driver calls, mean ns: cuStreamIsCapturing {capturing:.0}, cuCtxGetCurrent {current:.0}, cuEventRecord {record:.0}"
        );
        // SAFETY: ours.
        unsafe { sys::cuEventDestroy_v2(ev) };
    }

    /// Without a GPU the cuda build starts with the CPU stand-in when the clock is `Auto`;
    /// with one, it times on the GPU.
    #[test]
    fn auto_picks_cuda_exactly_when_a_gpu_is_present() {
        // SAFETY: only tries to dlopen libcuda.
        let gpu = unsafe { sys::is_culib_present() } && {
            let mut n = 0;
            // SAFETY: plain driver calls, libcuda is present.
            unsafe {
                sys::cuInit(0) == sys::CUresult::CUDA_SUCCESS
                    && sys::cuDeviceGetCount(&mut n) == sys::CUresult::CUDA_SUCCESS
                    && n > 0
            }
        };
        let _g = gpu_lock();
        let e = Emitter::start_with_transport(
            cuda_config().with_clock(ClockChoice::Auto),
            MemoryTransport::new(),
        )
        .unwrap();
        let expected = if gpu { ClockKind::Cuda } else { ClockKind::Cpu };
        assert_eq!(e.clock_kind(), expected);
        assert_eq!(e.stats().clock, expected);
    }
}

/// Overload: an engine submitting as fast as it can (far beyond what a slow subscriber
/// drains) for 2 s. `submit` never waits (its slowest call is printed), every iteration is
/// published or counted by reason, and memory stays bounded by the queue.
mod overload {
    use super::*;

    fn rss_bytes() -> u64 {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map_or(0, |pages| pages * 4096)
    }

    #[test]
    fn submit_never_waits_and_every_drop_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "ov");
        let mut cfg = EmitterConfig::new(Endpoint::IpcBase(base.clone()), "w", 0)
            .with_clock(ClockChoice::Cpu)
            .with_queue_capacity(1000);
        cfg.send_hwm = 1000;
        let mut e = Emitter::start(cfg).unwrap();
        // A slow subscriber: reads one message per millisecond.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            let addr = format!("{base}.0");
            std::thread::spawn(move || {
                let ctx = zmq::Context::new();
                let s = ctx.socket(zmq::SUB).unwrap();
                s.set_subscribe(b"").unwrap();
                s.set_rcvhwm(1000).unwrap();
                s.set_rcvtimeo(50).unwrap();
                s.connect(&addr).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if s.recv_multipart(0).is_ok() {
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                n
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        let rss0 = rss_bytes();
        let mut worst = Duration::ZERO;
        let mut times = Vec::with_capacity(1 << 20);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let t = Instant::now();
            e.submit(batch(1), QueuedRequestMetrics::default());
            let d = t.elapsed();
            worst = worst.max(d);
            if times.len() < times.capacity() {
                times.push(d.as_nanos() as u64);
            }
        }
        let rss1 = rss_bytes();
        times.sort_unstable();
        let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
        let stats = e.shutdown(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let received = reader.join().unwrap();
        eprintln!(
            "overload: {} submits in 2 s; submit p50 {} ns, p99.9 {} ns, max {:?}; published {}, dropped {:?}; subscriber read {received}; RSS grew {} KiB (the timing vector itself is {} KiB)",
            stats.submitted,
            q(0.5),
            q(0.999),
            worst,
            stats.published,
            stats.dropped,
            rss1.saturating_sub(rss0) / 1024,
            times.capacity() * 8 / 1024
        );
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
        assert!(stats.dropped.queue_full > 0, "not overloaded: {stats:?}");
        assert!(stats.submitted > 100 * stats.published.max(1) / 10);
        // Bounded: the queue (1,000) and the socket's HWM (1,000) hold little; the only big
        // allocation is this test's timing vector.
        assert!(
            rss1.saturating_sub(rss0) < 64 << 20,
            "RSS grew {}",
            rss1 - rss0
        );
    }
}
