//! The ZMTP 3.0 subset Forward Pass Metrics needs: NULL security, a SUB reading from a PUB
//! (the relay's input) and a PUB writing to SUBs (the emitter's output), over tcp or ipc.
//!
//! Why this is not a library (measured, see the README's relay section and issue 15's note):
//! - libzmq (the `zmq` crate) reads on its own I/O thread and hands every message to the
//!   relay's thread: one more thread wake-up per message, the largest cost at the rates a
//!   relay runs at. On the publishing side it discards, uncounted, the batch it has not yet
//!   written to a slow subscriber when a lingering socket closes, and no API says how many
//!   messages that was.
//! - The pure-Rust `zeromq` 0.7 crate has no size limit at all: a peer announcing a huge
//!   frame makes it reserve the announced length before a byte of it arrives (the process
//!   aborts), and a never-ending multipart message grows without bound.
//!
//! What is here is the protocol codec and nothing else (no sockets): the greeting, the READY
//! handshake, subscriptions, PING/PONG, and message frames, with every length checked against
//! the limit *before* anything is read or allocated for it.

use std::ops::Range;

/// Length of a ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
/// Most bytes a command (READY, PING, ERROR, ...) may take; engines send a few dozen.
pub const MAX_COMMAND: usize = 4096;
/// Frames of a message whose ranges are kept; a message with more is still read through
/// (its bytes count against the message limit) and reported with its frame count.
pub const KEPT_FRAMES: usize = 4;

