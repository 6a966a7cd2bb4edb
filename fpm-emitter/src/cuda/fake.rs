//! A fake CUDA driver for tests: models what the CUDA clock's correctness depends on, as the
//! driver API documents it.
//!
//! - Contexts: primary contexts per device with a reference count, plus created
//!   (non-primary) contexts; a per-thread stack of current contexts.
//! - Streams belong to a context; the special handles 0/1/2 resolve to the calling thread's
//!   current context (`CUDA_ERROR_INVALID_CONTEXT` without one).
//! - Events belong to the context current at creation; recording on a stream of another
//!   context fails with `CUDA_ERROR_INVALID_HANDLE`. A record is complete once the test
//!   completes its stream; its timestamp is the fake GPU clock at record time.
//! - Stream capture: an event recorded on a capturing stream is "captured" (queries and
//!   elapsed time fail with `CUDA_ERROR_CAPTURED_EVENT`). While a thread captures in global
//!   mode, an event query from any thread in global mode is prohibited: it fails with
//!   `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and invalidates the capture.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use super::driver::{
    CuResult, CudaDriver, RawContext, RawEvent, CUDA_ERROR_CAPTURED_EVENT,
    CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_INVALID_HANDLE, CUDA_ERROR_NOT_READY,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
};

pub const CUDA_ERROR_INVALID_DEVICE: i32 = 101;
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: i32 = 900;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    Global,
    ThreadLocal,
}

#[derive(Debug)]
struct Ctx {
    device: i32,
    primary: bool,
    refs: i64,
}

#[derive(Debug)]
struct Stream {
    ctx: RawContext,
    /// Work items recorded so far, and how many have completed.
    recorded: u64,
    completed: u64,
    capture: Option<Capture>,
}

#[derive(Debug, Clone, Copy)]
struct Capture {
    mode: CaptureMode,
    thread: ThreadId,
    invalidated: bool,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    ctx: RawContext,
    /// (stream, work item, GPU time in ms) of the last record.
    last: Option<(u64, u64, f64)>,
    captured: bool,
}

#[derive(Debug, Default)]
struct State {
    devices: i32,
    contexts: HashMap<usize, Ctx>,
    next_handle: usize,
    current: HashMap<ThreadId, Vec<RawContext>>,
    modes: HashMap<ThreadId, CaptureMode>,
    streams: HashMap<u64, Stream>,
    events: HashMap<usize, Event>,
    gpu_ms: f64,
    calls: HashMap<&'static str, u64>,
}

/// The fake driver; clones share one state.
#[derive(Debug, Clone)]
pub struct FakeDriver(Arc<Mutex<State>>);

