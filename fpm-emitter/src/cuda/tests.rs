//! The CUDA clock against the fake driver: the five review defects of issue 16, each with a
//! test that failed before the fix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fpm_schema::{decode, QueuedRequestMetrics, ScheduledRequestMetrics};

use super::fake::{CaptureMode, FakeDriver};
use super::CudaClock;
use crate::clock::{IterationClock, StreamHandle, TimingPoll};
use crate::{
    ClockChoice, DropReason, Emitter, EmitterConfig, EmitterStats, Endpoint, MemoryTransport,
    TimingError,
};

fn config() -> EmitterConfig {
    let mut c =
        EmitterConfig::new(Endpoint::Exact("memory".into()), "w", 0).with_clock(ClockChoice::Cuda);
    c.poll_interval = Duration::from_micros(100);
    c
}

fn sched() -> ScheduledRequestMetrics {
    ScheduledRequestMetrics {
        num_decode_requests: 1,
        ..Default::default()
    }
}

fn stream(raw: u64) -> StreamHandle {
    // SAFETY: the fake driver never dereferences handles.
    unsafe { StreamHandle::from_raw(raw) }
}

fn start(
    driver: &FakeDriver,
    device: Option<u32>,
    pairs: usize,
) -> (Arc<CudaClock<FakeDriver>>, MemoryTransport, Emitter) {
    let clock = Arc::new(CudaClock::with_driver(driver.clone(), device, pairs).unwrap());
    let t = MemoryTransport::new();
    let mut cfg = config();
    cfg.cuda_event_pairs = pairs;
    let e = Emitter::start_with_clock(cfg, t.clone(), clock.clone(), None).unwrap();
    (clock, t, e)
}

fn wait_for(t: &MemoryTransport, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if t.sent().len() >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

fn walls(t: &MemoryTransport) -> Vec<f64> {
    t.sent()
        .iter()
        .map(|m| decode(&m.payload).unwrap().wall_time)
        .collect()
}

fn adds_up(s: &EmitterStats) {
    assert_eq!(
        s.submitted,
        s.published + s.dropped.total(),
        "totals do not add up: {s:?}"
    );
}

/// Defect 1: a bare `submit` (no `begin_iteration`) must not release pair 0, which another
/// iteration holds. Before the fix the free list became `[.., 0, 0]`.
#[test]
fn bare_submit_never_releases_a_pair_it_does_not_hold() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s = drv.create_stream(drv.primary(0));
    let (clock, t, mut e) = start(&drv, None, 4);
    // Iteration A holds a pair (slot 3 then, popped from the end) and stays pending.
    e.begin_iteration();
    e.time_segment(stream(s), || drv.advance_ms(5.0));
    assert_eq!(e.submit(sched(), QueuedRequestMetrics::default()), None);
    // Bare submits, as the submit benchmark and a careless engine do.
    for _ in 0..3 {
        assert_eq!(e.submit(sched(), QueuedRequestMetrics::default()), None);
    }
    // A timed iteration after them.
    e.begin_iteration();
    e.time_segment(stream(s), || drv.advance_ms(7.0));
    e.submit(sched(), QueuedRequestMetrics::default());
    drv.complete(s);
    assert!(wait_for(&t, 5));
    let stats = e.shutdown(Duration::from_secs(2));
    adds_up(&stats);
    assert_eq!(stats.published, 5);
    assert_eq!(walls(&t), vec![0.005, 0.0, 0.0, 0.0, 0.007]);
    clock.check_pool().unwrap();
    assert_eq!(clock.invalid_releases(), 0);
    assert_eq!(clock.free_pairs(), 4);
}

/// The pool refuses a release of a pair that is not out instead of listing it twice.
#[test]
fn pool_refuses_a_double_release() {
    let drv = FakeDriver::new(1);
    let clock = CudaClock::with_driver(drv, Some(0), 2).unwrap();
    let a = clock.begin().unwrap();
    clock.release(a);
    clock.release(a);
    clock.release(crate::Span {
        slot: 99,
        ..Default::default()
    });
    assert_eq!(clock.invalid_releases(), 2);
    clock.check_pool().unwrap();
    assert_eq!(clock.free_pairs(), 2);
    let (x, y) = (clock.begin().unwrap(), clock.begin().unwrap());
    assert_ne!(x.slot, y.slot);
    assert_eq!(clock.begin(), Err(TimingError::PoolExhausted));
}

