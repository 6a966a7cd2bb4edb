//! Where iteration durations come from: a trait with a CPU implementation (always available)
//! and a CUDA one (feature `cuda`).

use std::sync::OnceLock;
use std::time::Instant;

use crate::error::TimingError;

/// Which clock timed the iterations, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClockKind {
    /// CUDA events on the engine's stream: GPU time, first segment start to last segment end.
    Cuda,
    /// The CPU's monotonic clock, standing in where CUDA is unavailable. It measures host time
    /// around the segments, which includes launch overhead and excludes queued GPU work.
    Cpu,
}

impl ClockKind {
    /// `"cuda"` or `"cpu"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClockKind::Cuda => "cuda",
            ClockKind::Cpu => "cpu",
        }
    }
}

/// A raw CUDA stream handle (`CUstream` / `cudaStream_t`, e.g. PyTorch's
/// `torch.cuda.current_stream().cuda_stream`); `0` is the legacy default stream. The CPU clock
/// uses it only to tell streams apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StreamHandle(pub u64);

/// The clock-specific state of one iteration's timing: plain data, so it moves through the
/// submission queue without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    /// Clock-specific slot (the CUDA event pair index).
    pub slot: u32,
    /// Clock-specific start mark (CPU: nanoseconds since the clock's origin).
    pub start: u64,
    /// Clock-specific end mark.
    pub end: u64,
}

/// The outcome of polling a span from the publisher thread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimingPoll {
    /// The GPU has not finished the work yet.
    Pending,
    /// The span's duration in seconds.
    Ready(f64),
    /// The span cannot be measured.
    Failed(TimingError),
}

/// A source of iteration timings.
///
/// `begin`, `mark_start` and `mark_end` run on the engine's scheduler thread and must be cheap
/// and never block; `poll` and `release` run on the emitter's publisher thread and must not
/// block either (the CUDA clock uses the non-blocking event query).
pub trait IterationClock: Send + Sync + 'static {
    /// Which clock this is.
    fn kind(&self) -> ClockKind;

    /// Reserves what one iteration needs (a CUDA event pair).
    ///
    /// # Errors
    /// [`TimingError::PoolExhausted`] when nothing is free.
    fn begin(&self) -> Result<Span, TimingError>;

    /// Marks the start of the iteration's first segment on `stream`.
    ///
    /// # Errors
    /// A failed CUDA call.
    fn mark_start(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError>;

    /// Marks the end of a segment on `stream`; the last call wins.
    ///
    /// # Errors
    /// A failed CUDA call.
    fn mark_end(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError>;

    /// Non-blocking: is the span complete, and how long was it?
    fn poll(&self, span: &Span) -> TimingPoll;

    /// Returns what `begin` reserved.
    fn release(&self, span: Span);
}

/// The CPU monotonic clock.
#[derive(Debug)]
pub struct CpuClock {
    origin: Instant,
}

impl Default for CpuClock {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuClock {
    /// A CPU clock.
    pub fn new() -> Self {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        CpuClock {
            origin: *ORIGIN.get_or_init(Instant::now),
        }
    }

    #[inline]
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl IterationClock for CpuClock {
    fn kind(&self) -> ClockKind {
        ClockKind::Cpu
    }

    #[inline]
    fn begin(&self) -> Result<Span, TimingError> {
        Ok(Span::default())
    }

    #[inline]
    fn mark_start(&self, span: &mut Span, _stream: StreamHandle) -> Result<(), TimingError> {
        span.start = self.now();
        span.end = span.start;
        Ok(())
    }

    #[inline]
    fn mark_end(&self, span: &mut Span, _stream: StreamHandle) -> Result<(), TimingError> {
        span.end = self.now();
        Ok(())
    }

    fn poll(&self, span: &Span) -> TimingPoll {
        TimingPoll::Ready(span.end.saturating_sub(span.start) as f64 / 1e9)
    }

    fn release(&self, _span: Span) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_clock_measures_a_sleep() {
        let c = CpuClock::new();
        let mut s = c.begin().unwrap();
        c.mark_start(&mut s, StreamHandle(0)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.mark_end(&mut s, StreamHandle(0)).unwrap();
        match c.poll(&s) {
            TimingPoll::Ready(secs) => assert!((0.019..0.5).contains(&secs), "{secs}"),
            other => panic!("{other:?}"),
        }
    }
}
