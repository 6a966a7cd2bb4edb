//! Planner side of FPM: will consume FPM envelopes from NATS, track every engine and
//! data-parallel rank, and bucket samples for the planner's performance model.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout. Today, consume
//! the relay's output with Dynamo's own `FpmEventSubscriber`, or decode envelopes with
//! [`fpm_schema::Envelope::decode`] and [`fpm_schema::decode`].
#![deny(missing_docs)]