/// Random sequences of scheduler calls never break the pool: every pair is free or out,
/// never both or twice, and every iteration is published or counted.
#[test]
fn random_call_sequences_keep_the_pool_and_the_totals() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s1 = drv.create_stream(drv.primary(0));
    let s2 = drv.create_stream(drv.primary(0));
    let (clock, _t, mut e) = start(&drv, None, 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let st = stream(if x & 64 == 0 { s1 } else { s2 });
        match x % 7 {
            0 => e.begin_iteration(),
            1 => e.segment_start(st),
            2 => e.segment_end(st),
            3 => {
                e.submit(sched(), QueuedRequestMetrics::default());
            }
            4 => e.time_segment(st, || drv.advance_ms(0.5)),
            5 => {
                drv.complete(s1);
                drv.complete(s2);
            }
            _ => {
                e.begin_iteration();
                e.time_segment(st, || ());
                e.submit(sched(), QueuedRequestMetrics::default());
            }
        }
        if i % 500 == 0 {
            clock.check_pool().unwrap();
        }
    }
    drv.complete(s1);
    drv.complete(s2);
    let stats = e.shutdown(Duration::from_secs(2));
    adds_up(&stats);
    clock.check_pool().unwrap();
    assert_eq!(clock.invalid_releases(), 0);
    assert_eq!(clock.free_pairs(), 8);
}

/// Defect 2: `segment_start` without `segment_end` is dropped as unpaired, never published
/// with an end event left over from an earlier iteration.
#[test]
fn start_without_end_is_an_unpaired_drop() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s = drv.create_stream(drv.primary(0));
    let (clock, t, mut e) = start(&drv, None, 1); // one pair: the stale end would be reused
    e.begin_iteration();
    e.time_segment(stream(s), || drv.advance_ms(3.0));
    e.submit(sched(), QueuedRequestMetrics::default());
    drv.complete(s);
    assert!(wait_for(&t, 1));
    // Start, never end: the pair's end event still marks the first iteration's end.
    e.begin_iteration();
    drv.advance_ms(10.0);
    e.segment_start(stream(s));
    assert_eq!(
        e.submit(sched(), QueuedRequestMetrics::default()),
        Some(DropReason::Unpaired)
    );
    // Start, end, start again (second segment never ended): unpaired too.
    e.begin_iteration();
    e.time_segment(stream(s), || ());
    e.segment_start(stream(s));
    assert_eq!(
        e.submit(sched(), QueuedRequestMetrics::default()),
        Some(DropReason::Unpaired)
    );
    // End without start: unpaired.
    e.begin_iteration();
    e.segment_end(stream(s));
    assert_eq!(
        e.submit(sched(), QueuedRequestMetrics::default()),
        Some(DropReason::Unpaired)
    );
    drv.complete(s);
    let stats = e.shutdown(Duration::from_secs(2));
    adds_up(&stats);
    assert_eq!(stats.published, 1);
    assert_eq!(stats.dropped.unpaired_segment, 3);
    assert_eq!(walls(&t), vec![0.003]);
    clock.check_pool().unwrap();
    assert_eq!(clock.free_pairs(), 1);
}

/// Defect 3: the engine thread's current context is the same after start, iterations,
/// shutdown and the clock's drop; with a context current and with none.
#[test]
fn engine_thread_context_is_never_changed() {
    for engine_ctx in [true, false] {
        let drv = FakeDriver::new(1);
        let primary = drv.primary(0);
        if engine_ctx {
            drv.set_current(Some(primary));
        }
        let before = drv.stack();
        let s = drv.create_stream(primary);
        let (clock, t, mut e) = start(&drv, if engine_ctx { None } else { Some(0) }, 32);
        assert_eq!(drv.stack(), before, "start changed the context stack");
        for i in 0..20 {
            e.begin_iteration();
            e.time_segment(stream(s), || drv.advance_ms(1.0));
            e.submit(sched(), QueuedRequestMetrics::default());
            assert_eq!(
                drv.stack(),
                before,
                "iteration {i} changed the context stack"
            );
            drv.complete(s);
        }
        assert!(wait_for(&t, 20));
        let stats = e.shutdown(Duration::from_secs(2));
        assert_eq!(stats.published, 20, "{stats:?}");
        assert_eq!(drv.stack(), before, "shutdown changed the context stack");
        drop(clock);
        assert_eq!(
            drv.stack(),
            before,
            "dropping the clock changed the context stack"
        );
        assert_eq!(drv.live_events(), 0, "events leaked");
        assert_eq!(drv.primary_refs(0), 0, "primary context reference leaked");
    }
}

