//! Prometheus metrics of the relay; [`Stats`] is a plain snapshot of the same numbers.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// Why a message was not forwarded although it was valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelayDropReason {
    /// The buffer was at its message or byte limit.
    BufferFull,
    /// Still buffered when the shutdown timeout expired.
    Shutdown,
    /// The NATS client refused the publish.
    PublishError,
    /// The publish did not complete within the publish timeout.
    PublishTimeout,
}

impl RelayDropReason {
    /// All reasons, in label order.
    pub const ALL: [RelayDropReason; 4] = [
        RelayDropReason::BufferFull,
        RelayDropReason::Shutdown,
        RelayDropReason::PublishError,
        RelayDropReason::PublishTimeout,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayDropReason::BufferFull => "buffer_full",
            RelayDropReason::Shutdown => "shutdown",
            RelayDropReason::PublishError => "publish_error",
            RelayDropReason::PublishTimeout => "publish_timeout",
        }
    }
}

/// Why a message from an engine was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidReason {
    /// Not exactly 3 frames.
    FrameCount,
    /// The first (topic) frame is not empty.
    TopicFrame,
    /// The counter frame is not 8 bytes.
    CounterFrame,
    /// The payload is over the size limit.
    TooLarge,
    /// The payload is not an FPM msgpack map whose key can be read.
    Undecodable,
    /// The payload's `version` is not 1.
    UnsupportedVersion,
    /// A message whose frames announce more than the payload limit plus room for the
    /// other frames (1 KiB): refused from the frame header, before it is read or allocated.
    /// The relay drops that connection, counts one message, and reconnects.
    OversizedFrame,
    /// The engine's stream broke ZeroMQ's framing after the handshake (reserved flag bits,
    /// a command inside a message, a malformed command): the relay drops that connection,
    /// counts one message, and reconnects.
    Protocol,
}

impl InvalidReason {
    /// All reasons, in label order.
    pub const ALL: [InvalidReason; 8] = [
        InvalidReason::FrameCount,
        InvalidReason::TopicFrame,
        InvalidReason::CounterFrame,
        InvalidReason::TooLarge,
        InvalidReason::Undecodable,
        InvalidReason::UnsupportedVersion,
        InvalidReason::OversizedFrame,
        InvalidReason::Protocol,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::FrameCount => "frame_count",
            InvalidReason::TopicFrame => "topic_frame",
            InvalidReason::CounterFrame => "counter_frame",
            InvalidReason::TooLarge => "too_large",
            InvalidReason::Undecodable => "undecodable",
            InvalidReason::UnsupportedVersion => "unsupported_version",
            InvalidReason::OversizedFrame => "oversized_frame",
            InvalidReason::Protocol => "protocol",
        }
    }
}

/// A snapshot of the relay's counters.
///
/// While running, `received == invalid.total() + published + dropped.total() + buffered`
/// (up to messages being handed from one stage to the next at the moment of the snapshot);
/// after shutdown `buffered` is 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages read from ZeroMQ (valid or not).
    pub received: u64,
    /// Messages handed to NATS.
    pub published: u64,
    /// Valid messages not forwarded, by reason (`RelayDropReason::ALL` order).
    pub dropped: ReasonCounts<4>,
    /// Rejected messages, by reason (`InvalidReason::ALL` order).
    pub invalid: ReasonCounts<8>,
    /// Messages lost upstream, from counter-frame gaps.
    pub counter_gaps: u64,
    /// Counter resets (engine restarts).
    pub counter_resets: u64,
    /// Messages lost before the first one seen on a stream: the first counter after the relay
    /// started reading an endpoint, or after a reset, is above 0 (publishers count from 0).
    /// Not part of `counter_gaps`.
    pub missed_before_start: u64,
    /// Messages counted under the `other` label set because the per-input label cap was
    /// reached (the totals still count them).
    pub label_overflow: u64,
    /// HTTP connections refused because the concurrent-connection cap was reached.
    pub http_rejected: u64,
    /// Messages waiting in the buffer.
    pub buffered: u64,
    /// Bytes waiting in the buffer.
    pub buffered_bytes: u64,
    /// Whether the NATS connection is up.
    pub nats_connected: bool,
    /// Reconnections to NATS after a lost connection.
    pub nats_reconnects: u64,
}

