//! Planner side of FPM.
//!
//! Today: [`planner`], Dynamo's planner load models (prefill, decode, aggregated) with the
//! same behaviour as `ai-dynamo==1.6.1`, fed [`fpm_schema::ForwardPassMetrics`], plus fit
//! quality reports, a choice of feeding policy and an attention-DP rank check. Consuming
//! the relay's NATS output and tracking engines is not written yet: use Dynamo's own
//! `FpmEventSubscriber`, or decode envelopes with [`fpm_schema::Envelope::decode`] and
//! [`fpm_schema::decode`].
#![deny(missing_docs)]

pub mod planner;
