//! The ZeroMQ side: one task per engine endpoint, all on the relay's data thread, connects a
//! SUB ([`crate::zmtp`]), reads every message that has arrived per wake-up, validates (fully
//! decodes) each one and hands the payload to the [`Buffer`]. It never waits on NATS.
//!
//! Connections are retried forever (100 ms, backing off to 500 ms) until the engine binds,
//! and again after it restarts. A frame over the size limit, or broken framing, is refused
//! from its header: the connection is dropped, counted as one `oversized_frame` (or
//! `protocol`) message, and made again (at once after a connection that carried messages,
//! with the usual back-off otherwise).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use fpm_schema::{DecodeError, Decoder, ForwardPassMetrics};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::buffer::{Buffer, Item};
use crate::metrics::{InputSeries, InvalidReason, Metrics, RelayDropReason};
use crate::zmtp::{self, ProtocolError, Unit};

/// At most one warning per reason per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Room for the topic and counter frames (and ZMTP headers) above the payload limit: a
/// message whose frames announce more is refused from its headers.
pub(crate) const FRAME_SLACK: usize = 1024;
/// A reader whose heartbeat is older than this is reported unhealthy.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// First wait before connecting again, doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_millis(500);
/// How long writing a PONG may take before the connection is dropped.
const PONG_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the greeting and READY exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Free space kept in the read buffer before each read (one read takes all that arrived,
/// up to this much at least).
const READ_MIN: usize = 16 * 1024;
/// Size of the read buffer's growth steps and of the payload arena's chunks.
const CHUNK: usize = 64 * 1024;

/// Checks one multipart message and decodes its payload completely into `msg` (reused
/// between messages); on success returns the counter frame's value.
pub(crate) fn validate(
    frames: &[&[u8]],
    decoder: &Decoder,
    msg: &mut ForwardPassMetrics,
) -> Result<u64, InvalidReason> {
    let [topic, counter, payload] = frames else {
        return Err(InvalidReason::FrameCount);
    };
    if !topic.is_empty() {
        return Err(InvalidReason::TopicFrame);
    }
    let counter: [u8; 8] = (*counter)
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

/// Liveness of the data thread's inputs, for `/health` and for the relay's supervision.
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

    pub fn beat(&self) {
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

/// Why an endpoint cannot work, found at start-up (a bad tcp port or a missing ipc directory
/// would otherwise be retried forever).
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
        Err("inproc:// is libzmq's in-process transport; the relay reads tcp:// or ipc://".into())
    } else {
        Err("unknown transport: use tcp://HOST:PORT or ipc:///path".into())
    }
}

/// Checks every endpoint with [`check_endpoint`] (touches the filesystem: call it off the
/// async runtime).
pub(crate) fn check_endpoints(endpoints: &[String]) -> Result<(), crate::Error> {
    for (i, ep) in endpoints.iter().enumerate() {
        if endpoints[..i].contains(ep) {
            return Err(crate::Error::DuplicateEndpoint(ep.clone()));
        }
        check_endpoint(ep).map_err(|reason| crate::Error::BadEndpoint {
            endpoint: ep.clone(),
            reason,
        })?;
    }
    Ok(())
}

/// Where one endpoint is.
#[derive(Debug, Clone)]
enum Target {
    Tcp(String),
    Ipc(PathBuf),
    /// Linux abstract namespace (`ipc://@name`).
    Abstract(Vec<u8>),
}

impl Target {
    fn parse(endpoint: &str) -> Target {
        if let Some(rest) = endpoint.strip_prefix("tcp://") {
            Target::Tcp(rest.to_owned())
        } else {
            let path = endpoint.strip_prefix("ipc://").unwrap_or(endpoint);
            match path.strip_prefix('@') {
                Some(name) => Target::Abstract(name.as_bytes().to_vec()),
                None => Target::Ipc(PathBuf::from(path)),
            }
        }
    }
}

/// Everything the input tasks share.
#[derive(Debug)]
pub(crate) struct ReaderContext {
    pub buffer: Arc<Buffer>,
    pub metrics: Arc<Metrics>,
    pub decoder: Decoder,
    pub cancel: CancellationToken,
    pub state: Arc<ReaderState>,
    /// Fault injection for tests: panic after reading this many messages.
    pub panic_after: Option<u64>,
    /// Messages read, over all inputs (for `panic_after`).
    pub read: AtomicU64,
}

/// How a connection ended.
enum Ended {
    /// Shutdown.
    Cancelled,
    /// The engine went away (restart, crash): connect again after the usual wait.
    Closed(std::io::Error),
    /// The relay dropped it for a protocol violation: connect again at once.
    Violation(ProtocolError),
}

/// One input: an endpoint, its stream state and its cached label sets.
struct Input<'a> {
    index: usize,
    endpoint: &'a str,
    cx: &'a ReaderContext,
    counters: CounterTracker,
    /// Per-(dp_rank, worker_id) series of this endpoint, cached to keep the hot path lock-free.
    series: HashMap<i64, HashMap<String, Arc<InputSeries>>>,
    /// The last message's (dp_rank, worker_id) and series: an engine sends one pair, so most
    /// messages need no lookup at all.
    last_series: Option<(i64, String, Arc<InputSeries>)>,
    log: LogLimiter,
    msg: ForwardPassMetrics,
    /// Payloads are copied here, densely, so what waits in the buffer holds no read buffer.
    arena: BytesMut,
    /// The current connection got through the handshake.
    subscribed: bool,
    /// Messages read on the current connection.
    delivered: u64,
}

