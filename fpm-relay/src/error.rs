//! Errors the relay reports at startup. Once running, nothing stops it except shutdown:
//! bad messages, lost connections and full buffers are counted, not returned.

use std::path::PathBuf;

use thiserror::Error;

/// Why the relay could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// No ZeroMQ endpoint was configured.
    #[error("no ZeroMQ endpoint to read from: give --zmq-endpoint, --ipc-base with --dp-ranks, or --tcp-port-base with --dp-size")]
    NoEndpoints,
    /// A ZeroMQ endpoint can never work (bad port, missing ipc directory, ...).
    #[error("ZeroMQ endpoint {endpoint:?} is not usable: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same ZeroMQ endpoint was given twice.
    #[error("ZeroMQ endpoint {0:?} is given more than once")]
    DuplicateEndpoint(String),
    /// A namespace, component or endpoint name cannot be used in a NATS subject.
    #[error(transparent)]
    Name(#[from] fpm_schema::NameError),
    /// The NATS URL does not parse.
    #[error("NATS URL {url:?} is not valid ({reason}): use nats://HOST:PORT (or tls://, ws://), comma-separated for several servers")]
    NatsUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A credentials file, nkey seed or TLS file could not be used.
    #[error("NATS credentials: {0}")]
    Credentials(String),
    /// Connecting to NATS failed in a way retrying cannot fix.
    #[error("NATS: {0}")]
    Nats(String),
    /// The metrics address could not be bound.
    #[error("cannot listen for /metrics on {addr} ({error}): pick another --metrics-addr")]
    MetricsBind {
        /// The address.
        addr: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The discovery record could not be written.
    #[error("cannot write the discovery record under {dir} ({error}): check --discovery-dir / DYN_FILE_KV")]
    Discovery {
        /// The discovery directory.
        dir: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A stage of the running relay died (an input task or the data thread); the relay
    /// stopped itself.
    #[error("the relay stopped because its ZeroMQ reader died ({0}): restart it")]
    ReaderDied(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}
