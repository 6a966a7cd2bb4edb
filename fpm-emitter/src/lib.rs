//! Engine side of FPM: times scheduler iterations and publishes them over ZeroMQ.
#![deny(missing_docs)]