impl Stats {
    /// Dropped messages for one reason (the field `dropped` holds them all).
    pub fn dropped_for(&self, reason: RelayDropReason) -> u64 {
        let i = RelayDropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped.0[i]
    }

    /// Invalid messages for one reason (the field `invalid` holds them all).
    pub fn invalid_for(&self, reason: InvalidReason) -> u64 {
        let i = InvalidReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.invalid.0[i]
    }
}

/// Counts by reason, in the order of the reason's `ALL` constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonCounts<const N: usize>(pub [u64; N]);

impl<const N: usize> Default for ReasonCounts<N> {
    fn default() -> Self {
        ReasonCounts([0; N])
    }
}

impl<const N: usize> ReasonCounts<N> {
    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Default cap on per-input label sets (`endpoint`, `worker_id`, `dp_rank`).
pub const DEFAULT_MAX_LABEL_SETS: usize = 1024;

/// Counts of one input label set: (endpoint, worker_id, dp_rank) as seen in the messages.
#[derive(Debug, Default)]
pub(crate) struct InputSeries {
    /// Valid messages.
    pub received: AtomicU64,
    /// Messages lost upstream (counter-frame gaps).
    pub gaps: AtomicU64,
    /// Counter resets (engine restarts).
    pub resets: AtomicU64,
    /// Messages lost before the first one seen (first counter above 0).
    pub missed_before_start: AtomicU64,
}

impl InputSeries {
    fn is_zero(&self) -> bool {
        self.received.load(Ordering::Relaxed) == 0
            && self.gaps.load(Ordering::Relaxed) == 0
            && self.resets.load(Ordering::Relaxed) == 0
            && self.missed_before_start.load(Ordering::Relaxed) == 0
    }
}

/// (endpoint index, worker_id, dp_rank, series).
type LabelSet = (usize, String, i64, Arc<InputSeries>);

/// A per-input counter family: name, help, and the field it shows.
type InputFamily = (&'static str, &'static str, fn(&InputSeries) -> &AtomicU64);

/// One configured endpoint: its overflow series and when it last delivered a valid message.
#[derive(Debug)]
struct EndpointSlot {
    endpoint: String,
    /// Nanoseconds after `InputTable::started` of the last valid message, plus 1 (0: never).
    last_ns: AtomicU64,
    /// Where label sets over the cap are counted (`worker_id="other"`, `dp_rank="other"`).
    other: Arc<InputSeries>,
}

/// Per-input series, bounded in number. Lookups happen on an input's cache misses
/// only; scrapes read it under the same lock.
#[derive(Debug)]
pub(crate) struct InputTable {
    started: Instant,
    endpoints: Vec<EndpointSlot>,
    /// (endpoint index, worker_id, dp_rank, series): in creation order.
    sets: Mutex<Vec<LabelSet>>,
    len: AtomicUsize,
    cap: usize,
    /// Messages counted under `other` because the cap was reached.
    pub overflow: Counter,
}

impl InputTable {
    fn new(endpoints: &[String], cap: usize) -> Self {
        InputTable {
            started: Instant::now(),
            endpoints: endpoints
                .iter()
                .map(|e| EndpointSlot {
                    endpoint: e.clone(),
                    last_ns: AtomicU64::new(0),
                    other: Arc::default(),
                })
                .collect(),
            sets: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            cap,
            overflow: Counter::default(),
        }
    }

