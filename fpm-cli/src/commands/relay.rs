//! `fpm relay`: engines' ZeroMQ PUB sockets → NATS, a drop-in for Dynamo's FpmEventRelay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fpm_relay::{BufferLimits, Relay, RelayConfig, Scope};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{parse_duration, shutdown_signal, NatsArgs};

/// Subject layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// `namespace.{ns}.component.{c}.endpoint.{e}.forward-pass-metrics` (Dynamo 1.6.1).
    Endpoint,
    /// `namespace.{ns}.component.{c}.forward-pass-metrics` (older Dynamo planners).
    Component,
}

/// Arguments of `fpm relay`.
#[derive(Debug, Args)]
#[command(after_help = "\
Engine endpoints (at least one way is required):
  --zmq-endpoint tcp://127.0.0.1:20380 --zmq-endpoint ipc:///tmp/fpm.0   any PUB, repeated
  --ipc-base ipc:///tmp/sglang_fpm --dp-ranks 0,1                       SGLang: {base}.{rank}
  --tcp-port-base 20380 --dp-size 2                                     vLLM/Dynamo: port base+rank

The relay may start before the engine and before NATS; it connects and reconnects by itself.
SIGINT/SIGTERM: stop reading, flush to NATS within --shutdown-timeout, remove the discovery
record, exit 0.")]
pub struct RelayArgs {
    /// An engine's ZeroMQ PUB endpoint to subscribe to (repeatable, or comma-separated).
    #[arg(
        long = "zmq-endpoint",
        env = "FPM_ZMQ_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub zmq_endpoints: Vec<String>,
    /// SGLang-style ipc base: one PUB per data-parallel rank at `{base}.{rank}`.
    #[arg(long, env = "FPM_IPC_BASE", value_name = "ipc://PATH")]
    pub ipc_base: Option<String>,
    /// Data-parallel ranks to read with --ipc-base.
    #[arg(
        long,
        env = "FPM_DP_RANKS",
        value_delimiter = ',',
        default_value = "0",
        value_name = "RANKS"
    )]
    pub dp_ranks: Vec<u32>,
    /// vLLM-style base port (Dynamo's DYN_FORWARDPASS_METRIC_PORT, usually 20380): rank r is
    /// read from tcp://{--tcp-host}:{base + r}.
    #[arg(long, env = "DYN_FORWARDPASS_METRIC_PORT", value_name = "PORT")]
    pub tcp_port_base: Option<u16>,
    /// Number of data-parallel ranks with --tcp-port-base.
    #[arg(long, env = "FPM_DP_SIZE", default_value_t = 1)]
    pub dp_size: u16,
    /// Host the engine's tcp PUB sockets are on, with --tcp-port-base.
    #[arg(long, env = "FPM_TCP_HOST", default_value = "127.0.0.1")]
    pub tcp_host: String,

    /// Dynamo namespace of the engine.
    #[arg(long, env = "DYN_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,
    /// Dynamo component of the engine.
    #[arg(long, env = "DYN_COMPONENT", default_value = "backend")]
    pub component: String,
    /// Dynamo endpoint of the engine (not used with --scope component).
    #[arg(long, env = "DYN_ENDPOINT", default_value = "generate")]
    pub endpoint: String,
    /// Subject layout: `endpoint` for Dynamo 1.6.1, `component` for older planners.
    #[arg(long, env = "FPM_SCOPE", value_enum, default_value = "endpoint")]
    pub scope: ScopeArg,

    /// How to reach NATS.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Most messages held while NATS is away; more are dropped and counted.
    #[arg(long, env = "FPM_RELAY_BUFFER_MESSAGES", default_value_t = 100_000)]
    pub buffer_messages: usize,
    /// Most payload bytes held while NATS is away; more are dropped and counted.
    #[arg(long, env = "FPM_RELAY_BUFFER_BYTES", default_value_t = 64 << 20)]
    pub buffer_bytes: usize,
    /// Largest FPM payload accepted, in bytes; larger ones are counted as invalid.
    #[arg(long, env = "FPM_MAX_PAYLOAD_BYTES", default_value_t = fpm_schema::DEFAULT_MAX_SIZE)]
    pub max_payload_bytes: usize,
    /// How long one NATS publish may take before the message is dropped (e.g. 2s, 500ms).
    #[arg(long, env = "FPM_RELAY_PUBLISH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub publish_timeout: Duration,
    /// How long shutdown may take to flush buffered messages to NATS (e.g. 5s).
    #[arg(long, env = "FPM_RELAY_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Where to serve /metrics, /health and /live; `off` disables. Default:
    /// 127.0.0.1:$DYN_SYSTEM_PORT when that is set, else 127.0.0.1:9091.
    #[arg(long, env = "FPM_METRICS_ADDR", value_name = "ADDR|off")]
    pub metrics_addr: Option<String>,
    /// The engine's own Prometheus endpoint (e.g. SGLang's http://127.0.0.1:30000/metrics);
    /// repeatable or comma-separated. Fetched on every scrape of /metrics: its families
    /// named with an allowed prefix are served after the relay's, so one scrape per worker
    /// sees both (as Dynamo's workers serve `dynamo_*` and the engine's metrics together).
    #[arg(
        long,
        env = "FPM_ENGINE_METRICS",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub engine_metrics: Vec<String>,
    /// Which of the engine's families pass through: names starting with one of these
    /// (repeatable or comma-separated).
    #[arg(
        long,
        env = "FPM_ENGINE_METRICS_PREFIX",
        value_name = "PREFIX",
        value_delimiter = ',',
        default_value = "sglang:,vllm:,trtllm_"
    )]
    pub engine_metrics_prefix: Vec<String>,
    /// How long a scrape of /metrics waits for the engines before answering without them
    /// (counted in fpm_relay_engine_scrape_errors_total{reason="timeout"}).
    #[arg(long, env = "FPM_ENGINE_METRICS_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub engine_metrics_timeout: Duration,
    /// Dynamo file-discovery root: write the EventChannel record there (refreshed every 3 s,
    /// removed on shutdown). Not needed by Dynamo's subscriber in recv or tracking mode.
    #[arg(long, env = "DYN_FILE_KV", value_name = "DIR")]
    pub discovery_dir: Option<PathBuf>,
    /// No longer used (accepted so that old command lines still start): the relay reads the
    /// engines' sockets itself, and its buffer (`--buffer-messages`, `--buffer-bytes`) is the
    /// bound.
    #[arg(long, hide = true)]
    pub zmq_rcvhwm: Option<i32>,
    /// Fault injection for tests: the ZeroMQ input panics after this many messages.
    #[arg(long, hide = true)]
    pub fault_panic_reader_after: Option<u64>,

    /// Ids of the input arguments whose value came from the environment (filled by
    /// [`crate::parse`], for the log line saying where the inputs came from).
    #[arg(skip)]
    pub from_env: Vec<&'static str>,
}