/// Defect 4: a rank on device 1 (the engine thread's current context) times on device 1 and
/// holds nothing on device 0. A stream of another context is a counted, logged mismatch.
#[test]
fn a_rank_on_device_one_uses_device_ones_context() {
    let drv = FakeDriver::new(2);
    drv.set_current(Some(drv.primary(1))); // torch.cuda.set_device(1)
    let s = drv.create_stream(drv.primary(1));
    let (clock, t, mut e) = start(&drv, None, 8);
    assert_eq!(clock.device(), 1);
    assert_eq!(clock.context(), drv.primary(1));
    assert_eq!(drv.primary_refs(0), 0, "a context was opened on GPU 0");
    for _ in 0..5 {
        e.begin_iteration();
        e.time_segment(stream(s), || drv.advance_ms(2.0));
        assert_eq!(e.submit(sched(), QueuedRequestMetrics::default()), None);
    }
    drv.complete(s);
    assert!(wait_for(&t, 5));
    let stats = e.shutdown(Duration::from_secs(2));
    assert_eq!(stats.published, 5);
    assert!(walls(&t).iter().all(|&w| (w - 0.002).abs() < 1e-9));
    drop(clock);
    assert_eq!(drv.primary_refs(1), 0);

    // The same engine with the device configured wrongly: every iteration is refused by the
    // stream check (not by an opaque record failure) and counted.
    let (clock, t, mut e) = start(&drv, Some(0), 4);
    assert_eq!(clock.device(), 0);
    for _ in 0..3 {
        e.begin_iteration();
        e.time_segment(stream(s), || ());
        assert_eq!(
            e.submit(sched(), QueuedRequestMetrics::default()),
            Some(DropReason::TimingUnavailable)
        );
    }
    let stats = e.shutdown(Duration::from_secs(2));
    adds_up(&stats);
    assert_eq!(stats.dropped.timing_unavailable, 3);
    assert!(t.sent().is_empty());
    assert_eq!(
        drv.calls("event_record"),
        10,
        "mismatched records reached the driver"
    );
    clock.check_pool().unwrap();
}

/// A non-primary context current on the engine thread (a driver-API engine, or a one-GPU
/// stand-in for "another device") is used as is, without a primary reference.
#[test]
fn a_non_primary_current_context_is_used() {
    let drv = FakeDriver::new(1);
    let own = drv.create_context(0);
    drv.set_current(Some(own));
    let s = drv.create_stream(own);
    let (clock, t, mut e) = start(&drv, None, 2);
    assert_eq!(clock.context(), own);
    assert_eq!(drv.primary_refs(0), 0);
    e.begin_iteration();
    e.time_segment(stream(s), || drv.advance_ms(4.0));
    assert_eq!(e.submit(sched(), QueuedRequestMetrics::default()), None);
    drv.complete(s);
    assert!(wait_for(&t, 1));
    assert_eq!(walls(&t), vec![0.004]);
    e.shutdown(Duration::from_secs(1));
}

/// Defect 5: the publisher thread queries events in thread-local capture mode, so an engine
/// thread's global-mode capture is not invalidated by them.
#[test]
fn publisher_queries_do_not_invalidate_a_global_capture() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let busy = drv.create_stream(drv.primary(0));
    let graph = drv.create_stream(drv.primary(0));
    let (clock, t, mut e) = start(&drv, None, 8);
    // Iterations pending on `busy` keep the publisher polling throughout the capture.
    for _ in 0..3 {
        e.begin_iteration();
        e.time_segment(stream(busy), || drv.advance_ms(1.0));
        e.submit(sched(), QueuedRequestMetrics::default());
    }
    drv.begin_capture(graph, CaptureMode::Global);
    let queries = drv.calls("event_query");
    let deadline = Instant::now() + Duration::from_secs(5);
    while drv.calls("event_query") < queries + 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        drv.calls("event_query") >= queries + 20,
        "the publisher did not poll during the capture"
    );
    assert_eq!(drv.end_capture(graph), Ok(()), "capture invalidated");
    assert_eq!(drv.thread_local_threads(), 1);
    drv.complete(busy);
    assert!(wait_for(&t, 3));
    e.shutdown(Duration::from_secs(1));
    drop(clock);

    // The control: the same queries from a thread left in global mode do invalidate it, so
    // the fake can tell the difference.
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let graph = drv.create_stream(drv.primary(0));
    let clock = Arc::new(CudaClock::with_driver(drv.clone(), None, 2).unwrap());
    let mut span = clock.begin().unwrap();
    clock.mark_start(&mut span, StreamHandle::DEFAULT).unwrap();
    clock.mark_end(&mut span, StreamHandle::DEFAULT).unwrap();
    drv.begin_capture(graph, CaptureMode::Global);
    let c = clock.clone();
    std::thread::spawn(move || c.poll(&span)).join().unwrap();
    assert!(
        drv.end_capture(graph).is_err(),
        "the fake missed the invalidation"
    );
}

