//! The msgpack codec for [`ForwardPassMetrics`], byte-identical to msgspec 0.22.

use crate::error::DecodeError;
use crate::metrics::{
    ForwardPassMetrics, QueuedRequestMetrics, ScheduledRequestMetrics, FPM_VERSION,
};
use crate::msgpack::{key, Reader, SliceWriter};

/// Default size limit for one payload: 64 KiB. A default message is 407 bytes plus the
/// worker id, so anything near this is not FPM.
pub const DEFAULT_MAX_SIZE: usize = 64 * 1024;

/// Size of a default-valued message (empty worker id, all zeros): 407 bytes.
pub const ENCODED_DEFAULT_LEN: usize = 407;

const ROOT: &str = "<message>";
const SCHED: &str = "scheduled_requests";
const QUEUED: &str = "queued_requests";

/// Encodes `m` exactly as msgspec does: a map keyed by field name, fields in declaration order,
/// smallest int and str forms, every float as float64.
pub fn encode(m: &ForwardPassMetrics) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(m, &mut buf);
    buf
}

/// The most bytes a message can take besides its worker id: the default layout with every
/// int at its widest (9 bytes instead of 1) and the widest string header (5 instead of 1).
const MAX_LEN_WITHOUT_WORKER_ID: usize = ENCODED_DEFAULT_LEN + 12 * 8 + 4;

/// Like [`encode`], into `buf`, which is cleared first; reusing one buffer avoids allocating.
pub fn encode_into(m: &ForwardPassMetrics, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(MAX_LEN_WITHOUT_WORKER_ID + m.worker_id.len(), 0);
    let mut w = SliceWriter::new(buf);
    w.put(&[0x87]);
    w.put(key!("version"));
    w.i64(m.version);
    w.put(key!("worker_id"));
    w.str(&m.worker_id);
    w.put(key!("dp_rank"));
    w.i64(m.dp_rank);
    w.put(key!("counter_id"));
    w.i64(m.counter_id);
    w.put(key!("wall_time"));
    w.f64(m.wall_time);
    w.put(key!("scheduled_requests"));
    let s = &m.scheduled_requests;
    w.put(&[0x87]);
    w.put(key!("num_prefill_requests"));
    w.i64(s.num_prefill_requests);
    w.put(key!("sum_prefill_tokens"));
    w.i64(s.sum_prefill_tokens);
    w.put(key!("var_prefill_length"));
    w.f64(s.var_prefill_length);
    w.put(key!("sum_prefill_kv_tokens"));
    w.i64(s.sum_prefill_kv_tokens);
    w.put(key!("num_decode_requests"));
    w.i64(s.num_decode_requests);
    w.put(key!("sum_decode_kv_tokens"));
    w.i64(s.sum_decode_kv_tokens);
    w.put(key!("var_decode_kv_tokens"));
    w.f64(s.var_decode_kv_tokens);
    w.put(key!("queued_requests"));
    let q = &m.queued_requests;
    w.put(&[0x86]);
    w.put(key!("num_prefill_requests"));
    w.i64(q.num_prefill_requests);
    w.put(key!("sum_prefill_tokens"));
    w.i64(q.sum_prefill_tokens);
    w.put(key!("var_prefill_length"));
    w.f64(q.var_prefill_length);
    w.put(key!("num_decode_requests"));
    w.i64(q.num_decode_requests);
    w.put(key!("sum_decode_kv_tokens"));
    w.i64(q.sum_decode_kv_tokens);
    w.put(key!("var_decode_kv_tokens"));
    w.f64(q.var_decode_kv_tokens);
    let len = w.len();
    buf.truncate(len);
}

/// Decodes with the default [`Decoder`] (64 KiB limit).
///
/// Semantics are msgspec's plus Dynamo's version check: unknown keys (at any level) are
/// skipped, missing keys take their defaults, an int is accepted for a float field, a float for
/// an int field is an error, a non-map is an error, trailing bytes are an error, and a message
/// whose `version` is not 1 is [`DecodeError::UnsupportedVersion`].
///
/// # Errors
/// A [`DecodeError`] naming the field and the reason. Never panics, whatever the input.
pub fn decode(bytes: &[u8]) -> Result<ForwardPassMetrics, DecodeError> {
    Decoder::new().decode(bytes)
}

