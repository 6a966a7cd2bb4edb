//! Test material for this crate's users (the contract tests, the property tests, the fuzz
//! targets): behind the `testing` feature, not part of the normal API.

use crate::{decode, peek_key, serde_codec, Decoder, Envelope};

/// The integers at which the msgpack encoding of an int changes form (fixint, 8, 16, 32 and
/// 64 bits, both signs), as msgspec and this crate write them: the values any conformance
/// test of an encoder must cover.
pub const INT_FORM_BOUNDARIES: [i64; 21] = [
    0,
    1,
    127,
    128,
    255,
    256,
    65535,
    65536,
    u32::MAX as i64,
    1 << 32,
    i64::MAX,
    -1,
    -32,
    -33,
    -128,
    -129,
    -32768,
    -32769,
    i32::MIN as i64,
    i32::MIN as i64 - 1,
    i64::MIN,
];

/// Decodes `data` with every decoder in this crate (the `rmp-serde` one included) and
/// discards the results: the body of the property tests that prove no input panics.
pub fn fuzz_all_decoders(data: &[u8]) {
    let _ = decode(data);
    let _ = peek_key(data);
    let _ = Decoder::new().with_max_size(usize::MAX).decode(data);
    let _ = serde_codec::decode(data);
    if let Ok(env) = Envelope::decode(data) {
        let _ = decode(env.payload);
        let _ = serde_codec::decode(env.payload);
    }
}

/// Encodes `m` into `buf` (cleared first) over the same field table as [`crate::encode_into`],
/// but with the `rmp` crate's primitive writers (`write_sint`, `write_f64`, `write_str`,
/// `write_map_len`) instead of the hand-written ones: the bench compares the two, and the
/// tests check the bytes are the same.
pub fn encode_with_rmp_primitives(m: &crate::ForwardPassMetrics, buf: &mut Vec<u8>) {
    buf.clear();
    crate::table::Field::write_rmp(m, buf);
}