/// Segments marked on a capturing stream are not recorded (the events could not be timed and
/// would join the graph): the iteration is dropped as `graph_capture`, the capture stays
/// valid; timing around the replay works.
#[test]
fn iterations_timed_inside_a_capture_are_counted() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s = drv.create_stream(drv.primary(0));
    let (clock, t, mut e) = start(&drv, None, 4);
    drv.begin_capture(s, CaptureMode::Global);
    let records = drv.calls("event_record");
    e.begin_iteration();
    e.time_segment(stream(s), || ());
    assert_eq!(
        e.submit(sched(), QueuedRequestMetrics::default()),
        Some(DropReason::GraphCapture)
    );
    assert_eq!(
        drv.calls("event_record"),
        records,
        "recorded into the capture"
    );
    drv.end_capture(s).unwrap();
    // Replay, timed around it.
    e.begin_iteration();
    e.time_segment(stream(s), || drv.advance_ms(6.0));
    e.submit(sched(), QueuedRequestMetrics::default());
    drv.complete(s);
    assert!(wait_for(&t, 1));
    let stats = e.shutdown(Duration::from_secs(1));
    adds_up(&stats);
    assert_eq!(stats.dropped.graph_capture, 1);
    assert_eq!(walls(&t), vec![0.006]);
    clock.check_pool().unwrap();

    // A capture that begins mid-iteration: the end is not recorded into it either.
    let s2 = drv.create_stream(drv.primary(0));
    let (_clock, t, mut e) = start(&drv, None, 4);
    e.begin_iteration();
    e.segment_start(stream(s2));
    drv.begin_capture(s2, CaptureMode::ThreadLocal); // capture begins mid-iteration
    e.segment_end(stream(s2));
    assert_eq!(
        e.submit(sched(), QueuedRequestMetrics::default()),
        Some(DropReason::GraphCapture)
    );
    drv.end_capture(s2).unwrap();
    let stats = e.shutdown(Duration::from_secs(1));
    assert_eq!(stats.dropped.graph_capture, 1);
    assert!(t.sent().is_empty());
}

/// Pending timings are polled, never waited on; a never-completing one is a shutdown drop.
#[test]
fn pending_is_not_ready_and_shutdown_counts_it() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s = drv.create_stream(drv.primary(0));
    let clock = CudaClock::with_driver(drv.clone(), None, 2).unwrap();
    let mut span = clock.begin().unwrap();
    clock.mark_start(&mut span, stream(s)).unwrap();
    clock.mark_end(&mut span, stream(s)).unwrap();
    assert_eq!(clock.poll(&span), TimingPoll::Pending);
    drop(clock);
    let (_clock, _t, mut e) = start(&drv, None, 2);
    e.begin_iteration();
    e.time_segment(stream(s), || ());
    e.submit(sched(), QueuedRequestMetrics::default());
    let stats = e.shutdown(Duration::from_millis(50));
    adds_up(&stats);
    assert_eq!(stats.dropped.shutdown, 1);
}

/// No event is created per iteration: the pool is made up front.
#[test]
fn events_are_created_up_front_only() {
    let drv = FakeDriver::new(1);
    drv.set_current(Some(drv.primary(0)));
    let s = drv.create_stream(drv.primary(0));
    let (_clock, t, mut e) = start(&drv, None, 16);
    let created = drv.calls("event_create");
    assert_eq!(created, 32);
    for i in 0..100 {
        e.begin_iteration();
        e.time_segment(stream(s), || ());
        assert_eq!(e.submit(sched(), QueuedRequestMetrics::default()), None);
        drv.complete(s);
        assert!(wait_for(&t, i + 1)); // pairs come back before the next iteration
    }
    assert!(wait_for(&t, 100));
    e.shutdown(Duration::from_secs(1));
    assert_eq!(drv.calls("event_create"), created);
    // One stream check for one stream, not one per record.
    assert_eq!(drv.calls("stream_context"), 1);
}
