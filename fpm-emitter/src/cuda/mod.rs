//! CUDA event timing through `cudarc` with dynamic loading: `libcuda` is opened at run time,
//! so this compiles and runs on machines without a GPU (construction then fails cleanly and
//! the emitter falls back to the CPU clock).
//!
//! Each iteration takes one pair of timing-enabled events from a pool created up front (no
//! event is created or destroyed per iteration). The start event is recorded when the first
//! segment starts; the end event is re-recorded at every segment end, so it ends up marking
//! the last segment's end. The publisher thread polls the end event with the non-blocking
//! `cuEventQuery` and reads `cuEventElapsedTime` once it has completed.
//!
//! Rules the clock keeps (each checked by a test against a fake driver, and on a GPU):
//! - **Context.** The events live in the context of the engine's streams: the engine
//!   thread's current context when the emitter starts (PyTorch's primary context of the
//!   device chosen with `torch.cuda.set_device`), or the primary context of
//!   `EmitterConfig::cuda_device` when that is set or no context is current. The first
//!   record on each new stream checks `cuStreamGetCtx` against it; a mismatch is counted
//!   (`TimingError::ContextMismatch`) and logged at ERROR instead of failing silently.
//! - **The engine thread's current context is never changed**: not at start, not per
//!   iteration (a thread with no current context gets ours pushed and popped around the
//!   record), not at shutdown.
//! - **Graph capture.** The publisher thread runs in thread-local capture mode, so its event
//!   queries cannot invalidate a capture running in global mode on an engine thread. A segment
//!   marked on a stream that is capturing is not recorded at all (`cuStreamIsCapturing` before
//!   each record: events recorded inside a capture cannot be timed and would join the graph):
//!   the iteration is dropped as `graph_capture`. Time a CUDA graph around its `replay()`.
//! - **Pool.** A pair is handed out once and taken back once; a release of a pair that is not
//!   out is refused and counted (`invalid_releases`), never double-inserted.

pub mod driver;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use tracing::error;

use crate::clock::{ClockKind, IterationClock, Span, StreamHandle, TimingPoll};
use crate::error::{CudaCode, CudaError, TimingError};
use driver::{
    CudaDriver, DynamicDriver, RawContext, RawEvent, CUDA_ERROR_CAPTURED_EVENT,
    CUDA_ERROR_NOT_READY,
};

/// A pair of CUDA events.
#[derive(Debug, Clone, Copy)]
struct EventPair {
    start: RawEvent,
    end: RawEvent,
}

/// The free list and who is out, under one lock.
#[derive(Debug)]
struct Pool {
    /// Indices of free pairs; preallocated to the pool size, so push/pop never allocate.
    free: Vec<u32>,
    /// `out[i]`: pair `i` is reserved by an iteration.
    out: Vec<bool>,
}

/// No stream checked yet.
const NO_STREAM: u64 = u64::MAX;

/// Times iterations with CUDA events on the engine's stream.
#[derive(Debug)]
pub struct CudaClock<D: CudaDriver = DynamicDriver> {
    driver: D,
    ctx: RawContext,
    /// The device whose primary context we retained (released on drop), if we did.
    retained_primary: Option<i32>,
    device: i32,
    source: ContextSource,
    pairs: Vec<EventPair>,
    pool: Mutex<Pool>,
    /// The last stream whose context was checked against ours.
    checked_stream: AtomicU64,
    invalid_releases: AtomicU64,
}

/// Which context a clock was created in, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSource {
    /// The creating thread's current context.
    Current,
    /// The primary context of the configured device.
    Configured,
    /// No context was current and no device configured: device 0's primary context.
    DefaultDevice,
}

