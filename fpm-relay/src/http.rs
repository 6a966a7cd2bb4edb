//! A minimal HTTP/1.1 responder for `/metrics`, `/health` and `/live` (GET only, one request
//! per connection), shared by the relay and `fpm watch`. Small on purpose: three fixed routes
//! do not need a web framework.
//!
//! At most [`Limits::max_connections`] connections are served at once; more are answered
//! `503` at once and closed, and counted (`fpm_relay_http_rejected_connections_total`). A
//! client must send its request within [`Limits::read_timeout`], so idle connections cannot
//! hold the slots.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ingest::ReaderState;
use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";
/// How long a refused connection is kept to read its request away (so closing it does not
/// reset the connection before the client reads the 503).
const BUSY_DRAIN: Duration = Duration::from_millis(500);
/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a process serves: its metrics text and its health.
pub trait Status: Send + Sync + 'static {
    /// The OpenMetrics text for `/metrics`.
    fn metrics(&self) -> String;
    /// `(healthy, text)` for `/health` (503 when not healthy).
    fn health(&self) -> (bool, String);
    /// Called for each connection refused because all slots were busy (count it).
    fn rejected(&self);
}

/// What the relay's `/health` looks at.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub metrics: Arc<Metrics>,
    pub reader: Arc<ReaderState>,
}

impl Health {
    /// (healthy, one line per stage).
    fn report(&self) -> (bool, String) {
        let reader = if self.reader.alive() {
            "ok".to_owned()
        } else {
            match self.reader.failure() {
                Some(f) => format!("dead ({f})"),
                None => "stopped".to_owned(),
            }
        };
        let nats = self.metrics.connected.get() == 1;
        let ok = self.reader.alive() && nats;
        let text = format!(
            "{}\nzmq_reader: {reader}\nnats: {}\n",
            if ok { "ok" } else { "unhealthy" },
            if nats { "connected" } else { "disconnected" }
        );
        (ok, text)
    }
}

impl Status for Health {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }
    fn health(&self) -> (bool, String) {
        self.report()
    }
    fn rejected(&self) {
        self.metrics.http_rejected.inc();
    }
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long a client may take to send its request.
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            read_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves `/metrics`, `/health` and `/live` on `listener` until `cancel` fires.
pub async fn serve<S: Status>(
    listener: TcpListener,
    health: Arc<S>,
    limits: Limits,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let busy = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, _) = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            health.rejected();
            // Answer 503 and close. Closing with the client's request unread would reset the
            // connection (RST) and the client might never see the 503, so a bounded pool of
            // short-lived responders reads the request away first (at most BUSY_DRAIN long);
            // when that pool is full too, the connection is just closed.
            match busy.clone().try_acquire_owned() {
                Ok(p) => {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = stream.try_write(BUSY);
                        let _ = stream.shutdown().await;
                        let mut sink = [0u8; 1024];
                        let _ = tokio::time::timeout(BUSY_DRAIN, async {
                            while let Ok(n) = stream.read(&mut sink).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        })
                        .await;
                        drop(p);
                    });
                }
                Err(_) => {
                    let _ = stream.try_write(BUSY);
                    drop(stream);
                }
            }
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _ = respond(stream, &*health, limits.read_timeout).await;
            drop(permit);
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(buf)
}

async fn respond<S: Status>(
    mut stream: TcpStream,
    health: &S,
    read_timeout: Duration,
) -> std::io::Result<()> {
    let Ok(buf) = tokio::time::timeout(read_timeout, read_head(&mut stream)).await else {
        debug!("HTTP client sent no request in time; closed");
        return Ok(());
    };
    let buf = buf?;
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", OPENMETRICS, health.metrics()),
        ("GET" | "HEAD", "/live") => ("200 OK", "text/plain", "live\n".to_owned()),
        ("GET" | "HEAD", "/health") => match health.health() {
            (true, text) => ("200 OK", "text/plain", text),
            (false, text) => ("503 Service Unavailable", "text/plain", text),
        },
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /live\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp.push_str(&body);
    }
    let write = async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or(Ok(()))
}
