//! CUDA event timing through `cudarc` with dynamic loading: `libcuda` is opened at run time,
//! so this compiles and runs on machines without a GPU (construction then fails cleanly and
//! the emitter falls back to the CPU clock).
//!
//! Each iteration takes one pair of timing-enabled events from a pool created up front (no
//! event is created or destroyed per iteration). The start event is recorded when the first
//! segment starts; the end event is re-recorded at every segment end, so it ends up marking
//! the last segment's end. The publisher thread polls the end event with the non-blocking
//! `cuEventQuery` and reads `cuEventElapsedTime` once it has completed.

use std::sync::{Arc, Mutex};

use cudarc::driver::result::event;
use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{CudaContext, DriverError};

use crate::clock::{ClockKind, IterationClock, Span, StreamHandle, TimingPoll};
use crate::error::TimingError;

/// A pair of CUDA events. Raw handles are plain pointers; CUDA allows using an event from any
/// thread of the process once created, so sharing them is sound.
#[derive(Debug, Clone, Copy)]
struct EventPair {
    start: sys::CUevent,
    end: sys::CUevent,
}

// SAFETY: CUDA event handles are process-wide driver objects usable from any thread; the pool
// hands each pair to at most one iteration at a time.
unsafe impl Send for EventPair {}
unsafe impl Sync for EventPair {}

fn code(e: DriverError) -> TimingError {
    TimingError::Cuda(e.0 as i32)
}

/// Times iterations with CUDA events on the engine's stream.
#[derive(Debug)]
pub struct CudaClock {
    ctx: Arc<CudaContext>,
    pairs: Vec<EventPair>,
    /// Indices of free pairs; preallocated, so push/pop never allocate.
    free: Mutex<Vec<u32>>,
}

impl CudaClock {
    /// Opens `libcuda`, retains device `ordinal`'s primary context (the one PyTorch and most
    /// engines use) and creates `pool_size` timing-enabled event pairs.
    ///
    /// # Errors
    /// A message saying why CUDA is unavailable (no `libcuda`, no device, a failed call).
    pub fn new(ordinal: usize, pool_size: usize) -> Result<Self, String> {
        // SAFETY: only tries to dlopen libcuda; without this guard the first driver call panics.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcuda.so not found (no NVIDIA driver on this machine)".into());
        }
        // `CudaContext::new` makes the device's primary context current on this thread, which
        // is the engine's: put back whatever was current before (if anything) when done.
        cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let previous = cudarc::driver::result::ctx::get_current().ok().flatten();
        let restore = || {
            if let Some(ctx) = previous {
                // SAFETY: a context that was current on this thread a moment ago.
                let _ = unsafe { cudarc::driver::result::ctx::set_current(ctx) };
            }
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            restore();
            format!("cannot open CUDA device {ordinal}: {e:?}")
        })?;
        let pool_size = pool_size.clamp(1, u32::MAX as usize);
        // Built as a clock right away so that a failure part-way destroys what was created.
        let mut clock = CudaClock {
            ctx,
            pairs: Vec::with_capacity(pool_size),
            free: Mutex::new(Vec::new()),
        };
        for _ in 0..pool_size {
            let pair = event::create(CUevent_flags::CU_EVENT_DEFAULT).and_then(|start| {
                match event::create(CUevent_flags::CU_EVENT_DEFAULT) {
                    Ok(end) => Ok(EventPair { start, end }),
                    Err(e) => {
                        // SAFETY: just created, never recorded or shared.
                        let _ = unsafe { event::destroy(start) };
                        Err(e)
                    }
                }
            });
            match pair {
                Ok(p) => clock.pairs.push(p),
                Err(e) => {
                    drop(clock);
                    restore();
                    return Err(format!("cuEventCreate failed: {e:?}"));
                }
            }
        }
        restore();
        clock.free = Mutex::new((0..pool_size as u32).rev().collect());
        Ok(clock)
    }

    /// The CUDA context the events belong to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Event pairs not in use.
    pub fn free_pairs(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    fn pair(&self, span: &Span) -> Option<EventPair> {
        self.pairs.get(span.slot as usize).copied()
    }
}

impl IterationClock for CudaClock {
    fn kind(&self) -> ClockKind {
        ClockKind::Cuda
    }

    fn begin(&self) -> Result<Span, TimingError> {
        let slot = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or(TimingError::PoolExhausted)?;
        Ok(Span {
            slot,
            start: 0,
            end: 0,
        })
    }

    fn mark_start(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError> {
        let pair = self.pair(span).ok_or(TimingError::PoolExhausted)?;
        // Never switch the engine thread's context (it may be working on another device):
        // bind ours only when the thread has none, as a pure-driver engine thread may not.
        if matches!(cudarc::driver::result::ctx::get_current(), Ok(None)) {
            self.ctx.bind_to_thread().map_err(code)?;
        }
        // SAFETY: the event was created by `event::create` and is owned by this iteration; the
        // stream handle comes from the engine and lives in the same context.
        unsafe { event::record(pair.start, stream.0 as sys::CUstream) }.map_err(code)
    }

    fn mark_end(&self, span: &mut Span, stream: StreamHandle) -> Result<(), TimingError> {
        let pair = self.pair(span).ok_or(TimingError::PoolExhausted)?;
        // SAFETY: as in `mark_start`.
        unsafe { event::record(pair.end, stream.0 as sys::CUstream) }.map_err(code)
    }

    fn poll(&self, span: &Span) -> TimingPoll {
        let Some(pair) = self.pair(span) else {
            return TimingPoll::Failed(TimingError::PoolExhausted);
        };
        if let Err(e) = self.ctx.bind_to_thread() {
            return TimingPoll::Failed(code(e));
        }
        // SAFETY: events created by this clock and not destroyed while the clock lives.
        match unsafe { event::query(pair.end) } {
            Ok(()) => match unsafe { event::elapsed(pair.start, pair.end) } {
                Ok(ms) => TimingPoll::Ready(ms as f64 / 1000.0),
                Err(e) => TimingPoll::Failed(code(e)),
            },
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => TimingPoll::Pending,
            Err(e) => TimingPoll::Failed(code(e)),
        }
    }

    fn release(&self, span: Span) {
        if (span.slot as usize) < self.pairs.len() {
            if let Ok(mut f) = self.free.lock() {
                f.push(span.slot);
            }
        }
    }
}

impl Drop for CudaClock {
    fn drop(&mut self) {
        // This may run on the engine's thread: restore whatever context it had.
        let previous = cudarc::driver::result::ctx::get_current().ok().flatten();
        let _ = self.ctx.bind_to_thread();
        for p in &self.pairs {
            // SAFETY: created by this clock, destroyed once; destroying a pending event is
            // allowed (resources are released at completion).
            unsafe {
                let _ = event::destroy(p.start);
                let _ = event::destroy(p.end);
            }
        }
        if let Some(ctx) = previous {
            // SAFETY: a context that was current on this thread a moment ago.
            let _ = unsafe { cudarc::driver::result::ctx::set_current(ctx) };
        }
    }
}
