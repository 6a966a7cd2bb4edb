//! The ZeroMQ side: one thread polls every SUB socket, validates (fully decodes) each message
//! and hands the payload to the [`Buffer`]. It never waits on NATS.
//!
//! Each SUB has a socket monitor. libzmq refuses a frame over `ZMQ_MAXMSGSIZE` by dropping
//! the connection as a protocol error, and then does *not* reconnect; the monitor shows a
//! disconnect that no reconnect attempt follows. The thread counts that as one
//! `oversized_frame` message and reconnects the endpoint itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fpm_schema::{DecodeError, Decoder, ForwardPassMetrics};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::buffer::{Buffer, Item};
use crate::metrics::{DropReason, InputSeries, InvalidReason, Metrics};

/// How often the thread looks at the shutdown token while idle.
const POLL_MS: u64 = 50;
/// Most messages read from one socket before the others get a turn.
const BATCH: usize = 1024;
/// At most one warning per reason per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long after a disconnect libzmq has to announce its own reconnect attempt before the
/// thread concludes the connection was dropped for a protocol error (no retry coming).
const RETRY_GRACE: Duration = Duration::from_millis(250);
/// Room for the topic and counter frames (and ZMTP overhead) above the payload limit in
/// `ZMQ_MAXMSGSIZE`, which libzmq applies to each frame.
pub(crate) const FRAME_SLACK: usize = 1024;
/// A reader whose heartbeat is older than this is reported unhealthy.
const STALE_AFTER: Duration = Duration::from_secs(5);

/// Checks one multipart message and decodes its payload completely into `msg` (reused
/// between messages); on success returns the counter frame's value.
pub(crate) fn validate(
    frames: &[Vec<u8>],
    decoder: &Decoder,
    msg: &mut ForwardPassMetrics,
) -> Result<u64, InvalidReason> {
    let [topic, counter, payload] = frames else {
        return Err(InvalidReason::FrameCount);
    };
    if !topic.is_empty() {
        return Err(InvalidReason::TopicFrame);
    }
    let counter: [u8; 8] = counter
        .as_slice()
        .try_into()
        .map_err(|_| InvalidReason::CounterFrame)?;
    if payload.len() > decoder.max_size() {
        return Err(InvalidReason::TooLarge);
    }
    match decoder.decode_into(payload, msg) {
        Ok(()) => Ok(u64::from_be_bytes(counter)),
        Err(DecodeError::TooLarge { .. }) => Err(InvalidReason::TooLarge),
        Err(DecodeError::UnsupportedVersion { .. }) => Err(InvalidReason::UnsupportedVersion),
        // A newer schema may not decode as version 1: say so when its version is readable.
        Err(_) => match decoder.peek_key(payload) {
            Ok(key) if key.check_version().is_err() => Err(InvalidReason::UnsupportedVersion),
            _ => Err(InvalidReason::Undecodable),
        },
    }
}

/// What the counter frame of one message says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CounterCheck {
    /// Messages skipped upstream.
    pub gap: u64,
    /// The counter went backwards (a restarted engine).
    pub reset: bool,
    /// Messages sent before the first one seen on this stream (at start or after a reset):
    /// publishers count from 0, so a first counter of n means n were missed.
    pub missed_before_start: u64,
}

/// Tracks one endpoint's counter frames.
#[derive(Debug, Default)]
pub(crate) struct CounterTracker {
    expected: Option<u64>,
}

impl CounterTracker {
    pub fn observe(&mut self, counter: u64) -> CounterCheck {
        let check = match self.expected {
            None => CounterCheck {
                missed_before_start: counter,
                ..CounterCheck::default()
            },
            Some(e) if counter > e => CounterCheck {
                gap: counter - e,
                ..CounterCheck::default()
            },
            Some(e) if counter < e => CounterCheck {
                reset: true,
                missed_before_start: counter,
                ..CounterCheck::default()
            },
            Some(_) => CounterCheck::default(),
        };
        self.expected = Some(counter.wrapping_add(1));
        check
    }
}

/// Logs at most one warning per reason per [`LOG_EVERY`], with the count since the last one.
#[derive(Debug, Default)]
struct LogLimiter {
    last: [Option<Instant>; InvalidReason::ALL.len()],
    suppressed: [u64; InvalidReason::ALL.len()],
}

