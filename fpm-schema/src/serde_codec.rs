//! The msgpack codec written with `rmp-serde`, the crate this project's design names: the
//! same wire format and the same decode rules as the hand-written [`crate::encode`] /
//! [`crate::decode`], through the serde impls the field table generates (map keyed by field
//! name, msgspec's decode semantics: unknown keys ignored, missing keys defaulted, an int
//! accepted for a float, a float for an int an error, a non-map an error, string keys only,
//! the last of repeated keys wins), plus trailing bytes, the size limit and `version != 1`
//! rejected. The contract tests hold both paths to msgspec byte for byte and decision for
//! decision.
//!
//! Where they differ: errors are [`SerdeDecodeError`] (rmp-serde's, which name no field);
//! values nested [`MAX_DEPTH`] containers deep are an error. rmp-serde recurses per level
//! (its default limit of 1,024 overflowed a 2 MiB test thread's stack in a debug build), so
//! the limit is lower than msgspec's (Python's recursion limit, about 1,000 levels); the
//! hand-written decoder skips ignored values iteratively and accepts any depth. The hand-written path stays the one the pipeline uses because it is over 2×
//! faster on the same message (figures in the README, "Benchmarks").
//!
//! ```
//! use fpm_schema::{serde_codec, ForwardPassMetrics};
//! let m = ForwardPassMetrics::heartbeat("worker-1", 0);
//! let bytes = serde_codec::encode(&m);
//! assert_eq!(bytes, fpm_schema::encode(&m));
//! assert_eq!(serde_codec::decode(&bytes).unwrap(), m);
//! ```

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::message::{ForwardPassMetrics, FPM_VERSION};
use crate::DEFAULT_MAX_SIZE;

/// [`decode`] rejects `MAX_DEPTH` or more containers nested in one another (the message's
/// own map counts).
pub const MAX_DEPTH: usize = 256;

/// Why [`decode`] rejected a payload.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SerdeDecodeError {
    /// The input is larger than [`DEFAULT_MAX_SIZE`].
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Input size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Malformed msgpack or a value of the wrong type.
    #[error("malformed FPM payload")]
    Msgpack(#[source] rmp_serde::decode::Error),
    /// Bytes left over after one complete message.
    #[error("malformed msgpack: trailing bytes after the message at byte {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
    },
    /// A well-formed message with a schema version other than 1.
    #[error(
        "unsupported ForwardPassMetrics version {version} (this decoder understands version 1)"
    )]
    UnsupportedVersion {
        /// The version found.
        version: i64,
    },
}

/// Encodes `m` with `rmp_serde` as a map keyed by field name (msgspec's layout).
pub fn encode(m: &ForwardPassMetrics) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(m, &mut buf);
    buf
}

/// Like [`encode`], into `buf`, which is cleared first.
pub fn encode_into(m: &ForwardPassMetrics, buf: &mut Vec<u8>) {
    buf.clear();
    m.serialize(&mut rmp_serde::Serializer::new(&mut *buf).with_struct_map())
        .expect("writing msgpack into a Vec cannot fail");
}

/// Decodes one message with `rmp_serde`; see the module docs for the rules.
///
/// # Errors
/// A [`SerdeDecodeError`]. Never panics, whatever the input.
pub fn decode(bytes: &[u8]) -> Result<ForwardPassMetrics, SerdeDecodeError> {
    if bytes.len() > DEFAULT_MAX_SIZE {
        return Err(SerdeDecodeError::TooLarge {
            size: bytes.len(),
            limit: DEFAULT_MAX_SIZE,
        });
    }
    let mut de = rmp_serde::Deserializer::new(Cursor::new(bytes));
    de.set_max_depth(MAX_DEPTH);
    let m = ForwardPassMetrics::deserialize(&mut de).map_err(SerdeDecodeError::Msgpack)?;
    let offset = de.position() as usize;
    if offset != bytes.len() {
        return Err(SerdeDecodeError::TrailingBytes { offset });
    }
    if m.version != FPM_VERSION {
        return Err(SerdeDecodeError::UnsupportedVersion { version: m.version });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"deep": [{"": [{"": … nil}]}]}` with `levels` containers under the key.
    fn nested(levels: usize) -> Vec<u8> {
        let mut b = vec![0x81, 0xa4, b'd', b'e', b'e', b'p'];
        for i in 0..levels {
            if i % 2 == 0 {
                b.push(0x91);
            } else {
                b.extend_from_slice(&[0x81, 0xa0]);
            }
        }
        b.push(0xc0);
        b
    }

    #[test]
    fn depth_is_limited_without_overflowing_the_stack() {
        // On this (2 MiB) test thread, in a debug build: the deepest accepted nesting
        // decodes, one more is an error, and 20,000 levels are an error, not a crash.
        let deepest = (0..MAX_DEPTH + 2)
            .filter(|&l| decode(&nested(l)).is_ok())
            .max();
        // The message's map and `MAX_DEPTH - 2` levels under it: `MAX_DEPTH - 1` containers.
        assert_eq!(deepest, Some(MAX_DEPTH - 2));
        assert!(matches!(
            decode(&nested(MAX_DEPTH - 1)),
            Err(SerdeDecodeError::Msgpack(_))
        ));
        assert!(decode(&nested(20_000)).is_err());
        // The hand-written decoder accepts any depth.
        assert!(crate::decode(&nested(20_000)).is_ok());
    }

    #[test]
    fn rejects_what_msgspec_rejects() {
        let ok = encode(&ForwardPassMetrics::heartbeat("w", 0));
        assert!(decode(&ok).is_ok());
        // Trailing bytes, an array, a float for an int, bin for str, an int key, version 2.
        let trailing = [ok.as_slice(), &[0xc0]].concat();
        assert!(matches!(
            decode(&trailing),
            Err(SerdeDecodeError::TrailingBytes { offset }) if offset == ok.len()
        ));
        for bad in [
            &[0x90][..],
            b"\x81\xa7dp_rank\xcb\x3f\xf0\0\0\0\0\0\0",
            b"\x81\xa9worker_id\xc4\x01w",
            b"\x81\x00\x00",
        ] {
            assert!(
                matches!(decode(bad), Err(SerdeDecodeError::Msgpack(_))),
                "{bad:x?}"
            );
        }
        assert!(matches!(
            decode(b"\x81\xa7version\x02"),
            Err(SerdeDecodeError::UnsupportedVersion { version: 2 })
        ));
        // An int for a float, an unknown key, a repeated key (the last wins), a missing key.
        let m = decode(b"\x83\xa9wall_time\x02\xa1x\x90\xa9wall_time\x03").unwrap();
        assert_eq!((m.wall_time, m.version), (3.0, 1));
        let big = vec![0u8; DEFAULT_MAX_SIZE + 1];
        assert!(matches!(
            decode(&big),
            Err(SerdeDecodeError::TooLarge { .. })
        ));
    }
}
