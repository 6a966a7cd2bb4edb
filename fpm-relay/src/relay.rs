//! Starting, observing and stopping a relay.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fpm_schema::{Decoder, FpmSubject};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::buffer::Buffer;
use crate::config::RelayConfig;
use crate::ingest::ReaderState;
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
/// [`Relay::start`], then await [`Relay::wait`] (or [`Relay::finish`]).
#[derive(Debug)]
pub struct Relay {
    metrics: Arc<Metrics>,
    reader: Arc<ReaderState>,
    /// Cancelled when a stage dies (the ZeroMQ reader thread).
    failed: CancellationToken,
    task: JoinHandle<()>,
    publisher_id: u64,
    subject: String,
    metrics_addr: Option<SocketAddr>,
    record: Option<PathBuf>,
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// Runs a blocking filesystem call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

impl Relay {
    /// Connects to the engines and to NATS and starts relaying, until `shutdown` is cancelled
    /// or a stage dies (see [`Relay::stopped`]).
    ///
    /// Neither the engines nor NATS need to be up: ZeroMQ connects (and reconnects) in the
    /// background, and the NATS client retries forever while messages wait in the buffer.
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`Error`] for a configuration that cannot work: no or malformed endpoints (bad port,
    /// missing ipc directory), bad names, a malformed NATS URL or one whose host does not
    /// resolve, unusable credentials, a metrics address that cannot be bound, or a discovery
    /// directory that cannot be written.
    pub async fn start(config: RelayConfig, shutdown: CancellationToken) -> Result<Relay, Error> {
        if config.zmq_endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        if config.buffer.max_messages == 0 || config.buffer.max_bytes == 0 {
            return Err(Error::Config("the buffer limits must be above 0".into()));
        }
        if config.http_max_connections == 0 {
            return Err(Error::Config(
                "the HTTP connection cap must be above 0".into(),
            ));
        }
        let subject = FpmSubject::new(
            config.scope,
            &config.namespace,
            &config.component,
            &config.endpoint,
        )?;
        let eps = config.zmq_endpoints.clone();
        tokio::task::spawn_blocking(move || ingest::check_endpoints(&eps))
            .await
            .map_err(|e| Error::Config(format!("endpoint check task failed: {e}")))??;
        let metrics = Arc::new(Metrics::with_inputs(
            &config.zmq_endpoints,
            config.max_label_sets,
        ));
        let conn = Arc::new(Conn::default());
        let nats = match &config.plane {
            crate::EventPlane::Nats => {
                let (servers, options) = crate::nats::prepare(&config.nats).await?;
                let (m, c) = (metrics.clone(), conn.clone());
                let options = options.event_callback(move |event| {
                    c.on_event(&m, &event);
                    async {}
                });
                Some((servers, options))
            }
            crate::EventPlane::Memory(_) => None,
        };

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
        let inputs = ingest::connect(
            &ctx,
            &config.zmq_endpoints,
            config.zmq_rcvhwm,
            config.max_payload,
        )?;

        let publisher_id = config.publisher_id.unwrap_or_else(random_publisher_id);
        let record = match &config.discovery_dir {
            Some(dir) => match discovery::record(dir, &subject, publisher_id) {
                Some((path, json)) => {
                    let (p, j) = (path.clone(), json.clone());
                    blocking(move || discovery::write_atomic(&p, &j))
                        .await
                        .map_err(|error| Error::Discovery {
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

        let client = match (nats, &config.plane) {
            (Some((servers, options)), _) => match options.connect(servers).await {
                Ok(c) => crate::publish::Sink::Nats(c),
                Err(e) => {
                    if let Some((p, _)) = &record {
                        let p = p.clone();
                        let _ = blocking(move || std::fs::remove_file(p)).await;
                    }
                    return Err(Error::Nats(e.to_string()));
                }
            },
            (None, crate::EventPlane::Memory(tx)) => crate::publish::Sink::Memory(tx.clone()),
            (None, crate::EventPlane::Nats) => unreachable!("prepared above"),
        };

        let failed = CancellationToken::new();
        let buffer = Arc::new(Buffer::new(config.buffer, metrics.clone()));
        let reader = Arc::new(ReaderState::new());
        let (done_tx, done_rx) = oneshot::channel::<()>();
        {
            let cx = ingest::ReaderContext {
                buffer: buffer.clone(),
                metrics: metrics.clone(),
                decoder: Decoder::new().with_max_size(config.max_payload),
                cancel: shutdown.clone(),
                state: reader.clone(),
                panic_after: config.fault_panic_reader_after,
            };
            std::thread::Builder::new()
                .name("fpm-relay-zmq".into())
                .spawn({
                    let failed = failed.clone();
                    move || {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| ingest::run(inputs, &cx)));
                    let failure = match r {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e),
                        Err(p) => Some(panic_text(p.as_ref())),
                    };
                    cx.state.ended(failure.clone());
                    if let Some(f) = &failure {
                        error!(reason = %f, "the ZeroMQ reader died: nothing is read any more; /health reports it");
                        failed.cancel();
                    }
                    drop(ctx);
                    let _ = done_tx.send(());
                }})
                .map_err(|e| Error::Config(format!("cannot start the ZeroMQ thread: {e}")))?;
        }

        let http_cancel = CancellationToken::new();
        if let Some(l) = listener {
            let health = http::Health {
                metrics: metrics.clone(),
                reader: reader.clone(),
            };
            let limits = http::Limits {
                max_connections: config.http_max_connections,
                read_timeout: config.http_read_timeout,
            };
            tokio::spawn(http::serve(
                l,
                Arc::new(health),
                limits,
                http_cancel.clone(),
            ));
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
                            let (p, j) = (path.clone(), json.clone());
                            if let Err(e) = blocking(move || discovery::refresh(&p, &j)).await {
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
            endpoints = %config.zmq_endpoints.join(","),
            metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
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
            if let Some(p) = record_path {
                let shown = p.display().to_string();
                if let Err(e) = blocking(move || std::fs::remove_file(p)).await {
                    warn!(path = %shown, error = %e, "cannot remove the discovery record");
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
            reader,
            failed,
            task,
            publisher_id,
            subject: subject_str,
            metrics_addr,
            record: record.map(|(p, _)| p),
        })
    }

    /// Completes if a stage dies: the ZeroMQ reader thread panicked or ZeroMQ failed. The
    /// relay does not restart it: `/health` reports 503 from then on, and the owner should
    /// shut the relay down ([`Relay::finish`] then returns [`Error::ReaderDied`]) and let a
    /// supervisor start a new one. `fpm relay` does exactly that and exits 1.
    pub async fn failed(&self) {
        self.failed.cancelled().await;
    }

    /// Whether every stage is working: the ZeroMQ reader thread runs and NATS is connected
    /// (what `/health` reports).
    pub fn healthy(&self) -> bool {
        self.reader.alive() && self.metrics.connected.get() == 1
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

    /// Like [`Relay::wait`], but an error if the relay stopped because a stage died.
    ///
    /// # Errors
    /// [`Error::ReaderDied`] with the reason, when the ZeroMQ reader thread died.
    pub async fn finish(self) -> Result<Stats, Error> {
        let reader = self.reader.clone();
        let stats = self.wait().await;
        match reader.failure() {
            Some(f) => Err(Error::ReaderDied(f.to_owned())),
            None => Ok(stats),
        }
    }
}
