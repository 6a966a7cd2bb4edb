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

/// A CUDA stream handle (`CUstream` / `cudaStream_t`, e.g. PyTorch's
/// `torch.cuda.current_stream().cuda_stream`) on which the CUDA clock records its events. The
/// CPU clock uses it only to tell streams apart.
///
/// The CUDA clock hands the raw value to `cuEventRecord`, so only the constructors for the
/// driver's own special streams are safe; any other value goes through the `unsafe`
/// [`StreamHandle::from_raw`] and its contract: safe code cannot make one from an integer.
///
/// ```compile_fail
/// let s = fpm_emitter::StreamHandle(0x7f00_dead_beef); // private field: does not compile
/// ```
///
/// ```
/// use fpm_emitter::StreamHandle;
/// let legacy = StreamHandle::DEFAULT; // safe: the driver's own null stream
/// // SAFETY: a stream that outlives the emitter's timing of it.
/// let s = unsafe { StreamHandle::from_raw(0x7f00_dead_beef) };
/// assert_eq!(s.raw(), 0x7f00_dead_beef);
/// assert!(legacy.is_special() && !s.is_special());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StreamHandle(u64);

impl StreamHandle {
    /// The legacy default ("null") stream of the calling thread's current context (`0`).
    pub const DEFAULT: StreamHandle = StreamHandle(0);
    /// `CU_STREAM_PER_THREAD` (`0x2`): the per-thread default stream of the current context.
    pub const PER_THREAD: StreamHandle = StreamHandle(2);

    /// Wraps a raw `CUstream`.
    ///
    /// # Safety
    /// `raw` must be `0`, `CU_STREAM_LEGACY` (`1`), `CU_STREAM_PER_THREAD` (`2`) or a stream
    /// created by the CUDA driver or runtime in this process that stays alive (not destroyed)
    /// until every iteration that records on it has been published or dropped, i.e. until the
    /// emitter's timing of it has completed. Engines pass the stream they launch the forward
    /// pass on; PyTorch keeps its streams alive for the life of the process.
    #[inline]
    pub const unsafe fn from_raw(raw: u64) -> StreamHandle {
        StreamHandle(raw)
    }

    /// The raw `CUstream` value.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// One of the driver's special handles (legacy default, `CU_STREAM_LEGACY`, per-thread
    /// default), which resolve to the calling thread's current context.
    #[inline]
    pub const fn is_special(self) -> bool {
        self.0 <= 2
    }
}

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

    /// Returns what `begin` reserved. Called exactly once for each span `begin` returned, and
    /// never for a span it did not return.
    fn release(&self, span: Span);

    /// Called once on the publisher thread before its first `poll` (the CUDA clock switches
    /// that thread to thread-local stream-capture mode so its queries can never invalidate
    /// an engine's CUDA graph capture).
    fn on_publisher_thread(&self) {}

    /// What the start-up log says about this clock beyond its kind (the CUDA clock: device and
    /// where its context came from).
    fn describe(&self) -> String {
        String::new()
    }
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
        c.mark_start(&mut s, StreamHandle::DEFAULT).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.mark_end(&mut s, StreamHandle::DEFAULT).unwrap();
        match c.poll(&s) {
            TimingPoll::Ready(secs) => assert!((0.019..0.5).contains(&secs), "{secs}"),
            other => panic!("{other:?}"),
        }
    }
}
