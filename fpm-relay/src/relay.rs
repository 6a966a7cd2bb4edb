//! Starting, observing and stopping a relay.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
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
use crate::publish::{Conn, Forwarder, Sink};
use crate::{discovery, http, ingest, Error};

/// 64 random bits from `rand`'s thread-local generator (seeded from the operating system).
pub(crate) fn random_u64() -> u64 {
    rand::random()
}

/// A random publisher id in `1..2^53`, like Dynamo's.
fn random_publisher_id() -> u64 {
    rand::random_range(1..1 << 53)
}

#[cfg(test)]
mod random_tests {
    #[test]
    fn publisher_ids_are_in_range_and_differ() {
        let ids: std::collections::HashSet<u64> =
            (0..1000).map(|_| super::random_publisher_id()).collect();
        assert_eq!(ids.len(), 1000, "1000 draws from 2^53 values repeated one");
        assert!(ids.iter().all(|id| (1..1 << 53).contains(id)));
        assert_ne!(super::random_u64(), super::random_u64());
    }
}

/// A running relay. Dropping it does not stop it: cancel the token given to
/// [`Relay::start`], then await [`Relay::wait`] (or [`Relay::finish`]).
#[derive(Debug)]
pub struct Relay {
    metrics: Arc<Metrics>,
    reader: Arc<ReaderState>,
    /// Cancelled when a stage dies (an input task, or the data thread).
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

/// Where the data thread publishes; the NATS client is connected on that thread so that its
/// connection task runs there too.
enum SinkSpec {
    Nats(Vec<async_nats::ServerAddr>, Box<async_nats::ConnectOptions>),
    Memory(crate::MemoryPlane),
}

/// The relay's data path: every input task, the publisher and the NATS client's connection,
/// on one thread with a single-threaded runtime, so a message wakes one thread, once.
struct DataPath {
    endpoints: Vec<String>,
    cx: Arc<ingest::ReaderContext>,
    sink: SinkSpec,
    subject: async_nats::Subject,
    publisher_id: u64,
    conn: Arc<Conn>,
    publish_timeout: Duration,
    shutdown_timeout: Duration,
    failed: CancellationToken,
    on_start: Option<fn()>,
    panic_publisher_after: Option<u64>,
}

impl DataPath {
    /// Starts the thread and waits until it is connected (or failed to); returns what
    /// completes when it is done.
    async fn start(self) -> Result<oneshot::Receiver<()>, Error> {
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), Error>>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("fpm-relay-data".into())
            .spawn(move || self.run(ready_tx, done_tx))
            .map_err(|source| Error::Internal {
                what: "cannot start the relay's data thread",
                source,
            })?;
        ready_rx.await.unwrap_or_else(|_| {
            Err(Error::ReaderDied(
                "the relay's data thread died while starting".into(),
            ))
        })?;
        Ok(done_rx)
    }

