//! The emitter: the scheduler-side API and the background publisher thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fpm_schema::{ForwardPassMetrics, QueuedRequestMetrics, ScheduledRequestMetrics};
use tracing::{error, info, warn};

use crate::clock::{ClockKind, CpuClock, IterationClock, Span, StreamHandle, TimingPoll};
use crate::config::{ClockChoice, EmitterConfig};
use crate::error::{CudaError, EmitterError, TimingError};
use crate::stats::{Counters, DropReason, EmitterStats, FailureLog};
use crate::transport::{SendError, Transport, ZmqTransport};

/// How an iteration's timing went on the scheduler side.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SpanState {
    /// No segment yet.
    Empty,
    /// Segments on one stream; `open` while a segment has started and not yet ended.
    Started { stream: StreamHandle, open: bool },
    /// Segments on several streams: ambiguous, skipped.
    MultiStream,
    /// Could not be timed.
    Failed(TimingError),
}

/// The iteration being built on the scheduler thread.
#[derive(Debug, Clone, Copy)]
struct Current {
    span: Span,
    reserved: bool,
    state: SpanState,
}

/// One submitted iteration on its way to the publisher thread: plain data, no allocation.
#[derive(Debug, Clone, Copy)]
struct Submission {
    counter: u64,
    span: Span,
    /// The span holds clock resources (`begin` succeeded): release them exactly once.
    reserved: bool,
    /// False for an iteration without segments (published with `wall_time` 0, as upstream).
    timed: bool,
    /// A wall time the engine measured itself ([`Emitter::submit_measured`]).
    measured: Option<f64>,
    scheduled: ScheduledRequestMetrics,
    queued: QueuedRequestMetrics,
}

/// State shared by the scheduler side, the publisher thread and handles.
#[derive(Debug)]
struct Shared {
    counters: Counters,
    idle: AtomicBool,
    /// The next counter value. Stamping happens under this lock so that the publisher thread
    /// can stamp an idle heartbeat only after every earlier submission has reached it, keeping
    /// counters in order on the wire.
    next_counter: Mutex<u64>,
    /// Set by `shutdown`: when the publisher must give up on pending timings.
    deadline: Mutex<Option<Instant>>,
    clock_kind: ClockKind,
    endpoint: String,
}

/// A cheap, cloneable view of a running emitter for other threads: idle flag and stats.
#[derive(Debug, Clone)]
pub struct EmitterHandle {
    shared: Arc<Shared>,
}

impl EmitterHandle {
    /// See [`Emitter::set_idle`].
    pub fn set_idle(&self, idle: bool) {
        self.shared.idle.store(idle, Relaxed);
    }

    /// See [`Emitter::stats`].
    pub fn stats(&self) -> EmitterStats {
        self.shared.counters.snapshot(self.shared.clock_kind)
    }
}

/// Publishes one [`ForwardPassMetrics`] per scheduler iteration, timed on the GPU when CUDA is
/// available, without ever blocking the scheduler.
///
/// The scheduler thread owns the `Emitter` and calls, per iteration: [`begin_iteration`],
/// [`segment_start`]/[`segment_end`] around each forward segment (or [`time_segment`]), then
/// [`submit`] with the batch and queue statistics. `submit` stamps the counter and hands the
/// iteration to a background thread through a bounded queue (`try_send`, no allocation); the
/// background thread waits for the GPU events to complete (polling, in iteration order),
/// encodes the message and publishes it.
///
/// [`begin_iteration`]: Emitter::begin_iteration
/// [`segment_start`]: Emitter::segment_start
/// [`segment_end`]: Emitter::segment_end
/// [`time_segment`]: Emitter::time_segment
/// [`submit`]: Emitter::submit
pub struct Emitter {
    shared: Arc<Shared>,
    clock: Arc<dyn IterationClock>,
    tx: Option<SyncSender<Submission>>,
    thread: Option<JoinHandle<()>>,
    current: Option<Current>,
    failures: FailureLog,
}

