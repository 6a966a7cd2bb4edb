//! Emitter configuration.

use std::time::Duration;

use crate::error::EmitterError;

/// Default port base of Dynamo's vLLM scheduler (`DYN_FORWARDPASS_METRIC_PORT`).
pub const DEFAULT_TCP_PORT_BASE: u16 = 20380;

/// Environment variable Dynamo uses for the TCP port base.
pub const PORT_ENV: &str = "DYN_FORWARDPASS_METRIC_PORT";

/// Where the emitter binds its publisher socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// SGLang's layout: an `ipc://` base, published at `{base}.{dp_rank}`.
    IpcBase(String),
    /// Dynamo's vLLM layout: `tcp://{host}:{port_base + dp_rank}` (host `*` binds all
    /// interfaces; relays connect to `127.0.0.1`).
    TcpPortBase {
        /// Interface to bind (`*`, `127.0.0.1`, ...).
        host: String,
        /// Port of dp rank 0.
        port_base: u16,
    },
    /// Exactly this ZeroMQ address, whatever the rank.
    Exact(String),
}

impl Endpoint {
    /// TCP on all interfaces at the port base from `DYN_FORWARDPASS_METRIC_PORT`, or 20380.
    ///
    /// # Errors
    /// [`EmitterError::Config`] if the variable is set but not a port number.
    pub fn tcp_from_env() -> Result<Self, EmitterError> {
        let port_base = match std::env::var(PORT_ENV) {
            Ok(v) => v.trim().parse().map_err(|_| {
                EmitterError::Config(format!("{PORT_ENV}={v:?} is not a port number"))
            })?,
            Err(_) => DEFAULT_TCP_PORT_BASE,
        };
        Ok(Endpoint::TcpPortBase {
            host: "*".into(),
            port_base,
        })
    }

    /// Parses a command-line form: `ipc://PATH` (a base), `tcp://HOST:PORT` (a port base), or a
    /// bare port number (a port base on all interfaces).
    ///
    /// # Errors
    /// [`EmitterError::Config`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self, EmitterError> {
        if let Some(path) = s.strip_prefix("ipc://") {
            if path.is_empty() {
                return Err(EmitterError::Config("ipc:// endpoint has no path".into()));
            }
            return Ok(Endpoint::IpcBase(s.to_owned()));
        }
        let (host, port) = match s.strip_prefix("tcp://") {
            Some(rest) => rest
                .rsplit_once(':')
                .ok_or_else(|| EmitterError::Config(format!("{s:?}: expected tcp://HOST:PORT")))?,
            None => ("*", s),
        };
        let port_base = port.parse().map_err(|_| {
            EmitterError::Config(format!(
                "{s:?}: expected ipc://PATH, tcp://HOST:PORT or a port number"
            ))
        })?;
        Ok(Endpoint::TcpPortBase {
            host: host.to_owned(),
            port_base,
        })
    }

    /// The address the publisher of `dp_rank` binds.
    ///
    /// # Errors
    /// [`EmitterError::Config`] if `port_base + dp_rank` is not a valid port.
    pub fn bind_address(&self, dp_rank: u32) -> Result<String, EmitterError> {
        Ok(match self {
            Endpoint::IpcBase(base) => format!("{base}.{dp_rank}"),
            Endpoint::TcpPortBase { host, port_base } => {
                let port = u16::try_from(*port_base as u32 + dp_rank).map_err(|_| {
                    EmitterError::Config(format!("port {port_base} + dp rank {dp_rank} > 65535"))
                })?;
                format!("tcp://{host}:{port}")
            }
            Endpoint::Exact(addr) => addr.clone(),
        })
    }
}

/// Which clock times iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockChoice {
    /// CUDA events when the `cuda` feature is built and a GPU is present, otherwise the CPU
    /// clock (logged, and reported by `stats().clock`).
    #[default]
    Auto,
    /// Always the CPU monotonic clock.
    Cpu,
    /// CUDA events or fail to start.
    Cuda,
}