    /// The thread body: reports start-up on `ready`, runs until shutdown, drains, then
    /// signals `done`.
    fn run(self, ready: oneshot::Sender<Result<(), Error>>, done: oneshot::Sender<()>) {
        if let Some(f) = self.on_start {
            f();
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(Error::Internal {
                    what: "cannot start the relay's runtime",
                    source: e,
                }));
                return;
            }
        };
        let (state, failed) = (self.cx.state.clone(), self.failed.clone());
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(self.serve(ready))));
        if let Err(p) = r {
            let f = panic_text(p.as_ref());
            error!(reason = %f, "the relay's data thread died");
            state.ended(Some(f));
            failed.cancel();
        }
        drop(rt);
        let _ = done.send(());
    }

    async fn serve(self, ready: oneshot::Sender<Result<(), Error>>) {
        let client = match self.sink {
            SinkSpec::Nats(servers, options) => match (*options).connect(servers).await {
                Ok(c) => Sink::Nats(c),
                Err(e) => {
                    let _ = ready.send(Err(Error::Nats(e)));
                    return;
                }
            },
            SinkSpec::Memory(tx) => Sink::Memory(tx),
        };
        let _ = ready.send(Ok(()));
        let cx = self.cx;
        let shutdown = cx.cancel.clone();
        let publisher = Forwarder {
            sink: client,
            subject: self.subject,
            publisher_id: self.publisher_id,
            buffer: cx.buffer.clone(),
            metrics: cx.metrics.clone(),
            conn: self.conn,
            publish_timeout: self.publish_timeout,
            sequence: 0,
            scratch: Vec::new(),
            arena: bytes::BytesMut::new(),
            panic_after: self.panic_publisher_after,
        };
        let mut inputs = tokio::task::JoinSet::new();
        for (i, ep) in self.endpoints.into_iter().enumerate() {
            inputs.spawn(ingest::run(i, ep, cx.clone()));
        }
        let beat = {
            let cx = cx.clone();
            async move {
                loop {
                    cx.state.beat();
                    tokio::select! {
                        biased;
                        () = cx.cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let failed = self.failed;
        let supervise = async {
            while let Some(r) = inputs.join_next().await {
                if let Err(e) = r {
                    let f = if e.is_panic() {
                        panic_text(e.into_panic().as_ref())
                    } else {
                        e.to_string()
                    };
                    error!(reason = %f, "a ZeroMQ input died: its engine is not read any more; /health reports it");
                    cx.state.ended(Some(f));
                    failed.cancel();
                }
            }
        };
        // The publisher is a task of its own rather than part of this (block_on) future: a
        // woken block_on future costs the runtime an extra poll of the driver per message.
        let mut publishing = tokio::spawn(async move {
            let mut publisher = publisher;
            publisher.run(&shutdown).await;
            publisher
        });
        tokio::spawn(beat);
        let mut supervise = std::pin::pin!(supervise);
        // The publisher ends at shutdown, or earlier if it panics: then /health turns 503 and
        // the owner is told, while the inputs go on (and the buffer's limits count what no
        // longer leaves) until shutdown.
        let (published, deadline) = tokio::select! {
            () = &mut supervise => {
                let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
                (publishing.await, deadline)
            }
            r = &mut publishing => {
                if let Err(e) = &r {
                    let f = if e.is_panic() { "the NATS publisher panicked".to_owned() } else { e.to_string() };
                    error!(reason = %f, "the NATS publisher died: nothing is published any more; /health reports it");
                    cx.state.ended(Some(f));
                    failed.cancel();
                }
                supervise.await;
                (r, tokio::time::Instant::now() + self.shutdown_timeout)
            }
        };
        cx.state.ended(None);
        match published {
            Ok(mut publisher) => publisher.drain(deadline).await,
            Err(_) => {
                let left = cx.buffer.clear();
                cx.metrics
                    .drop_msgs(crate::metrics::RelayDropReason::Shutdown, left);
            }
        }
    }
}

/// Largest payload limit accepted (a message is held whole while it is read).
const MAX_PAYLOAD_LIMIT: usize = 64 << 20;

/// The checks that need no network: limits, names, endpoints. Returns the subject.
async fn check_config(config: &RelayConfig) -> Result<FpmSubject, Error> {
    if config.zmq_endpoints.is_empty() {
        return Err(Error::NoEndpoints);
    }
    if config.buffer.max_messages == 0 || config.buffer.max_bytes == 0 {
        return Err(Error::Config("the buffer limits must be above 0".into()));
    }
    if config.max_payload == 0 || config.max_payload > MAX_PAYLOAD_LIMIT {
        return Err(Error::Config(format!(
            "the payload limit must be 1 to {MAX_PAYLOAD_LIMIT} bytes, got {}",
            config.max_payload
        )));
    }
    if config.max_payload > config.buffer.max_bytes {
        return Err(Error::Config(format!(
            "the payload limit ({}) is above the buffer's byte limit ({}): every such message would be dropped",
            config.max_payload, config.buffer.max_bytes
        )));
    }
    if !config.engine_metrics.is_empty() && config.engine_metrics_prefixes.is_empty() {
        return Err(Error::Config(
            "no engine metrics prefix: no engine family would pass through".into(),
        ));
    }
    for url in &config.engine_metrics {
        crate::passthrough::check_url(url).map_err(|reason| Error::EngineMetricsUrl {
            url: url.clone(),
            reason,
        })?;
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
        .map_err(|e| Error::Internal {
            what: "the endpoint check failed",
            source: std::io::Error::other(e),
        })??;
    Ok(subject)
}

/// Checks the NATS settings (or takes the in-process plane) and builds what the data thread
/// connects with; connection events update `conn` and the metrics.
async fn prepare_sink(
    config: &RelayConfig,
    metrics: &Arc<Metrics>,
    conn: &Arc<Conn>,
) -> Result<SinkSpec, Error> {
    Ok(match &config.plane {
        crate::EventPlane::Nats => {
            let (servers, options) = crate::nats::prepare(&config.nats).await?;
            let (m, c) = (metrics.clone(), conn.clone());
            let options = options.event_callback(move |event| {
                c.on_event(&m, &event);
                async {}
            });
            SinkSpec::Nats(servers, Box::new(options))
        }
        crate::EventPlane::Memory(tx) => SinkSpec::Memory(tx.clone()),
    })
}

/// Binds the `/metrics` listener, when there is one.
async fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<tokio::net::TcpListener>, Error> {
    match addr {
        Some(addr) => Ok(Some(tokio::net::TcpListener::bind(addr).await.map_err(
            |error| Error::MetricsBind {
                addr: addr.to_string(),
                error,
            },
        )?)),
        None => Ok(None),
    }
}

/// Writes Dynamo's discovery record, when a directory is configured (endpoint scope only).
async fn write_discovery_record(
    config: &RelayConfig,
    subject: &FpmSubject,
    publisher_id: u64,
) -> Result<Option<(PathBuf, String)>, Error> {
    let Some(dir) = &config.discovery_dir else {
        return Ok(None);
    };
    let Some((path, json)) = discovery::record(dir, subject, publisher_id) else {
        warn!("component scope: no discovery record is written (Dynamo 1.6.1 records are endpoint-scoped)");
        return Ok(None);
    };
    let (p, j) = (path.clone(), json.clone());
    blocking(move || discovery::write_atomic(&p, &j))
        .await
        .map_err(|error| Error::Discovery {
            dir: dir.clone(),
            error,
        })?;
    Ok(Some((path, json)))
}

/// Refreshes the discovery record's mtime every `every` until `cancel` fires.
async fn keep_fresh((path, json): (PathBuf, String), every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
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
}

/// After the data thread is done: stops the refresh, removes the record, stops serving HTTP,
/// logs the final counts.
async fn finish(
    done: oneshot::Receiver<()>,
    refresh: Option<JoinHandle<()>>,
    record: Option<PathBuf>,
    http_cancel: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let _ = done.await;
    if let Some(r) = refresh {
        let _ = r.await;
    }
    if let Some(p) = record {
        let shown = p.display().to_string();
        if let Err(e) = blocking(move || std::fs::remove_file(p)).await {
            warn!(path = %shown, error = %e, "cannot remove the discovery record");
        }
    }
    http_cancel.cancel();
    let s = metrics.stats();
    info!(
        received = s.received,
        published = s.published,
        dropped = s.dropped.total(),
        invalid = s.invalid.total(),
        "relay stopped"
    );
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
        let subject = check_config(&config).await?;
        let mut metrics = Metrics::with_inputs(&config.zmq_endpoints, config.max_label_sets);
        let passthrough = if config.engine_metrics.is_empty() {
            None
        } else {
            let p = crate::passthrough::Passthrough::new(
                &config.engine_metrics,
                &config.engine_metrics_prefixes,
                config.engine_metrics_timeout,
                &mut metrics.registry,
            )
            .map_err(|reason| Error::EngineMetricsUrl {
                url: config.engine_metrics.join(","),
                reason,
            })?;
            Some(Arc::new(p))
        };
        let metrics = Arc::new(metrics);
        let conn = Arc::new(Conn::default());
        let sink = prepare_sink(&config, &metrics, &conn).await?;
        let listener = bind_metrics(config.metrics_addr).await?;
        let metrics_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let publisher_id = config.publisher_id.unwrap_or_else(random_publisher_id);
        let record = write_discovery_record(&config, &subject, publisher_id).await?;

        let failed = CancellationToken::new();
        let reader = Arc::new(ReaderState::new());
        let subject_str = subject.subject();
        let data = DataPath {
            endpoints: config.zmq_endpoints.clone(),
            cx: Arc::new(ingest::ReaderContext {
                buffer: Arc::new(Buffer::new(config.buffer, metrics.clone())),
                metrics: metrics.clone(),
                decoder: Decoder::new().with_max_size(config.max_payload),
                cancel: shutdown.clone(),
                state: reader.clone(),
                panic_after: config.fault_panic_reader_after,
                read: AtomicU64::new(0),
            }),
            sink,
            subject: subject_str.clone().into(),
            publisher_id,
            conn,
            publish_timeout: config.publish_timeout,
            shutdown_timeout: config.shutdown_timeout,
            failed: failed.clone(),
            on_start: config.on_data_thread_start,
            panic_publisher_after: config.fault_panic_publisher_after,
        };
        let done = match data.start().await {
            Ok(done) => done,
            Err(e) => {
                if let Some((p, _)) = &record {
                    let p = p.clone();
                    let _ = blocking(move || std::fs::remove_file(p)).await;
                }
                return Err(e);
            }
        };

        let http_cancel = CancellationToken::new();
        if let Some(l) = listener {
            let health = http::Health {
                metrics: metrics.clone(),
                reader: reader.clone(),
                passthrough,
            };
            let limits = http::Limits {
                max_connections: config.http_max_connections,
                read_timeout: config.http_read_timeout,
                render_timeout: if config.engine_metrics.is_empty() {
                    Duration::ZERO
                } else {
                    config.engine_metrics_timeout
                },
            };
            tokio::spawn(http::serve(
                l,
                Arc::new(health),
                limits,
                http_cancel.clone(),
            ));
        }
        let refresh = record
            .clone()
            .map(|r| tokio::spawn(keep_fresh(r, config.discovery_refresh, shutdown.clone())));
        info!(
            subject = %subject_str,
            publisher_id,
            endpoints = %config.zmq_endpoints.join(","),
            metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            "relay started"
        );
        let task = tokio::spawn(finish(
            done,
            refresh,
            record.as_ref().map(|(p, _)| p.clone()),
            http_cancel,
            metrics.clone(),
        ));
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

    /// Completes if a stage dies: an input task or the data thread panicked. The
    /// relay does not restart it: `/health` reports 503 from then on, and the owner should
    /// shut the relay down ([`Relay::finish`] then returns [`Error::ReaderDied`]) and let a
    /// supervisor start a new one. `fpm relay` does exactly that and exits 1.
    pub async fn failed(&self) {
        self.failed.cancelled().await;
    }

    /// Whether every stage is working: the data thread turns and NATS is connected
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
    /// [`Error::ReaderDied`] with the reason, when an input or the data thread died.
    pub async fn finish(self) -> Result<Stats, Error> {
        let reader = self.reader.clone();
        let stats = self.wait().await;
        match reader.failure() {
            Some(f) => Err(Error::ReaderDied(f.to_owned())),
            None => Ok(stats),
        }
    }
}
