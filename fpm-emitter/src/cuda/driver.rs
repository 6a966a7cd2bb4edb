//! The CUDA driver calls the CUDA clock makes, behind a trait: [`DynamicDriver`] calls
//! `libcuda` through `cudarc` (loaded at run time); tests substitute a fake that models
//! contexts, streams, events and stream capture, so every rule below is checked without a GPU.

use cudarc::driver::sys::{self, cudaError_enum as E};

/// A driver error: the raw `CUresult` code.
pub type CuResult<T> = Result<T, i32>;

/// `CUDA_ERROR_INVALID_CONTEXT`.
pub const CUDA_ERROR_INVALID_CONTEXT: i32 = 201;
/// `CUDA_ERROR_INVALID_HANDLE`.
pub const CUDA_ERROR_INVALID_HANDLE: i32 = 400;
/// `CUDA_ERROR_NOT_READY`: the event's work has not completed.
pub const CUDA_ERROR_NOT_READY: i32 = 600;
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
pub const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: i32 = 901;
/// `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`.
pub const CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: i32 = 906;
/// `CUDA_ERROR_CAPTURED_EVENT`: the event was last recorded inside a stream capture.
pub const CUDA_ERROR_CAPTURED_EVENT: i32 = 907;

/// A `CUcontext`, as an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawContext(pub usize);

/// A `CUevent`, as an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawEvent(pub usize);

/// The driver API subset used by [`CudaClock`](super::CudaClock). Streams are raw `CUstream`
/// values (`0` is the legacy default stream).
///
/// # Safety
/// Implementations must behave as the CUDA driver API documents for each call: the clock
/// relies on it for memory safety (handles are passed to the driver unchecked).
pub unsafe trait CudaDriver: Send + Sync + 'static {
    /// `cuInit(0)`.
    fn init(&self) -> CuResult<()>;
    /// `cuCtxGetCurrent`: the calling thread's current context, if any.
    fn current_context(&self) -> CuResult<Option<RawContext>>;
    /// `cuCtxPushCurrent`.
    fn push_context(&self, ctx: RawContext) -> CuResult<()>;
    /// `cuCtxPopCurrent`.
    fn pop_context(&self) -> CuResult<()>;
    /// `cuCtxGetDevice`: the device of the calling thread's current context.
    fn current_device(&self) -> CuResult<i32>;
    /// `cuDevicePrimaryCtxRetain` for device `ordinal`.
    fn primary_context_retain(&self, ordinal: i32) -> CuResult<RawContext>;
    /// `cuDevicePrimaryCtxRelease` for device `ordinal`.
    fn primary_context_release(&self, ordinal: i32) -> CuResult<()>;
    /// `cuStreamGetCtx`: the context a stream belongs to.
    fn stream_context(&self, stream: u64) -> CuResult<RawContext>;
    /// `cuStreamIsCapturing`: is a stream capture (active or invalidated) under way?
    fn stream_capturing(&self, stream: u64) -> CuResult<bool>;
    /// `cuEventCreate(CU_EVENT_DEFAULT)` in the current context.
    fn event_create(&self) -> CuResult<RawEvent>;
    /// `cuEventDestroy`.
    fn event_destroy(&self, event: RawEvent) -> CuResult<()>;
    /// `cuEventRecord`.
    fn event_record(&self, event: RawEvent, stream: u64) -> CuResult<()>;
    /// `cuEventQuery`: `Ok` when complete, `Err(CUDA_ERROR_NOT_READY)` while pending.
    fn event_query(&self, event: RawEvent) -> CuResult<()>;
    /// `cuEventElapsedTime` in milliseconds.
    fn event_elapsed_ms(&self, start: RawEvent, end: RawEvent) -> CuResult<f32>;
    /// `cuThreadExchangeStreamCaptureMode(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)` for the
    /// calling thread: its calls can then never invalidate another thread's global-mode
    /// capture.
    fn use_thread_local_capture_mode(&self) -> CuResult<()>;
}

/// `libcuda` through `cudarc`'s dynamically loaded bindings.
#[derive(Debug, Clone, Copy)]
pub struct DynamicDriver(());

impl DynamicDriver {
    /// Loads `libcuda` if present.
    ///
    /// # Errors
    /// [`crate::CudaError::NoDriver`] when the library is not on this machine.
    pub fn load() -> Result<Self, crate::CudaError> {
        // SAFETY: only tries to dlopen libcuda; without this guard the first driver call panics.
        if unsafe { sys::is_culib_present() } {
            Ok(DynamicDriver(()))
        } else {
            Err(crate::CudaError::NoDriver)
        }
    }
}

#[inline]
fn check(r: sys::CUresult) -> CuResult<()> {
    match r {
        E::CUDA_SUCCESS => Ok(()),
        e => Err(e as i32),
    }
}

