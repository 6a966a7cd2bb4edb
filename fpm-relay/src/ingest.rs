//! The ZeroMQ side: one thread polls every SUB socket, validates each message and hands the
//! payload to the [`Buffer`]. It never waits on NATS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fpm_schema::{DecodeError, Decoder};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::buffer::{Buffer, Item};
use crate::metrics::{DropReason, InvalidReason, Metrics};

/// How often the thread looks at the shutdown token while idle.
const POLL_MS: i64 = 50;
/// Most messages read from one socket before the others get a turn.
const BATCH: usize = 1024;
/// At most one warning per reason per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Checks one multipart message; on success returns the counter frame's value.
pub(crate) fn validate(frames: &[Vec<u8>], decoder: &Decoder) -> Result<u64, InvalidReason> {
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
    let key = decoder.peek_key(payload).map_err(|e| match e {
        DecodeError::TooLarge { .. } => InvalidReason::TooLarge,
        _ => InvalidReason::Undecodable,
    })?;
    key.check_version()
        .map_err(|_| InvalidReason::UnsupportedVersion)?;
    Ok(u64::from_be_bytes(counter))
}

/// What the counter frame of one message says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CounterCheck {
    /// Messages skipped upstream.
    pub gap: u64,
    /// The counter went backwards (a restarted engine).
    pub reset: bool,
}

/// Tracks one endpoint's counter frames. The first message sets the baseline (Dynamo's
/// publisher starts at 1, SGLang's at 0).
#[derive(Debug, Default)]
pub(crate) struct CounterTracker {
    expected: Option<u64>,
}

