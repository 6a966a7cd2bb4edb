//! The planner side of Forward Pass Metrics: consume the relay's NATS events, track every
//! engine stream, account for every lost message, and fit Dynamo's planner load models.
//!
//! - [`SubjectFilter`]: what to subscribe to (namespace / component / endpoint, `*` for any;
//!   endpoint scope, component scope or both).
//! - [`Ingest`]: NATS message → [`Sample`] (envelope metadata + decoded metrics); anything
//!   else is counted by [`RejectReason`], never fatal.
//! - [`Tracker`]: the latest metrics per `(worker_id, dp_rank)`, counter gaps, duplicates,
//!   reordering, producer restarts, `missed_before_start`, envelope sequence gaps per relay,
//!   staleness, and a cap on tracked streams.
//! - [`Subscriber`]: the three over a live NATS subscription.
//! - [`planner`]: Dynamo's planner load models (prefill, decode, aggregated) with the same
//!   behaviour as `ai-dynamo==1.6.1`, plus fit quality, a feeding policy and an attention-DP
//!   rank check.
//! - [`exporter`]: Prometheus exposition with Dynamo's label names.
//! - [`record`]: the JSON Lines recording format (`fpm record`, `fpm fit`, `fpm plot`).
#![deny(missing_docs)]

pub mod exporter;
mod filter;
mod ingest;
pub mod planner;
pub mod record;
mod subscriber;
mod tracker;

pub use filter::{ScopeFilter, Segment, Source, SubjectFilter};
pub use ingest::{Ingest, RejectCounts, RejectReason, Sample};
pub use subscriber::{unix_now_ns, Subscriber, SubscriberConfig, SubscriberStats};
pub use tracker::{
    LossCounts, Observation, SequenceCounts, StreamKey, StreamState, Sweep, Tracker, TrackerConfig,
};