impl std::fmt::Debug for Emitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("endpoint", &self.shared.endpoint)
            .field("clock", &self.shared.clock_kind)
            .finish()
    }
}

/// Picks the clock; returns it with a note for the log when CUDA was wanted but unavailable.
fn make_clock(
    config: &EmitterConfig,
) -> Result<(Arc<dyn IterationClock>, Option<String>), EmitterError> {
    match config.clock {
        ClockChoice::Cpu => Ok((Arc::new(CpuClock::new()), None)),
        ClockChoice::Auto | ClockChoice::Cuda => match cuda_clock(config) {
            Ok(c) => Ok((c, None)),
            Err(why) if config.clock == ClockChoice::Auto => {
                Ok((Arc::new(CpuClock::new()), Some(why.to_string())))
            }
            Err(why) => Err(EmitterError::CudaUnavailable(why)),
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda_clock(config: &EmitterConfig) -> Result<Arc<dyn IterationClock>, CudaError> {
    crate::cuda::CudaClock::new(config.cuda_device, config.cuda_event_pairs)
        .map(|c| Arc::new(c) as Arc<dyn IterationClock>)
}

#[cfg(not(feature = "cuda"))]
fn cuda_clock(_config: &EmitterConfig) -> Result<Arc<dyn IterationClock>, CudaError> {
    Err(CudaError::NotBuilt)
}

impl Emitter {
    /// Binds the ZeroMQ publisher for `config.dp_rank` and starts the publisher thread.
    ///
    /// # Errors
    /// An invalid configuration, a socket that cannot be bound, or CUDA required but missing.
    pub fn start(config: EmitterConfig) -> Result<Self, EmitterError> {
        config.validate()?;
        let address = config.endpoint.bind_address(config.dp_rank)?;
        let transport = ZmqTransport::bind(&address, config.send_hwm)?;
        Self::start_with_transport(config, transport)
    }

    /// Starts with any [`Transport`] (tests use [`crate::MemoryTransport`]).
    ///
    /// # Errors
    /// An invalid configuration or CUDA required but missing.
    pub fn start_with_transport(
        config: EmitterConfig,
        transport: impl Transport,
    ) -> Result<Self, EmitterError> {
        config.validate()?;
        let clock_and_note = make_clock(&config)?;
        Self::start_with_clock(config, transport, clock_and_note.0, clock_and_note.1)
    }

    /// Starts with a given clock (for engines that bring their own, and for tests).
    ///
    /// # Errors
    /// An invalid configuration, or the thread cannot be spawned.
    pub fn start_with_clock(
        config: EmitterConfig,
        transport: impl Transport,
        clock: Arc<dyn IterationClock>,
        cuda_note: Option<String>,
    ) -> Result<Self, EmitterError> {
        config.validate()?;
        let endpoint = transport.describe();
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            idle: AtomicBool::new(false),
            next_counter: Mutex::new(0),
            deadline: Mutex::new(None),
            clock_kind: clock.kind(),
            endpoint: endpoint.clone(),
        });
        match (clock.kind(), cuda_note) {
            (ClockKind::Cuda, _) => {
                info!(%endpoint, worker_id = %config.worker_id, dp_rank = config.dp_rank, clock = "cuda", cuda = %clock.describe(), "FPM emitter started")
            }
            (ClockKind::Cpu, Some(why)) => warn!(
                %endpoint, worker_id = %config.worker_id, dp_rank = config.dp_rank, clock = "cpu", reason = %why,
                "FPM emitter started without GPU timing: CUDA unavailable, iterations are timed with the CPU monotonic clock"
            ),
            (ClockKind::Cpu, None) => info!(
                %endpoint, worker_id = %config.worker_id, dp_rank = config.dp_rank, clock = "cpu",
                "FPM emitter started; iterations are timed with the CPU monotonic clock (not GPU time)"
            ),
        }
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity);
        let publisher = Publisher {
            shared: shared.clone(),
            clock: clock.clone(),
            rx,
            transport: Box::new(transport),
            pending: VecDeque::with_capacity(
                config.cuda_event_pairs.min(config.queue_capacity) + 16,
            ),
            message: ForwardPassMetrics::heartbeat(config.worker_id.clone(), config.dp_rank as i64),
            buf: Vec::with_capacity(1024),
            heartbeat_interval: config.heartbeat_interval,
            poll_interval: config.poll_interval,
            max_poll_interval: config.max_poll_interval.max(config.poll_interval),
            backoff: config.poll_interval,
            last_publish: Instant::now(),
            max_pending: config.queue_capacity,
            held: VecDeque::new(),
            hold_until: Instant::now() + config.first_subscriber_wait,
            hold_capacity: config.queue_capacity,
            ever_delivered: false,
            failures: FailureLog::new("publisher"),
        };
        let thread = std::thread::Builder::new()
            .name(format!("fpm-publisher-{}", config.dp_rank))
            .spawn(move || publisher.run())?;
        Ok(Emitter {
            shared,
            clock,
            tx: Some(tx),
            thread: Some(thread),
            current: None,
            failures: FailureLog::new("scheduler"),
        })
    }

    /// A cloneable handle for other threads (idle flag, stats).
    pub fn handle(&self) -> EmitterHandle {
        EmitterHandle {
            shared: self.shared.clone(),
        }
    }

    /// Which clock times the iterations.
    pub fn clock_kind(&self) -> ClockKind {
        self.shared.clock_kind
    }

    /// The address the publisher is bound to.
    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// Starts a new iteration. An iteration begun and never submitted is released here (its
    /// timing resources go back to the pool).
    #[inline]
    pub fn begin_iteration(&mut self) {
        if let Some(prev) = self.current.take() {
            if prev.reserved {
                self.clock.release(prev.span);
            }
        }
        self.current = Some(match self.clock.begin() {
            Ok(span) => Current {
                span,
                reserved: true,
                state: SpanState::Empty,
            },
            Err(e) => Current {
                span: Span::default(),
                reserved: false,
                state: SpanState::Failed(e),
            },
        });
    }

    /// The current iteration (begun implicitly if needed) and the clock, borrowed apart.
    #[inline]
    fn current(&mut self) -> (&mut Current, &dyn IterationClock) {
        if self.current.is_none() {
            self.begin_iteration();
        }
        let cur = self.current.get_or_insert(Current {
            span: Span::default(),
            reserved: false,
            state: SpanState::Empty,
        });
        (cur, &*self.clock)
    }

    /// Marks the start of a forward segment on `stream` (the first one starts the span).
    /// Segments pair up: a start while one is open makes the iteration `unpaired_segment`.
    #[inline]
    pub fn segment_start(&mut self, stream: StreamHandle) {
        let (cur, clock) = self.current();
        match cur.state {
            SpanState::Empty => {
                cur.state = match clock.mark_start(&mut cur.span, stream) {
                    Ok(()) => SpanState::Started { stream, open: true },
                    Err(e) => SpanState::Failed(e),
                }
            }
            SpanState::Started { stream: s, .. } if s != stream => {
                cur.state = SpanState::MultiStream
            }
            // A start while a segment is open: the pairs are off, the span means nothing.
            SpanState::Started { open: true, .. } => {
                cur.state = SpanState::Failed(TimingError::Unpaired)
            }
            SpanState::Started { stream: s, .. } => {
                cur.state = SpanState::Started {
                    stream: s,
                    open: true,
                }
            }
            _ => {}
        }
    }

    /// Marks the end of a forward segment on `stream` (the last one ends the span). An end
    /// with no segment open makes the iteration `unpaired_segment`.
    #[inline]
    pub fn segment_end(&mut self, stream: StreamHandle) {
        let (cur, clock) = self.current();
        match cur.state {
            // An end with no segment open (a second end): the pairs are off.
            SpanState::Started {
                stream: s,
                open: false,
            } if s == stream => cur.state = SpanState::Failed(TimingError::Unpaired),
            SpanState::Started { stream: s, .. } if s == stream => {
                cur.state = match clock.mark_end(&mut cur.span, stream) {
                    Ok(()) => SpanState::Started {
                        stream,
                        open: false,
                    },
                    Err(e) => SpanState::Failed(e),
                }
            }
            SpanState::Started { .. } => cur.state = SpanState::MultiStream,
            // An end without a start: nothing to measure.
            SpanState::Empty => cur.state = SpanState::Failed(TimingError::Unpaired),
            _ => {}
        }
    }

    /// Runs `f` as one forward segment on `stream`.
    #[inline]
    pub fn time_segment<R>(&mut self, stream: StreamHandle, f: impl FnOnce() -> R) -> R {
        self.segment_start(stream);
        let r = f();
        self.segment_end(stream);
        r
    }

    /// Submits the current iteration with its statistics; never blocks, never allocates.
    ///
    /// An iteration without any segment is published with `wall_time` 0.0, as upstream does
    /// (it then reads like a heartbeat to planners); one whose timing failed or spanned several
    /// streams is dropped and counted.
    ///
    /// Returns `None` when queued for publication, or the reason it was dropped (already
    /// counted). Either way the iteration consumed a counter value, so a drop shows downstream
    /// as a gap.
    #[inline]
    pub fn submit(
        &mut self,
        scheduled: ScheduledRequestMetrics,
        queued: QueuedRequestMetrics,
    ) -> Option<DropReason> {
        self.submit_with(scheduled, queued, None)
    }

    /// Like [`Emitter::submit`], for an engine that timed the iteration itself (SGLang's and
    /// Dynamo's vLLM publishers hand over finished messages): `wall_time` (seconds) is
    /// published as given, and the current iteration's segments, if any, are discarded.
    #[inline]
    pub fn submit_measured(
        &mut self,
        wall_time: f64,
        scheduled: ScheduledRequestMetrics,
        queued: QueuedRequestMetrics,
    ) -> Option<DropReason> {
        if let Some(cur) = self.current.take() {
            if cur.reserved {
                self.clock.release(cur.span);
            }
        }
        self.submit_with(scheduled, queued, Some(wall_time))
    }

    #[inline]
    fn submit_with(
        &mut self,
        scheduled: ScheduledRequestMetrics,
        queued: QueuedRequestMetrics,
        measured: Option<f64>,
    ) -> Option<DropReason> {
        let cur = self.current.take().unwrap_or(Current {
            span: Span::default(),
            reserved: false,
            state: SpanState::Empty,
        });
        let counters = &self.shared.counters;
        let mut next = match self.shared.next_counter.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let counter = *next;
        *next += 1;
        counters.submitted.fetch_add(1, Relaxed);
        let drop_reason = match cur.state {
            SpanState::MultiStream => Some(DropReason::MultiStream),
            // A segment started and never ended: its end event is stale or unrecorded.
            SpanState::Started { open: true, .. } => Some(DropReason::Unpaired),
            SpanState::Failed(e) => {
                self.failures.record(counter, e);
                Some(DropReason::for_timing_error(e))
            }
            SpanState::Empty | SpanState::Started { open: false, .. } => None,
        };
        if let Some(reason) = drop_reason {
            drop(next);
            if cur.reserved {
                self.clock.release(cur.span);
            }
            counters.drop_one(reason);
            return Some(reason);
        }
        let sub = Submission {
            counter,
            span: cur.span,
            reserved: cur.reserved,
            timed: matches!(cur.state, SpanState::Started { .. }),
            measured,
            scheduled,
            queued,
        };
        // Counted as pending before the hand-over, so the publisher's decrement can never
        // run first (the count never dips below zero).
        counters.pending.fetch_add(1, Relaxed);
        let sent = match &self.tx {
            Some(tx) => tx.try_send(sub),
            None => Err(TrySendError::Disconnected(sub)),
        };
        drop(next);
        if sent.is_err() {
            counters.pending.fetch_sub(1, Relaxed);
        }
        match sent {
            Ok(()) => None,
            Err(TrySendError::Full(sub)) => {
                if sub.reserved {
                    self.clock.release(sub.span);
                }
                counters.drop_one(DropReason::QueueFull);
                Some(DropReason::QueueFull)
            }
            Err(TrySendError::Disconnected(sub)) => {
                if sub.reserved {
                    self.clock.release(sub.span);
                }
                counters.drop_one(DropReason::PublisherGone);
                Some(DropReason::PublisherGone)
            }
        }
    }

    /// Tells the emitter whether the engine is idle; while idle and nothing is published, an
    /// all-zero heartbeat goes out every heartbeat interval.
    pub fn set_idle(&self, idle: bool) {
        self.shared.idle.store(idle, Relaxed);
    }

    /// Counters so far.
    pub fn stats(&self) -> EmitterStats {
        self.shared.counters.snapshot(self.shared.clock_kind)
    }

    /// Stops accepting iterations, publishes what completes within `timeout` (pending GPU
    /// timings are waited for until then, the rest counted as dropped `shutdown`), lets the
    /// queued messages leave within the same deadline, closes the socket and returns the
    /// final counters. Messages some subscriber may not have at the deadline (unwritten, or on
    /// ipc unread) move from `published` to dropped `shutdown`.
    pub fn shutdown(mut self, timeout: Duration) -> EmitterStats {
        self.stop(timeout);
        self.stats()
    }

    fn stop(&mut self, timeout: Duration) {
        if let Some(cur) = self.current.take() {
            if cur.reserved {
                self.clock.release(cur.span);
            }
        }
        if let Ok(mut d) = self.shared.deadline.lock() {
            // A timeout too large for the clock means "no deadline" in practice.
            let now = Instant::now();
            *d = Some(
                now.checked_add(timeout)
                    .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365)),
            );
        }
        self.tx = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                // Whatever it held is lost: count it, so the totals still add up.
                let lost = self.shared.counters.pending.swap(0, Relaxed);
                self.shared.counters.drop_n(DropReason::PublisherGone, lost);
                error!(
                    lost,
                    "FPM publisher thread panicked; its pending iterations are counted as publisher_gone"
                );
            }
        }
    }
}

