//! Prometheus exposition of what the subscriber sees: per-stream gauges and a wall_time
//! histogram, labelled as Dynamo labels its metrics (`dynamo_namespace`, `dynamo_component`,
//! `dynamo_endpoint`) plus `worker_id` and `dp_rank`, and the subscriber's own counters.
//!
//! Label sets are bounded by the tracker's stream cap; a removed stream's series go away.

use std::collections::HashMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::ingest::{RejectReason, Sample};
use crate::subscriber::SubscriberStats;
use crate::tracker::{StreamKey, StreamState, Tracker};

type Labels = Vec<(&'static str, String)>;
/// (name, help, value of a stream at a time).
type GaugeDef = (&'static str, &'static str, fn(&StreamState, u64) -> f64);
/// (name, help, value of a stream).
type StreamCounterDef = (&'static str, &'static str, fn(&StreamState) -> u64);
/// (name, help, value of the subscriber's stats).
type TotalDef = (&'static str, &'static str, fn(&SubscriberStats) -> u64);
type FGauge = Gauge<f64, AtomicU64>;

fn labels(st_source: &crate::filter::Source, key: &StreamKey) -> Labels {
    vec![
        ("dynamo_namespace", st_source.namespace.clone()),
        ("dynamo_component", st_source.component.clone()),
        (
            "dynamo_endpoint",
            st_source.endpoint.clone().unwrap_or_default(),
        ),
        ("worker_id", key.worker_id.clone()),
        ("dp_rank", key.dp_rank.to_string()),
    ]
}

/// Per-stream gauge definitions: name, help, value.
const GAUGES: [GaugeDef; 14] = [
    (
        "fpm_wall_time_seconds",
        "wall_time of the latest iteration",
        |s, _| s.latest.wall_time,
    ),
    (
        "fpm_wall_time_p50_seconds",
        "median wall_time of recent iterations",
        |s, _| s.wall_time_quantile(0.5).unwrap_or(0.0),
    ),
    (
        "fpm_wall_time_p99_seconds",
        "99th percentile wall_time of recent iterations",
        |s, _| s.wall_time_quantile(0.99).unwrap_or(0.0),
    ),
    (
        "fpm_iterations_per_second",
        "iteration rate over the last 10 s",
        |s, now| s.iteration_rate(now),
    ),
    (
        "fpm_scheduled_prefill_requests",
        "prefill requests in the latest iteration",
        |s, _| s.latest.scheduled_requests.num_prefill_requests as f64,
    ),
    (
        "fpm_scheduled_prefill_tokens",
        "prefill tokens computed in the latest iteration",
        |s, _| s.latest.scheduled_requests.sum_prefill_tokens as f64,
    ),
    (
        "fpm_scheduled_decode_requests",
        "decode requests in the latest iteration",
        |s, _| s.latest.scheduled_requests.num_decode_requests as f64,
    ),
    (
        "fpm_scheduled_decode_kv_tokens",
        "decode KV tokens read in the latest iteration",
        |s, _| s.latest.scheduled_requests.sum_decode_kv_tokens as f64,
    ),
    (
        "fpm_queued_prefill_requests",
        "requests waiting for prefill",
        |s, _| s.latest.queued_requests.num_prefill_requests as f64,
    ),
    (
        "fpm_queued_prefill_tokens",
        "prompt tokens waiting for prefill",
        |s, _| s.latest.queued_requests.sum_prefill_tokens as f64,
    ),
    (
        "fpm_queued_decode_requests",
        "preempted decode requests waiting",
        |s, _| s.latest.queued_requests.num_decode_requests as f64,
    ),
    (
        "fpm_stream_stale",
        "1 when the stream has been silent longer than the stale time",
        |s, _| f64::from(u8::from(s.stale)),
    ),
    // Gauges, not counters: a message another relay delivers late takes itself back out.
    (
        "fpm_stream_gap_messages",
        "messages missing in counter gaps (a late arrival takes itself back out)",
        |s, _| s.counts.gap_messages as f64,
    ),
    (
        "fpm_stream_missed_before_start",
        "messages sent before the stream was first seen (a late arrival takes itself back out)",
        |s, _| s.counts.missed_before_start as f64,
    ),
];

/// Per-stream loss counters: name, help, value.
const STREAM_COUNTERS: [StreamCounterDef; 2] = [
    ("fpm_stream_restarts", "producer restarts", |s| {
        s.counts.restarts
    }),
    ("fpm_stream_messages", "messages received", |s| {
        s.counts.received
    }),
];

/// The subscriber's own counters: name, help, value.
const TOTALS: [TotalDef; 7] = [
    (
        "fpm_subscriber_received_messages",
        "NATS messages received",
        |s| s.received,
    ),
    (
        "fpm_subscriber_samples",
        "messages decoded into samples",
        |s| s.samples,
    ),
    ("fpm_subscriber_duplicates", "duplicated counters", |s| {
        s.streams.duplicates
    }),
    (
        "fpm_subscriber_reordered",
        "counters older than the latest",
        |s| s.streams.reordered,
    ),
    ("fpm_subscriber_restarts", "producer restarts", |s| {
        s.streams.restarts
    }),
    (
        "fpm_subscriber_sequence_gap_messages",
        "relay envelopes missing (sequence gaps)",
        |s| s.sequence.gap_messages,
    ),
    (
        "fpm_subscriber_slow_consumer_drops",
        "messages the NATS client dropped because the subscriber fell behind",
        |s| s.slow_consumer_drops,
    ),
];

/// Keeps the Prometheus families in step with a [`Subscriber`].
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
    gauges: Vec<Family<Labels, FGauge>>,
    stream_counters: Vec<Family<Labels, Counter>>,
    totals: Vec<Counter>,
    rejected: Family<Vec<(&'static str, &'static str)>, Counter>,
    tracked: Gauge,
    /// Messages missing now, all streams: counter gaps and before start (gauges: late
    /// arrivals take themselves back out).
    missing: [Gauge; 2],
    wall_time: Family<Labels, Histogram>,
    /// Labels of every stream exported, with the last counter values exported.
    exported: HashMap<StreamKey, (Labels, [u64; 2])>,
    last_totals: [u64; 7],
    last_rejected: [u64; RejectReason::ALL.len()],
}

