//! The event-plane envelope Dynamo 1.6.1 puts around every FPM payload on NATS.
//!
//! A msgpack map, in this order: `publisher_id` (u64, random per publisher, below 2^53),
//! `sequence` (u64 from 0, +1 per publish), `published_at` (u64, Unix milliseconds), `topic`
//! (`"forward-pass-metrics"`) and `payload` (msgpack bin holding the FPM bytes unchanged).

use crate::codec::DEFAULT_MAX_SIZE;
use crate::error::DecodeError;
use crate::msgpack::{key, write_bin, write_str, write_u64, Reader};

/// The topic string FPM envelopes carry.
pub const FPM_TOPIC: &str = "forward-pass-metrics";

/// The longest topic [`Envelope::decode`] makes room for in its default size limit, in bytes
/// (the longest str8; Dynamo's topics are short names such as [`FPM_TOPIC`]).
pub const MAX_TOPIC_LEN: usize = u8::MAX as usize;

/// Widest msgpack uint (`0xcf` and 8 bytes).
const MAX_U64_LEN: usize = 9;
/// Widest msgpack bin header (`0xc6` and a 4-byte length).
const MAX_BIN_HEADER_LEN: usize = 5;

/// Length of the smallest msgpack str header for a string of `len` bytes.
const fn str_header_len(len: usize) -> usize {
    if len < 32 {
        1
    } else if len <= u8::MAX as usize {
        2
    } else if len <= u16::MAX as usize {
        3
    } else {
        5
    }
}

const fn key_len(key: &str) -> usize {
    str_header_len(key.len()) + key.len()
}

/// The most bytes an envelope with a topic of `topic_len` bytes adds around its payload,
/// whatever the payload's length and the integers' values: derived from the layout (map
/// header, the five keys, three integers at their widest, the topic's header and bytes, the
/// widest bin header), so `encode(e).len() <= e.payload.len() + envelope_overhead(e.topic.len())`
/// always holds, with equality when the integers need 64 bits and the payload a bin32 header.
pub const fn envelope_overhead(topic_len: usize) -> usize {
    1 + key_len("publisher_id")
        + MAX_U64_LEN
        + key_len("sequence")
        + MAX_U64_LEN
        + key_len("published_at")
        + MAX_U64_LEN
        + key_len("topic")
        + str_header_len(topic_len)
        + topic_len
        + key_len("payload")
        + MAX_BIN_HEADER_LEN
}

/// Bytes an envelope with topic [`FPM_TOPIC`] adds around its payload, at most (103).
pub const ENVELOPE_OVERHEAD: usize = envelope_overhead(FPM_TOPIC.len());

/// Bytes any envelope whose topic is at most [`MAX_TOPIC_LEN`] bytes adds around its payload,
/// at most: [`Envelope::decode`] accepts [`DEFAULT_MAX_SIZE`] plus this.
pub const MAX_ENVELOPE_OVERHEAD: usize = envelope_overhead(MAX_TOPIC_LEN);

const ENV: &str = "<envelope>";