impl Drop for Emitter {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Duration::from_secs(1));
        }
    }
}

/// The background thread: owns the transport, waits for timings, encodes and sends.
struct Publisher {
    shared: Arc<Shared>,
    clock: Arc<dyn IterationClock>,
    rx: Receiver<Submission>,
    transport: Box<dyn Transport>,
    /// Submissions received, waiting for their timing, in counter order.
    pending: VecDeque<Submission>,
    /// Reused message (worker id and rank set once) and buffer: no allocation per message.
    message: ForwardPassMetrics,
    buf: Vec<u8>,
    heartbeat_interval: Duration,
    poll_interval: Duration,
    max_poll_interval: Duration,
    /// The current wait between polls of a pending head: `poll_interval`, doubled after each
    /// poll that finds it still running, up to `max_poll_interval`; reset on completion.
    backoff: Duration,
    last_publish: Instant,
    /// Iterations held waiting for their timing, at most (the queue capacity).
    max_pending: usize,
    failures: FailureLog,
    /// Encoded messages held because no subscriber has connected yet (start-up only), in
    /// counter order. Still counted as pending until sent or dropped.
    held: VecDeque<(u64, Vec<u8>)>,
    /// Until when messages are held for the first subscriber.
    hold_until: Instant,
    /// Messages held, at most.
    hold_capacity: usize,
    /// A message has been delivered: no more holding (a subscriber that leaves later is the
    /// relay's restart, counted `no_subscriber` as before).
    ever_delivered: bool,
}