/// Reads only the routing key of a message; see [`Decoder::peek_key`].
///
/// # Errors
/// As [`Decoder::peek_key`].
pub fn peek_key(bytes: &[u8]) -> Result<FpmKey<'_>, DecodeError> {
    Decoder::new().peek_key(bytes)
}

/// The identity and sequence of a message, read without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FpmKey<'a> {
    /// The engine's identity, borrowed from the payload.
    pub worker_id: &'a str,
    /// Data-parallel rank.
    pub dp_rank: i64,
    /// Publisher's sequence number.
    pub counter_id: i64,
    /// Schema version (not checked by the peek; see [`FpmKey::check_version`]).
    pub version: i64,
}

impl FpmKey<'_> {
    /// `Ok` when the version is the one this crate understands.
    ///
    /// # Errors
    /// [`DecodeError::UnsupportedVersion`] otherwise.
    pub fn check_version(&self) -> Result<(), DecodeError> {
        if self.version == FPM_VERSION {
            Ok(())
        } else {
            Err(DecodeError::UnsupportedVersion {
                version: self.version,
            })
        }
    }
}

/// A configured decoder; cheap to copy. The free functions use [`Decoder::new`].
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder with the default 64 KiB size limit.
    pub const fn new() -> Self {
        Decoder {
            max_size: DEFAULT_MAX_SIZE,
        }
    }

    /// Sets the largest payload accepted, in bytes.
    pub const fn with_max_size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    /// The size limit in bytes.
    pub const fn max_size(&self) -> usize {
        self.max_size
    }

    fn check_size(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        if bytes.len() > self.max_size {
            Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: self.max_size,
            })
        } else {
            Ok(())
        }
    }

    /// Decodes one message; see [`decode`] for the semantics.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the field and the reason.
    pub fn decode(&self, bytes: &[u8]) -> Result<ForwardPassMetrics, DecodeError> {
        self.check_size(bytes)?;
        let mut m = ForwardPassMetrics::default();
        if let Some(at) = decode_canonical(bytes, &mut m) {
            check_version(m.version)?;
            if let Ok(worker_id) = std::str::from_utf8(&bytes[at]) {
                // One exact-size allocation, the only one of the whole decode.
                m.worker_id = String::from(worker_id);
                return Ok(m);
            }
        }
        decode_general(bytes, &mut m)?;
        Ok(m)
    }

    /// Decodes into `out`, reusing its `worker_id` allocation. On error `out` holds a partly
    /// decoded value and must not be used.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the field and the reason.
    pub fn decode_into(
        &self,
        bytes: &[u8],
        out: &mut ForwardPassMetrics,
    ) -> Result<(), DecodeError> {
        self.check_size(bytes)?;
        if let Some(at) = decode_canonical(bytes, out) {
            if let Ok(worker_id) = std::str::from_utf8(&bytes[at.clone()]) {
                out.worker_id.clear();
                out.worker_id.push_str(worker_id);
                return check_version(out.version);
            }
        }
        decode_general(bytes, out)
    }

    /// Reads `(worker_id, dp_rank, counter_id, version)` without decoding the rest: other
    /// values are skipped, and the scan stops as soon as the four keys are found (they come
    /// first in every upstream encoding). Missing keys take their defaults. The version is
    /// returned, not checked.
    ///
    /// # Errors
    /// A [`DecodeError`] if the payload is too large, not a map, or malformed up to the point
    /// where the four keys were found.
    pub fn peek_key<'a>(&self, bytes: &'a [u8]) -> Result<FpmKey<'a>, DecodeError> {
        self.check_size(bytes)?;
        let mut r = Reader::new(bytes);
        let mut key = FpmKey {
            worker_id: "",
            dp_rank: 0,
            counter_id: 0,
            version: FPM_VERSION,
        };
        let mut seen = 0u32;
        let n = r.read_map_len(ROOT)?;
        let mut next = 0;
        for _ in 0..n {
            let Some(field) = top_field(&mut r, next)? else {
                continue;
            };
            match field {
                0 => key.version = r.read_i64("version")?,
                1 => key.worker_id = r.read_str("worker_id")?,
                2 => key.dp_rank = r.read_i64("dp_rank")?,
                3 => key.counter_id = r.read_i64("counter_id")?,
                _ => r.skip_value(ROOT)?,
            }
            seen |= 1 << field;
            if seen & 0b1111 == 0b1111 {
                return Ok(key);
            }
            next = field + 1;
        }
        if !r.is_empty() {
            return Err(DecodeError::TrailingBytes { offset: r.pos() });
        }
        Ok(key)
    }
}