const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// Our greeting: ZMTP 3.0, NULL mechanism, client role.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Our READY command naming `socket_type` (`SUB`, `PUB`; at most a few bytes).
pub fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut out = vec![COMMAND, u8::try_from(body.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(&body);
    out
}

/// Our READY command (`Socket-Type: SUB`) and the message subscribing to every topic
/// (ZMTP 3.0 form: a one-byte body `0x01` followed by the empty prefix).
pub fn ready_and_subscribe() -> Vec<u8> {
    let mut out = ready("SUB");
    out.extend_from_slice(&[0, 1, 1]);
    out
}

/// Appends the header of a frame of `len` bytes (`more`: another frame of the same message
/// follows).
pub fn frame_header(more: bool, len: usize, out: &mut Vec<u8>) {
    let more = if more { MORE } else { 0 };
    if len > 255 {
        out.push(LONG | more);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    } else {
        out.push(more);
        out.push(len as u8);
    }
}

/// What a subscriber's message or command means to a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription<'a> {
    /// Subscribe to this topic prefix.
    Subscribe(&'a [u8]),
    /// Cancel one subscription to this prefix.
    Cancel(&'a [u8]),
}

impl<'a> Subscription<'a> {
    /// A one-frame message from a SUB in the ZMTP 3.0 form (`0x01` + prefix subscribes,
    /// `0x00` + prefix cancels); anything else is not a subscription.
    pub fn from_message(body: &'a [u8]) -> Option<Self> {
        match body.split_first() {
            Some((1, topic)) => Some(Subscription::Subscribe(topic)),
            Some((0, topic)) => Some(Subscription::Cancel(topic)),
            _ => None,
        }
    }

    /// A ZMTP 3.1 `SUBSCRIBE` or `CANCEL` command.
    pub fn from_command(name: &[u8], body: &'a [u8]) -> Option<Self> {
        match name {
            b"SUBSCRIBE" => Some(Subscription::Subscribe(body)),
            b"CANCEL" => Some(Subscription::Cancel(body)),
            _ => None,
        }
    }
}

/// The PONG answering a PING whose context is `context` (at most 16 bytes are echoed).
pub fn pong(context: &[u8]) -> Vec<u8> {
    let ctx = &context[..context.len().min(16)];
    let mut out = vec![COMMAND, u8::try_from(5 + ctx.len()).unwrap_or(u8::MAX), 4];
    out.extend_from_slice(b"PONG");
    out.extend_from_slice(ctx);
    out
}

/// Why a connection was given up. Each is a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The peer does not speak ZMTP 3 (or anything ZeroMQ).
    #[error("not a ZeroMQ peer: its greeting is malformed")]
    BadGreeting,
    /// A ZMTP 1.0 / 2.0 peer (libzmq before 4.0).
    #[error("the peer speaks ZMTP {0}.x; ZMTP 3 (libzmq 4 or later) is needed")]
    OldVersion(u8),
    /// The peer wants CURVE or PLAIN security.
    #[error("the peer asks for the {0:?} security mechanism; only NULL is supported")]
    Mechanism(String),
    /// The peer's READY names a socket type this side cannot talk to.
    #[error("the peer is a {0:?} socket, which cannot talk to a {1}")]
    SocketType(String, &'static str),
    /// The peer sent an ERROR command.
    #[error("the peer refused the connection: {0:?}")]
    Refused(String),
    /// The handshake was not a READY command.
    #[error("the peer's handshake is not a READY command")]
    BadHandshake,
    /// A frame or message over the size limit, refused from its header.
    #[error("a message of at least {announced} bytes is over the {limit}-byte limit")]
    Oversized {
        /// Bytes the frames announced so far.
        announced: u64,
        /// The limit.
        limit: usize,
    },
    /// A frame with reserved flag bits, a command inside a multipart message, or a
    /// malformed command.
    #[error("the peer broke the ZMTP framing: {0}")]
    Framing(&'static str),
}

impl ProtocolError {
    /// Whether this happened after the handshake (counted against messages) rather than
    /// while connecting.
    pub fn mid_stream(&self) -> bool {
        matches!(
            self,
            ProtocolError::Oversized { .. } | ProtocolError::Framing(_)
        )
    }
}

/// Checks the peer's greeting.
pub fn check_greeting(g: &[u8]) -> Result<(), ProtocolError> {
    if g.len() < GREETING_LEN || g[0] != 0xff || g[9] & 1 != 1 {
        return Err(ProtocolError::BadGreeting);
    }
    if g[10] < 3 {
        return Err(ProtocolError::OldVersion(g[10]));
    }
    let mech = &g[12..32];
    let end = mech.iter().position(|&b| b == 0).unwrap_or(mech.len());
    if &mech[..end] != b"NULL" {
        return Err(ProtocolError::Mechanism(
            String::from_utf8_lossy(&mech[..end]).into_owned(),
        ));
    }
    Ok(())
}

/// Checks the command a SUB's peer sent after its greeting: READY from a PUB or XPUB.
pub fn check_ready(name: &[u8], body: &[u8]) -> Result<(), ProtocolError> {
    check_ready_for("SUB", name, body)
}

/// Checks the command the peer sent after its greeting: READY from a socket type that can
/// talk to `ours` (`SUB`: a PUB or XPUB; `PUB`: a SUB or XSUB).
pub fn check_ready_for(ours: &'static str, name: &[u8], body: &[u8]) -> Result<(), ProtocolError> {
    let peers: &[&[u8]] = match ours {
        "PUB" => &[b"SUB", b"XSUB"],
        _ => &[b"PUB", b"XPUB"],
    };
    if name == b"ERROR" {
        let reason = body
            .first()
            .and_then(|&n| body.get(1..1 + usize::from(n)))
            .unwrap_or_default();
        return Err(ProtocolError::Refused(
            String::from_utf8_lossy(reason).into_owned(),
        ));
    }
    if name != b"READY" {
        return Err(ProtocolError::BadHandshake);
    }
    let mut rest = body;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n);
        let (Some(key), Some(len)) = (tail.get(..n), tail.get(n..n + 4)) else {
            return Err(ProtocolError::BadHandshake);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(value) = tail.get(n + 4..).and_then(|v| v.get(..len)) else {
            return Err(ProtocolError::BadHandshake);
        };
        if key.eq_ignore_ascii_case(b"Socket-Type") && !peers.contains(&value) {
            return Err(ProtocolError::SocketType(
                String::from_utf8_lossy(value).into_owned(),
                ours,
            ));
        }
        rest = &tail[n + 4 + len..];
    }
    Ok(())
}

/// The frames of one complete message, as ranges into the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frames {
    /// How many frames the message has.
    pub count: usize,
    /// The first [`KEPT_FRAMES`] of them.
    pub ranges: [Range<usize>; KEPT_FRAMES],
}

impl Frames {
    /// The kept frames as slices of `buf`.
    pub fn slices<'a>(&self, buf: &'a [u8]) -> ([&'a [u8]; KEPT_FRAMES], usize) {
        let mut out: [&[u8]; KEPT_FRAMES] = [&[]; KEPT_FRAMES];
        for (o, r) in out.iter_mut().zip(&self.ranges) {
            *o = &buf[r.clone()];
        }
        (out, self.count.min(KEPT_FRAMES))
    }
}

/// What starts the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A whole message taking the first `len` bytes.
    Message { len: usize, frames: Frames },
    /// A command taking the first `len` bytes.
    Command {
        len: usize,
        name: Range<usize>,
        body: Range<usize>,
    },
}