impl Publisher {
    fn run(mut self) {
        self.clock.on_publisher_thread();
        loop {
            self.flush_held(false);
            self.publish_ready();
            self.shared
                .counters
                .lost_with_subscribers
                .store(self.transport.lost_with_subscribers(), Relaxed);
            let wait = if !self.held.is_empty() {
                Duration::from_millis(5)
            } else if self.pending.is_empty() {
                self.heartbeat_interval
                    .saturating_sub(self.last_publish.elapsed())
                    .max(Duration::from_millis(1))
                    .min(Duration::from_millis(100))
            } else {
                self.backoff
            };
            if self.pending.len() >= self.max_pending {
                // Waiting on the GPU for a full queue's worth: leave new submissions in the
                // channel, which fills and makes `submit` drop and count.
                if self
                    .shared
                    .deadline
                    .lock()
                    .map(|d| d.is_some())
                    .unwrap_or(true)
                {
                    break;
                }
                std::thread::sleep(self.backoff);
                continue;
            }
            match self.rx.recv_timeout(wait) {
                Ok(sub) => {
                    self.pending.push_back(sub);
                    while self.pending.len() < self.max_pending {
                        match self.rx.try_recv() {
                            Ok(sub) => self.pending.push_back(sub),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.maybe_heartbeat(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.drain();
    }

    /// Publishes the completed iterations at the head of the queue, in order.
    fn publish_ready(&mut self) {
        while let Some(sub) = self.pending.front().copied() {
            let wall_time: Result<f64, TimingError> = if let Some(w) = sub.measured {
                Ok(w)
            } else if sub.timed {
                match self.clock.poll(&sub.span) {
                    TimingPoll::Pending => {
                        self.backoff = (self.backoff * 2).min(self.max_poll_interval);
                        return;
                    }
                    TimingPoll::Ready(secs) => Ok(secs),
                    TimingPoll::Failed(e) => Err(e),
                }
            } else {
                Ok(0.0)
            };
            self.pending.pop_front();
            self.backoff = self.poll_interval;
            if sub.reserved {
                self.clock.release(sub.span);
            }
            let counters = &self.shared.counters;
            match wall_time {
                Ok(secs) => self.send(sub, secs),
                Err(e) => {
                    counters.pending.fetch_sub(1, Relaxed);
                    self.failures.record(sub.counter, e);
                    counters.drop_one(match e {
                        TimingError::Captured => DropReason::GraphCapture,
                        _ => DropReason::TimingFailed,
                    });
                }
            }
        }
    }

    fn send(&mut self, sub: Submission, wall_time: f64) {
        self.message.counter_id = sub.counter as i64;
        self.message.wall_time = wall_time;
        self.message.scheduled_requests = sub.scheduled;
        self.message.queued_requests = sub.queued;
        fpm_schema::encode_into(&self.message, &mut self.buf);
        let counters = &self.shared.counters;
        let result = if self.held.is_empty() {
            self.transport.send(sub.counter, &self.buf)
        } else {
            // Behind messages held for the first subscriber: keep counter order.
            Err(SendError::NoSubscriber)
        };
        match result {
            Ok(()) => {
                counters.pending.fetch_sub(1, Relaxed);
                counters.published.fetch_add(1, Relaxed);
                self.last_publish = Instant::now();
                self.ever_delivered = true;
            }
            Err(SendError::NoSubscriber) if self.holding() => {
                if self.held.len() < self.hold_capacity {
                    self.held.push_back((sub.counter, self.buf.clone()));
                } else {
                    counters.pending.fetch_sub(1, Relaxed);
                    counters.drop_one(DropReason::NoSubscriber);
                }
            }
            Err(e) => {
                counters.pending.fetch_sub(1, Relaxed);
                counters.drop_one(match e {
                    SendError::NoSubscriber => DropReason::NoSubscriber,
                    SendError::WouldBlock => DropReason::SendHwm,
                    _ => DropReason::SendError,
                });
            }
        }
    }

    /// Still in the start-up window where messages wait for the first subscriber?
    fn holding(&self) -> bool {
        !self.ever_delivered && Instant::now() < self.hold_until
    }

    /// Sends held messages, in order, once a subscriber is there; when the window has passed
    /// (or at shutdown, `give_up`), drops what is left as `no_subscriber`.
    fn flush_held(&mut self, give_up: bool) {
        let counters = &self.shared.counters;
        while let Some((counter, payload)) = self.held.front() {
            match self.transport.send(*counter, payload) {
                Ok(()) => {
                    counters.pending.fetch_sub(1, Relaxed);
                    counters.published.fetch_add(1, Relaxed);
                    self.ever_delivered = true;
                    self.last_publish = Instant::now();
                    self.held.pop_front();
                }
                Err(SendError::NoSubscriber) if !give_up && self.holding() => return,
                Err(e) => {
                    counters.pending.fetch_sub(1, Relaxed);
                    counters.drop_one(match e {
                        SendError::WouldBlock => DropReason::SendHwm,
                        SendError::Failed => DropReason::SendError,
                        _ => DropReason::NoSubscriber,
                    });
                    self.held.pop_front();
                }
            }
        }
    }

    /// While idle with nothing in flight, sends an all-zero heartbeat every interval.
    fn maybe_heartbeat(&mut self) {
        if !self.shared.idle.load(Relaxed)
            || !self.pending.is_empty()
            || !self.held.is_empty()
            || self.last_publish.elapsed() < self.heartbeat_interval
        {
            return;
        }
        let counter = {
            let mut next = match self.shared.next_counter.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // Everything stamped before this point is in the channel: take it first, so the
            // heartbeat's counter follows every earlier submission's on the wire.
            while let Ok(sub) = self.rx.try_recv() {
                self.pending.push_back(sub);
            }
            if !self.pending.is_empty() {
                return;
            }
            let c = *next;
            *next += 1;
            c
        };
        self.message.counter_id = counter as i64;
        self.message.wall_time = 0.0;
        self.message.scheduled_requests = ScheduledRequestMetrics::default();
        self.message.queued_requests = QueuedRequestMetrics::default();
        fpm_schema::encode_into(&self.message, &mut self.buf);
        let counters = &self.shared.counters;
        match self.transport.send_heartbeat(counter, &self.buf) {
            Ok(()) => counters.heartbeats.fetch_add(1, Relaxed),
            Err(_) => counters.heartbeats_dropped.fetch_add(1, Relaxed),
        };
        // Counts as activity either way, so heartbeats keep to the interval.
        self.last_publish = Instant::now();
    }

    /// After shutdown: publish what completes before the deadline, count the rest.
    fn drain(&mut self) {
        let deadline = self
            .shared
            .deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .unwrap_or_else(Instant::now);
        // Submissions still in the channel are owed a publication or a count, too.
        while let Ok(sub) = self.rx.try_recv() {
            self.pending.push_back(sub);
        }
        loop {
            self.flush_held(false);
            self.publish_ready();
            if self.pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(self.poll_interval);
        }
        // Held for a subscriber that never came: counted `no_subscriber`.
        self.flush_held(true);
        let counters = &self.shared.counters;
        for sub in self.pending.drain(..) {
            if sub.reserved {
                self.clock.release(sub.span);
            }
            counters.pending.fetch_sub(1, Relaxed);
            counters.drop_one(DropReason::Shutdown);
        }
        let linger = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        // Accepted by the transport but still queued for a subscriber at the deadline: not
        // published after all.
        let unsent = self.transport.close(linger);
        counters
            .lost_with_subscribers
            .store(self.transport.lost_with_subscribers(), Relaxed);
        counters.published.fetch_sub(unsent.messages, Relaxed);
        counters.drop_n(DropReason::Shutdown, unsent.messages);
        counters.heartbeats.fetch_sub(unsent.heartbeats, Relaxed);
        counters
            .heartbeats_dropped
            .fetch_add(unsent.heartbeats, Relaxed);
    }
}