/// The general decoder: any key order, unknown keys skipped, missing keys defaulted, every
/// error reported precisely.
fn decode_general(bytes: &[u8], out: &mut ForwardPassMetrics) -> Result<(), DecodeError> {
    let mut r = Reader::new(bytes);
    out.version = FPM_VERSION;
    out.worker_id.clear();
    out.dp_rank = 0;
    out.counter_id = 0;
    out.wall_time = 0.0;
    out.scheduled_requests = ScheduledRequestMetrics::default();
    out.queued_requests = QueuedRequestMetrics::default();
    let n = r.read_map_len(ROOT)?;
    let mut next = 0;
    for _ in 0..n {
        let Some(field) = top_field(&mut r, next)? else {
            continue;
        };
        match field {
            0 => out.version = r.read_i64("version")?,
            1 => {
                let s = r.read_str("worker_id")?;
                out.worker_id.clear();
                out.worker_id.push_str(s);
            }
            2 => out.dp_rank = r.read_i64("dp_rank")?,
            3 => out.counter_id = r.read_i64("counter_id")?,
            4 => out.wall_time = r.read_f64("wall_time")?,
            5 => out.scheduled_requests = decode_scheduled(&mut r)?,
            _ => out.queued_requests = decode_queued(&mut r)?,
        }
        next = field + 1;
    }
    if !r.is_empty() {
        return Err(DecodeError::TrailingBytes { offset: r.pos() });
    }
    check_version(out.version)
}

fn check_version(version: i64) -> Result<(), DecodeError> {
    if version == FPM_VERSION {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion { version })
    }
}

