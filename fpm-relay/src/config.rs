//! What the relay reads from, where it publishes, and its limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fpm_schema::Scope;

/// Default base port of vLLM-style publishers (`DYN_FORWARDPASS_METRIC_PORT`).
pub const DEFAULT_TCP_PORT_BASE: u16 = 20380;

/// Everything [`crate::Relay::start`] needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The engines' ZeroMQ PUB endpoints to connect a SUB to (`tcp://HOST:PORT`, `ipc:///path`).
    /// See [`ipc_endpoints`] and [`tcp_endpoints`] for the usual layouts.
    pub zmq_endpoints: Vec<String>,
    /// Dynamo namespace (first subject segment).
    pub namespace: String,
    /// Dynamo component.
    pub component: String,
    /// Dynamo endpoint (ignored in component scope).
    pub endpoint: String,
    /// Endpoint scope matches Dynamo 1.6.1; component scope matches older planners.
    pub scope: Scope,
    /// How to reach NATS (used when `plane` is [`EventPlane::Nats`]).
    pub nats: NatsConfig,
    /// Where envelopes go: NATS (the default) or a channel in this process.
    pub plane: EventPlane,
    /// Bounds of the buffer that holds messages while NATS is away.
    pub buffer: BufferLimits,
    /// Largest FPM payload accepted, in bytes; larger ones are counted as `too_large`. A
    /// message whose frame headers announce more than this plus 1 KiB is refused from the
    /// headers, before it is read or allocated: the relay drops that connection, counts it
    /// as `oversized_frame`, and reconnects.
    pub max_payload: usize,
    /// How long one NATS publish may wait before the message counts as dropped.
    pub publish_timeout: Duration,
    /// How long shutdown may take to flush what is buffered.
    pub shutdown_timeout: Duration,
    /// Where to serve `/metrics`, `/health` and `/live`; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Dynamo's file-discovery root (`DYN_FILE_KV`): when set, the relay writes its
    /// EventChannel record there (endpoint scope only) and removes it on shutdown.
    pub discovery_dir: Option<PathBuf>,
    /// How often the discovery record's mtime is refreshed (Dynamo expires records not
    /// refreshed for about 10 s; its own publishers refresh every ~3.3 s).
    pub discovery_refresh: Duration,
    /// Fixed publisher id for the envelope (tests); `None` draws a random one below 2^53.
    pub publisher_id: Option<u64>,
    /// Most per-input label sets (`endpoint`, `worker_id`, `dp_rank`) on `/metrics`; further
    /// ones are counted under `worker_id="other"`, `dp_rank="other"`.
    pub max_label_sets: usize,
    /// Most HTTP connections served at once; more are answered 503 and closed (counted).
    pub http_max_connections: usize,
    /// How long an HTTP client may take to send its request before the connection is closed
    /// (so idle connections cannot hold the slots).
    pub http_read_timeout: Duration,
    /// The engines' own Prometheus endpoints (`http://HOST:PORT/metrics`), fetched on every
    /// scrape of `/metrics` and appended after the relay's metrics (see
    /// [`RelayConfig::engine_metrics_prefixes`]).
    pub engine_metrics: Vec<String>,
    /// Families of the engines' metrics that are passed through: those whose names start
    /// with one of these (default `sglang:`, `vllm:`, `trtllm_`).
    pub engine_metrics_prefixes: Vec<String>,
    /// How long one scrape waits for the engines before answering without them.
    pub engine_metrics_timeout: Duration,
    /// Fault injection for tests: the ZeroMQ input panics after reading this many
    /// messages. Never set in production.
    #[doc(hidden)]
    pub fault_panic_reader_after: Option<u64>,
    /// Fault injection for tests: the NATS publisher panics after publishing this many
    /// messages. Never set in production.
    #[doc(hidden)]
    pub fault_panic_publisher_after: Option<u64>,
    /// Called first thing on the relay's data thread (tests count its allocations).
    #[doc(hidden)]
    pub on_data_thread_start: Option<fn()>,
}

