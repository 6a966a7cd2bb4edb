//! Starting, observing and stopping a relay.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::ServerAddr;
use fpm_schema::{Decoder, FpmSubject};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::buffer::Buffer;
use crate::config::{NatsAuth, NatsConfig, RelayConfig};
use crate::metrics::{Metrics, Stats};
use crate::publish::{Conn, Publisher};
use crate::{discovery, http, ingest, Error};

/// 64 random bits from the standard library's randomly seeded hasher (no extra dependency).
pub(crate) fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A random publisher id in `1..2^53`, like Dynamo's.
fn random_publisher_id() -> u64 {
    loop {
        let id = random_u64() & ((1 << 53) - 1);
        if id != 0 {
            return id;
        }
    }
}

/// A running relay. Dropping it does not stop it: cancel the token given to
/// [`Relay::start`], then await [`Relay::wait`].
#[derive(Debug)]
pub struct Relay {
    metrics: Arc<Metrics>,
    task: JoinHandle<()>,
    publisher_id: u64,
    subject: String,
    metrics_addr: Option<SocketAddr>,
    record: Option<PathBuf>,
}

fn parse_urls(url: &str) -> Result<Vec<ServerAddr>, Error> {
    let addrs: Vec<ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            ServerAddr::from_str(s).map_err(|e| Error::NatsUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(Error::NatsUrl {
            url: url.to_owned(),
            reason: "empty".into(),
        });
    }
    Ok(addrs)
}

