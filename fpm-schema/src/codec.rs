//! The msgpack codec for [`ForwardPassMetrics`], byte-identical to msgspec 0.22.

use crate::error::DecodeError;
use crate::metrics::{
    ForwardPassMetrics, QueuedRequestMetrics, ScheduledRequestMetrics, FPM_VERSION,
};
use crate::msgpack::{key, write_f64, write_i64, write_str, Reader};

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
    let mut buf = Vec::with_capacity(ENCODED_DEFAULT_LEN + 32 + m.worker_id.len());
    encode_into(m, &mut buf);
    buf
}

/// Like [`encode`], into `buf`, which is cleared first; reusing one buffer avoids allocating.
pub fn encode_into(m: &ForwardPassMetrics, buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(ENCODED_DEFAULT_LEN + 32 + m.worker_id.len());
    buf.push(0x87);
    buf.extend_from_slice(key!("version"));
    write_i64(buf, m.version);
    buf.extend_from_slice(key!("worker_id"));
    write_str(buf, &m.worker_id);
    buf.extend_from_slice(key!("dp_rank"));
    write_i64(buf, m.dp_rank);
    buf.extend_from_slice(key!("counter_id"));
    write_i64(buf, m.counter_id);
    buf.extend_from_slice(key!("wall_time"));
    write_f64(buf, m.wall_time);
    buf.extend_from_slice(key!("scheduled_requests"));
    encode_scheduled(&m.scheduled_requests, buf);
    buf.extend_from_slice(key!("queued_requests"));
    encode_queued(&m.queued_requests, buf);
}

#[inline]
fn encode_scheduled(s: &ScheduledRequestMetrics, buf: &mut Vec<u8>) {
    buf.push(0x87);
    buf.extend_from_slice(key!("num_prefill_requests"));
    write_i64(buf, s.num_prefill_requests);
    buf.extend_from_slice(key!("sum_prefill_tokens"));
    write_i64(buf, s.sum_prefill_tokens);
    buf.extend_from_slice(key!("var_prefill_length"));
    write_f64(buf, s.var_prefill_length);
    buf.extend_from_slice(key!("sum_prefill_kv_tokens"));
    write_i64(buf, s.sum_prefill_kv_tokens);
    buf.extend_from_slice(key!("num_decode_requests"));
    write_i64(buf, s.num_decode_requests);
    buf.extend_from_slice(key!("sum_decode_kv_tokens"));
    write_i64(buf, s.sum_decode_kv_tokens);
    buf.extend_from_slice(key!("var_decode_kv_tokens"));
    write_f64(buf, s.var_decode_kv_tokens);
}

#[inline]
fn encode_queued(q: &QueuedRequestMetrics, buf: &mut Vec<u8>) {
    buf.push(0x86);
    buf.extend_from_slice(key!("num_prefill_requests"));
    write_i64(buf, q.num_prefill_requests);
    buf.extend_from_slice(key!("sum_prefill_tokens"));
    write_i64(buf, q.sum_prefill_tokens);
    buf.extend_from_slice(key!("var_prefill_length"));
    write_f64(buf, q.var_prefill_length);
    buf.extend_from_slice(key!("num_decode_requests"));
    write_i64(buf, q.num_decode_requests);
    buf.extend_from_slice(key!("sum_decode_kv_tokens"));
    write_i64(buf, q.sum_decode_kv_tokens);
    buf.extend_from_slice(key!("var_decode_kv_tokens"));
    write_f64(buf, q.var_decode_kv_tokens);
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
        let mut m = ForwardPassMetrics::default();
        self.decode_into(bytes, &mut m)?;
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
        let mut r = Reader::new(bytes);
        out.version = FPM_VERSION;
        out.worker_id.clear();
        out.dp_rank = 0;
        out.counter_id = 0;
        out.wall_time = 0.0;
        out.scheduled_requests = ScheduledRequestMetrics::default();
        out.queued_requests = QueuedRequestMetrics::default();
        let n = r.read_map_len(ROOT)?;
        for _ in 0..n {
            match r.read_key(ROOT)? {
                b"version" => out.version = r.read_i64("version")?,
                b"worker_id" => {
                    let s = r.read_str("worker_id")?;
                    out.worker_id.clear();
                    out.worker_id.push_str(s);
                }
                b"dp_rank" => out.dp_rank = r.read_i64("dp_rank")?,
                b"counter_id" => out.counter_id = r.read_i64("counter_id")?,
                b"wall_time" => out.wall_time = r.read_f64("wall_time")?,
                b"scheduled_requests" => out.scheduled_requests = decode_scheduled(&mut r)?,
                b"queued_requests" => out.queued_requests = decode_queued(&mut r)?,
                _ => r.skip_value(ROOT)?,
            }
        }
        if !r.is_empty() {
            return Err(DecodeError::TrailingBytes { offset: r.pos() });
        }
        if out.version != FPM_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                version: out.version,
            });
        }
        Ok(())
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
        let mut seen = 0u8;
        let n = r.read_map_len(ROOT)?;
        for _ in 0..n {
            match r.read_key(ROOT)? {
                b"version" => {
                    key.version = r.read_i64("version")?;
                    seen |= 1;
                }
                b"worker_id" => {
                    key.worker_id = r.read_str("worker_id")?;
                    seen |= 2;
                }
                b"dp_rank" => {
                    key.dp_rank = r.read_i64("dp_rank")?;
                    seen |= 4;
                }
                b"counter_id" => {
                    key.counter_id = r.read_i64("counter_id")?;
                    seen |= 8;
                }
                _ => r.skip_value(ROOT)?,
            }
            if seen == 0b1111 {
                return Ok(key);
            }
        }
        if !r.is_empty() {
            return Err(DecodeError::TrailingBytes { offset: r.pos() });
        }
        Ok(key)
    }
}

