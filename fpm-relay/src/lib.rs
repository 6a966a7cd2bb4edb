//! Relays Forward Pass Metrics from engines' ZeroMQ PUB sockets onto NATS, a drop-in for
//! Dynamo 1.6.1's `FpmEventRelay`.
//!
//! An engine (SGLang, or vLLM under Dynamo) binds a ZeroMQ PUB and sends one 3-frame message
//! per scheduler iteration: an empty topic, an 8-byte big-endian counter, and the msgpack
//! `ForwardPassMetrics`. The relay connects a SUB to each engine endpoint, validates every
//! message, and publishes the payload byte-for-byte inside Dynamo's event-plane envelope on
//! `namespace.{ns}.component.{c}.endpoint.{e}.forward-pass-metrics`, where Dynamo's
//! `FpmEventSubscriber` (and its planner) receive it.
//!
//! - The data path (every engine input, the buffer, the publisher and the NATS client's
//!   connection) runs on one thread of its own with a single-threaded runtime: a message
//!   costs one wake-up, one read and one write, and no allocation (payloads and envelopes
//!   share 64 KiB chunks). The ZeroMQ side is a minimal ZMTP 3 SUB peer that checks every
//!   announced length before reading it (see the README for why not libzmq or `zeromq`).
//! - Reading never waits for NATS: a bounded buffer (by count and bytes) sits between them;
//!   what does not fit is dropped and counted.
//! - Invalid messages are counted by reason and never stop the relay; counter-frame gaps
//!   (lost upstream) and resets (engine restarts) are counted per endpoint.
//! - Neither the engine nor NATS has to be up first; both reconnect forever.
//! - Prometheus metrics, `/health` and `/live` are served on an optional address; with
//!   `engine_metrics`, the engines' own Prometheus families (`sglang:`, `vllm:`, `trtllm_`)
//!   are fetched on every scrape and served after the relay's, as Dynamo's workers do.
//! - With a discovery directory (Dynamo's `DYN_FILE_KV`), the relay keeps Dynamo's
//!   EventChannel record alive and removes it on shutdown.
//!
//! ```no_run
//! use fpm_relay::{Relay, RelayConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), fpm_relay::Error> {
//! let mut config = RelayConfig::new(fpm_relay::ipc_endpoints("ipc:///tmp/sglang_fpm", &[0, 1]));
//! config.nats.url = "nats://127.0.0.1:4222".into();
//! let shutdown = CancellationToken::new();
//! let relay = Relay::start(config, shutdown.clone()).await?;
//! // ... later, e.g. on SIGTERM:
//! shutdown.cancel();
//! let stats = relay.wait().await;
//! assert_eq!(stats.received, stats.invalid.total() + stats.published + stats.dropped.total());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod buffer;
mod config;
mod discovery;
mod error;
pub mod http;
mod ingest;
mod metrics;
pub mod nats;
mod passthrough;
mod publish;
mod relay;
use fpm_zmtp as zmtp;

pub use config::{
    ipc_endpoints, tcp_endpoints, BufferLimits, EventPlane, MemoryPlane, NatsAuth, NatsConfig,
    RelayConfig, DEFAULT_TCP_PORT_BASE,
};
pub use error::Error;
pub use fpm_schema::Scope;
pub use metrics::{InvalidReason, ReasonCounts, RelayDropReason, Stats};
pub use relay::Relay;
