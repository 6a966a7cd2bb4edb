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
    /// An engine metrics URL cannot be used.
    #[error("engine metrics URL {url:?} is not usable: {reason}")]
    EngineMetricsUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same ZeroMQ endpoint was given twice.
    #[error("ZeroMQ endpoint {0:?} is given more than once")]
    DuplicateEndpoint(String),
    /// A namespace, component or endpoint name cannot be used in a NATS subject.
    #[error(transparent)]
    Name(#[from] fpm_schema::NameError),
    /// The NATS URL does not parse. The parser's error is the source.
    #[error("NATS URL {url:?} is not valid: use nats://HOST:PORT (or tls://, ws://), comma-separated for several servers")]
    NatsUrl {
        /// The URL as given.
        url: String,
        /// What the parser said (absent for an empty URL).
        #[source]
        source: Option<std::io::Error>,
    },
    /// No server host of the NATS URL resolves (retrying a name that does not exist would
    /// never end).
    #[error("NATS URL {url:?}: no server host resolves ({hosts})")]
    NatsUnresolvable {
        /// The URL as given.
        url: String,
        /// Each host and why it did not resolve.
        hosts: String,
    },
    /// The NATS server refused the credentials; the client's error is the source.
    #[error("the NATS server at {url} refused the credentials (check --nats-user/--nats-password, --nats-token, --nats-creds or --nats-nkey)")]
    NatsRefused {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// TLS with the NATS server failed; the client's error is the source.
    #[error("TLS with the NATS server at {url} failed (check --nats-tls-ca / --nats-tls-cert / --nats-tls-key / --nats-tls)")]
    NatsTls {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A credentials file could not be read.
    #[error("cannot read the NATS creds file {path} (check --nats-creds)")]
    CredsFile {
        /// The file.
        path: PathBuf,
        /// The OS or parse error.
        #[source]
        source: std::io::Error,
    },
    /// The nkey seed does not parse.
    #[error(
        "the nkey seed is not valid (check --nats-nkey: a user seed is 'SU...', 58 characters)"
    )]
    NkeySeed(#[source] nkeys::error::Error),
    /// A TLS file does not exist.
    #[error("TLS file {0} does not exist: check --nats-tls-ca / --nats-tls-cert / --nats-tls-key")]
    TlsFile(PathBuf),
    /// Connecting to NATS failed in a way retrying cannot fix; the client's error is the
    /// source.
    #[error("cannot connect to NATS")]
    Nats(#[source] async_nats::ConnectError),
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
    /// A stage of the running relay died (an input task, the publisher or the data thread);
    /// [`crate::Relay::finish`] returns it once the owner has shut the relay down.
    #[error("the relay stopped because its ZeroMQ reader died ({0}): restart it")]
    ReaderDied(String),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A thread or blocking task of the relay could not be started or failed to finish.
    #[error("{what}")]
    Internal {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `main` prints errors as a chain (`{:#}`): each cause once, after the message.
    #[test]
    fn causes_are_printed_once() {
        let io = || std::io::Error::other("the cause");
        let errors = [
            Error::NatsUrl {
                url: "x".into(),
                source: Some(io()),
            },
            Error::CredsFile {
                path: "/c".into(),
                source: io(),
            },
            Error::Internal {
                what: "cannot start",
                source: io(),
            },
        ];
        for e in &errors {
            let mut text = e.to_string();
            let mut cur = std::error::Error::source(e);
            while let Some(c) = cur {
                text = format!("{text}: {c}");
                cur = c.source();
            }
            assert_eq!(text.matches("the cause").count(), 1, "{text}");
        }
    }
}
