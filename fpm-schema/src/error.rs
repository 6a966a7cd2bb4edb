//! Errors of this crate. Decode errors are small plain enums (no allocation, no boxing) so the
//! hot path of a relay can count them by [`DecodeError::reason`] and move on.

use thiserror::Error;

/// Why a payload (an FPM message or an envelope) could not be decoded.
///
/// `field` is the dotted path of the field being read when the error happened
/// (`"scheduled_requests.sum_prefill_tokens"`), or `"<message>"` / `"<envelope>"` for the
/// whole value. `offset` is the byte offset in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is larger than the decoder's size limit.
    #[error("payload is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Input size in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The input ended in the middle of a value.
    #[error("`{field}`: input truncated at byte {offset}")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Where the input ended.
        offset: usize,
    },
    /// A byte that is not a MessagePack marker (`0xc1`).
    #[error("`{field}`: malformed msgpack: invalid marker 0x{byte:02x} at byte {offset}")]
    InvalidMarker {
        /// Field being read.
        field: &'static str,
        /// The offending byte.
        byte: u8,
        /// Where it was.
        offset: usize,
    },
    /// A value of the wrong MessagePack type (for example a float where an int is required,
    /// or an array where a map is required).
    #[error("`{field}`: expected {expected}, found {found} at byte {offset}")]
    WrongType {
        /// Field being read.
        field: &'static str,
        /// The type the schema requires.
        expected: &'static str,
        /// The type found.
        found: &'static str,
        /// Where it was.
        offset: usize,
    },
    /// An unsigned integer too large for `i64` (msgspec accepts up to `u64::MAX`; FPM uses i64).
    #[error("`{field}`: integer {value} is outside the i64 range (at byte {offset})")]
    IntOutOfRange {
        /// Field being read.
        field: &'static str,
        /// The value found.
        value: u64,
        /// Where it was.
        offset: usize,
    },
    /// A negative integer where an unsigned one is required (envelope counters).
    #[error(
        "`{field}`: integer {value} is negative, expected an unsigned integer (at byte {offset})"
    )]
    NegativeInt {
        /// Field being read.
        field: &'static str,
        /// The value found.
        value: i64,
        /// Where it was.
        offset: usize,
    },
    /// A string that is not valid UTF-8.
    #[error("`{field}`: string is not valid UTF-8 (at byte {offset})")]
    InvalidUtf8 {
        /// Field being read.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },
    /// A map key that is not a string.
    #[error("`{field}`: map key must be a str, found {found} at byte {offset}")]
    NonStringKey {
        /// The map being read.
        field: &'static str,
        /// The key's type.
        found: &'static str,
        /// Where it was.
        offset: usize,
    },
    /// Bytes left over after one complete message.
    #[error("malformed msgpack: trailing bytes after the message at byte {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
    },
    /// A required key is absent (envelopes only; FPM fields all have defaults).
    #[error("`{field}`: required key is missing")]
    MissingKey {
        /// The missing key.
        field: &'static str,
    },
    /// A well-formed message with a schema version this decoder does not understand.
    #[error(
        "unsupported ForwardPassMetrics version {version} (this decoder understands version 1)"
    )]
    UnsupportedVersion {
        /// The version found.
        version: i64,
    },
}

impl DecodeError {
    /// A short stable label for metrics (`reason="wrong_type"`): low cardinality, never
    /// contains field names or values.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::InvalidMarker { .. } => "invalid_marker",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::IntOutOfRange { .. } => "int_out_of_range",
            DecodeError::NegativeInt { .. } => "negative_int",
            DecodeError::InvalidUtf8 { .. } => "invalid_utf8",
            DecodeError::NonStringKey { .. } => "non_string_key",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::MissingKey { .. } => "missing_key",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
        }
    }

    /// The field the error is about, if it is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            DecodeError::Truncated { field, .. }
            | DecodeError::InvalidMarker { field, .. }
            | DecodeError::WrongType { field, .. }
            | DecodeError::IntOutOfRange { field, .. }
            | DecodeError::NegativeInt { field, .. }
            | DecodeError::InvalidUtf8 { field, .. }
            | DecodeError::NonStringKey { field, .. }
            | DecodeError::MissingKey { field } => Some(field),
            DecodeError::UnsupportedVersion { .. } => Some("version"),
            DecodeError::TooLarge { .. } | DecodeError::TrailingBytes { .. } => None,
        }
    }
}

/// A name that cannot be used as a segment of a NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// Which name (`namespace`, `component`, `endpoint`).
        what: &'static str,
    },
    /// The name contains a character that would change the subject's meaning.
    #[error("{what} name {name:?} contains {found:?}: dots, spaces, `*` and `>` are not allowed in a subject segment")]
    InvalidChar {
        /// Which name.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// The first offending character.
        found: char,
    },
}
