//! Forward Pass Metrics (FPM), schema version 1.
//!
//! An inference engine emits one [`ForwardPassMetrics`] per scheduler iteration: how long the
//! iteration took and what was in the batch and the queue. This crate holds the message types,
//! a msgpack codec that is byte-for-byte identical to the msgspec structs shipped by NVIDIA
//! Dynamo (`dynamo.common.forward_pass_metrics`) and SGLang
//! (`sglang.srt.observability.forward_pass_metrics`), a cheap key peek for relays, the
//! Welford accumulator and builders engines use to fill the statistics, and the event-plane
//! [`Envelope`] and [`FpmSubject`] Dynamo uses on NATS.
//!
//! ```
//! use fpm_schema::{decode, encode, ForwardPassMetrics, ScheduledRequestsBuilder};
//!
//! let mut batch = ScheduledRequestsBuilder::new();
//! batch.add_prefill(2000, 2000, 0);
//! batch.add_decode(900);
//! let m = ForwardPassMetrics {
//!     worker_id: "worker-1".into(),
//!     wall_time: 0.021,
//!     scheduled_requests: batch.build(),
//!     ..Default::default()
//! };
//! let bytes = encode(&m);
//! assert_eq!(decode(&bytes).unwrap(), m);
//! assert_eq!(fpm_schema::peek_key(&bytes).unwrap().worker_id, "worker-1");
//! ```
#![deny(missing_docs)]

mod codec;
mod envelope;
mod error;
mod metrics;
mod msgpack;
mod subject;

pub use codec::{
    decode, encode, encode_into, peek_key, Decoder, FpmKey, DEFAULT_MAX_SIZE, ENCODED_DEFAULT_LEN,
};
pub use envelope::{
    envelope_overhead, Envelope, ENVELOPE_OVERHEAD, FPM_TOPIC, MAX_ENVELOPE_OVERHEAD, MAX_TOPIC_LEN,
};
pub use error::{DecodeError, NameError};
pub use metrics::{
    ForwardPassMetrics, QueuedRequestMetrics, QueuedRequestsBuilder, ScheduledRequestMetrics,
    ScheduledRequestsBuilder, Welford, FPM_VERSION,
};
pub use subject::{FpmSubject, Name, Scope};

/// The schema as this crate implements it: struct name, then `(field, type)` in declaration
/// order, with Python's type names. The contract tests compare it with the upstream classes.
pub const SCHEMA: [(&str, &[(&str, &str)]); 3] = [
    (
        "ForwardPassMetrics",
        &[
            ("version", "int"),
            ("worker_id", "str"),
            ("dp_rank", "int"),
            ("counter_id", "int"),
            ("wall_time", "float"),
            ("scheduled_requests", "ScheduledRequestMetrics"),
            ("queued_requests", "QueuedRequestMetrics"),
        ],
    ),
    (
        "ScheduledRequestMetrics",
        &[
            ("num_prefill_requests", "int"),
            ("sum_prefill_tokens", "int"),
            ("var_prefill_length", "float"),
            ("sum_prefill_kv_tokens", "int"),
            ("num_decode_requests", "int"),
            ("sum_decode_kv_tokens", "int"),
            ("var_decode_kv_tokens", "float"),
        ],
    ),
    (
        "QueuedRequestMetrics",
        &[
            ("num_prefill_requests", "int"),
            ("sum_prefill_tokens", "int"),
            ("var_prefill_length", "float"),
            ("num_decode_requests", "int"),
            ("sum_decode_kv_tokens", "int"),
            ("var_decode_kv_tokens", "float"),
        ],
    ),
];

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

/// Decodes `data` with every decoder in this crate and discards the results: the body of the
/// fuzz targets and property tests that prove no input panics.
#[doc(hidden)]
pub fn fuzz_all_decoders(data: &[u8]) {
    let _ = decode(data);
    let _ = peek_key(data);
    let _ = Decoder::new().with_max_size(usize::MAX).decode(data);
    if let Ok(env) = Envelope::decode(data) {
        let _ = decode(env.payload);
    }
}