async fn connect_options(
    cfg: &NatsConfig,
    metrics: &Arc<Metrics>,
    conn: &Arc<Conn>,
) -> Result<async_nats::ConnectOptions, Error> {
    let mut o = async_nats::ConnectOptions::new();
    o = match &cfg.auth {
        NatsAuth::None => o,
        NatsAuth::UserPassword { user, password } => {
            o.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(t) => o.token(t.clone()),
        NatsAuth::CredsFile(p) => o.credentials_file(p).await.map_err(|e| {
            Error::Credentials(format!(
                "cannot read the creds file {} ({e}): check --nats-creds",
                p.display()
            ))
        })?,
        NatsAuth::NkeySeed(seed) => {
            if !seed.starts_with('S') {
                return Err(Error::Credentials(
                    "the nkey seed must start with 'S' (a user seed is 'SU...'): check --nats-nkey"
                        .into(),
                ));
            }
            o.nkey(seed.clone())
        }
    };
    for p in cfg
        .tls_ca
        .iter()
        .chain(cfg.tls_client.iter().flat_map(|(c, k)| [c, k]))
    {
        if !p.is_file() {
            return Err(Error::Credentials(format!(
                "TLS file {} does not exist: check --nats-tls-ca / --nats-tls-cert / --nats-tls-key",
                p.display()
            )));
        }
    }
    if let Some(ca) = &cfg.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &cfg.tls_client {
        o = o
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if cfg.require_tls {
        o = o.require_tls(true);
    }
    let max = cfg.reconnect_delay_max;
    let (m, c) = (metrics.clone(), conn.clone());
    Ok(o.name(&cfg.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            if attempts <= 1 {
                Duration::ZERO
            } else {
                let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
                (Duration::from_millis(50) * 2u32.pow(exp)).min(max)
            }
        })
        .event_callback(move |event| {
            c.on_event(&m, &event);
            async {}
        }))
}

impl Relay {
    /// Connects to the engines and to NATS and starts relaying, until `shutdown` is cancelled.
    ///
    /// Neither the engines nor NATS need to be up: ZeroMQ connects (and reconnects) in the
    /// background, and the NATS client retries forever while messages wait in the buffer.
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`Error`] for a configuration that cannot work: no or malformed endpoints, bad names,
    /// a malformed NATS URL, unreadable credentials, a metrics address that cannot be bound,
    /// or a discovery directory that cannot be written.
    pub async fn start(config: RelayConfig, shutdown: CancellationToken) -> Result<Relay, Error> {
        if config.zmq_endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        if config.buffer.max_messages == 0 || config.buffer.max_bytes == 0 {
            return Err(Error::Config("the buffer limits must be above 0".into()));
        }
        let subject = FpmSubject::new(
            config.scope,
            &config.namespace,
            &config.component,
            &config.endpoint,
        )?;
        let servers = parse_urls(&config.nats.url)?;
        let metrics = Arc::new(Metrics::new());
        let conn = Arc::new(Conn::default());
        let options = connect_options(&config.nats, &metrics, &conn).await?;

        let listener = match config.metrics_addr {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|error| {
                Error::MetricsBind {
                    addr: addr.to_string(),
                    error,
                }
            })?),
            None => None,
        };
        let metrics_addr = listener.as_ref().and_then(|l| l.local_addr().ok());

        let ctx = zmq::Context::new();
        let sockets = ingest::connect(&ctx, &config.zmq_endpoints, config.zmq_rcvhwm)?;

        let publisher_id = config.publisher_id.unwrap_or_else(random_publisher_id);
        let record = match &config.discovery_dir {
            Some(dir) => match discovery::record(dir, &subject, publisher_id) {
                Some((path, json)) => {
                    discovery::write_atomic(&path, &json).map_err(|error| Error::Discovery {
                        dir: dir.clone(),
                        error,
                    })?;
                    Some((path, json))
                }
                None => {
                    warn!("component scope: no discovery record is written (Dynamo 1.6.1 records are endpoint-scoped)");
                    None
                }
            },
            None => None,
        };

        let client = match options.connect(servers).await {
            Ok(c) => c,
            Err(e) => {
                if let Some((p, _)) = &record {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::Nats(e.to_string()));
            }
        };

        let buffer = Arc::new(Buffer::new(config.buffer, metrics.clone()));
        let (done_tx, done_rx) = oneshot::channel::<()>();
        {
            let (buffer, metrics, cancel) = (buffer.clone(), metrics.clone(), shutdown.clone());
            let decoder = Decoder::new().with_max_size(config.max_payload);
            std::thread::Builder::new()
                .name("fpm-relay-zmq".into())
                .spawn(move || {
                    ingest::run(sockets, buffer, metrics, decoder, cancel);
                    drop(ctx);
                    let _ = done_tx.send(());
                })
                .map_err(|e| Error::Config(format!("cannot start the ZeroMQ thread: {e}")))?;
        }

        let http_cancel = CancellationToken::new();
        if let Some(l) = listener {
            tokio::spawn(http::serve(l, metrics.clone(), http_cancel.clone()));
        }
        let refresh = record.clone().map(|(path, json)| {
            let cancel = shutdown.clone();
            let every = config.discovery_refresh.max(Duration::from_millis(10));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {
                            if let Err(e) = discovery::refresh(&path, &json) {
                                warn!(path = %path.display(), error = %e, "cannot refresh the discovery record");
                            }
                        }
                    }
                }
            })
        });

        let subject_str = subject.subject();
        info!(
            subject = %subject_str,
            publisher_id,
            endpoints = ?config.zmq_endpoints,
            metrics = ?metrics_addr,
            "relay started"
        );
        let mut publisher = Publisher {
            client,
            subject: subject_str.clone().into(),
            publisher_id,
            buffer,
            metrics: metrics.clone(),
            conn,
            publish_timeout: config.publish_timeout,
            sequence: 0,
        };
        let shutdown_timeout = config.shutdown_timeout;
        let record_path = record.as_ref().map(|(p, _)| p.clone());
        let task = tokio::spawn(async move {
            publisher.run(&shutdown).await;
            // The ZeroMQ thread notices the token within one poll interval.
            let deadline = tokio::time::Instant::now() + shutdown_timeout;
            let _ = tokio::time::timeout_at(deadline, done_rx).await;
            publisher.drain(deadline).await;
            if let Some(r) = refresh {
                let _ = r.await;
            }
            if let Some(p) = &record_path {
                if let Err(e) = std::fs::remove_file(p) {
                    warn!(path = %p.display(), error = %e, "cannot remove the discovery record");
                }
            }
            http_cancel.cancel();
            let s = publisher.metrics.stats();
            info!(
                received = s.received,
                published = s.published,
                dropped = s.dropped.total(),
                invalid = s.invalid.total(),
                "relay stopped"
            );
        });
        Ok(Relay {
            metrics,
            task,
            publisher_id,
            subject: subject_str,
            metrics_addr,
            record: record.map(|(p, _)| p),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.metrics.stats()
    }

    /// The metrics in OpenMetrics text format (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    /// The envelope's `publisher_id` (also the discovery record's `instance_id`).
    pub fn publisher_id(&self) -> u64 {
        self.publisher_id
    }

    /// The NATS subject published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Where `/metrics` is served (with the actual port when port 0 was asked for).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The discovery record's path, when one was written.
    pub fn discovery_record(&self) -> Option<&Path> {
        self.record.as_deref()
    }

    /// Waits until the relay has stopped: after the shutdown token fired, reading stopped,
    /// the buffer was flushed (or the shutdown timeout expired) and the discovery record
    /// was removed. Returns the final counters.
    pub async fn wait(self) -> Stats {
        let _ = self.task.await;
        self.metrics.stats()
    }
}