impl Default for Exporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Exporter {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let gauges = GAUGES
            .iter()
            .map(|(name, help, _)| {
                let f = Family::<Labels, FGauge>::default();
                registry.register(*name, *help, f.clone());
                f
            })
            .collect();
        let stream_counters = STREAM_COUNTERS
            .iter()
            .map(|(name, help, _)| {
                let f = Family::<Labels, Counter>::default();
                registry.register(*name, *help, f.clone());
                f
            })
            .collect();
        let totals = TOTALS
            .iter()
            .map(|(name, help, _)| {
                let c = Counter::default();
                registry.register(*name, *help, c.clone());
                c
            })
            .collect();
        let rejected = Family::default();
        registry.register(
            "fpm_subscriber_rejected_messages",
            "messages that did not become samples, by reason",
            rejected.clone(),
        );
        let tracked = Gauge::default();
        registry.register(
            "fpm_subscriber_tracked_streams",
            "streams tracked now",
            tracked.clone(),
        );
        let missing = [Gauge::default(), Gauge::default()];
        registry.register(
            "fpm_subscriber_gap_messages",
            "messages missing in counter gaps, all streams",
            missing[0].clone(),
        );
        registry.register(
            "fpm_subscriber_missed_before_start",
            "messages sent before streams were first seen, all streams",
            missing[1].clone(),
        );
        let wall_time = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 14))
        });
        registry.register(
            "fpm_iteration_wall_time_seconds",
            "wall_time of iterations (heartbeats excluded)",
            wall_time.clone(),
        );
        let build = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        registry.register("fpm_build_info", "fpm version", build.clone());
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        Exporter {
            registry,
            gauges,
            stream_counters,
            totals,
            rejected,
            tracked,
            missing,
            wall_time,
            exported: HashMap::new(),
            last_totals: [0; 7],
            last_rejected: [0; RejectReason::ALL.len()],
        }
    }

    /// Records one sample's wall_time in the histogram (call for every sample).
    pub fn observe(&mut self, sample: &Sample) {
        if sample.is_heartbeat() {
            return;
        }
        let key = StreamKey {
            worker_id: sample.metrics.worker_id.clone(),
            dp_rank: sample.metrics.dp_rank,
        };
        if let Some((l, _)) = self.exported.get(&key) {
            self.wall_time
                .get_or_create(l)
                .observe(sample.metrics.wall_time);
        } else {
            let l = labels(&sample.source, &key);
            self.wall_time
                .get_or_create(&l)
                .observe(sample.metrics.wall_time);
            self.exported.insert(key, (l, [0; 2]));
        }
    }

    /// Brings every gauge and counter up to date with a subscriber's tracker and stats
    /// (`sub.tracker()`, `sub.stats()`) as of `now_ns`; removes the series of streams the
    /// tracker no longer has.
    pub fn update(&mut self, tracker: &Tracker, stats: &SubscriberStats, now_ns: u64) {
        let mut seen = std::collections::HashSet::new();
        for st in tracker.streams() {
            seen.insert(st.key.clone());
            let entry = self
                .exported
                .entry(st.key.clone())
                .or_insert_with(|| (labels(&st.source, &st.key), [0; 2]));
            for (f, (_, _, value)) in self.gauges.iter().zip(GAUGES.iter()) {
                f.get_or_create(&entry.0).set(value(st, now_ns));
            }
            for (i, (f, (_, _, value))) in self
                .stream_counters
                .iter()
                .zip(STREAM_COUNTERS.iter())
                .enumerate()
            {
                let v = value(st);
                f.get_or_create(&entry.0)
                    .inc_by(v.saturating_sub(entry.1[i]));
                entry.1[i] = v;
            }
        }
        let gone: Vec<StreamKey> = self
            .exported
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some((l, _)) = self.exported.remove(&k) {
                for f in &self.gauges {
                    f.remove(&l);
                }
                for f in &self.stream_counters {
                    f.remove(&l);
                }
                self.wall_time.remove(&l);
            }
        }
        for (i, (c, (_, _, value))) in self.totals.iter().zip(TOTALS.iter()).enumerate() {
            let v = value(stats);
            c.inc_by(v.saturating_sub(self.last_totals[i]));
            self.last_totals[i] = v;
        }
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let v = stats.rejected.get(*r);
            self.rejected
                .get_or_create(&vec![("reason", r.as_str())])
                .inc_by(v.saturating_sub(self.last_rejected[i]));
            self.last_rejected[i] = v;
        }
        self.tracked.set(stats.tracked_streams as i64);
        self.missing[0].set(i64::try_from(stats.streams.gap_messages).unwrap_or(i64::MAX));
        self.missing[1].set(i64::try_from(stats.streams.missed_before_start).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Source;
    use crate::ingest::RejectCounts;
    use crate::tracker::TrackerConfig;
    use std::sync::Arc;

    fn sample(worker: &str, rank: i64, counter: i64, wall: f64) -> Sample {
        let mut m = fpm_schema::ForwardPassMetrics::heartbeat(worker, rank);
        m.counter_id = counter;
        m.wall_time = wall;
        m.scheduled_requests.num_decode_requests = 7;
        Sample {
            received_at_ns: 1_000_000_000 + counter as u64,
            publisher_id: 1,
            sequence: counter as u64,
            published_at_ms: 0,
            source: Arc::new(Source {
                namespace: "ns".into(),
                component: "backend".into(),
                endpoint: Some("generate".into()),
            }),
            metrics: m,
        }
    }

    fn stats(t: &Tracker) -> SubscriberStats {
        SubscriberStats {
            received: t.totals().received,
            samples: t.totals().received,
            rejected: RejectCounts::default(),
            streams: t.totals(),
            sequence: t.sequence(),
            tracked_streams: t.streams().count() as u64,
            untracked: 0,
            slow_consumer_drops: 0,
        }
    }

    #[test]
    fn series_follow_the_tracker() {
        let mut t = Tracker::new(TrackerConfig {
            remove_after: std::time::Duration::from_secs(1),
            ..TrackerConfig::default()
        });
        let mut x = Exporter::new();
        for c in [3, 4, 6] {
            let s = sample("w", 1, c, 0.02);
            t.observe(&s);
            x.observe(&s);
        }
        x.update(&t, &stats(&t), 1_000_000_100);
        let text = x.encode();
        let l = r#"dynamo_namespace="ns",dynamo_component="backend",dynamo_endpoint="generate",worker_id="w",dp_rank="1""#;
        for line in [
            format!("fpm_scheduled_decode_requests{{{l}}} 7.0"),
            format!("fpm_stream_gap_messages{{{l}}} 1.0"),
            format!("fpm_stream_missed_before_start{{{l}}} 3.0"),
            format!("fpm_iteration_wall_time_seconds_count{{{l}}} 3"),
            "fpm_subscriber_gap_messages 1".to_owned(),
            "fpm_subscriber_tracked_streams 1".to_owned(),
            r#"fpm_build_info{version=""#.to_owned(),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        // Counters are not double counted across updates.
        x.update(&t, &stats(&t), 1_000_000_200);
        assert!(x.encode().contains("fpm_subscriber_gap_messages 1"));
        // The stream goes away: its series too.
        t.sweep(5_000_000_000);
        x.update(&t, &stats(&t), 5_000_000_000);
        let text = x.encode();
        assert!(!text.contains(r#"worker_id="w""#), "{text}");
        // Subscriber-wide totals keep what removed streams lost.
        assert!(text.contains("fpm_subscriber_gap_messages 1"), "{text}");
        assert!(text.contains("fpm_subscriber_tracked_streams 0"), "{text}");
    }
}