/// Where one group of inputs came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputGroup {
    /// The endpoints.
    pub endpoints: Vec<String>,
    /// `flag --zmq-endpoint`, `environment DYN_FORWARDPASS_METRIC_PORT=20380`, ...
    pub source: String,
}

impl RelayArgs {
    /// Turns the arguments into a relay configuration.
    ///
    /// # Errors
    /// A message saying which flag to fix.
    pub fn to_config(&self) -> Result<RelayConfig> {
        let endpoints: Vec<String> = self
            .inputs()?
            .into_iter()
            .flat_map(|g| g.endpoints)
            .collect();
        for e in &endpoints {
            if !(e.starts_with("tcp://") || e.starts_with("ipc://")) {
                bail!("ZeroMQ endpoint {e:?} is not usable: use tcp://HOST:PORT or ipc:///path");
            }
        }
        let mut c = RelayConfig::new(endpoints);
        c.namespace.clone_from(&self.namespace);
        c.component.clone_from(&self.component);
        c.endpoint.clone_from(&self.endpoint);
        c.scope = match self.scope {
            ScopeArg::Endpoint => Scope::Endpoint,
            ScopeArg::Component => Scope::Component,
        };
        c.nats = self.nats.to_config("fpm-relay")?;
        c.buffer = BufferLimits {
            max_messages: self.buffer_messages,
            max_bytes: self.buffer_bytes,
        };
        c.max_payload = self.max_payload_bytes;
        c.publish_timeout = self.publish_timeout;
        c.shutdown_timeout = self.shutdown_timeout;
        c.metrics_addr = match self.metrics_addr.as_deref() {
            Some("off" | "none" | "") => None,
            Some(a) => Some(a.parse::<SocketAddr>().with_context(|| {
                format!("--metrics-addr {a:?} is not an address: use HOST:PORT, e.g. 127.0.0.1:9091, or off")
            })?),
            None => {
                let port = match std::env::var("DYN_SYSTEM_PORT") {
                    Ok(p) if !p.is_empty() => p
                        .parse::<u16>()
                        .with_context(|| format!("DYN_SYSTEM_PORT={p:?} is not a port"))?,
                    _ => 9091,
                };
                Some(SocketAddr::from(([127, 0, 0, 1], port)))
            }
        };
        c.discovery_dir = self
            .discovery_dir
            .clone()
            .filter(|d| !d.as_os_str().is_empty());
        c.engine_metrics = self
            .engine_metrics
            .iter()
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        c.engine_metrics_prefixes = self
            .engine_metrics_prefix
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        c.engine_metrics_timeout = self.engine_metrics_timeout;
        if !c.engine_metrics.is_empty() && c.metrics_addr.is_none() {
            bail!("--engine-metrics needs /metrics: drop --metrics-addr off");
        }
        if self.zmq_rcvhwm.is_some() {
            tracing::warn!("--zmq-rcvhwm has no effect any more: the relay's buffer (--buffer-messages, --buffer-bytes) bounds what waits");
        }
        c.fault_panic_reader_after = self.fault_panic_reader_after;
        Ok(c)
    }