    /// The series of `(endpoint #ep, worker_id, dp_rank)`, created if the cap allows. The
    /// bool is false for the shared overflow series (the caller must not cache it, so every
    /// message over the cap is counted in `overflow`).
    pub fn series(&self, ep: usize, worker_id: &str, dp_rank: i64) -> (Arc<InputSeries>, bool) {
        let Some(slot) = self.endpoints.get(ep) else {
            return (Arc::default(), false);
        };
        if self.len.load(Ordering::Relaxed) >= self.cap {
            self.overflow.inc();
            return (slot.other.clone(), false);
        }
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, _, s)) = sets
            .iter()
            .find(|(e, w, r, _)| *e == ep && w == worker_id && *r == dp_rank)
        {
            return (s.clone(), true);
        }
        let s = Arc::new(InputSeries::default());
        sets.push((ep, worker_id.to_owned(), dp_rank, s.clone()));
        self.len.store(sets.len(), Ordering::Relaxed);
        (s, true)
    }

    /// Records that endpoint #ep delivered a valid message at `at`.
    pub fn touch(&self, ep: usize, at: Instant) {
        if let Some(slot) = self.endpoints.get(ep) {
            let ns = u64::try_from(at.saturating_duration_since(self.started).as_nanos())
                .unwrap_or(u64::MAX - 1);
            slot.last_ns.store(ns + 1, Ordering::Relaxed);
        }
    }

    /// Seconds since endpoint #ep's last valid message (since the relay started if none).
    fn age_seconds(&self, slot: &EndpointSlot) -> f64 {
        let now = self.started.elapsed().as_secs_f64();
        match slot.last_ns.load(Ordering::Relaxed) {
            0 => now,
            ns => (now - (ns - 1) as f64 / 1e9).max(0.0),
        }
    }

    /// Sum over label sets (including `other`) of one field, for tests.
    #[cfg(test)]
    fn sum(&self, f: impl Fn(&InputSeries) -> u64) -> u64 {
        let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.iter().map(|(_, _, _, s)| f(s)).sum::<u64>()
            + self.endpoints.iter().map(|e| f(&e.other)).sum::<u64>()
    }
}

type InputLabels<'a> = [(&'static str, &'a str); 3];