impl CounterTracker {
    pub fn observe(&mut self, counter: u64) -> CounterCheck {
        let check = match self.expected {
            None => CounterCheck::default(),
            Some(e) if counter > e => CounterCheck {
                gap: counter - e,
                reset: false,
            },
            Some(e) if counter < e => CounterCheck {
                gap: 0,
                reset: true,
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
    last: [Option<Instant>; 6],
    suppressed: [u64; 6],
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

struct Source {
    endpoint: String,
    socket: zmq::Socket,
    counters: CounterTracker,
}

/// Creates and connects one SUB per endpoint (connect returns at once; libzmq retries in the
/// background until the engine binds, and reconnects after an engine restart).
pub(crate) fn connect(
    ctx: &zmq::Context,
    endpoints: &[String],
    rcvhwm: i32,
) -> Result<Vec<(String, zmq::Socket)>, crate::Error> {
    let mut out = Vec::with_capacity(endpoints.len());
    for ep in endpoints {
        if out.iter().any(|(e, _)| e == ep) {
            return Err(crate::Error::DuplicateEndpoint(ep.clone()));
        }
        let s = ctx.socket(zmq::SUB)?;
        s.set_rcvhwm(rcvhwm)?;
        s.set_linger(0)?;
        s.set_reconnect_ivl(100)?;
        s.set_reconnect_ivl_max(500)?;
        s.set_subscribe(b"")?;
        s.connect(ep).map_err(|error| crate::Error::Endpoint {
            endpoint: ep.clone(),
            error,
        })?;
        debug!(endpoint = %ep, "ZeroMQ SUB connecting");
        out.push((ep.clone(), s));
    }
    Ok(out)
}

/// The thread body: runs until `cancel` fires.
pub(crate) fn run(
    sockets: Vec<(String, zmq::Socket)>,
    buffer: Arc<Buffer>,
    metrics: Arc<Metrics>,
    decoder: Decoder,
    cancel: CancellationToken,
) {
    let mut sources: Vec<Source> = sockets
        .into_iter()
        .map(|(endpoint, socket)| Source {
            endpoint,
            socket,
            counters: CounterTracker::default(),
        })
        .collect();
    let mut log = LogLimiter::default();
    let mut ready = Vec::with_capacity(sources.len());
    while !cancel.is_cancelled() {
        ready.clear();
        {
            let mut items: Vec<zmq::PollItem<'_>> = sources
                .iter()
                .map(|s| s.socket.as_poll_item(zmq::POLLIN))
                .collect();
            match zmq::poll(&mut items, POLL_MS) {
                Ok(0) => continue,
                Ok(_) => ready.extend(
                    items
                        .iter()
                        .enumerate()
                        .filter(|(_, it)| it.is_readable())
                        .map(|(i, _)| i),
                ),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    error!(error = %e, "ZeroMQ poll failed; the relay stops reading");
                    return;
                }
            }
        }
        for &i in &ready {
            let src = &mut sources[i];
            for _ in 0..BATCH {
                let frames = match src.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(f) => f,
                    Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => break,
                    Err(e) => {
                        error!(endpoint = %src.endpoint, error = %e, "ZeroMQ receive failed");
                        break;
                    }
                };
                let received = Instant::now();
                metrics.received.inc();
                match validate(&frames, &decoder) {
                    Err(reason) => {
                        metrics.invalid(reason);
                        log.invalid(reason, &src.endpoint);
                    }
                    Ok(counter) => {
                        let check = src.counters.observe(counter);
                        if check.gap > 0 {
                            metrics.gaps.inc_by(check.gap);
                            debug!(endpoint = %src.endpoint, gap = check.gap, "counter gap");
                        }
                        if check.reset {
                            metrics.resets.inc();
                            debug!(endpoint = %src.endpoint, counter, "counter reset (engine restart?)");
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

    #[test]
    fn validation_reasons() {
        let d = Decoder::new().with_max_size(1000);
        assert_eq!(validate(&good(7), &d), Ok(7));
        assert_eq!(validate(&good(7)[..2], &d), Err(InvalidReason::FrameCount));
        let mut f = good(1);
        f.push(vec![]);
        assert_eq!(validate(&f, &d), Err(InvalidReason::FrameCount));
        let mut f = good(1);
        f[0] = b"t".to_vec();
        assert_eq!(validate(&f, &d), Err(InvalidReason::TopicFrame));
        let mut f = good(1);
        f[1] = vec![0, 0, 0, 1];
        assert_eq!(validate(&f, &d), Err(InvalidReason::CounterFrame));
        let mut f = good(1);
        f[2] = vec![0x80; 1001];
        assert_eq!(validate(&f, &d), Err(InvalidReason::TooLarge));
        let mut f = good(1);
        f[2] = b"garbage".to_vec();
        assert_eq!(validate(&f, &d), Err(InvalidReason::Undecodable));
        let mut f = good(1);
        let m = fpm_schema::ForwardPassMetrics {
            version: 2,
            ..Default::default()
        };
        f[2] = fpm_schema::encode(&m);
        assert_eq!(validate(&f, &d), Err(InvalidReason::UnsupportedVersion));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Whatever arrives on the socket, validation returns (never panics), and accepts
        /// only three frames with an empty topic, an 8-byte counter and a peekable v1 payload.
        #[test]
        fn arbitrary_frames_never_panic(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..6),
            counter in proptest::prelude::any::<u64>(),
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..4),
        ) {
            let d = Decoder::new();
            if let Ok(c) = validate(&frames, &d) {
                proptest::prop_assert_eq!(frames.len(), 3);
                proptest::prop_assert!(frames[0].is_empty());
                proptest::prop_assert_eq!(c.to_be_bytes().to_vec(), frames[1].clone());
            }
            // A good message with a few bytes of its payload corrupted.
            let mut g = good(counter);
            for (i, b) in flips {
                let i = i.index(g[2].len());
                g[2][i] = b;
            }
            let _ = validate(&g, &d);
        }
    }

    #[test]
    fn counter_gaps_and_resets() {
        let mut t = CounterTracker::default();
        assert_eq!(
            t.observe(1),
            CounterCheck::default(),
            "baseline at 1 (Dynamo)"
        );
        assert_eq!(t.observe(2), CounterCheck::default());
        assert_eq!(
            t.observe(5),
            CounterCheck {
                gap: 2,
                reset: false
            }
        );
        assert_eq!(
            t.observe(0),
            CounterCheck {
                gap: 0,
                reset: true
            }
        );
        assert_eq!(t.observe(1), CounterCheck::default());
        let mut t = CounterTracker::default();
        assert_eq!(
            t.observe(0),
            CounterCheck::default(),
            "baseline at 0 (SGLang)"
        );
        assert_eq!(t.observe(1), CounterCheck::default());
    }
}
