//! Planner side of FPM: consumes from NATS and tracks every engine and rank.
#![deny(missing_docs)]