impl Collector for InputTable {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(String, String, String, Arc<InputSeries>)> = {
            let sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
            sets.iter()
                .map(|(e, w, r, s)| {
                    (
                        self.endpoints[*e].endpoint.clone(),
                        w.clone(),
                        r.to_string(),
                        s.clone(),
                    )
                })
                .chain(
                    self.endpoints
                        .iter()
                        .filter(|e| !e.other.is_zero())
                        .map(|e| {
                            (
                                e.endpoint.clone(),
                                "other".to_owned(),
                                "other".to_owned(),
                                e.other.clone(),
                            )
                        }),
                )
                .collect()
        };
        let families: [InputFamily; 4] = [
            (
                "fpm_relay_input_received_messages",
                "Valid messages read, per input (endpoint, worker_id, dp_rank)",
                |s| &s.received,
            ),
            (
                "fpm_relay_input_counter_gap_messages",
                "Messages lost upstream (counter-frame gaps), per input",
                |s| &s.gaps,
            ),
            (
                "fpm_relay_input_counter_resets",
                "Counter resets (engine restarts), per input",
                |s| &s.resets,
            ),
            (
                "fpm_relay_input_missed_before_start",
                "Messages lost before the first one seen on a stream (first counter above 0), per input",
                |s| &s.missed_before_start,
            ),
        ];
        for (name, help, field) in families {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (e, w, r, s) in &rows {
                let labels: InputLabels<'_> = [("endpoint", e), ("worker_id", w), ("dp_rank", r)];
                ConstCounter::new(field(s).load(Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "fpm_relay_input_last_message_age_seconds",
            "Seconds since the endpoint's last valid message (since the relay started if none yet)",
            None,
            MetricType::Gauge,
        )?;
        for slot in &self.endpoints {
            let labels = [("endpoint", slot.endpoint.as_str())];
            ConstGauge::new(self.age_seconds(slot)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `process_cpu_seconds_total` and `process_resident_memory_bytes`, read from `/proc/self`
/// on each scrape (Linux; absent elsewhere).
#[derive(Debug, Default)]
struct ProcessCollector;

/// (CPU seconds, resident bytes) of this process.
pub(crate) fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse_proc(&stat, &statm, clock_ticks()?, page_size()?)
}

fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (t > 0).then_some(t as f64)
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|p| *p > 0)
}

/// utime and stime are fields 14 and 15 of `/proc/self/stat` (after the parenthesised
/// command name, which may hold spaces); resident pages are field 2 of `statm`.
fn parse_proc(stat: &str, statm: &str, ticks: f64, page: u64) -> Option<(f64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut f = after.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let rss: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(((utime + stime) as f64 / ticks, rss * page))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((cpu, rss)) = process_usage() else {
            return Ok(());
        };
        let m = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(cpu).encode(m)?;
        let m = encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(rss as i64).encode(m)?;
        Ok(())
    }
}

/// The relay's metrics: registered in a [`Registry`] for `/metrics` and readable as [`Stats`].
#[derive(Debug)]
pub(crate) struct Metrics {
    pub received: Counter,
    pub published: Counter,
    pub dropped: [Counter; 4],
    pub invalid: [Counter; 8],
    pub gaps: Counter,
    pub resets: Counter,
    pub missed_before_start: Counter,
    pub buffered: Gauge,
    pub buffered_bytes: Gauge,
    pub connected: Gauge<i64, AtomicI64>,
    pub reconnects: Counter<u64, AtomicU64>,
    pub http_rejected: Counter,
    pub latency: Histogram,
    /// Per-input series (labelled by endpoint, worker_id, dp_rank).
    pub inputs: Arc<InputTable>,
    pub registry: Registry,
}

impl Metrics {
    /// Metrics without inputs (unit tests).
    #[cfg(test)]
    pub fn new() -> Self {
        Self::with_inputs(&[], DEFAULT_MAX_LABEL_SETS)
    }

    /// Metrics for these endpoints, with at most `max_label_sets` per-input label sets.
    pub fn with_inputs(endpoints: &[String], max_label_sets: usize) -> Self {
        let mut registry = Registry::default();
        let received = Counter::default();
        registry.register(
            "fpm_relay_received_messages",
            "Messages read from the engines' ZeroMQ sockets, valid or not",
            received.clone(),
        );
        let published = Counter::default();
        registry.register(
            "fpm_relay_published_messages",
            "Messages published to NATS",
            published.clone(),
        );
        let dropped_f = Family::<Labels, Counter>::default();
        let dropped =
            RelayDropReason::ALL.map(|r| dropped_f.get_or_create_owned(&[("reason", r.as_str())]));
        registry.register(
            "fpm_relay_dropped_messages",
            "Valid messages not forwarded: buffer_full (NATS away too long), shutdown (unflushed at exit), publish_error, publish_timeout",
            dropped_f,
        );
        let invalid_f = Family::<Labels, Counter>::default();
        let invalid =
            InvalidReason::ALL.map(|r| invalid_f.get_or_create_owned(&[("reason", r.as_str())]));
        registry.register(
            "fpm_relay_invalid_messages",
            "Messages rejected by validation, by reason (oversized_frame and protocol: one per engine connection the relay dropped for a frame over the size limit or broken framing)",
            invalid_f,
        );
        let gaps = Counter::default();
        registry.register(
            "fpm_relay_counter_gap_messages",
            "Messages lost upstream, from gaps in the engines' counter frames",
            gaps.clone(),
        );
        let resets = Counter::default();
        registry.register(
            "fpm_relay_counter_resets",
            "Counter frames that went backwards (engine restarts)",
            resets.clone(),
        );
        let missed_before_start = Counter::default();
        registry.register(
            "fpm_relay_missed_before_start",
            "Messages lost before the first one seen on a stream (at start or after a reset, the first counter was above 0)",
            missed_before_start.clone(),
        );
        let buffered = Gauge::default();
        registry.register(
            "fpm_relay_buffered_messages",
            "Messages waiting to be published",
            buffered.clone(),
        );
        let buffered_bytes = Gauge::default();
        registry.register(
            "fpm_relay_buffered_bytes",
            "Payload bytes waiting to be published",
            buffered_bytes.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "fpm_relay_nats_connected",
            "1 while the NATS connection is up",
            connected.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "fpm_relay_nats_reconnects",
            "Reconnections to NATS after a lost connection",
            reconnects.clone(),
        );
        let http_rejected = Counter::default();
        registry.register(
            "fpm_relay_http_rejected_connections",
            "HTTP connections answered 503 and closed because the concurrent-connection cap was reached",
            http_rejected.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "fpm_relay_publish_latency_seconds",
            "Time from ZeroMQ receive to NATS publish",
            latency.clone(),
        );
        let inputs = Arc::new(InputTable::new(endpoints, max_label_sets));
        registry.register(
            "fpm_relay_label_overflow",
            "Messages counted under worker_id=\"other\", dp_rank=\"other\" because the per-input label-set cap was reached",
            inputs.overflow.clone(),
        );
        registry.register_collector(Box::new(inputs.clone()));
        let build = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        build
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register("fpm_build_info", "The relay's version; always 1", build);
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            received,
            published,
            dropped,
            invalid,
            gaps,
            resets,
            missed_before_start,
            buffered,
            buffered_bytes,
            connected,
            reconnects,
            http_rejected,
            latency,
            inputs,
            registry,
        }
    }

    pub fn drop_msgs(&self, reason: RelayDropReason, n: u64) {
        let i = RelayDropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped[i].inc_by(n);
    }

    pub fn invalid(&self, reason: InvalidReason) {
        let i = InvalidReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.invalid[i].inc();
    }

    pub fn stats(&self) -> Stats {
        Stats {
            received: self.received.get(),
            published: self.published.get(),
            dropped: ReasonCounts(self.dropped.each_ref().map(Counter::get)),
            invalid: ReasonCounts(self.invalid.each_ref().map(Counter::get)),
            counter_gaps: self.gaps.get(),
            counter_resets: self.resets.get(),
            missed_before_start: self.missed_before_start.get(),
            label_overflow: self.inputs.overflow.get(),
            http_rejected: self.http_rejected.get(),
            buffered: self.buffered.get().max(0) as u64,
            buffered_bytes: self.buffered_bytes.get().max(0) as u64,
            nats_connected: self.connected.get() == 1,
            nats_reconnects: self.reconnects.get(),
        }
    }

    /// Sum of the per-input received counters (valid messages), for consistency checks.
    #[cfg(test)]
    pub fn input_received(&self) -> u64 {
        self.inputs.sum(|s| s.received.load(Ordering::Relaxed))
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let stat = "42 (fpm relay) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 1000 77";
        assert_eq!(
            parse_proc(stat, "1000 300 20 1 0 50 0\n", 100.0, 4096),
            Some((3.0, 300 * 4096))
        );
        assert_eq!(parse_proc("garbage", "", 100.0, 4096), None);
        let (cpu, rss) = process_usage().expect("Linux /proc");
        assert!(cpu >= 0.0 && rss > 1 << 20, "{cpu} {rss}");
    }

    #[test]
    fn label_sets_are_capped_and_overflow_counted() {
        let m = Metrics::with_inputs(&["ipc:///a".into(), "ipc:///b".into()], 2);
        let (a, cached) = m.inputs.series(0, "w", 0);
        assert!(cached);
        a.received.fetch_add(1, Ordering::Relaxed);
        let (a2, _) = m.inputs.series(0, "w", 0);
        assert!(Arc::ptr_eq(&a, &a2));
        let (b, cached) = m.inputs.series(1, "w", 1);
        assert!(cached);
        b.received.fetch_add(1, Ordering::Relaxed);
        let (o, cached) = m.inputs.series(1, "x", 5);
        assert!(!cached);
        o.received.fetch_add(1, Ordering::Relaxed);
        assert_eq!(m.stats().label_overflow, 1);
        assert_eq!(m.input_received(), 3);
        let text = m.encode();
        for line in [
            "fpm_relay_input_received_messages_total{endpoint=\"ipc:///a\",worker_id=\"w\",dp_rank=\"0\"} 1",
            "fpm_relay_input_received_messages_total{endpoint=\"ipc:///b\",worker_id=\"other\",dp_rank=\"other\"} 1",
            "fpm_relay_label_overflow_total 1",
            "fpm_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