/// One event-plane message, borrowing its topic and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Random per publisher (below 2^53 so JavaScript and JSON consumers keep it exact).
    pub publisher_id: u64,
    /// Per-publisher sequence, from 0.
    pub sequence: u64,
    /// When it was published, Unix milliseconds.
    pub published_at: u64,
    /// Event topic; [`FPM_TOPIC`] for forward-pass metrics.
    pub topic: &'a str,
    /// The FPM msgpack bytes, unchanged.
    pub payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Encodes the envelope into `buf` (cleared first), byte-identical to Dynamo 1.6.1.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(envelope_overhead(self.topic.len()) + self.payload.len());
        buf.push(0x85);
        buf.extend_from_slice(key!("publisher_id"));
        write_u64(buf, self.publisher_id);
        buf.extend_from_slice(key!("sequence"));
        write_u64(buf, self.sequence);
        buf.extend_from_slice(key!("published_at"));
        write_u64(buf, self.published_at);
        buf.extend_from_slice(key!("topic"));
        write_str(buf, self.topic);
        buf.extend_from_slice(key!("payload"));
        write_bin(buf, self.payload);
    }

    /// Encodes the envelope into a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode_into(&mut buf);
        buf
    }

    /// Decodes an envelope with the default limit: any envelope of a payload up to
    /// [`DEFAULT_MAX_SIZE`] with a topic up to [`MAX_TOPIC_LEN`] bytes fits, whatever its
    /// integers ([`DEFAULT_MAX_SIZE`] + [`MAX_ENVELOPE_OVERHEAD`] bytes).
    ///
    /// Keys may come in any order; unknown keys are skipped; all five keys are required.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the key and the reason.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Self::decode_with_limit(bytes, DEFAULT_MAX_SIZE + MAX_ENVELOPE_OVERHEAD)
    }

    /// Decodes an envelope of at most `max_size` bytes.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the key and the reason.
    pub fn decode_with_limit(bytes: &'a [u8], max_size: usize) -> Result<Self, DecodeError> {
        if bytes.len() > max_size {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: max_size,
            });
        }
        let mut r = Reader::new(bytes);
        let (mut publisher_id, mut sequence, mut published_at) = (None, None, None);
        let (mut topic, mut payload) = (None, None);
        let n = r.read_map_len(ENV)?;
        for _ in 0..n {
            match r.read_key(ENV)? {
                b"publisher_id" => publisher_id = Some(r.read_u64("publisher_id")?),
                b"sequence" => sequence = Some(r.read_u64("sequence")?),
                b"published_at" => published_at = Some(r.read_u64("published_at")?),
                b"topic" => topic = Some(r.read_str("topic")?),
                b"payload" => payload = Some(r.read_bin("payload")?),
                _ => r.skip_value(ENV)?,
            }
        }
        if !r.is_empty() {
            return Err(DecodeError::TrailingBytes { offset: r.pos() });
        }
        let missing = |field| DecodeError::MissingKey { field };
        Ok(Envelope {
            publisher_id: publisher_id.ok_or(missing("publisher_id"))?,
            sequence: sequence.ok_or(missing("sequence"))?,
            published_at: published_at.ok_or(missing("published_at"))?,
            topic: topic.ok_or(missing("topic"))?,
            payload: payload.ok_or(missing("payload"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let payload = crate::encode(&crate::ForwardPassMetrics::default());
        let e = Envelope {
            publisher_id: (1 << 53) - 1,
            sequence: 0,
            published_at: 1_764_000_000_000,
            topic: FPM_TOPIC,
            payload: &payload,
        };
        let b = e.encode();
        assert_eq!(b[0], 0x85);
        assert_eq!(&b[1..14], b"\xacpublisher_id");
        assert_eq!(Envelope::decode(&b).unwrap(), e);
        // 407-byte payload needs bin16.
        let at = b.len() - payload.len() - 3;
        assert_eq!(&b[at..at + 3], &[0xc5, 0x01, 0x97]);
    }

    #[test]
    fn overhead_is_derived_from_the_layout() {
        assert_eq!(ENVELOPE_OVERHEAD, 103);
        assert_eq!(MAX_ENVELOPE_OVERHEAD, 82 + 2 + 255);
        assert_eq!(envelope_overhead(0), 83);
        assert_eq!(envelope_overhead(31), 82 + 1 + 31);
        assert_eq!(envelope_overhead(32), 82 + 2 + 32);
    }

    /// The largest envelope the default decoder must accept: a 64 KiB payload (bin32), every
    /// integer at 64 bits, the longest topic. Its size is exactly the bound, and it decodes;
    /// one byte more is over the limit.
    #[test]
    fn largest_envelope_decodes_at_the_limit() {
        let payload = vec![0xa5; DEFAULT_MAX_SIZE];
        let long_topic = "t".repeat(MAX_TOPIC_LEN);
        for topic in [FPM_TOPIC, long_topic.as_str()] {
            let e = Envelope {
                publisher_id: u64::MAX,
                sequence: u64::MAX,
                published_at: u64::MAX,
                topic,
                payload: &payload,
            };
            let b = e.encode();
            assert_eq!(b.len(), DEFAULT_MAX_SIZE + envelope_overhead(topic.len()));
            assert_eq!(Envelope::decode(&b), Ok(e));
        }
        // The case that broke the old guess of 96: a realistic envelope of a 64 KiB payload
        // once the sequence needs 32 bits.
        let e = Envelope {
            publisher_id: (1 << 53) - 1,
            sequence: 65_536,
            published_at: 1_764_000_000_000,
            topic: FPM_TOPIC,
            payload: &payload,
        };
        assert_eq!(Envelope::decode(&e.encode()), Ok(e));
        let too_big = vec![0u8; DEFAULT_MAX_SIZE + MAX_ENVELOPE_OVERHEAD + 1];
        assert!(matches!(
            Envelope::decode(&too_big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn missing_and_wrong_keys() {
        let e = Envelope {
            publisher_id: 1,
            sequence: 2,
            published_at: 3,
            topic: "t",
            payload: b"x",
        };
        let b = e.encode();
        for cut in 0..b.len() {
            assert!(Envelope::decode(&b[..cut]).is_err());
        }
        assert_eq!(
            Envelope::decode(&[0x80]),
            Err(DecodeError::MissingKey {
                field: "publisher_id"
            })
        );
    }
}