impl LogLimiter {
    fn invalid(&mut self, reason: InvalidReason, endpoint: &str) {
        let i = InvalidReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.suppressed[i] += 1;
        let now = Instant::now();
        if self.last[i].is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
            warn!(
                reason = reason.as_str(),
                endpoint,
                count = self.suppressed[i],
                "invalid FPM messages dropped (logged at most every 10 s)"
            );
            self.last[i] = Some(now);
            self.suppressed[i] = 0;
        }
    }
}

/// Liveness of the reader thread, for `/health` and for the relay's supervision.
#[derive(Debug)]
pub(crate) struct ReaderState {
    started: Instant,
    /// Milliseconds after `started` of the last loop turn.
    beat_ms: AtomicU64,
    /// Set once the thread has ended, for whatever reason.
    stopped: AtomicBool,
    /// Why the thread died, when it did not stop for shutdown.
    failure: OnceLock<String>,
}

impl ReaderState {
    pub fn new() -> Self {
        ReaderState {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            failure: OnceLock::new(),
        }
    }

    fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Running and turning its loop.
    pub fn alive(&self) -> bool {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        !self.stopped.load(Ordering::Relaxed)
            && now.saturating_sub(self.beat_ms.load(Ordering::Relaxed))
                < STALE_AFTER.as_millis() as u64
    }