impl CudaClock<DynamicDriver> {
    /// Opens `libcuda` and creates `pool_size` timing-enabled event pairs in the context the
    /// engine's streams belong to: with `device` `None`, the calling thread's current context
    /// (call this on the engine's thread after it selected its device), or device 0's primary
    /// context if none is current; with `Some(n)`, device `n`'s primary context.
    ///
    /// # Errors
    /// A [`CudaError`] saying why CUDA is unavailable (no `libcuda`, no device, a failed
    /// call).
    pub fn new(device: Option<u32>, pool_size: usize) -> Result<Self, CudaError> {
        Self::with_driver(DynamicDriver::load()?, device, pool_size)
    }
}

impl<D: CudaDriver> CudaClock<D> {
    /// As [`CudaClock::new`] with a given driver.
    ///
    /// # Errors
    /// A [`CudaError`] naming the driver call that failed.
    pub fn with_driver(
        driver: D,
        device: Option<u32>,
        pool_size: usize,
    ) -> Result<Self, CudaError> {
        driver.init().map_err(|e| CudaError::Call {
            call: "cuInit",
            code: CudaCode(e),
        })?;
        let current = driver.current_context().map_err(|e| CudaError::Call {
            call: "cuCtxGetCurrent",
            code: CudaCode(e),
        })?;
        let (ctx, retained_primary, device, source) = match (device, current) {
            (None, Some(cur)) => {
                let dev = driver.current_device().map_err(|e| CudaError::Call {
                    call: "cuCtxGetDevice",
                    code: CudaCode(e),
                })?;
                // Hold a reference when it is the device's primary context (PyTorch's), so it
                // outlives us; another context is the engine's to keep alive.
                let primary =
                    driver
                        .primary_context_retain(dev)
                        .map_err(|e| CudaError::Device {
                            device: dev,
                            code: CudaCode(e),
                        })?;
                if primary == cur {
                    (cur, Some(dev), dev, ContextSource::Current)
                } else {
                    let _ = driver.primary_context_release(dev);
                    (cur, None, dev, ContextSource::Current)
                }
            }
            (Some(_), _) | (None, None) => {
                let n = device.map_or(0, |d| d as i32);
                let ctx = driver
                    .primary_context_retain(n)
                    .map_err(|e| CudaError::Device {
                        device: n,
                        code: CudaCode(e),
                    })?;
                let source = if device.is_some() {
                    ContextSource::Configured
                } else {
                    ContextSource::DefaultDevice
                };
                (ctx, Some(n), n, source)
            }
        };
        let pool_size = pool_size.clamp(1, u32::MAX as usize - 1);
        // Built as a clock right away so that a failure part-way destroys what was created
        // and releases the context (Drop).
        let mut clock = CudaClock {
            driver,
            ctx,
            retained_primary,
            device,
            source,
            pairs: Vec::with_capacity(pool_size),
            pool: Mutex::new(Pool {
                free: Vec::with_capacity(pool_size),
                out: vec![false; pool_size],
            }),
            checked_stream: AtomicU64::new(NO_STREAM),
            invalid_releases: AtomicU64::new(0),
        };
        clock
            .driver
            .push_context(ctx)
            .map_err(|e| CudaError::Call {
                call: "cuCtxPushCurrent",
                code: CudaCode(e),
            })?;
        let mut failure = None;
        for _ in 0..pool_size {
            let pair =
                clock
                    .driver
                    .event_create()
                    .and_then(|start| match clock.driver.event_create() {
                        Ok(end) => Ok(EventPair { start, end }),
                        Err(e) => {
                            let _ = clock.driver.event_destroy(start);
                            Err(e)
                        }
                    });
            match pair {
                Ok(p) => clock.pairs.push(p),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let _ = clock.driver.pop_context();
        if let Some(e) = failure {
            return Err(CudaError::Call {
                call: "cuEventCreate",
                code: CudaCode(e),
            });
        }
        if let Ok(mut pool) = clock.pool.lock() {
            pool.free.extend((0..pool_size as u32).rev());
        }
        Ok(clock)
    }

    /// The CUDA context the events belong to.
    pub fn context(&self) -> RawContext {
        self.ctx
    }

    /// The device of that context.
    pub fn device(&self) -> i32 {
        self.device
    }

    /// Where the context came from.
    pub fn context_source(&self) -> ContextSource {
        self.source
    }

    /// Event pairs created.
    pub fn pool_size(&self) -> usize {
        self.pairs.len()
    }

    /// Event pairs not in use.
    pub fn free_pairs(&self) -> usize {
        self.pool.lock().map(|p| p.free.len()).unwrap_or(0)
    }

    /// Releases refused because the pair was not out (a caller bug; never double-inserted).
    pub fn invalid_releases(&self) -> u64 {
        self.invalid_releases.load(Relaxed)
    }

    /// Checks the pool's invariants: every pair is either free (listed once) or out, never
    /// both. Returns a description of the first violation.
    pub fn check_pool(&self) -> Result<(), String> {
        let pool = self
            .pool
            .lock()
            .map_err(|_| "pool lock poisoned".to_owned())?;
        let mut seen = vec![false; self.pairs.len()];
        for &i in &pool.free {
            let i = i as usize;
            if i >= seen.len() {
                return Err(format!("free list holds {i}, pool has {}", seen.len()));
            }
            if seen[i] {
                return Err(format!(
                    "pair {i} is on the free list twice: {:?}",
                    pool.free
                ));
            }
            if pool.out[i] {
                return Err(format!("pair {i} is both free and out"));
            }
            seen[i] = true;
        }
        let out = pool.out.iter().filter(|&&o| o).count();
        if out + pool.free.len() != self.pairs.len() {
            return Err(format!(
                "{} free + {out} out != {} pairs",
                pool.free.len(),
                self.pairs.len()
            ));
        }
        Ok(())
    }

    fn pair(&self, span: &Span) -> Option<EventPair> {
        self.pairs.get(span.slot as usize).copied()
    }

    /// Records `event` on `stream` without changing the thread's current context: a thread
    /// with no current context gets ours pushed and popped around the call.
    #[inline]
    fn record(&self, event: RawEvent, stream: StreamHandle) -> Result<(), TimingError> {
        let raw = stream.raw();
        if raw != self.checked_stream.load(Relaxed) && !stream.is_special() {
            match self.driver.stream_context(raw) {
                Ok(c) if c == self.ctx => self.checked_stream.store(raw, Relaxed),
                Ok(_) => return Err(TimingError::ContextMismatch),
                Err(e) => return Err(TimingError::Cuda(e)),
            }
        }
        // Never record inside a stream capture: the events could not be timed
        // (`CUDA_ERROR_CAPTURED_EVENT`) and would join the engine's graph. One query per record.
        match self.driver.stream_capturing(raw) {
            Ok(false) => {}
            Ok(true) => return Err(TimingError::Captured),
            Err(e) => return Err(TimingError::Cuda(e)),
        }
        let pushed = match self.driver.current_context() {
            Ok(Some(_)) => false,
            Ok(None) => {
                self.driver
                    .push_context(self.ctx)
                    .map_err(TimingError::Cuda)?;
                true
            }
            Err(e) => return Err(TimingError::Cuda(e)),
        };
        let r = self.driver.event_record(event, raw);
        if pushed {
            let _ = self.driver.pop_context();
        }
        r.map_err(|e| match e {
            CUDA_ERROR_CAPTURED_EVENT => TimingError::Captured,
            e => TimingError::Cuda(e),
        })
    }
}

impl<D: CudaDriver> IterationClock for CudaClock<D> {
    fn kind(&self) -> ClockKind {
        ClockKind::Cuda
    }

    fn begin(&self) -> Result<Span, TimingError> {
        let mut pool = self.pool.lock().map_err(|_| TimingError::PoolExhausted)?;
        let slot = pool.free.pop().ok_or(TimingError::PoolExhausted)?;
        pool.out[slot as usize] = true;
        Ok(Span {
            slot,
            start: 0,
            end: 0,
        })
    }

    fn mark_start(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError> {
        let pair = self.pair(span).ok_or(TimingError::PoolExhausted)?;
        self.record(pair.start, stream)
    }

    fn mark_end(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError> {
        let pair = self.pair(span).ok_or(TimingError::PoolExhausted)?;
        self.record(pair.end, stream)
    }

    fn poll(&self, span: &Span) -> TimingPoll {
        let Some(pair) = self.pair(span) else {
            return TimingPoll::Failed(TimingError::PoolExhausted);
        };
        // The publisher thread has our context current (`on_publisher_thread`); any other
        // caller gets it pushed and popped.
        let pushed = match self.driver.current_context() {
            Ok(Some(c)) if c == self.ctx => false,
            _ => match self.driver.push_context(self.ctx) {
                Ok(()) => true,
                Err(e) => return TimingPoll::Failed(TimingError::Cuda(e)),
            },
        };
        let result = match self.driver.event_query(pair.end) {
            Ok(()) => match self.driver.event_elapsed_ms(pair.start, pair.end) {
                Ok(ms) => TimingPoll::Ready(ms as f64 / 1000.0),
                Err(CUDA_ERROR_CAPTURED_EVENT) => TimingPoll::Failed(TimingError::Captured),
                Err(e) => TimingPoll::Failed(TimingError::Cuda(e)),
            },
            Err(CUDA_ERROR_NOT_READY) => TimingPoll::Pending,
            Err(CUDA_ERROR_CAPTURED_EVENT) => TimingPoll::Failed(TimingError::Captured),
            Err(e) => TimingPoll::Failed(TimingError::Cuda(e)),
        };
        if pushed {
            let _ = self.driver.pop_context();
        }
        result
    }

    fn release(&self, span: Span) {
        let slot = span.slot as usize;
        let Ok(mut pool) = self.pool.lock() else {
            return;
        };
        if slot < pool.out.len() && pool.out[slot] {
            pool.out[slot] = false;
            pool.free.push(span.slot);
        } else {
            drop(pool);
            let n = self.invalid_releases.fetch_add(1, Relaxed);
            if n == 0 {
                error!(
                    slot,
                    "FPM CUDA clock: release of an event pair that is not in use refused (bug)"
                );
            }
        }
    }

    fn describe(&self) -> String {
        let from = match self.source {
            ContextSource::Current => "the starting thread's current context",
            ContextSource::Configured => "its primary context (configured)",
            ContextSource::DefaultDevice => {
                "its primary context (no context was current on the starting thread)"
            }
        };
        format!("device {}, {from}", self.device)
    }

    fn on_publisher_thread(&self) {
        if let Err(e) = self.driver.use_thread_local_capture_mode() {
            error!(
                code = e,
                "FPM CUDA clock: cannot switch the publisher thread to thread-local capture mode; \
                 its event queries may invalidate CUDA graph captures"
            );
        }
        // This thread is ours: keep the clock's context current for the queries.
        if let Err(e) = self.driver.push_context(self.ctx) {
            error!(
                code = e,
                "FPM CUDA clock: cannot make the timing context current on the publisher thread"
            );
        }
    }
}

impl<D: CudaDriver> Drop for CudaClock<D> {
    fn drop(&mut self) {
        // This may run on the engine's thread: push/pop leaves its current context as it was,
        // and releasing our primary-context reference never makes a context current.
        if !self.pairs.is_empty() && self.driver.push_context(self.ctx).is_ok() {
            for p in &self.pairs {
                // Destroying a pending event is allowed (resources go at completion).
                let _ = self.driver.event_destroy(p.start);
                let _ = self.driver.event_destroy(p.end);
            }
            let _ = self.driver.pop_context();
        }
        if let Some(dev) = self.retained_primary {
            let _ = self.driver.primary_context_release(dev);
        }
    }
}

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