/// Parses the message or command at the start of `buf`: `Ok(None)` when more bytes are
/// needed. Every announced length is checked first, so a caller that reads only what this
/// asks for never holds more than `max_message` bytes of one message (headers included).
pub fn next(buf: &[u8], max_message: usize) -> Result<Option<Unit>, ProtocolError> {
    let mut pos = 0usize;
    let mut total = 0u64;
    let mut frames = Frames {
        count: 0,
        ranges: Default::default(),
    };
    loop {
        let Some(&flags) = buf.get(pos) else {
            return Ok(None);
        };
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(ProtocolError::Framing("reserved flag bits set"));
        }
        let header = if flags & LONG != 0 { 9 } else { 2 };
        let Some(h) = buf.get(pos..pos + header) else {
            return Ok(None);
        };
        let size = if flags & LONG != 0 {
            u64::from_be_bytes([h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]])
        } else {
            u64::from(h[1])
        };
        if flags & COMMAND != 0 {
            if frames.count > 0 {
                return Err(ProtocolError::Framing("a command inside a message"));
            }
            if flags & MORE != 0 {
                return Err(ProtocolError::Framing("a command with the MORE flag"));
            }
            if size > MAX_COMMAND as u64 {
                return Err(ProtocolError::Oversized {
                    announced: size,
                    limit: MAX_COMMAND,
                });
            }
            let end = header + size as usize;
            let Some(body) = buf.get(header..end) else {
                return Ok(None);
            };
            let Some((&n, rest)) = body.split_first() else {
                return Err(ProtocolError::Framing("an empty command"));
            };
            if rest.len() < usize::from(n) {
                return Err(ProtocolError::Framing("a command name past its frame"));
            }
            let name = header + 1..header + 1 + usize::from(n);
            return Ok(Some(Unit::Command {
                len: end,
                body: name.end..end,
                name,
            }));
        }
        total = total.saturating_add(header as u64).saturating_add(size);
        if total > max_message as u64 {
            return Err(ProtocolError::Oversized {
                announced: total,
                limit: max_message,
            });
        }
        let start = pos + header;
        // `total` (which includes `size`) is within `max_message`, so this fits; checked all
        // the same.
        let Some(end) = usize::try_from(size)
            .ok()
            .and_then(|size| start.checked_add(size))
        else {
            return Err(ProtocolError::Oversized {
                announced: total,
                limit: max_message,
            });
        };
        if buf.len() < end {
            return Ok(None);
        }
        if let Some(r) = frames.ranges.get_mut(frames.count) {
            *r = start..end;
        }
        frames.count += 1;
        pos = end;
        if flags & MORE == 0 {
            return Ok(Some(Unit::Message { len: pos, frames }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(more: bool, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(more, body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    fn message(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            out.extend(frame(i + 1 < frames.len(), f));
        }
        out
    }

    #[test]
    fn greeting_and_handshake() {
        let g = greeting();
        assert_eq!(check_greeting(&g), Ok(()));
        let mut old = g;
        old[10] = 2;
        assert_eq!(check_greeting(&old), Err(ProtocolError::OldVersion(2)));
        let mut curve = g;
        curve[12..17].copy_from_slice(b"CURVE");
        assert_eq!(
            check_greeting(&curve),
            Err(ProtocolError::Mechanism("CURVE".into()))
        );
        assert_eq!(
            check_greeting(b"GET / HTTP/1.1\r\n"),
            Err(ProtocolError::BadGreeting)
        );

        let ours = ready_and_subscribe();
        let Ok(Some(Unit::Command { len, name, body })) = next(&ours, 100) else {
            panic!("our READY parses");
        };
        assert_eq!(&ours[name.clone()], b"READY");
        // Our own READY names SUB: refused as a peer.
        assert_eq!(
            check_ready(&ours[name.clone()], &ours[body.clone()]),
            Err(ProtocolError::SocketType("SUB".into(), "SUB"))
        );
        assert_eq!(
            check_ready_for("PUB", &ours[name.clone()], &ours[body.clone()]),
            Ok(())
        );
        let pub_ready = ready("PUB");
        let Ok(Some(Unit::Command {
            name: n2, body: b2, ..
        })) = next(&pub_ready, 100)
        else {
            panic!("a PUB READY parses");
        };
        assert_eq!(
            check_ready(&pub_ready[n2.clone()], &pub_ready[b2.clone()]),
            Ok(())
        );
        assert_eq!(
            check_ready_for("PUB", &pub_ready[n2], &pub_ready[b2]),
            Err(ProtocolError::SocketType("PUB".into(), "PUB"))
        );
        assert_eq!(
            next(&ours[len..], 100).unwrap(),
            Some(Unit::Message {
                len: 3,
                frames: Frames {
                    count: 1,
                    ranges: [2..3, 0..0, 0..0, 0..0]
                }
            })
        );
        let pub_ready = b"\x0bSocket-Type\x00\x00\x00\x03PUB";
        assert_eq!(check_ready(b"READY", pub_ready), Ok(()));
        assert_eq!(
            check_ready(b"READY", b"\x0bsocket-type\x00\x00\x00\x04XPUB"),
            Ok(())
        );
        assert_eq!(
            check_ready(b"READY", b"\x0bSocket-Type\x00\x00\x00\x09"),
            Err(ProtocolError::BadHandshake)
        );
        assert_eq!(
            check_ready(b"ERROR", b"\x0eno such socket"),
            Err(ProtocolError::Refused("no such socket".into()))
        );
        assert_eq!(check_ready(b"PING", b""), Err(ProtocolError::BadHandshake));
        let p = pong(b"0123456789abcdefXYZ");
        let Ok(Some(Unit::Command { name, body, .. })) = next(&p, 100) else {
            panic!("pong parses");
        };
        assert_eq!(&p[name], b"PONG");
        assert_eq!(&p[body], b"0123456789abcdef");
    }

    #[test]
    fn subscriptions_in_both_forms() {
        assert_eq!(
            Subscription::from_message(b"\x01"),
            Some(Subscription::Subscribe(b""))
        );
        assert_eq!(
            Subscription::from_message(b"\x00abc"),
            Some(Subscription::Cancel(b"abc"))
        );
        assert_eq!(Subscription::from_message(b""), None);
        assert_eq!(Subscription::from_message(b"\x02x"), None);
        assert_eq!(
            Subscription::from_command(b"SUBSCRIBE", b""),
            Some(Subscription::Subscribe(b""))
        );
        assert_eq!(
            Subscription::from_command(b"CANCEL", b"t"),
            Some(Subscription::Cancel(b"t"))
        );
        assert_eq!(Subscription::from_command(b"PING", b""), None);
        // What a SUB sends after its READY is a subscription to everything.
        let ours = ready_and_subscribe();
        let Ok(Some(Unit::Command { len, .. })) = next(&ours, 100) else {
            panic!()
        };
        let Ok(Some(Unit::Message { frames, .. })) = next(&ours[len..], 100) else {
            panic!()
        };
        let (s, _) = frames.slices(&ours[len..]);
        assert_eq!(
            Subscription::from_message(s[0]),
            Some(Subscription::Subscribe(b""))
        );
    }

    #[test]
    fn messages_partial_and_long() {
        let big = vec![7u8; 300];
        let m = message(&[b"", &5u64.to_be_bytes(), &big]);
        for cut in 0..m.len() {
            assert_eq!(next(&m[..cut], 1000), Ok(None), "cut at {cut}");
        }
        let Ok(Some(Unit::Message { len, frames })) = next(&m, 1000) else {
            panic!()
        };
        assert_eq!(len, m.len());
        let (s, n) = frames.slices(&m);
        assert_eq!(n, 3);
        assert_eq!(s[0], b"");
        assert_eq!(s[1], 5u64.to_be_bytes());
        assert_eq!(s[2], &big[..]);
        // Two messages back to back: the first is returned alone.
        let mut two = m.clone();
        two.extend(message(&[b"x"]));
        assert!(matches!(next(&two, 1000), Ok(Some(Unit::Message { len, .. })) if len == m.len()));
        // Six frames: counted, the first four kept.
        let six = message(&[b"a", b"b", b"c", b"d", b"e", b"f"]);
        let Ok(Some(Unit::Message { frames, .. })) = next(&six, 1000) else {
            panic!()
        };
        assert_eq!(frames.count, 6);
        assert_eq!(frames.slices(&six).0[3], b"d");
    }

    #[test]
    fn limits_are_applied_from_the_header() {
        // A header announcing 2^62 bytes, and nothing after it.
        let mut h = vec![LONG];
        h.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(matches!(
            next(&h, 1 << 20),
            Err(ProtocolError::Oversized { .. })
        ));
        let mut h = vec![LONG];
        h.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            next(&h, 1 << 20),
            Err(ProtocolError::Oversized { .. })
        ));
        // Frames each under the limit, together over it.
        let mut m = Vec::new();
        for _ in 0..5 {
            m.extend(frame(true, &[0; 250]));
        }
        assert!(matches!(
            next(&m, 1000),
            Err(ProtocolError::Oversized { .. })
        ));
        // Endless tiny MORE frames: the headers count too.
        let m: Vec<u8> = std::iter::repeat_n([MORE, 0], 600).flatten().collect();
        assert!(matches!(
            next(&m, 1000),
            Err(ProtocolError::Oversized { .. })
        ));
        // A command over its limit, and broken framing.
        let mut c = vec![COMMAND | LONG];
        c.extend_from_slice(&10_000u64.to_be_bytes());
        assert!(matches!(
            next(&c, 1 << 20),
            Err(ProtocolError::Oversized { .. })
        ));
        assert!(matches!(
            next(&[0x08, 0], 100),
            Err(ProtocolError::Framing(_))
        ));
        assert!(matches!(
            next(&[COMMAND, 0], 100),
            Err(ProtocolError::Framing(_))
        ));
        assert!(matches!(
            next(&[COMMAND, 2, 5, b'x'], 100),
            Err(ProtocolError::Framing(_))
        ));
        let mut inside = frame(true, b"a");
        inside.extend([COMMAND, 1, 0]);
        assert!(matches!(next(&inside, 100), Err(ProtocolError::Framing(_))));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Whatever the bytes, parsing returns without panicking, never claims more bytes
        /// than it was given, and a message it returns is within the limit.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), limit in 0usize..700) {
            match next(&bytes, limit) {
                Ok(Some(Unit::Message { len, frames })) => {
                    proptest::prop_assert!(len <= bytes.len() && len <= limit);
                    proptest::prop_assert!(frames.count >= 1);
                    let _ = frames.slices(&bytes);
                }
                Ok(Some(Unit::Command { len, name, body })) => {
                    proptest::prop_assert!(len <= bytes.len());
                    proptest::prop_assert!(name.end <= body.start && body.end == len);
                }
                Ok(None) | Err(_) => {}
            }
        }

        /// Any split of a stream of messages parses to the same messages.
        #[test]
        fn messages_survive_any_split(
            msgs in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 1..5), 1..6),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                let refs: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
                stream.extend(message(&refs));
            }
            let cut = cut.index(stream.len() + 1);
            let mut buf = stream[..cut].to_vec();
            let mut rest = &stream[cut..];
            let mut got = Vec::new();
            loop {
                match next(&buf, 1 << 20).unwrap() {
                    Some(Unit::Message { len, frames }) => {
                        let (s, n) = frames.slices(&buf);
                        got.push(s[..n].iter().map(|f| f.to_vec()).collect::<Vec<_>>());
                        buf.drain(..len);
                    }
                    Some(Unit::Command { .. }) => proptest::prop_assert!(false, "no commands sent"),
                    None if rest.is_empty() => break,
                    None => {
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                }
            }
            let want: Vec<Vec<Vec<u8>>> = msgs.iter().map(|m| m.iter().take(KEPT_FRAMES).cloned().collect()).collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