    /// The engine endpoints, grouped by the argument that gave them and where its value came
    /// from (flag or environment).
    ///
    /// # Errors
    /// A message saying which flag to fix.
    pub fn inputs(&self) -> Result<Vec<InputGroup>> {
        let source = |id: &str, flag: &str, env: &str, value: &dyn std::fmt::Display| {
            if self.from_env.contains(&id) {
                format!("environment {env}={value}")
            } else {
                format!("flag {flag} {value}")
            }
        };
        let mut groups = Vec::new();
        if !self.zmq_endpoints.is_empty() {
            groups.push(InputGroup {
                endpoints: self.zmq_endpoints.clone(),
                source: source(
                    "zmq_endpoints",
                    "--zmq-endpoint",
                    "FPM_ZMQ_ENDPOINTS",
                    &self.zmq_endpoints.join(","),
                ),
            });
        }
        if let Some(base) = &self.ipc_base {
            groups.push(InputGroup {
                endpoints: fpm_relay::ipc_endpoints(base, &self.dp_ranks),
                source: source("ipc_base", "--ipc-base", "FPM_IPC_BASE", base),
            });
        }
        if let Some(port) = self.tcp_port_base {
            if u32::from(port) + u32::from(self.dp_size) > 65536 || self.dp_size == 0 {
                bail!(
                    "--tcp-port-base {port} with --dp-size {} gives ports outside 1..65535",
                    self.dp_size
                );
            }
            groups.push(InputGroup {
                endpoints: fpm_relay::tcp_endpoints(&self.tcp_host, port, self.dp_size),
                source: source(
                    "tcp_port_base",
                    "--tcp-port-base",
                    "DYN_FORWARDPASS_METRIC_PORT",
                    &port,
                ),
            });
        }
        Ok(groups)
    }

    /// Records which input arguments took their value from the environment.
    pub fn note_sources(&mut self, matches: &clap::ArgMatches) {
        for id in ["zmq_endpoints", "ipc_base", "tcp_port_base"] {
            if matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable) {
                self.from_env.push(id);
            }
        }
    }
}