/// Reads one endpoint until `cx.cancel` fires: connects, reads, and connects again whenever
/// the connection ends. Runs on the relay's data thread.
pub(crate) async fn run(index: usize, endpoint: String, cx: Arc<ReaderContext>) {
    let target = Target::parse(&endpoint);
    let mut input = Input {
        index,
        endpoint: &endpoint,
        cx: &cx,
        counters: CounterTracker::default(),
        series: HashMap::new(),
        last_series: None,
        log: LogLimiter::default(),
        msg: ForwardPassMetrics::default(),
        arena: BytesMut::new(),
        subscribed: false,
        delivered: 0,
    };
    let mut buf = BytesMut::with_capacity(CHUNK);
    let mut wait = RETRY_MIN;
    let mut last_warning: Option<Instant> = None;
    loop {
        input.subscribed = false;
        input.delivered = 0;
        let ended = tokio::select! {
            biased;
            () = cx.cancel.cancelled() => Ended::Cancelled,
            e = input.connection(&target, &mut buf) => e,
        };
        buf.clear();
        // A connection that got through the handshake ends the back-off: an engine that
        // restarts is connected to again within the first retry interval.
        if input.subscribed {
            wait = RETRY_MIN;
        }
        match ended {
            Ended::Cancelled => return,
            Ended::Violation(e) => {
                let reason = match e {
                    ProtocolError::Oversized { .. } => InvalidReason::OversizedFrame,
                    _ => InvalidReason::Protocol,
                };
                if e.mid_stream() {
                    cx.metrics.received.inc();
                    cx.metrics.invalid(reason);
                    input.log.invalid(reason, &endpoint);
                    debug!(endpoint = %endpoint, error = %e, "engine connection dropped; connecting again");
                    // At once after a connection that carried messages; a peer that breaks
                    // every connection before its first message is retried with back-off.
                    if input.delivered > 0 {
                        continue;
                    }
                }
                // A handshake refused: not a PUB, wrong security, not ZeroMQ at all.
                else if last_warning.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    warn!(endpoint = %endpoint, error = %e, "cannot subscribe to this endpoint (retrying; logged at most every 10 s)");
                    last_warning = Some(Instant::now());
                }
            }
            Ended::Closed(e) => debug!(endpoint = %endpoint, error = %e, "engine not connected"),
        }
        tokio::select! {
            biased;
            () = cx.cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

impl Input<'_> {
    /// One connection, from connect to its end.
    async fn connection(&mut self, target: &Target, buf: &mut BytesMut) -> Ended {
        let r = match target {
            Target::Tcp(addr) => match tokio::net::TcpStream::connect(addr.as_str()).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    self.session(s, buf).await
                }
                Err(e) => Ended::Closed(e),
            },
            Target::Ipc(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(s) => self.session(s, buf).await,
                Err(e) => Ended::Closed(e),
            },
            Target::Abstract(name) => {
                // std's connect blocks (a full backlog): off the data thread.
                let name = name.clone();
                match tokio::task::spawn_blocking(move || connect_abstract(&name)).await {
                    Ok(Ok(s)) => match tokio::net::UnixStream::from_std(s) {
                        Ok(s) => self.session(s, buf).await,
                        Err(e) => Ended::Closed(e),
                    },
                    Ok(Err(e)) => Ended::Closed(e),
                    Err(e) => Ended::Closed(std::io::Error::other(e)),
                }
            }
        };
        r
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut s: S,
        buf: &mut BytesMut,
    ) -> Ended {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut s, buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return e,
            Err(_) => {
                return Ended::Closed(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no ZeroMQ handshake within 5 s",
                ))
            }
        }
        debug!(endpoint = %self.endpoint, "subscribed");
        self.subscribed = true;
        let max_message = self.cx.decoder.max_size().saturating_add(FRAME_SLACK);
        loop {
            // Everything that has arrived, message by message.
            loop {
                match zmtp::next(buf, max_message) {
                    Ok(Some(Unit::Message { len, frames })) => {
                        let (slices, n) = frames.slices(&buf[..len]);
                        self.delivered += 1;
                        self.message(&slices[..n]);
                        buf.advance(len);
                    }
                    Ok(Some(Unit::Command { len, name, body })) => {
                        if &buf[name] == b"PING" {
                            // PING: a 2-byte TTL, then the context to echo.
                            let ctx = buf.get(body.start + 2..body.end).unwrap_or_default();
                            // A peer that pings and never reads must not stall this input.
                            match tokio::time::timeout(PONG_TIMEOUT, s.write_all(&zmtp::pong(ctx)))
                                .await
                            {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Ended::Closed(e),
                                Err(_) => {
                                    return Ended::Closed(std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        "the engine does not read its PONGs",
                                    ))
                                }
                            }
                        }
                        buf.advance(len);
                    }
                    Ok(None) => break,
                    Err(e) => return Ended::Violation(e),
                }
            }
            if buf.capacity() - buf.len() < READ_MIN {
                buf.reserve(CHUNK);
            }
            match s.read_buf(buf).await {
                Ok(0) => {
                    return Ended::Closed(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the engine closed the connection",
                    ))
                }
                Ok(_) => {}
                Err(e) => return Ended::Closed(e),
            }
        }
    }

    /// Validates one message and hands its payload to the buffer.
    fn message(&mut self, frames: &[&[u8]]) {
        let cx = self.cx;
        let received = Instant::now();
        cx.metrics.received.inc();
        if let Some(n) = cx.panic_after {
            let read = cx.read.fetch_add(1, Ordering::Relaxed) + 1;
            if read >= n {
                panic!("fault injection: the ZeroMQ reader panics after {read} messages");
            }
        }
        let counter = match validate(frames, &cx.decoder, &mut self.msg) {
            Err(reason) => {
                cx.metrics.invalid(reason);
                self.log.invalid(reason, self.endpoint);
                return;
            }
            Ok(c) => c,
        };
        let series = self.series_for();
        series.received.fetch_add(1, Ordering::Relaxed);
        cx.metrics.inputs.touch(self.index, received);
        let check = self.counters.observe(counter);
        if check.gap > 0 {
            cx.metrics.gaps.inc_by(check.gap);
            series.gaps.fetch_add(check.gap, Ordering::Relaxed);
            debug!(endpoint = %self.endpoint, gap = check.gap, "counter gap");
        }
        if check.reset {
            cx.metrics.resets.inc();
            series.resets.fetch_add(1, Ordering::Relaxed);
            debug!(endpoint = %self.endpoint, counter, "counter reset (engine restart?)");
        }
        if check.missed_before_start > 0 {
            cx.metrics
                .missed_before_start
                .inc_by(check.missed_before_start);
            series
                .missed_before_start
                .fetch_add(check.missed_before_start, Ordering::Relaxed);
            debug!(endpoint = %self.endpoint, counter, "first message of a stream is not counter 0");
        }
        let payload = copy_into(&mut self.arena, frames[2]);
        if cx.buffer.push(Item { payload, received }).is_err() {
            cx.metrics.drop_msgs(RelayDropReason::BufferFull, 1);
        }
    }

    fn series_for(&mut self) -> Arc<InputSeries> {
        let (worker_id, dp_rank) = (self.msg.worker_id.as_str(), self.msg.dp_rank);
        if let Some((r, w, s)) = &self.last_series {
            if *r == dp_rank && w == worker_id {
                return s.clone();
            }
        }
        if let Some(s) = self.series.get(&dp_rank).and_then(|m| m.get(worker_id)) {
            self.last_series = Some((dp_rank, worker_id.to_owned(), s.clone()));
            return s.clone();
        }
        let (s, cache) = self
            .cx
            .metrics
            .inputs
            .series(self.index, worker_id, dp_rank);
        if cache {
            self.series
                .entry(dp_rank)
                .or_default()
                .insert(worker_id.to_owned(), s.clone());
        }
        s
    }
}