    /// Records that the thread ended; `failure` when it died rather than stopped.
    pub fn ended(&self, failure: Option<String>) {
        if let Some(f) = failure {
            let _ = self.failure.set(f);
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Why the thread died, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// One engine endpoint: its SUB and the SUB's monitor.
pub(crate) struct Input {
    endpoint: String,
    socket: zmq::Socket,
    monitor: zmq::Socket,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Why an endpoint cannot work, found before libzmq is asked (libzmq accepts a bad tcp
/// port or a missing ipc directory and then retries forever).
pub(crate) fn check_endpoint(ep: &str) -> Result<(), String> {
    if let Some(rest) = ep.strip_prefix("tcp://") {
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err("no port: use tcp://HOST:PORT".into());
        };
        if host.is_empty() || host == "*" {
            return Err("no host to connect to: use tcp://HOST:PORT".into());
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(()),
            _ => Err(format!("port {port:?} is not a port number (1-65535)")),
        }
    } else if let Some(path) = ep.strip_prefix("ipc://") {
        if path.starts_with('@') {
            return Ok(()); // Linux abstract namespace: no file
        }
        if path.is_empty() {
            return Err("no path: use ipc:///path".into());
        }
        // sockaddr_un.sun_path holds 107 bytes and a NUL.
        if path.len() > 107 {
            return Err(format!(
                "the path is {} bytes, over the 107-byte limit of a unix socket path",
                path.len()
            ));
        }
        let dir = std::path::Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if dir.is_dir() {
            Ok(())
        } else {
            Err(format!(
                "directory {} does not exist (the engine binds its socket there)",
                dir.display()
            ))
        }
    } else if ep.starts_with("inproc://") {
        Ok(())
    } else {
        Err("unknown transport: use tcp://HOST:PORT or ipc:///path".into())
    }
}

/// Checks every endpoint with [`check_endpoint`] (touches the filesystem: call it off the
/// async runtime).
pub(crate) fn check_endpoints(endpoints: &[String]) -> Result<(), crate::Error> {
    for ep in endpoints {
        check_endpoint(ep).map_err(|reason| crate::Error::BadEndpoint {
            endpoint: ep.clone(),
            reason,
        })?;
    }
    Ok(())
}

/// Creates and connects one SUB (and its monitor) per endpoint. Connect returns at once;
/// libzmq retries in the background until the engine binds, and reconnects after an engine
/// restart.
pub(crate) fn connect(
    ctx: &zmq::Context,
    endpoints: &[String],
    rcvhwm: i32,
    max_payload: usize,
) -> Result<Vec<Input>, crate::Error> {
    let mut out: Vec<Input> = Vec::with_capacity(endpoints.len());
    let tag = crate::relay::random_u64();
    let max_frame = i64::try_from(max_payload.saturating_add(FRAME_SLACK)).unwrap_or(i64::MAX);
    for (i, ep) in endpoints.iter().enumerate() {
        if out.iter().any(|e| e.endpoint == *ep) {
            return Err(crate::Error::DuplicateEndpoint(ep.clone()));
        }
        let s = ctx.socket(zmq::SUB)?;
        s.set_rcvhwm(rcvhwm)?;
        s.set_maxmsgsize(max_frame)?;
        s.set_linger(0)?;
        s.set_reconnect_ivl(100)?;
        s.set_reconnect_ivl_max(500)?;
        s.set_subscribe(b"")?;
        let addr = format!("inproc://fpm-relay-monitor-{tag:x}-{i}");
        let events = [
            zmq::SocketEvent::DISCONNECTED,
            zmq::SocketEvent::CONNECT_RETRIED,
            zmq::SocketEvent::CONNECT_DELAYED,
            zmq::SocketEvent::CONNECTED,
        ]
        .iter()
        .fold(0i32, |acc, e| acc | i32::from(e.to_raw()));
        s.monitor(&addr, events)?;
        let monitor = ctx.socket(zmq::PAIR)?;
        monitor.set_linger(0)?;
        monitor.connect(&addr)?;
        s.connect(ep).map_err(|error| crate::Error::Endpoint {
            endpoint: ep.clone(),
            error,
        })?;
        debug!(endpoint = %ep, "ZeroMQ SUB connecting");
        out.push(Input {
            endpoint: ep.clone(),
            socket: s,
            monitor,
        });
    }
    Ok(out)
}

struct Source {
    input: Input,
    counters: CounterTracker,
    /// Per-(dp_rank, worker_id) series of this endpoint, cached to keep the hot path lock-free.
    series: HashMap<i64, HashMap<String, Arc<InputSeries>>>,
    /// Set on a disconnect; cleared when libzmq announces its reconnect attempt. Expiry means
    /// libzmq dropped the connection for a protocol error and will not come back by itself.
    dropped_at: Option<Instant>,
}

/// Everything the thread needs besides its sockets.
#[derive(Debug)]
pub(crate) struct ReaderContext {
    pub buffer: Arc<Buffer>,
    pub metrics: Arc<Metrics>,
    pub decoder: Decoder,
    pub cancel: CancellationToken,
    pub state: Arc<ReaderState>,
    /// Fault injection for tests: panic after reading this many messages.
    pub panic_after: Option<u64>,
}

/// The thread body: runs until `cancel` fires (`Ok`), or until ZeroMQ fails (`Err`).
pub(crate) fn run(inputs: Vec<Input>, cx: &ReaderContext) -> Result<(), String> {
    let ReaderContext {
        buffer,
        metrics,
        decoder,
        cancel,
        state,
        panic_after,
    } = cx;
    let mut sources: Vec<Source> = inputs
        .into_iter()
        .map(|input| Source {
            input,
            counters: CounterTracker::default(),
            series: HashMap::new(),
            dropped_at: None,
        })
        .collect();
    let mut log = LogLimiter::default();
    let mut ready = Vec::with_capacity(sources.len());
    let mut monitor_ready = Vec::with_capacity(sources.len());
    let mut msg = ForwardPassMetrics::default();
    let mut read = 0u64;
    while !cancel.is_cancelled() {
        state.beat();
        ready.clear();
        monitor_ready.clear();
        let now = Instant::now();
        let wait = sources
            .iter()
            .filter_map(|s| s.dropped_at)
            .map(|t| (t + RETRY_GRACE).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_millis(POLL_MS))
            .min(Duration::from_millis(POLL_MS));
        {
            let mut items: Vec<zmq::PollItem<'_>> = sources
                .iter()
                .map(|s| s.input.socket.as_poll_item(zmq::POLLIN))
                .chain(
                    sources
                        .iter()
                        .map(|s| s.input.monitor.as_poll_item(zmq::POLLIN)),
                )
                .collect();
            match zmq::poll(&mut items, i64::try_from(wait.as_millis()).unwrap_or(0)) {
                Ok(_) => {
                    let n = sources.len();
                    for (i, it) in items.iter().enumerate() {
                        if it.is_readable() {
                            if i < n {
                                ready.push(i);
                            } else {
                                monitor_ready.push(i - n);
                            }
                        }
                    }
                }
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(format!("ZeroMQ poll failed: {e}")),
            }
        }
        for &i in &monitor_ready {
            monitor_events(&mut sources[i]);
        }
        let now = Instant::now();
        for src in sources.iter_mut() {
            if src.dropped_at.is_some_and(|t| now >= t + RETRY_GRACE) {
                src.dropped_at = None;
                metrics.received.inc();
                metrics.invalid(InvalidReason::OversizedFrame);
                log.invalid(InvalidReason::OversizedFrame, &src.input.endpoint);
                // libzmq gave up on this endpoint: connect it again ourselves.
                let ep = src.input.endpoint.clone();
                let _ = src.input.socket.disconnect(&ep);
                if let Err(e) = src.input.socket.connect(&ep) {
                    return Err(format!("cannot reconnect {ep}: {e}"));
                }
                debug!(endpoint = %ep, "reconnected after libzmq dropped the connection");
            }
        }
        for &i in &ready {
            let ep_index = i;
            let src = &mut sources[i];
            for _ in 0..BATCH {
                let frames = match src.input.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(f) => f,
                    Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => break,
                    Err(e) => {
                        return Err(format!(
                            "ZeroMQ receive failed on {}: {e}",
                            src.input.endpoint
                        ))
                    }
                };
                let received = Instant::now();
                metrics.received.inc();
                read += 1;
                if panic_after.is_some_and(|n| read >= n) {
                    panic!("fault injection: the ZeroMQ reader panics after {read} messages");
                }
                match validate(&frames, decoder, &mut msg) {
                    Err(reason) => {
                        metrics.invalid(reason);
                        log.invalid(reason, &src.input.endpoint);
                    }
                    Ok(counter) => {
                        let series = src.series_for(metrics, ep_index, &msg.worker_id, msg.dp_rank);
                        series.received.fetch_add(1, Ordering::Relaxed);
                        metrics.inputs.touch(ep_index, received);
                        let check = src.counters.observe(counter);
                        if check.gap > 0 {
                            metrics.gaps.inc_by(check.gap);
                            series.gaps.fetch_add(check.gap, Ordering::Relaxed);
                            debug!(endpoint = %src.input.endpoint, gap = check.gap, "counter gap");
                        }
                        if check.reset {
                            metrics.resets.inc();
                            series.resets.fetch_add(1, Ordering::Relaxed);
                            debug!(endpoint = %src.input.endpoint, counter, "counter reset (engine restart?)");
                        }
                        if check.missed_before_start > 0 {
                            metrics
                                .missed_before_start
                                .inc_by(check.missed_before_start);
                            series
                                .missed_before_start
                                .fetch_add(check.missed_before_start, Ordering::Relaxed);
                            debug!(endpoint = %src.input.endpoint, counter, "first message of a stream is not counter 0");
                        }
                        let mut frames = frames;
                        let payload = frames.pop().unwrap_or_default();
                        if buffer.push(Item { payload, received }).is_err() {
                            metrics.drop_msgs(DropReason::BufferFull, 1);
                        }
                    }
                }
            }
        }
    }
    debug!("ZeroMQ reader stopped");
    Ok(())
}

impl Source {
    fn series_for(
        &mut self,
        metrics: &Metrics,
        ep: usize,
        worker_id: &str,
        dp_rank: i64,
    ) -> Arc<InputSeries> {
        if let Some(s) = self.series.get(&dp_rank).and_then(|m| m.get(worker_id)) {
            return s.clone();
        }
        let (s, cache) = metrics.inputs.series(ep, worker_id, dp_rank);
        if cache {
            self.series
                .entry(dp_rank)
                .or_default()
                .insert(worker_id.to_owned(), s.clone());
        }
        s
    }
}

/// Reads the monitor's pending events: a disconnect starts the grace period, libzmq's own
/// reconnect attempt (or a new connection) ends it.
fn monitor_events(src: &mut Source) {
    const DISCONNECTED: u16 = zmq::SocketEvent::DISCONNECTED as u16;
    loop {
        let frames = match src.input.monitor.recv_multipart(zmq::DONTWAIT) {
            Ok(f) => f,
            Err(_) => return,
        };
        let Some(event) = frames
            .first()
            .and_then(|f| f.get(..2))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
        else {
            continue;
        };
        if event == DISCONNECTED {
            debug!(endpoint = %src.input.endpoint, "ZeroMQ peer disconnected");
            src.dropped_at = Some(Instant::now());
        } else {
            src.dropped_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(counter: u64) -> Vec<Vec<u8>> {
        let m = fpm_schema::ForwardPassMetrics::heartbeat("w", 0);
        vec![
            vec![],
            counter.to_be_bytes().to_vec(),
            fpm_schema::encode(&m),
        ]
    }

    fn check(frames: &[Vec<u8>], d: &Decoder) -> Result<u64, InvalidReason> {
        validate(frames, d, &mut ForwardPassMetrics::default())
    }

    /// Where the key (`version` … `counter_id`) of an encoded message ends.
    fn key_end(payload: &[u8]) -> usize {
        let at = payload
            .windows(b"wall_time".len())
            .position(|w| w == b"wall_time")
            .expect("a wall_time key");
        at - 1 // the fixstr marker before the key
    }

    #[test]
    fn validation_reasons() {
        let d = Decoder::new().with_max_size(1000);
        assert_eq!(check(&good(7), &d), Ok(7));
        assert_eq!(check(&good(7)[..2], &d), Err(InvalidReason::FrameCount));
        let mut f = good(1);
        f.push(vec![]);
        assert_eq!(check(&f, &d), Err(InvalidReason::FrameCount));
        let mut f = good(1);
        f[0] = b"t".to_vec();
        assert_eq!(check(&f, &d), Err(InvalidReason::TopicFrame));
        let mut f = good(1);
        f[1] = vec![0, 0, 0, 1];
        assert_eq!(check(&f, &d), Err(InvalidReason::CounterFrame));
        let mut f = good(1);
        f[2] = vec![0x80; 1001];
        assert_eq!(check(&f, &d), Err(InvalidReason::TooLarge));
        let mut f = good(1);
        f[2] = b"garbage".to_vec();
        assert_eq!(check(&f, &d), Err(InvalidReason::Undecodable));
        let mut f = good(1);
        let m = fpm_schema::ForwardPassMetrics {
            version: 2,
            ..Default::default()
        };
        f[2] = fpm_schema::encode(&m);
        assert_eq!(check(&f, &d), Err(InvalidReason::UnsupportedVersion));
        // Well-formed up to counter_id, garbage after it: the key peek alone accepted this.
        let mut f = good(1);
        let end = key_end(&f[2]);
        assert!(fpm_schema::peek_key(&f[2][..end]).is_ok());
        f[2].truncate(end + 3);
        assert_eq!(check(&f, &d), Err(InvalidReason::Undecodable));
        // A version-2 message whose body no longer decodes as version 1 is still "version".
        let mut f = good(1);
        f[2] = fpm_schema::encode(&m);
        let end = key_end(&f[2]);
        f[2].truncate(end + 2);
        assert_eq!(check(&f, &d), Err(InvalidReason::UnsupportedVersion));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever arrives on the socket, validation returns (never panics), and accepts
        /// only three frames with an empty topic, an 8-byte counter and a payload that
        /// decodes completely as version 1.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..6),
            counter in proptest::prelude::any::<u64>(),
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..4),
        ) {
            let d = Decoder::new();
            if let Ok(c) = check(&frames, &d) {
                proptest::prop_assert_eq!(frames.len(), 3);
                proptest::prop_assert!(frames[0].is_empty());
                proptest::prop_assert_eq!(c.to_be_bytes().to_vec(), frames[1].clone());
                proptest::prop_assert!(fpm_schema::decode(&frames[2]).is_ok());
            }
            // A good message with a few bytes of its payload corrupted: accepted only if the
            // whole payload still decodes.
            let mut g = good(counter);
            for (i, b) in flips {
                let i = i.index(g[2].len());
                g[2][i] = b;
            }
            if check(&g, &d).is_ok() {
                proptest::prop_assert!(fpm_schema::decode(&g[2]).is_ok());
            }
        }

        /// A payload that is intact up to `counter_id` and broken after it (truncated, or an
        /// invalid msgpack byte written anywhere after the key) is rejected as undecodable.
        #[test]
        fn broken_after_the_key_is_undecodable(
            counter in proptest::prelude::any::<u64>(),
            worker in "[a-z0-9-]{0,40}",
            dp_rank in proptest::prelude::any::<i64>(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let d = Decoder::new();
            let payload = fpm_schema::encode(&fpm_schema::ForwardPassMetrics {
                worker_id: worker,
                dp_rank,
                counter_id: 5,
                ..Default::default()
            });
            let end = key_end(&payload);
            let frames = |p: Vec<u8>| vec![vec![], counter.to_be_bytes().to_vec(), p];
            let mut msg = ForwardPassMetrics::default();
            proptest::prop_assert_eq!(validate(&frames(payload.clone()), &d, &mut msg), Ok(counter));
            proptest::prop_assert_eq!(msg.dp_rank, dp_rank);
            // Truncated anywhere after the key.
            let n = end + cut.index(payload.len() - end);
            let p = payload[..n].to_vec();
            proptest::prop_assert!(fpm_schema::peek_key(&p).is_ok(), "the key still peeks");
            proptest::prop_assert_eq!(check(&frames(p.clone()), &d), Err(InvalidReason::Undecodable));
            // Anything appended to a complete message.
            let mut p = payload.clone();
            p.push(0);
            p.extend_from_slice(&tail);
            proptest::prop_assert_eq!(check(&frames(p), &d), Err(InvalidReason::Undecodable));
            // Bytes overwritten after the key: accepted exactly when the payload decodes.
            let mut p = payload.clone();
            for (k, b) in tail.iter().enumerate() {
                let i = end + at.index(payload.len() - end).wrapping_add(k * 7) % (payload.len() - end);
                p[i] = *b;
            }
            let decodes = fpm_schema::decode(&p).is_ok();
            proptest::prop_assert_eq!(check(&frames(p), &d).is_ok(), decodes);
        }
    }

    #[test]
    fn counter_gaps_resets_and_missed_before_start() {
        let c = |gap, reset, missed| CounterCheck {
            gap,
            reset,
            missed_before_start: missed,
        };
        let mut t = CounterTracker::default();
        assert_eq!(t.observe(0), c(0, false, 0), "publishers count from 0");
        assert_eq!(t.observe(1), c(0, false, 0));
        assert_eq!(t.observe(4), c(2, false, 0));
        assert_eq!(
            t.observe(0),
            c(0, true, 0),
            "restart seen from its first message"
        );
        assert_eq!(t.observe(1), c(0, false, 0));
        assert_eq!(t.observe(0), c(0, true, 0));
        assert_eq!(t.observe(1), c(0, false, 0));
        assert_eq!(t.observe(2), c(0, false, 0));
        assert_eq!(
            t.observe(1),
            c(0, true, 1),
            "restart whose message 0 was lost"
        );
        let mut t = CounterTracker::default();
        assert_eq!(
            t.observe(7),
            c(0, false, 7),
            "started reading late: 0..=6 missed"
        );
        assert_eq!(t.observe(8), c(0, false, 0));
    }

    #[test]
    fn endpoints_are_checked_before_libzmq_sees_them() {
        assert!(check_endpoint("tcp://127.0.0.1:20380").is_ok());
        assert!(check_endpoint("tcp://[::1]:20380").is_ok());
        assert!(check_endpoint("ipc:///tmp/fpm.0").is_ok());
        assert!(check_endpoint("ipc://@abstract").is_ok());
        for (ep, needle) in [
            ("tcp://127.0.0.1:99999", "99999"),
            ("tcp://127.0.0.1:0", "port"),
            ("tcp://127.0.0.1", "no port"),
            ("tcp://:5555", "host"),
            ("ipc:///nonexistent/dir/fpm.0", "/nonexistent/dir"),
            ("bogus", "transport"),
        ] {
            let e = check_endpoint(ep).unwrap_err();
            assert!(e.contains(needle), "{ep}: {e}");
        }
        let long = format!("ipc:///tmp/{}", "x".repeat(120));
        assert!(check_endpoint(&long).unwrap_err().contains("107"));
    }
}