/// Runs the relay until SIGINT or SIGTERM.
///
/// # Errors
/// A startup error saying what to fix.
pub fn relay(args: RelayArgs) -> Result<()> {
    let config = args.to_config()?;
    let inputs = args.inputs()?;
    // The data path has its own thread (`fpm-relay-data`); what runs here (HTTP endpoints,
    // discovery, engine-metrics scrapes, signals) is light: one thread, the main one, is
    // enough, and every thread costs memory (issue 10's RSS budget).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let signal = shutdown_signal()?;
        let shutdown = CancellationToken::new();
        let relay = Relay::start(config, shutdown.clone()).await?;
        for g in &inputs {
            info!(
                endpoints = %g.endpoints.join(","),
                source = %g.source,
                "reading engine inputs"
            );
        }
        tokio::select! {
            () = signal => info!("shutting down"),
            () = relay.failed() => {}
        }
        shutdown.cancel();
        relay.finish().await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<RelayArgs, clap::Error> {
        use clap::Parser;
        let mut argv = vec!["fpm", "relay"];
        argv.extend_from_slice(extra);
        match crate::Cli::try_parse_from(argv)?.command {
            crate::Command::Relay(a) => Ok(*a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn endpoint_layouts_and_names() {
        let a = args(&[
            "--zmq-endpoint",
            "tcp://10.0.0.1:5555",
            "--ipc-base",
            "ipc:///tmp/sgl",
            "--dp-ranks",
            "0,3",
            "--tcp-port-base",
            "20380",
            "--dp-size",
            "2",
            "--namespace",
            "ns",
            "--component",
            "c",
            "--endpoint",
            "e",
            "--scope",
            "component",
            "--nats-url",
            "nats://n:4222",
            "--metrics-addr",
            "off",
            "--buffer-messages",
            "10",
            "--buffer-bytes",
            "1000",
            "--shutdown-timeout",
            "750ms",
        ])
        .unwrap();
        let c = a.to_config().unwrap();
        assert_eq!(
            c.zmq_endpoints,
            [
                "tcp://10.0.0.1:5555",
                "ipc:///tmp/sgl.0",
                "ipc:///tmp/sgl.3",
                "tcp://127.0.0.1:20380",
                "tcp://127.0.0.1:20381"
            ]
        );
        assert_eq!(
            (
                c.namespace.as_str(),
                c.component.as_str(),
                c.endpoint.as_str()
            ),
            ("ns", "c", "e")
        );
        assert_eq!(c.scope, Scope::Component);
        assert_eq!(c.nats.url, "nats://n:4222");
        assert_eq!(c.metrics_addr, None);
        assert_eq!(
            c.buffer,
            BufferLimits {
                max_messages: 10,
                max_bytes: 1000
            }
        );
        assert_eq!(c.shutdown_timeout, Duration::from_millis(750));
    }

    #[test]
    fn nats_tls_is_still_a_plain_flag() {
        let on = args(&["--zmq-endpoint", "tcp://h:1", "--nats-tls"]).unwrap();
        assert!(on.to_config().unwrap().nats.require_tls);
        let off = args(&["--zmq-endpoint", "tcp://h:1"]).unwrap();
        assert!(
            !off.to_config().unwrap().nats.require_tls
                || std::env::var_os("FPM_NATS_TLS").is_some()
        );
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        let e = args(&["--zmq-endpoint", "localhost:5555"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(format!("{e:#}").contains("tcp://HOST:PORT"), "{e:#}");
        let e = args(&["--zmq-endpoint", "tcp://h:1", "--metrics-addr", "nine"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(format!("{e:#}").contains("--metrics-addr"), "{e:#}");
        let e = args(&["--tcp-port-base", "65535", "--dp-size", "2"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(format!("{e:#}").contains("--dp-size"), "{e:#}");
        let e = args(&["--zmq-endpoint", "tcp://h:1", "--nats-nkey", "not-a-seed"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(format!("{e:#}").contains("seed"), "{e:#}");
        assert!(
            args(&["--nats-user", "u"]).is_err(),
            "user needs a password"
        );
        assert!(args(&["--scope", "galaxy"]).is_err());
        let a = args(&[
            "--zmq-endpoint",
            "tcp://h:1",
            "--nats-user",
            "u",
            "--nats-password",
            "p",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        let c = a.to_config().unwrap();
        assert_eq!(format!("{:?}", c.nats.auth), "UserPassword(\"u\", ***)");
    }
}
