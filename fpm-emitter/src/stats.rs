//! Counters: every message the emitter does not publish is counted with a reason.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::clock::ClockKind;

/// Why an iteration's message was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The submission queue was full (the publisher thread is behind).
    QueueFull,
    /// The iteration could not be timed (no free CUDA event pair, or a CUDA call failed while
    /// recording).
    TimingUnavailable,
    /// Reading the GPU timing failed.
    TimingFailed,
    /// The segments ran on more than one stream, so the span is ambiguous (as upstream, the
    /// sample is skipped).
    MultiStream,
    /// No subscriber was connected to receive it.
    NoSubscriber,
    /// A subscriber's queue was full.
    SendHwm,
    /// The transport failed.
    SendError,
    /// Still waiting for the GPU, or still queued for a subscriber (see
    /// [`Emitter::shutdown`](crate::Emitter::shutdown)), when the shutdown timeout expired.
    Shutdown,
    /// Segment markers that do not pair up: an end without a start, or a segment still open
    /// at submit (`segment_start` without `segment_end`).
    Unpaired,
    /// The events were recorded inside a CUDA graph capture and cannot be timed (time the
    /// graph's replay instead).
    GraphCapture,
    /// The publisher thread is gone (it panicked): the iteration could not be handed over.
    PublisherGone,
}

impl DropReason {
    /// Every reason, in a fixed order.
    pub const ALL: [DropReason; 11] = [
        DropReason::QueueFull,
        DropReason::TimingUnavailable,
        DropReason::TimingFailed,
        DropReason::MultiStream,
        DropReason::NoSubscriber,
        DropReason::SendHwm,
        DropReason::SendError,
        DropReason::Shutdown,
        DropReason::Unpaired,
        DropReason::GraphCapture,
        DropReason::PublisherGone,
    ];

    /// The reason for an iteration whose timing failed on the scheduler side.
    pub fn for_timing_error(e: crate::TimingError) -> DropReason {
        match e {
            crate::TimingError::Unpaired => DropReason::Unpaired,
            crate::TimingError::Captured => DropReason::GraphCapture,
            _ => DropReason::TimingUnavailable,
        }
    }

    /// The metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TimingUnavailable => "timing_unavailable",
            DropReason::TimingFailed => "timing_failed",
            DropReason::MultiStream => "multi_stream",
            DropReason::NoSubscriber => "no_subscriber",
            DropReason::SendHwm => "send_hwm",
            DropReason::SendError => "send_error",
            DropReason::Shutdown => "shutdown",
            DropReason::Unpaired => "unpaired_segment",
            DropReason::GraphCapture => "graph_capture",
            DropReason::PublisherGone => "publisher_gone",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Shared atomic counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub submitted: AtomicU64,
    pub published: AtomicU64,
    pub heartbeats: AtomicU64,
    pub heartbeats_dropped: AtomicU64,
    pub lost_with_subscribers: AtomicU64,
    pub pending: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl Counters {
    #[inline]
    pub fn drop_one(&self, reason: DropReason) {
        self.drop_n(reason, 1);
    }

    #[inline]
    pub fn drop_n(&self, reason: DropReason, n: u64) {
        self.dropped[reason.index()].fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self, clock: ClockKind) -> EmitterStats {
        let d = |r: DropReason| self.dropped[r.index()].load(Relaxed);
        EmitterStats {
            clock,
            submitted: self.submitted.load(Relaxed),
            published: self.published.load(Relaxed),
            heartbeats: self.heartbeats.load(Relaxed),
            heartbeats_dropped: self.heartbeats_dropped.load(Relaxed),
            lost_with_subscribers: self.lost_with_subscribers.load(Relaxed),
            pending_timings: self.pending.load(Relaxed),
            dropped: DropCounts {
                queue_full: d(DropReason::QueueFull),
                timing_unavailable: d(DropReason::TimingUnavailable),
                timing_failed: d(DropReason::TimingFailed),
                multi_stream: d(DropReason::MultiStream),
                no_subscriber: d(DropReason::NoSubscriber),
                send_hwm: d(DropReason::SendHwm),
                send_error: d(DropReason::SendError),
                shutdown: d(DropReason::Shutdown),
                unpaired_segment: d(DropReason::Unpaired),
                graph_capture: d(DropReason::GraphCapture),
                publisher_gone: d(DropReason::PublisherGone),
            },
        }
    }
}

/// Dropped iteration messages by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounts {
    /// [`DropReason::QueueFull`].
    pub queue_full: u64,
    /// [`DropReason::TimingUnavailable`].
    pub timing_unavailable: u64,
    /// [`DropReason::TimingFailed`].
    pub timing_failed: u64,
    /// [`DropReason::MultiStream`] (skipped multi-stream spans).
    pub multi_stream: u64,
    /// [`DropReason::NoSubscriber`].
    pub no_subscriber: u64,
    /// [`DropReason::SendHwm`].
    pub send_hwm: u64,
    /// [`DropReason::SendError`].
    pub send_error: u64,
    /// [`DropReason::Shutdown`].
    pub shutdown: u64,
    /// [`DropReason::Unpaired`].
    pub unpaired_segment: u64,
    /// [`DropReason::GraphCapture`].
    pub graph_capture: u64,
    /// [`DropReason::PublisherGone`].
    pub publisher_gone: u64,
}