/// The fast path: the exact layout msgspec writes (all keys, in declaration order, fixstr
/// keys, nothing else), read straight through. Fills every field of `out` but the worker id,
/// whose position it returns, not yet checked as UTF-8 (the caller checks it once, and falls
/// back to the general decoder, which names the field, if it is not). Returns `None`, `out` untouched, at the first difference (an
/// extra or missing key, another order, a bad value); the caller then runs the general
/// decoder from the start, which accepts every valid layout and reports errors precisely.
#[inline(always)]
fn decode_canonical(bytes: &[u8], out: &mut ForwardPassMetrics) -> Option<std::ops::Range<usize>> {
    let mut r = Reader::new(bytes);
    if !r.eat(&[0x87]) || !r.eat(key!("version")) {
        return None;
    }
    let version = r.read_i64("").ok()?;
    r.eat(key!("worker_id")).then_some(())?;
    let worker_id = r.read_str_bytes("").ok()?;
    let worker_id_end = r.pos();
    let worker_id = worker_id_end - worker_id.len()..worker_id_end;
    r.eat(key!("dp_rank")).then_some(())?;
    let dp_rank = r.read_i64("").ok()?;
    r.eat(key!("counter_id")).then_some(())?;
    let counter_id = r.read_i64("").ok()?;
    r.eat(key!("wall_time")).then_some(())?;
    let wall_time = r.read_f64("").ok()?;
    r.eat(key!("scheduled_requests")).then_some(())?;
    r.eat(&[0x87]).then_some(())?;
    r.eat(key!("num_prefill_requests")).then_some(())?;
    let s_npr = r.read_i64("").ok()?;
    r.eat(key!("sum_prefill_tokens")).then_some(())?;
    let s_spt = r.read_i64("").ok()?;
    r.eat(key!("var_prefill_length")).then_some(())?;
    let s_vpl = r.read_f64("").ok()?;
    r.eat(key!("sum_prefill_kv_tokens")).then_some(())?;
    let s_spkv = r.read_i64("").ok()?;
    r.eat(key!("num_decode_requests")).then_some(())?;
    let s_ndr = r.read_i64("").ok()?;
    r.eat(key!("sum_decode_kv_tokens")).then_some(())?;
    let s_sdkv = r.read_i64("").ok()?;
    r.eat(key!("var_decode_kv_tokens")).then_some(())?;
    let s_vdkv = r.read_f64("").ok()?;
    r.eat(key!("queued_requests")).then_some(())?;
    r.eat(&[0x86]).then_some(())?;
    r.eat(key!("num_prefill_requests")).then_some(())?;
    let q_npr = r.read_i64("").ok()?;
    r.eat(key!("sum_prefill_tokens")).then_some(())?;
    let q_spt = r.read_i64("").ok()?;
    r.eat(key!("var_prefill_length")).then_some(())?;
    let q_vpl = r.read_f64("").ok()?;
    r.eat(key!("num_decode_requests")).then_some(())?;
    let q_ndr = r.read_i64("").ok()?;
    r.eat(key!("sum_decode_kv_tokens")).then_some(())?;
    let q_sdkv = r.read_i64("").ok()?;
    r.eat(key!("var_decode_kv_tokens")).then_some(())?;
    let q_vdkv = r.read_f64("").ok()?;
    if !r.is_empty() {
        return None;
    }
    out.version = version;
    out.dp_rank = dp_rank;
    out.counter_id = counter_id;
    out.wall_time = wall_time;
    out.scheduled_requests = ScheduledRequestMetrics {
        num_prefill_requests: s_npr,
        sum_prefill_tokens: s_spt,
        var_prefill_length: s_vpl,
        sum_prefill_kv_tokens: s_spkv,
        num_decode_requests: s_ndr,
        sum_decode_kv_tokens: s_sdkv,
        var_decode_kv_tokens: s_vdkv,
    };
    out.queued_requests = QueuedRequestMetrics {
        num_prefill_requests: q_npr,
        sum_prefill_tokens: q_spt,
        var_prefill_length: q_vpl,
        num_decode_requests: q_ndr,
        sum_decode_kv_tokens: q_sdkv,
        var_decode_kv_tokens: q_vdkv,
    };
    Some(worker_id)
}

/// Reads the next key of the top-level map and returns the field's index in declaration
/// order, or `None` after skipping the value of an unknown key. Tries the key expected next
/// first (`next`), which is a fixed-length comparison when keys come in the usual order.
#[inline(always)]
fn top_field(r: &mut Reader<'_>, next: usize) -> Result<Option<usize>, DecodeError> {
    let fast = match next {
        0 => r.eat(key!("version")),
        1 => r.eat(key!("worker_id")),
        2 => r.eat(key!("dp_rank")),
        3 => r.eat(key!("counter_id")),
        4 => r.eat(key!("wall_time")),
        5 => r.eat(key!("scheduled_requests")),
        6 => r.eat(key!("queued_requests")),
        _ => false,
    };
    if fast {
        return Ok(Some(next));
    }
    Ok(Some(match r.read_key(ROOT)? {
        b"version" => 0,
        b"worker_id" => 1,
        b"dp_rank" => 2,
        b"counter_id" => 3,
        b"wall_time" => 4,
        b"scheduled_requests" => 5,
        b"queued_requests" => 6,
        _ => {
            r.skip_value(ROOT)?;
            return Ok(None);
        }
    }))
}

