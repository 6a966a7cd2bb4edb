//! Prometheus metrics of the relay; [`Stats`] is a plain snapshot of the same numbers.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

/// Why a message was not forwarded although it was valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The buffer was at its message or byte limit.
    BufferFull,
    /// Still buffered when the shutdown timeout expired.
    Shutdown,
    /// The NATS client refused the publish.
    PublishError,
    /// The publish did not complete within the publish timeout.
    PublishTimeout,
}

impl DropReason {
    /// All reasons, in label order.
    pub const ALL: [DropReason; 4] = [
        DropReason::BufferFull,
        DropReason::Shutdown,
        DropReason::PublishError,
        DropReason::PublishTimeout,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::Shutdown => "shutdown",
            DropReason::PublishError => "publish_error",
            DropReason::PublishTimeout => "publish_timeout",
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
}

impl InvalidReason {
    /// All reasons, in label order.
    pub const ALL: [InvalidReason; 6] = [
        InvalidReason::FrameCount,
        InvalidReason::TopicFrame,
        InvalidReason::CounterFrame,
        InvalidReason::TooLarge,
        InvalidReason::Undecodable,
        InvalidReason::UnsupportedVersion,
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
    /// Valid messages not forwarded, by reason (`DropReason::ALL` order).
    pub dropped: ReasonCounts<4>,
    /// Rejected messages, by reason (`InvalidReason::ALL` order).
    pub invalid: ReasonCounts<6>,
    /// Messages lost upstream, from counter-frame gaps.
    pub counter_gaps: u64,
    /// Counter resets (engine restarts).
    pub counter_resets: u64,
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
    /// Dropped messages for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped.0[i]
    }

    /// Invalid messages for one reason.
    pub fn invalid(&self, reason: InvalidReason) -> u64 {
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

/// The relay's metrics: registered in a [`Registry`] for `/metrics` and readable as [`Stats`].
#[derive(Debug)]
pub(crate) struct Metrics {
    pub received: Counter,
    pub published: Counter,
    pub dropped: [Counter; 4],
    pub invalid: [Counter; 6],
    pub gaps: Counter,
    pub resets: Counter,
    pub buffered: Gauge,
    pub buffered_bytes: Gauge,
    pub connected: Gauge<i64, AtomicI64>,
    pub reconnects: Counter<u64, AtomicU64>,
    pub latency: Histogram,
    pub registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
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
            DropReason::ALL.map(|r| dropped_f.get_or_create_owned(&[("reason", r.as_str())]));
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
            "Messages rejected by validation, by reason",
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
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "fpm_relay_publish_latency_seconds",
            "Time from ZeroMQ receive to NATS publish",
            latency.clone(),
        );
        Metrics {
            received,
            published,
            dropped,
            invalid,
            gaps,
            resets,
            buffered,
            buffered_bytes,
            connected,
            reconnects,
            latency,
            registry,
        }
    }

    pub fn drop_msgs(&self, reason: DropReason, n: u64) {
        let i = DropReason::ALL
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
            buffered: self.buffered.get().max(0) as u64,
            buffered_bytes: self.buffered_bytes.get().max(0) as u64,
            nats_connected: self.connected.get() == 1,
            nats_reconnects: self.reconnects.get(),
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