impl DropCounts {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.by_reason().iter().map(|(_, n)| n).sum()
    }

    /// `(label, count)` pairs for metrics.
    pub fn by_reason(&self) -> [(&'static str, u64); DropReason::ALL.len()] {
        [
            ("queue_full", self.queue_full),
            ("timing_unavailable", self.timing_unavailable),
            ("timing_failed", self.timing_failed),
            ("multi_stream", self.multi_stream),
            ("no_subscriber", self.no_subscriber),
            ("send_hwm", self.send_hwm),
            ("send_error", self.send_error),
            ("shutdown", self.shutdown),
            ("unpaired_segment", self.unpaired_segment),
            ("graph_capture", self.graph_capture),
            ("publisher_gone", self.publisher_gone),
        ]
    }
}

/// A snapshot of the emitter's counters.
///
/// Once the emitter has shut down, `submitted == published + dropped.total()`: every
/// iteration is either published or counted under a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitterStats {
    /// Which clock timed the iterations (`Cpu` means no GPU timing: a stand-in).
    pub clock: ClockKind,
    /// Iterations submitted (each stamped with a counter).
    pub submitted: u64,
    /// Iteration messages published.
    pub published: u64,
    /// Idle heartbeats published.
    pub heartbeats: u64,
    /// Idle heartbeats not sent (no subscriber or transport error).
    pub heartbeats_dropped: u64,
    /// Published messages (not heartbeats) that were still queued, unwritten, for a
    /// subscriber when it disconnected: that subscriber missed them (others may have them).
    /// Not a drop (a subscriber that leaves misses what follows, as with any PUB socket), but
    /// counted, so that a departure mid-stream is visible.
    pub lost_with_subscribers: u64,
    /// Iterations waiting for their GPU timing (or in the queue).
    pub pending_timings: u64,
    /// Dropped iteration messages by reason.
    pub dropped: DropCounts,
}

impl EmitterStats {
    /// Skipped multi-stream spans (also in `dropped.multi_stream`).
    pub fn skipped_multi_stream(&self) -> u64 {
        self.dropped.multi_stream
    }
}

/// Logs iteration timing failures at ERROR without flooding: the first at once, then at most
/// one line per interval carrying how many were dropped since the last line. Used only on the
/// failure path (every failure is also counted by reason).
#[derive(Debug)]
pub(crate) struct FailureLog {
    side: &'static str,
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    since_last_line: u64,
}

impl FailureLog {
    pub fn new(side: &'static str) -> Self {
        FailureLog {
            side,
            interval: std::time::Duration::from_secs(10),
            last: None,
            since_last_line: 0,
        }
    }

    #[cold]
    pub fn record(&mut self, counter: u64, e: crate::TimingError) {
        let now = std::time::Instant::now();
        self.since_last_line += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            return;
        }
        tracing::error!(
            side = self.side,
            counter,
            error = %e,
            dropped_since_last_line = self.since_last_line,
            "FPM iteration could not be timed; its sample is dropped and counted (further lines at most every 10 s)"
        );
        self.last = Some(now);
        self.since_last_line = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_labels_and_counts_line_up() {
        let c = Counters::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?} out of order");
            c.drop_n(*r, i as u64 + 1);
        }
        let snap = c.snapshot(ClockKind::Cpu);
        let by = snap.dropped.by_reason();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(by[i], (r.as_str(), i as u64 + 1));
        }
        let n = DropReason::ALL.len() as u64;
        assert_eq!(snap.dropped.total(), n * (n + 1) / 2);
    }
}