fn decode_scheduled(r: &mut Reader<'_>) -> Result<ScheduledRequestMetrics, DecodeError> {
    let mut s = ScheduledRequestMetrics::default();
    let n = r.read_map_len(SCHED)?;
    let mut next = 0;
    for _ in 0..n {
        let fast = match next {
            0 => r.eat(key!("num_prefill_requests")),
            1 => r.eat(key!("sum_prefill_tokens")),
            2 => r.eat(key!("var_prefill_length")),
            3 => r.eat(key!("sum_prefill_kv_tokens")),
            4 => r.eat(key!("num_decode_requests")),
            5 => r.eat(key!("sum_decode_kv_tokens")),
            6 => r.eat(key!("var_decode_kv_tokens")),
            _ => false,
        };
        let field = if fast {
            next
        } else {
            match r.read_key(SCHED)? {
                b"num_prefill_requests" => 0,
                b"sum_prefill_tokens" => 1,
                b"var_prefill_length" => 2,
                b"sum_prefill_kv_tokens" => 3,
                b"num_decode_requests" => 4,
                b"sum_decode_kv_tokens" => 5,
                b"var_decode_kv_tokens" => 6,
                _ => {
                    r.skip_value(SCHED)?;
                    continue;
                }
            }
        };
        match field {
            0 => s.num_prefill_requests = r.read_i64("scheduled_requests.num_prefill_requests")?,
            1 => s.sum_prefill_tokens = r.read_i64("scheduled_requests.sum_prefill_tokens")?,
            2 => s.var_prefill_length = r.read_f64("scheduled_requests.var_prefill_length")?,
            3 => {
                s.sum_prefill_kv_tokens = r.read_i64("scheduled_requests.sum_prefill_kv_tokens")?
            }
            4 => s.num_decode_requests = r.read_i64("scheduled_requests.num_decode_requests")?,
            5 => s.sum_decode_kv_tokens = r.read_i64("scheduled_requests.sum_decode_kv_tokens")?,
            _ => s.var_decode_kv_tokens = r.read_f64("scheduled_requests.var_decode_kv_tokens")?,
        }
        next = field + 1;
    }
    Ok(s)
}

