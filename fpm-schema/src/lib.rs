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
mod message;
mod msgpack;
pub mod serde_codec;
mod subject;
mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use codec::{
    decode, encode, encode_into, peek_key, Decoder, FpmKey, DEFAULT_MAX_SIZE, ENCODED_DEFAULT_LEN,
};
pub use envelope::{
    envelope_overhead, Envelope, ENVELOPE_OVERHEAD, FPM_TOPIC, MAX_ENVELOPE_OVERHEAD, MAX_TOPIC_LEN,
};
pub use error::{DecodeError, NameError};
pub use message::{
    ForwardPassMetrics, QueuedRequestMetrics, QueuedRequestsBuilder, ScheduledRequestMetrics,
    ScheduledRequestsBuilder, Welford, FPM_VERSION,
};
pub use subject::{FpmSubject, Name, Scope};

/// The schema as this crate implements it: struct name, then `(field, type)` in declaration
/// order, with Python's type names. Generated from the field table (the struct declarations
/// in `message.rs`); the contract tests compare it with the upstream classes and with the
/// Python helper's layout.
pub const SCHEMA: [(&str, &[(&str, &str)]); 3] = [
    (
        <ForwardPassMetrics as table::Field>::PY_TYPE,
        ForwardPassMetrics::SCHEMA_FIELDS,
    ),
    (
        <ScheduledRequestMetrics as table::Field>::PY_TYPE,
        ScheduledRequestMetrics::SCHEMA_FIELDS,
    ),
    (
        <QueuedRequestMetrics as table::Field>::PY_TYPE,
        QueuedRequestMetrics::SCHEMA_FIELDS,
    ),
];
