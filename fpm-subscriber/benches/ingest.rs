//! Ingest cost per message: envelope decode, payload decode, tracking, and the update of the
//! three planner models (fed every iteration, the costlier policy). Target: at least
//! 1,000,000 messages/s on one core.
//!
//! `cargo bench -p fpm-subscriber --bench ingest`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fpm_schema::{Envelope, ForwardPassMetrics, ScheduledRequestsBuilder, FPM_TOPIC};
use fpm_subscriber::{Ingest, ScopeFilter, SubjectFilter, Tracker, TrackerConfig};

const SUBJECT: &str = "namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics";

/// `streams` engine streams (16 workers x ranks), `per_stream` consecutive iterations each,
/// interleaved as a relay would deliver them.
fn messages(streams: usize, per_stream: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(streams * per_stream);
    for i in 0..per_stream {
        for s in 0..streams {
            let mut b = ScheduledRequestsBuilder::new();
            for k in 0..8 {
                b.add_decode(1000 + 37 * k + i as i64);
            }
            let mut m = ForwardPassMetrics::heartbeat(
                format!("worker-{:04}-9f3c2a7d", s / 4),
                (s % 4) as i64,
            );
            m.counter_id = i as i64;
            m.wall_time = 0.012 + i as f64 * 1e-6;
            m.scheduled_requests = b.build();
            let payload = fpm_schema::encode(&m);
            out.push(
                Envelope {
                    publisher_id: 4_242_424_242,
                    sequence: (i * streams + s) as u64,
                    published_at: 1_764_000_000_000,
                    topic: FPM_TOPIC,
                    payload: &payload,
                }
                .encode(),
            );
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let msgs = messages(64, 256);
    let filter = SubjectFilter::parse("dynamo", "*", "*", ScopeFilter::Endpoint).unwrap();
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("decode+track, 64 streams", |b| {
        b.iter_batched_ref(
            || {
                (
                    Ingest::new(filter.clone(), fpm_schema::DEFAULT_MAX_SIZE),
                    Tracker::new(TrackerConfig::default()),
                )
            },
            |(ingest, tracker)| {
                for (i, m) in msgs.iter().enumerate() {
                    let s = ingest.ingest(SUBJECT, m, i as u64).unwrap();
                    black_box(tracker.observe(&s));
                }
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("decode+track+3 planner models, every iteration", |b| {
        use fpm_subscriber::planner::{ModelConfig, ModelKind, PerfModel};
        b.iter_batched_ref(
            || {
                let models: Vec<PerfModel> =
                    [ModelKind::Prefill, ModelKind::Decode, ModelKind::Agg]
                        .into_iter()
                        .map(|k| PerfModel::new(k, &ModelConfig::default()).unwrap())
                        .collect();
                (
                    Ingest::new(filter.clone(), fpm_schema::DEFAULT_MAX_SIZE),
                    Tracker::new(TrackerConfig::default()),
                    models,
                )
            },
            |(ingest, tracker, models)| {
                for (i, m) in msgs.iter().enumerate() {
                    let s = ingest.ingest(SUBJECT, m, i as u64).unwrap();
                    black_box(tracker.observe(&s));
                    for model in models.iter_mut() {
                        model.observe(&s.metrics);
                    }
                }
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("decode only", |b| {
        let mut ingest = Ingest::new(filter.clone(), fpm_schema::DEFAULT_MAX_SIZE);
        b.iter(|| {
            for (i, m) in msgs.iter().enumerate() {
                black_box(ingest.ingest(SUBJECT, m, i as u64).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
