//! The HTTP endpoints `/metrics`, `/health` and `/live` (GET and HEAD; one request per
//! connection), on hyper 1, shared by the relay and `fpm watch`.
//!
//! At most [`Limits::max_connections`] connections are served at once; more are answered
//! `503` and closed, and counted (`fpm_relay_http_rejected_connections_total`). A client must
//! send its request head within [`Limits::read_timeout`], so idle connections cannot hold
//! the slots.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::ingest::ReaderState;
use crate::metrics::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a refused connection is kept to read its request and answer 503 (so closing it
/// does not reset the connection before the client reads the answer).
const BUSY_DRAIN: Duration = Duration::from_millis(500);
/// How long writing a response may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a process serves: its metrics text and its health.
pub trait Status: Send + Sync + 'static {
    /// The OpenMetrics text for `/metrics`.
    fn metrics(&self) -> String;
    /// The content type and body for a `/metrics` request with this `Accept` header (by
    /// default the OpenMetrics text of [`Status::metrics`]).
    fn scrape(
        &self,
        accept: Option<String>,
    ) -> impl std::future::Future<Output = (&'static str, String)> + Send {
        let _ = accept;
        let text = self.metrics();
        async move { (OPENMETRICS, text) }
    }
    /// `(healthy, text)` for `/health` (503 when not healthy).
    fn health(&self) -> (bool, String);
    /// Called for each connection refused because all slots were busy (count it).
    fn rejected(&self);
}

/// What the relay's `/health` looks at (and its `/metrics`, with the engines' families).
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub metrics: Arc<Metrics>,
    pub reader: Arc<ReaderState>,
    pub passthrough: Option<Arc<crate::passthrough::Passthrough>>,
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
    async fn scrape(&self, _accept: Option<String>) -> (&'static str, String) {
        let own = self.metrics.encode();
        match &self.passthrough {
            Some(p) => p.render(own).await,
            None => (OPENMETRICS, own),
        }
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
    /// How long making an answer may take (the engine-metrics timeout, when engines are
    /// fetched on every scrape); added to the connection's time budget.
    pub render_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            read_timeout: Duration::from_secs(5),
            render_timeout: Duration::ZERO,
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
            // Answer 503 from a bounded pool of short-lived responders; when that pool is
            // full too, the connection is just closed.
            if let Ok(p) = busy.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, Infallible>(reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "busy\n".to_owned(),
                        ))
                    });
                    let _ =
                        tokio::time::timeout(BUSY_DRAIN, connection(stream, svc, BUSY_DRAIN)).await;
                    drop(p);
                });
            }
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let health = health.clone();
                async move {
                    let accept = req
                        .headers()
                        .get(hyper::header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    Ok::<_, Infallible>(
                        route(&*health, req.method(), req.uri().path(), accept).await,
                    )
                }
            });
            let _ = tokio::time::timeout(
                limits.read_timeout + limits.render_timeout + WRITE_TIMEOUT,
                connection(stream, svc, limits.read_timeout),
            )
            .await;
            drop(permit);
        });
    }
}

/// Serves one request on `stream` (no keep-alive), waiting at most `read_timeout` for its head.
async fn connection<S>(stream: TcpStream, svc: S, read_timeout: Duration)
where
    S: hyper::service::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
    >,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    if let Err(e) = conn.await {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// The answer to one request (hyper leaves the body out for HEAD).
async fn route<S: Status>(
    health: &S,
    method: &Method,
    path: &str,
    accept: Option<String>,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        );
    }
    match path {
        "/metrics" => {
            let (ctype, body) = health.scrape(accept).await;
            reply(StatusCode::OK, ctype, body)
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".to_owned()),
        "/health" => match health.health() {
            (true, text) => reply(StatusCode::OK, "text/plain", text),
            (false, text) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", text),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /health or /live\n".to_owned(),
        ),
    }
}
