//! Relays FPM from engines' ZeroMQ sockets onto NATS, wire-compatible with Dynamo.
#![deny(missing_docs)]