/// Copies `data` into the arena and returns it as its own `Bytes`: payloads share 64 KiB
/// chunks (no allocation per message), and a chunk holds nothing but payloads, so what
/// waits in the buffer pins no more memory than its own bytes plus one chunk.
pub(crate) fn copy_into(arena: &mut BytesMut, data: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < data.len() {
        *arena = BytesMut::with_capacity(CHUNK.max(data.len()));
    }
    arena.extend_from_slice(data);
    arena.split().freeze()
}

fn connect_abstract(name: &[u8]) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Greeting, READY both ways, then the subscription to everything. Leaves in `buf` whatever
/// the engine sent after its READY.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
) -> Result<(), Ended> {
    let io = Ended::Closed;
    s.write_all(&zmtp::greeting()).await.map_err(io)?;
    while buf.len() < zmtp::GREETING_LEN {
        if s.read_buf(buf).await.map_err(io)? == 0 {
            return Err(Ended::Closed(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed during the ZeroMQ greeting",
            )));
        }
        // Not ZeroMQ at all: say so from the first bytes rather than wait for 64.
        if buf[0] != 0xff {
            return Err(Ended::Violation(ProtocolError::BadGreeting));
        }
    }
    zmtp::check_greeting(&buf[..zmtp::GREETING_LEN]).map_err(Ended::Violation)?;
    buf.advance(zmtp::GREETING_LEN);
    s.write_all(&zmtp::ready_and_subscribe())
        .await
        .map_err(io)?;
    loop {
        match zmtp::next(buf, 0) {
            Ok(Some(Unit::Command { len, name, body })) => {
                zmtp::check_ready(&buf[name], &buf[body]).map_err(Ended::Violation)?;
                buf.advance(len);
                return Ok(());
            }
            // Anything but a command here is a broken handshake (not a message to count).
            Ok(Some(Unit::Message { .. })) | Err(_) => {
                return Err(Ended::Violation(ProtocolError::BadHandshake))
            }
            Ok(None) => {
                if s.read_buf(buf).await.map_err(io)? == 0 {
                    return Err(Ended::Closed(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed during the ZeroMQ handshake",
                    )));
                }
            }
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
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        validate(&refs, d, &mut ForwardPassMetrics::default())
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
            let f = frames(payload.clone());
            let refs: Vec<&[u8]> = f.iter().map(Vec::as_slice).collect();
            proptest::prop_assert_eq!(validate(&refs, &d, &mut msg), Ok(counter));
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

    /// Whatever follows a good greeting where READY should be, the handshake fails as a
    /// refused handshake (retried with back-off), never as a counted message.
    #[tokio::test]
    async fn a_broken_ready_is_a_refused_handshake() {
        for after in [
            &[0x40u8, 0][..],
            &[0x04, 0],
            &[0x05, 1, 0],
            &[0x00, 1, 7],
            &[0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ] {
            let (mut ours, mut theirs) = tokio::io::duplex(4096);
            let mut bytes = zmtp::greeting().to_vec();
            bytes.extend_from_slice(after);
            theirs.write_all(&bytes).await.unwrap();
            let mut buf = BytesMut::new();
            match handshake(&mut ours, &mut buf).await {
                Err(Ended::Violation(e)) => {
                    assert!(!e.mid_stream(), "{after:?}: {e}");
                    assert_eq!(e, ProtocolError::BadHandshake, "{after:?}");
                }
                Err(Ended::Closed(e)) => panic!("{after:?}: closed: {e}"),
                Err(Ended::Cancelled) => panic!("cancelled"),
                Ok(()) => panic!("{after:?}: accepted"),
            }
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
    fn endpoints_are_checked_at_start() {
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