// SAFETY: each method is the documented driver call; handles come from the same driver.
unsafe impl CudaDriver for DynamicDriver {
    fn init(&self) -> CuResult<()> {
        // SAFETY: plain driver call.
        check(unsafe { sys::cuInit(0) })
    }

    #[inline]
    fn current_context(&self) -> CuResult<Option<RawContext>> {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { sys::cuCtxGetCurrent(&mut ctx) })?;
        Ok((!ctx.is_null()).then_some(RawContext(ctx as usize)))
    }

    fn push_context(&self, ctx: RawContext) -> CuResult<()> {
        // SAFETY: a context handle obtained from this driver.
        check(unsafe { sys::cuCtxPushCurrent_v2(ctx.0 as sys::CUcontext) })
    }

    fn pop_context(&self) -> CuResult<()> {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { sys::cuCtxPopCurrent_v2(&mut ctx) })
    }

    fn current_device(&self) -> CuResult<i32> {
        let mut dev: sys::CUdevice = 0;
        // SAFETY: out-pointer to a local.
        check(unsafe { sys::cuCtxGetDevice(&mut dev) })?;
        Ok(dev)
    }

    fn primary_context_retain(&self, ordinal: i32) -> CuResult<RawContext> {
        let mut dev: sys::CUdevice = 0;
        // SAFETY: out-pointers to locals.
        check(unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        check(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
        Ok(RawContext(ctx as usize))
    }

    fn primary_context_release(&self, ordinal: i32) -> CuResult<()> {
        let mut dev: sys::CUdevice = 0;
        // SAFETY: out-pointer to a local; releases one reference taken by `retain`.
        check(unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
        check(unsafe { sys::cuDevicePrimaryCtxRelease_v2(dev) })
    }

    fn stream_context(&self, stream: u64) -> CuResult<RawContext> {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the stream handle's validity is the caller's contract (`StreamHandle`).
        check(unsafe { sys::cuStreamGetCtx(stream as sys::CUstream, &mut ctx) })?;
        Ok(RawContext(ctx as usize))
    }

    #[inline]
    fn stream_capturing(&self, stream: u64) -> CuResult<bool> {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: the stream handle's validity is the caller's contract; out-pointer to a local.
        check(unsafe { sys::cuStreamIsCapturing(stream as sys::CUstream, &mut status) })?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    fn event_create(&self) -> CuResult<RawEvent> {
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DEFAULT as u32) })?;
        Ok(RawEvent(ev as usize))
    }

    fn event_destroy(&self, event: RawEvent) -> CuResult<()> {
        // SAFETY: an event created by `event_create`, destroyed once.
        check(unsafe { sys::cuEventDestroy_v2(event.0 as sys::CUevent) })
    }

    #[inline]
    fn event_record(&self, event: RawEvent, stream: u64) -> CuResult<()> {
        // SAFETY: event from `event_create`; the stream handle's validity is the caller's
        // contract (`StreamHandle::from_raw`).
        check(unsafe { sys::cuEventRecord(event.0 as sys::CUevent, stream as sys::CUstream) })
    }

    #[inline]
    fn event_query(&self, event: RawEvent) -> CuResult<()> {
        // SAFETY: an event from `event_create`, not yet destroyed.
        check(unsafe { sys::cuEventQuery(event.0 as sys::CUevent) })
    }

    fn event_elapsed_ms(&self, start: RawEvent, end: RawEvent) -> CuResult<f32> {
        let mut ms = 0f32;
        // SAFETY: events from `event_create`; out-pointer to a local.
        check(unsafe {
            sys::cuEventElapsedTime(&mut ms, start.0 as sys::CUevent, end.0 as sys::CUevent)
        })?;
        Ok(ms)
    }

    fn use_thread_local_capture_mode(&self) -> CuResult<()> {
        let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: in/out pointer to a local.
        check(unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut mode) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_match_cudarc() {
        assert_eq!(
            CUDA_ERROR_INVALID_CONTEXT,
            E::CUDA_ERROR_INVALID_CONTEXT as i32
        );
        assert_eq!(
            CUDA_ERROR_INVALID_HANDLE,
            E::CUDA_ERROR_INVALID_HANDLE as i32
        );
        assert_eq!(CUDA_ERROR_NOT_READY, E::CUDA_ERROR_NOT_READY as i32);
        assert_eq!(
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
            E::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED as i32
        );
        assert_eq!(
            CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
            E::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT as i32
        );
        assert_eq!(
            CUDA_ERROR_CAPTURED_EVENT,
            E::CUDA_ERROR_CAPTURED_EVENT as i32
        );
    }
}