impl RelayConfig {
    /// A config with Dynamo's default names (`dynamo` / `backend` / `generate`), a local NATS
    /// and the default limits, reading from `zmq_endpoints`.
    pub fn new(zmq_endpoints: Vec<String>) -> Self {
        RelayConfig {
            zmq_endpoints,
            namespace: "dynamo".into(),
            component: "backend".into(),
            endpoint: "generate".into(),
            scope: Scope::Endpoint,
            nats: NatsConfig::default(),
            plane: EventPlane::Nats,
            buffer: BufferLimits::default(),
            max_payload: fpm_schema::DEFAULT_MAX_SIZE,
            publish_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(5),
            metrics_addr: None,
            discovery_dir: None,
            discovery_refresh: Duration::from_secs(3),
            publisher_id: None,
            max_label_sets: crate::metrics::DEFAULT_MAX_LABEL_SETS,
            http_max_connections: 64,
            http_read_timeout: Duration::from_secs(5),
            engine_metrics: Vec::new(),
            engine_metrics_prefixes: crate::passthrough::DEFAULT_PREFIXES
                .iter()
                .map(|p| (*p).to_owned())
                .collect(),
            engine_metrics_timeout: Duration::from_secs(1),
            fault_panic_reader_after: None,
            fault_panic_publisher_after: None,
            on_data_thread_start: None,
        }
    }
}

/// The in-process event plane: a broadcast channel of `(subject, envelope)`. Receivers that
/// fall behind by more than its capacity lose messages and are told how many
/// (`RecvError::Lagged`), so they can count them.
pub type MemoryPlane = tokio::sync::broadcast::Sender<(String, bytes::Bytes)>;

/// Where the relay publishes its envelopes.
#[derive(Debug, Clone, Default)]
pub enum EventPlane {
    /// The NATS server of [`RelayConfig::nats`].
    #[default]
    Nats,
    /// A channel in this process (`fpm demo` without a nats-server): same subjects, same
    /// envelopes; always "connected".
    Memory(MemoryPlane),
}

/// Limits of the in-memory buffer between ZeroMQ and NATS. A message that would exceed
/// either limit is dropped and counted (`reason="buffer_full"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLimits {
    /// Most messages held.
    pub max_messages: usize,
    /// Most payload bytes held.
    pub max_bytes: usize,
}

impl Default for BufferLimits {
    fn default() -> Self {
        BufferLimits {
            max_messages: 100_000,
            max_bytes: 64 << 20,
        }
    }
}

/// How to connect to NATS. The client reconnects forever.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// How to authenticate.
    pub auth: NatsAuth,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Require TLS even without certificates given.
    pub require_tls: bool,
    /// Connection name shown by the server.
    pub name: String,
    /// Longest wait between reconnect attempts.
    pub reconnect_delay_max: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            auth: NatsAuth::None,
            tls_ca: None,
            tls_client: None,
            require_tls: false,
            name: "fpm-relay".into(),
            reconnect_delay_max: Duration::from_secs(2),
        }
    }
}

/// NATS credentials.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsAuth {
    /// Anonymous (or credentials embedded in the URL).
    #[default]
    None,
    /// User and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A token.
    Token(String),
    /// A `.creds` file (JWT and nkey seed).
    CredsFile(PathBuf),
    /// An nkey seed (`SU...`).
    NkeySeed(String),
}

impl std::fmt::Debug for NatsAuth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::CredsFile(p) => write!(f, "CredsFile({p:?})"),
            NatsAuth::NkeySeed(_) => f.write_str("NkeySeed(***)"),
        }
    }
}

/// SGLang's layout: one PUB per data-parallel rank at `"{base}.{rank}"`.
///
/// ```
/// assert_eq!(fpm_relay::ipc_endpoints("ipc:///tmp/fpm", &[0, 1]),
///            vec!["ipc:///tmp/fpm.0".to_string(), "ipc:///tmp/fpm.1".to_string()]);
/// ```
pub fn ipc_endpoints(base: &str, dp_ranks: &[u32]) -> Vec<String> {
    dp_ranks.iter().map(|r| format!("{base}.{r}")).collect()
}

/// vLLM's layout (Dynamo's scheduler): rank `r` binds `tcp://*:{port_base + r}`; the relay
/// connects to `host`.
///
/// ```
/// assert_eq!(fpm_relay::tcp_endpoints("127.0.0.1", 20380, 2),
///            vec!["tcp://127.0.0.1:20380".to_string(), "tcp://127.0.0.1:20381".to_string()]);
/// ```
pub fn tcp_endpoints(host: &str, port_base: u16, dp_size: u16) -> Vec<String> {
    (0..dp_size)
        .map(|r| format!("tcp://{host}:{}", u32::from(port_base) + u32::from(r)))
        .collect()
}