fn decode_scheduled(r: &mut Reader<'_>) -> Result<ScheduledRequestMetrics, DecodeError> {
    let mut s = ScheduledRequestMetrics::default();
    let n = r.read_map_len(SCHED)?;
    for _ in 0..n {
        match r.read_key(SCHED)? {
            b"num_prefill_requests" => {
                s.num_prefill_requests = r.read_i64("scheduled_requests.num_prefill_requests")?
            }
            b"sum_prefill_tokens" => {
                s.sum_prefill_tokens = r.read_i64("scheduled_requests.sum_prefill_tokens")?
            }
            b"var_prefill_length" => {
                s.var_prefill_length = r.read_f64("scheduled_requests.var_prefill_length")?
            }
            b"sum_prefill_kv_tokens" => {
                s.sum_prefill_kv_tokens = r.read_i64("scheduled_requests.sum_prefill_kv_tokens")?
            }
            b"num_decode_requests" => {
                s.num_decode_requests = r.read_i64("scheduled_requests.num_decode_requests")?
            }
            b"sum_decode_kv_tokens" => {
                s.sum_decode_kv_tokens = r.read_i64("scheduled_requests.sum_decode_kv_tokens")?
            }
            b"var_decode_kv_tokens" => {
                s.var_decode_kv_tokens = r.read_f64("scheduled_requests.var_decode_kv_tokens")?
            }
            _ => r.skip_value(SCHED)?,
        }
    }
    Ok(s)
}

fn decode_queued(r: &mut Reader<'_>) -> Result<QueuedRequestMetrics, DecodeError> {
    let mut q = QueuedRequestMetrics::default();
    let n = r.read_map_len(QUEUED)?;
    for _ in 0..n {
        match r.read_key(QUEUED)? {
            b"num_prefill_requests" => {
                q.num_prefill_requests = r.read_i64("queued_requests.num_prefill_requests")?
            }
            b"sum_prefill_tokens" => {
                q.sum_prefill_tokens = r.read_i64("queued_requests.sum_prefill_tokens")?
            }
            b"var_prefill_length" => {
                q.var_prefill_length = r.read_f64("queued_requests.var_prefill_length")?
            }
            b"num_decode_requests" => {
                q.num_decode_requests = r.read_i64("queued_requests.num_decode_requests")?
            }
            b"sum_decode_kv_tokens" => {
                q.sum_decode_kv_tokens = r.read_i64("queued_requests.sum_decode_kv_tokens")?
            }
            b"var_decode_kv_tokens" => {
                q.var_decode_kv_tokens = r.read_f64("queued_requests.var_decode_kv_tokens")?
            }
            _ => r.skip_value(QUEUED)?,
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msgpack::{write_map_len, write_str};

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