/// Everything the emitter needs to start.
#[derive(Debug, Clone)]
pub struct EmitterConfig {
    /// Where to publish.
    pub endpoint: Endpoint,
    /// The engine's identity, stamped on every message.
    pub worker_id: String,
    /// Data-parallel rank: picks the socket address and is stamped on every message.
    pub dp_rank: u32,
    /// Submissions waiting for the publisher thread, at most (upstream uses 10,000). A full
    /// queue drops the submission and counts it.
    pub queue_capacity: usize,
    /// How often an idle engine sends an all-zero heartbeat.
    pub heartbeat_interval: Duration,
    /// Clock choice.
    pub clock: ClockChoice,
    /// The CUDA device whose primary context the timing events are created in. `None` (the
    /// default): the context current on the thread that starts the emitter (the engine's
    /// scheduler thread, after `torch.cuda.set_device(rank)`), or device 0's primary context
    /// when none is current. The engine's streams must belong to that context; a stream of
    /// another is counted (`timing_unavailable`) and logged at ERROR.
    pub cuda_device: Option<u32>,
    /// CUDA event pairs created up front: iterations whose GPU work is still running, at most.
    pub cuda_event_pairs: usize,
    /// ZeroMQ per-subscriber send queue limit.
    pub send_hwm: i32,
    /// The first wait before polling a timing still running on the GPU again (positive). Each
    /// poll that finds it still running doubles the wait, up to `max_poll_interval`; a
    /// completion resets it. So a message waits at most `max_poll_interval` past its GPU
    /// work's end, and a long iteration costs a handful of wake-ups, not one per interval.
    pub poll_interval: Duration,
    /// The longest wait between polls of a pending timing (at least `poll_interval`).
    pub max_poll_interval: Duration,
    /// At start-up, how long messages wait for the first subscriber (the relay usually
    /// connects a moment after the engine binds): until one is there they are held, in
    /// order, up to `queue_capacity` of them, and sent when it subscribes. Past this window,
    /// or once a first message was delivered, a message with no subscriber is dropped and
    /// counted `no_subscriber`. Zero disables holding.
    pub first_subscriber_wait: Duration,
}

/// Most iterations the submission queue can hold (2^20: its slots are allocated up front).
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;
/// Longest wait or interval accepted in a configuration (a day).
const MAX_WAIT: Duration = Duration::from_secs(86_400);

impl EmitterConfig {
    /// Defaults for everything but the endpoint and identity.
    pub fn new(endpoint: Endpoint, worker_id: impl Into<String>, dp_rank: u32) -> Self {
        EmitterConfig {
            endpoint,
            worker_id: worker_id.into(),
            dp_rank,
            queue_capacity: 10_000,
            heartbeat_interval: Duration::from_secs(1),
            clock: ClockChoice::Auto,
            cuda_device: None,
            cuda_event_pairs: 1024,
            send_hwm: 100_000,
            poll_interval: Duration::from_micros(100),
            max_poll_interval: Duration::from_millis(1),
            first_subscriber_wait: Duration::from_secs(10),
        }
    }

    /// Sets the clock choice.
    pub fn with_clock(mut self, clock: ClockChoice) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the queue capacity.
    pub fn with_queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n;
        self
    }

    /// Sets the heartbeat interval.
    pub fn with_heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), EmitterError> {
        if self.first_subscriber_wait > MAX_WAIT || self.heartbeat_interval > MAX_WAIT {
            return Err(EmitterError::Config(format!(
                "the first-subscriber wait and the heartbeat interval must be at most {MAX_WAIT:?}"
            )));
        }
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(EmitterError::Config(format!(
                "queue capacity must be 1 to {MAX_QUEUE_CAPACITY} (its slots are allocated up front), got {}",
                self.queue_capacity
            )));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(EmitterError::Config(
                "heartbeat interval must be positive".into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(EmitterError::Config(
                "poll interval must be positive (zero would spin the publisher thread)".into(),
            ));
        }
        if self.max_poll_interval < self.poll_interval {
            return Err(EmitterError::Config(format!(
                "max_poll_interval ({:?}) must be at least poll_interval ({:?})",
                self.max_poll_interval, self.poll_interval
            )));
        }
        if self.cuda_event_pairs == 0 {
            return Err(EmitterError::Config(
                "cuda_event_pairs must be at least 1".into(),
            ));
        }
        self.endpoint.bind_address(self.dp_rank)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("ipc:///tmp/fpm").unwrap();
        assert_eq!(e.bind_address(3).unwrap(), "ipc:///tmp/fpm.3");
        let e = Endpoint::parse("tcp://127.0.0.1:20380").unwrap();
        assert_eq!(e.bind_address(2).unwrap(), "tcp://127.0.0.1:20382");
        let e = Endpoint::parse("5000").unwrap();
        assert_eq!(e.bind_address(0).unwrap(), "tcp://*:5000");
        assert!(Endpoint::parse("tcp://nohost").is_err());
        assert!(Endpoint::parse("ipc://").is_err());
        assert!(Endpoint::parse("65535").unwrap().bind_address(1).is_err());
    }

    #[test]
    fn tcp_port_base_from_dynamo_env() {
        // The only test that touches this variable.
        std::env::set_var(PORT_ENV, "31000");
        let e = Endpoint::tcp_from_env().unwrap();
        assert_eq!(e.bind_address(2).unwrap(), "tcp://*:31002");
        std::env::set_var(PORT_ENV, "not-a-port");
        assert!(Endpoint::tcp_from_env().is_err());
        std::env::remove_var(PORT_ENV);
        assert_eq!(
            Endpoint::tcp_from_env().unwrap().bind_address(0).unwrap(),
            "tcp://*:20380"
        );
    }
}