impl FakeDriver {
    /// A machine with `devices` GPUs.
    pub fn new(devices: i32) -> Self {
        let mut st = State {
            devices,
            next_handle: 0x1000,
            ..State::default()
        };
        for d in 0..devices {
            st.contexts.insert(
                0x100 + d as usize,
                Ctx {
                    device: d,
                    primary: true,
                    refs: 0,
                },
            );
        }
        FakeDriver(Arc::new(Mutex::new(st)))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn me() -> ThreadId {
        std::thread::current().id()
    }

    /// Device `d`'s primary context handle (whether retained or not).
    pub fn primary(&self, d: i32) -> RawContext {
        RawContext(0x100 + d as usize)
    }

    /// References held on device `d`'s primary context.
    pub fn primary_refs(&self, d: i32) -> i64 {
        self.st().contexts[&(0x100 + d as usize)].refs
    }

    /// `cuCtxCreate`: a new, non-primary context on device `d` (not made current).
    pub fn create_context(&self, d: i32) -> RawContext {
        let mut st = self.st();
        st.next_handle += 0x10;
        let h = st.next_handle;
        st.contexts.insert(
            h,
            Ctx {
                device: d,
                primary: false,
                refs: 1,
            },
        );
        RawContext(h)
    }

    /// `cuCtxSetCurrent` on the calling thread (replaces the top of its stack).
    pub fn set_current(&self, ctx: Option<RawContext>) {
        let mut st = self.st();
        let stack = st.current.entry(Self::me()).or_default();
        stack.pop();
        if let Some(c) = ctx {
            stack.push(c);
        }
    }

    /// The calling thread's context stack.
    pub fn stack(&self) -> Vec<RawContext> {
        self.st()
            .current
            .get(&Self::me())
            .cloned()
            .unwrap_or_default()
    }

    /// A stream of `ctx`.
    pub fn create_stream(&self, ctx: RawContext) -> u64 {
        let mut st = self.st();
        st.next_handle += 0x10;
        let h = st.next_handle as u64;
        st.streams.insert(
            h,
            Stream {
                ctx,
                recorded: 0,
                completed: 0,
                capture: None,
            },
        );
        h
    }

    /// Advances the fake GPU clock.
    pub fn advance_ms(&self, ms: f64) {
        self.st().gpu_ms += ms;
    }

    /// Completes everything recorded on `stream` so far.
    pub fn complete(&self, stream: u64) {
        let mut st = self.st();
        let s = st.streams.get_mut(&stream).unwrap();
        s.completed = s.recorded;
    }

    /// `cuStreamBeginCapture` on the calling thread.
    pub fn begin_capture(&self, stream: u64, mode: CaptureMode) {
        let me = Self::me();
        self.st().streams.get_mut(&stream).unwrap().capture = Some(Capture {
            mode,
            thread: me,
            invalidated: false,
        });
    }

    /// `cuStreamEndCapture`: fails if the capture was invalidated.
    pub fn end_capture(&self, stream: u64) -> CuResult<()> {
        let c = self.st().streams.get_mut(&stream).unwrap().capture.take();
        match c {
            Some(c) if c.invalidated => Err(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
            Some(_) => Ok(()),
            None => Err(CUDA_ERROR_INVALID_HANDLE),
        }
    }

    /// Threads that switched to thread-local capture mode.
    pub fn thread_local_threads(&self) -> usize {
        self.st()
            .modes
            .values()
            .filter(|&&m| m == CaptureMode::ThreadLocal)
            .count()
    }

    /// Events alive.
    pub fn live_events(&self) -> usize {
        self.st().events.len()
    }

    /// How often a driver call was made.
    pub fn calls(&self, name: &str) -> u64 {
        self.st().calls.get(name).copied().unwrap_or(0)
    }

    fn count(st: &mut State, name: &'static str) {
        *st.calls.entry(name).or_default() += 1;
    }

    fn current_of(st: &State) -> Option<RawContext> {
        st.current.get(&Self::me()).and_then(|s| s.last().copied())
    }

    fn stream_ctx(st: &State, stream: u64) -> CuResult<RawContext> {
        if stream <= 2 {
            return Self::current_of(st).ok_or(CUDA_ERROR_INVALID_CONTEXT);
        }
        st.streams
            .get(&stream)
            .map(|s| s.ctx)
            .ok_or(CUDA_ERROR_INVALID_HANDLE)
    }

    /// Is the calling thread prohibited from "potentially unsafe" calls by a capture? If so
    /// the capture is invalidated, as the driver does.
    fn unsafe_call(st: &mut State) -> CuResult<()> {
        let me = Self::me();
        let my_mode = st.modes.get(&me).copied().unwrap_or(CaptureMode::Global);
        let mut prohibited = false;
        for s in st.streams.values_mut() {
            if let Some(c) = s.capture.as_mut() {
                let applies = c.thread == me
                    || (c.mode == CaptureMode::Global && my_mode == CaptureMode::Global);
                if applies {
                    c.invalidated = true;
                    prohibited = true;
                }
            }
        }
        if prohibited {
            Err(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
        } else {
            Ok(())
        }
    }
}

// SAFETY: a model; it never dereferences handles.
unsafe impl CudaDriver for FakeDriver {
    fn init(&self) -> CuResult<()> {
        Ok(())
    }

    fn current_context(&self) -> CuResult<Option<RawContext>> {
        let mut st = self.st();
        Self::count(&mut st, "current_context");
        Ok(Self::current_of(&st))
    }

    fn push_context(&self, ctx: RawContext) -> CuResult<()> {
        let mut st = self.st();
        Self::count(&mut st, "push_context");
        if !st.contexts.contains_key(&ctx.0) {
            return Err(CUDA_ERROR_INVALID_CONTEXT);
        }
        st.current.entry(Self::me()).or_default().push(ctx);
        Ok(())
    }

    fn pop_context(&self) -> CuResult<()> {
        let mut st = self.st();
        Self::count(&mut st, "pop_context");
        st.current
            .entry(Self::me())
            .or_default()
            .pop()
            .map(|_| ())
            .ok_or(CUDA_ERROR_INVALID_CONTEXT)
    }

    fn current_device(&self) -> CuResult<i32> {
        let st = self.st();
        let c = Self::current_of(&st).ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
        Ok(st.contexts[&c.0].device)
    }

    fn primary_context_retain(&self, ordinal: i32) -> CuResult<RawContext> {
        let mut st = self.st();
        Self::count(&mut st, "primary_context_retain");
        if ordinal < 0 || ordinal >= st.devices {
            return Err(CUDA_ERROR_INVALID_DEVICE);
        }
        let h = 0x100 + ordinal as usize;
        st.contexts.get_mut(&h).unwrap().refs += 1;
        Ok(RawContext(h))
    }

    fn primary_context_release(&self, ordinal: i32) -> CuResult<()> {
        let mut st = self.st();
        if ordinal < 0 || ordinal >= st.devices {
            return Err(CUDA_ERROR_INVALID_DEVICE);
        }
        let c = st.contexts.get_mut(&(0x100 + ordinal as usize)).unwrap();
        assert!(c.primary && c.refs > 0, "release without retain");
        c.refs -= 1;
        Ok(())
    }

    fn stream_context(&self, stream: u64) -> CuResult<RawContext> {
        let mut st = self.st();
        Self::count(&mut st, "stream_context");
        Self::stream_ctx(&st, stream)
    }

    fn stream_capturing(&self, stream: u64) -> CuResult<bool> {
        let mut st = self.st();
        Self::count(&mut st, "stream_capturing");
        Self::stream_ctx(&st, stream)?;
        Ok(st.streams.get(&stream).is_some_and(|s| s.capture.is_some()))
    }

    fn event_create(&self) -> CuResult<RawEvent> {
        let mut st = self.st();
        Self::count(&mut st, "event_create");
        let ctx = Self::current_of(&st).ok_or(CUDA_ERROR_INVALID_CONTEXT)?;
        st.next_handle += 0x10;
        let h = st.next_handle;
        st.events.insert(
            h,
            Event {
                ctx,
                last: None,
                captured: false,
            },
        );
        Ok(RawEvent(h))
    }

    fn event_destroy(&self, event: RawEvent) -> CuResult<()> {
        let mut st = self.st();
        st.events
            .remove(&event.0)
            .map(|_| ())
            .ok_or(CUDA_ERROR_INVALID_HANDLE)
    }

    fn event_record(&self, event: RawEvent, stream: u64) -> CuResult<()> {
        let mut st = self.st();
        Self::count(&mut st, "event_record");
        let sctx = Self::stream_ctx(&st, stream)?;
        let ev = *st.events.get(&event.0).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        if ev.ctx != sctx {
            return Err(CUDA_ERROR_INVALID_HANDLE);
        }
        let now = st.gpu_ms;
        let (item, capturing) = match st.streams.get_mut(&stream) {
            Some(s) => {
                s.recorded += 1;
                (s.recorded, s.capture.is_some())
            }
            None => (0, false), // special streams: complete at once
        };
        let e = st.events.get_mut(&event.0).unwrap();
        e.last = Some((stream, item, now));
        e.captured = capturing;
        Ok(())
    }

    fn event_query(&self, event: RawEvent) -> CuResult<()> {
        let mut st = self.st();
        Self::count(&mut st, "event_query");
        Self::unsafe_call(&mut st)?;
        let ev = *st.events.get(&event.0).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        if ev.captured {
            return Err(CUDA_ERROR_CAPTURED_EVENT);
        }
        match ev.last {
            None => Ok(()), // never recorded: complete
            Some((stream, item, _)) => match st.streams.get(&stream) {
                Some(s) if s.completed < item => Err(CUDA_ERROR_NOT_READY),
                _ => Ok(()),
            },
        }
    }

    fn event_elapsed_ms(&self, start: RawEvent, end: RawEvent) -> CuResult<f32> {
        let mut st = self.st();
        Self::unsafe_call(&mut st)?;
        let s = *st.events.get(&start.0).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        let e = *st.events.get(&end.0).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        if s.captured || e.captured {
            return Err(CUDA_ERROR_CAPTURED_EVENT);
        }
        match (s.last, e.last) {
            (Some((_, _, a)), Some((_, _, b))) => Ok((b - a) as f32),
            _ => Err(CUDA_ERROR_INVALID_HANDLE),
        }
    }

    fn use_thread_local_capture_mode(&self) -> CuResult<()> {
        let mut st = self.st();
        st.modes.insert(Self::me(), CaptureMode::ThreadLocal);
        Ok(())
    }
}