fn decode_queued(r: &mut Reader<'_>) -> Result<QueuedRequestMetrics, DecodeError> {
    let mut q = QueuedRequestMetrics::default();
    let n = r.read_map_len(QUEUED)?;
    let mut next = 0;
    for _ in 0..n {
        let fast = match next {
            0 => r.eat(key!("num_prefill_requests")),
            1 => r.eat(key!("sum_prefill_tokens")),
            2 => r.eat(key!("var_prefill_length")),
            3 => r.eat(key!("num_decode_requests")),
            4 => r.eat(key!("sum_decode_kv_tokens")),
            5 => r.eat(key!("var_decode_kv_tokens")),
            _ => false,
        };
        let field = if fast {
            next
        } else {
            match r.read_key(QUEUED)? {
                b"num_prefill_requests" => 0,
                b"sum_prefill_tokens" => 1,
                b"var_prefill_length" => 2,
                b"num_decode_requests" => 3,
                b"sum_decode_kv_tokens" => 4,
                b"var_decode_kv_tokens" => 5,
                _ => {
                    r.skip_value(QUEUED)?;
                    continue;
                }
            }
        };
        match field {
            0 => q.num_prefill_requests = r.read_i64("queued_requests.num_prefill_requests")?,
            1 => q.sum_prefill_tokens = r.read_i64("queued_requests.sum_prefill_tokens")?,
            2 => q.var_prefill_length = r.read_f64("queued_requests.var_prefill_length")?,
            3 => q.num_decode_requests = r.read_i64("queued_requests.num_decode_requests")?,
            4 => q.sum_decode_kv_tokens = r.read_i64("queued_requests.sum_decode_kv_tokens")?,
            _ => q.var_decode_kv_tokens = r.read_f64("queued_requests.var_decode_kv_tokens")?,
        }
        next = field + 1;
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msgpack::{write_i64, write_map_len, write_str};

    fn sample() -> ForwardPassMetrics {
        ForwardPassMetrics {
            version: 1,
            worker_id: "worker-7".into(),
            dp_rank: 3,
            counter_id: 300,
            wall_time: 0.0125,
            scheduled_requests: ScheduledRequestMetrics {
                num_prefill_requests: 2,
                sum_prefill_tokens: 4096,
                var_prefill_length: 12.5,
                sum_prefill_kv_tokens: 128,
                num_decode_requests: 64,
                sum_decode_kv_tokens: 70000,
                var_decode_kv_tokens: 3.25,
            },
            queued_requests: QueuedRequestMetrics {
                num_prefill_requests: 5,
                sum_prefill_tokens: 5000,
                var_prefill_length: 1.0,
                num_decode_requests: 1,
                sum_decode_kv_tokens: 900,
                var_decode_kv_tokens: 0.0,
            },
        }
    }

    #[test]
    fn default_message_is_407_bytes() {
        assert_eq!(
            encode(&ForwardPassMetrics::default()).len(),
            ENCODED_DEFAULT_LEN
        );
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let b = encode(&m);
        assert_eq!(decode(&b).unwrap(), m);
        let k = peek_key(&b).unwrap();
        assert_eq!(
            k,
            FpmKey {
                worker_id: "worker-7",
                dp_rank: 3,
                counter_id: 300,
                version: 1
            }
        );
    }

    #[test]
    fn encode_into_reuses_and_clears() {
        let mut buf = vec![1, 2, 3];
        encode_into(&sample(), &mut buf);
        assert_eq!(buf, encode(&sample()));
    }

    #[test]
    fn missing_keys_take_defaults_and_unknown_keys_are_skipped() {
        let mut b = Vec::new();
        write_map_len(&mut b, 3);
        write_str(&mut b, "timing_scope");
        write_str(&mut b, "iteration");
        write_str(&mut b, "dp_rank");
        write_i64(&mut b, 2);
        write_str(&mut b, "scheduled_requests");
        write_map_len(&mut b, 2);
        write_str(&mut b, "extend_lengths");
        b.extend_from_slice(&[0x93, 1, 2, 3]);
        write_str(&mut b, "var_prefill_length");
        write_i64(&mut b, 7); // an int for a float field
        let m = decode(&b).unwrap();
        assert_eq!(m.dp_rank, 2);
        assert_eq!(m.version, 1);
        assert_eq!(m.scheduled_requests.var_prefill_length, 7.0);
    }

    #[test]
    fn float_for_int_names_the_field() {
        let mut b = Vec::new();
        write_map_len(&mut b, 1);
        write_str(&mut b, "queued_requests");
        write_map_len(&mut b, 1);
        write_str(&mut b, "sum_decode_kv_tokens");
        crate::msgpack::write_f64(&mut b, 1.0);
        let e = decode(&b).unwrap_err();
        assert_eq!(e.field(), Some("queued_requests.sum_decode_kv_tokens"));
        assert_eq!(e.reason(), "wrong_type");
        assert!(e.to_string().contains("expected int, found float"), "{e}");
    }

    #[test]
    fn version_two_is_unsupported() {
        let m = ForwardPassMetrics {
            version: 2,
            ..sample()
        };
        assert_eq!(
            decode(&encode(&m)),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(peek_key(&encode(&m)).unwrap().version, 2);
    }

    #[test]
    fn array_trailing_and_size_errors() {
        assert!(matches!(
            decode(&[0x90]),
            Err(DecodeError::WrongType {
                expected: "map",
                found: "array",
                ..
            })
        ));
        let mut b = encode(&sample());
        b.push(0xc0);
        assert!(matches!(decode(&b), Err(DecodeError::TrailingBytes { .. })));
        let big = vec![0u8; DEFAULT_MAX_SIZE + 1];
        assert!(matches!(decode(&big), Err(DecodeError::TooLarge { .. })));
        assert!(Decoder::new()
            .with_max_size(10)
            .decode(&encode(&sample()))
            .is_err());
        assert!(matches!(decode(&[]), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let b = encode(&sample());
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
    }
}
