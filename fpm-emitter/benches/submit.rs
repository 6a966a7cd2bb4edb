//! The scheduler-side cost of the emitter (CPU clock): `submit` alone, and a whole iteration
//! (`begin_iteration` + one timed segment + `submit`). Target: median `submit` under 150 ns.
//!
//! `cargo bench -p fpm-emitter --bench submit`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fpm_emitter::{
    ClockChoice, Emitter, EmitterConfig, Endpoint, SendError, StreamHandle, Transport, Unsent,
};
use fpm_schema::{QueuedRequestsBuilder, ScheduledRequestsBuilder};

/// Discards messages (so the benchmark measures the emitter, not a socket or memory growth).
struct Discard;

impl Transport for Discard {
    fn send(&mut self, _counter: u64, payload: &[u8]) -> Result<(), SendError> {
        black_box(payload);
        Ok(())
    }
    fn close(&mut self, _timeout: Duration) -> Unsent {
        Unsent::default()
    }
    fn describe(&self) -> String {
        "discard".into()
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let config = EmitterConfig::new(Endpoint::Exact("discard".into()), "bench-worker", 0)
        .with_clock(ClockChoice::Cpu)
        .with_queue_capacity(1 << 20);
    let mut e = Emitter::start_with_transport(config, Discard).expect("start");
    let mut sched = ScheduledRequestsBuilder::new();
    sched.add_prefill(2000, 512, 1488);
    for i in 0..64 {
        sched.add_decode(1000 + i);
    }
    let sched = sched.build();
    let mut queued = QueuedRequestsBuilder::new();
    queued.add_waiting(3000);
    let queued = queued.build();

    // A real scheduler submits once per iteration (milliseconds apart), so the publisher
    // thread always keeps up. To measure that case and not the cheaper "queue full" path, time
    // batches of submits and let the queue drain between batches (untimed).
    fn timed_batches(e: &mut Emitter, iters: u64, mut one: impl FnMut(&mut Emitter)) -> Duration {
        const BATCH: u64 = 256;
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            let n = BATCH.min(iters - done);
            let t = Instant::now();
            for _ in 0..n {
                one(e);
            }
            total += t.elapsed();
            done += n;
            while e.stats().pending_timings > 0 {
                std::hint::spin_loop();
            }
        }
        total
    }
    c.bench_function("submit", |b| {
        b.iter_custom(|iters| {
            timed_batches(&mut e, iters, |e| {
                black_box(e.submit(black_box(sched), black_box(queued)));
            })
        })
    });
    c.bench_function("iteration (begin + segment + submit)", |b| {
        b.iter_custom(|iters| {
            timed_batches(&mut e, iters, |e| {
                e.begin_iteration();
                e.segment_start(StreamHandle::DEFAULT);
                e.segment_end(StreamHandle::DEFAULT);
                black_box(e.submit(black_box(sched), black_box(queued)));
            })
        })
    });
    c.final_summary();
    let stats = e.shutdown(Duration::from_secs(5));
    println!(
        "emitter after the benchmark: submitted {}, published {}, dropped {} ({:?})",
        stats.submitted,
        stats.published,
        stats.dropped.total(),
        stats.dropped
    );
    assert_eq!(
        stats.dropped.total(),
        0,
        "the benchmark must measure queued submits only"
    );
}
