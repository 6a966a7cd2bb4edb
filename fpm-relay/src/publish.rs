//! The NATS side: one task takes messages from the buffer and publishes them, wrapped in
//! Dynamo's envelope, while the connection is up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use bytes::Bytes;
use fpm_schema::{Envelope, FPM_TOPIC};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::buffer::{Buffer, Item};
use crate::metrics::{DropReason, Metrics};

/// Connection state shared between the client's event callback and the publisher.
#[derive(Debug, Default)]
pub(crate) struct Conn {
    /// Woken on every connect and disconnect.
    pub changed: Notify,
    ever_connected: AtomicBool,
    last_error_log: AtomicU64,
}

impl Conn {
    pub fn on_event(&self, metrics: &Metrics, event: &async_nats::Event) {
        match event {
            async_nats::Event::Connected => {
                metrics.connected.set(1);
                if self.ever_connected.swap(true, Ordering::SeqCst) {
                    metrics.reconnects.inc();
                    warn!("NATS connection restored");
                } else {
                    debug!("NATS connected");
                }
            }
            async_nats::Event::Disconnected => {
                metrics.connected.set(0);
                warn!("NATS connection lost; buffering until it is back");
            }
            // Failed connection attempts are logged with server and cause by the relay's
            // reconnect callback; this event only repeats their kind.
            async_nats::Event::ClientError(_) => debug!(error = %event, "NATS client error"),
            async_nats::Event::ServerError(_) => {
                // Auth or TLS failures repeat on every reconnect attempt: warn every 10 s.
                let now = unix_ms();
                let last = self.last_error_log.load(Ordering::Relaxed);
                if now.saturating_sub(last) >= 10_000 {
                    self.last_error_log.store(now, Ordering::Relaxed);
                    warn!(error = %event, "NATS error (retrying; logged at most every 10 s)");
                } else {
                    debug!(error = %event, "NATS error");
                }
            }
            other => debug!(event = %other, "NATS event"),
        }
        self.changed.notify_waiters();
        self.changed.notify_one();
    }
}

/// Where envelopes go.
pub(crate) enum Sink {
    Nats(async_nats::Client),
    Memory(crate::MemoryPlane),
}

impl Sink {
    fn connected(&self) -> bool {
        match self {
            Sink::Nats(c) => c.connection_state() == State::Connected,
            Sink::Memory(_) => true,
        }
    }

    async fn publish(&self, subject: async_nats::Subject, body: Bytes) -> Result<(), String> {
        match self {
            Sink::Nats(c) => c.publish(subject, body).await.map_err(|e| e.to_string()),
            Sink::Memory(tx) => {
                // No receiver is like no subscriber on NATS: published, nobody got it.
                let _ = tx.send((subject.to_string(), body));
                Ok(())
            }
        }
    }

    async fn flush(&self) -> Result<(), String> {
        match self {
            Sink::Nats(c) => c.flush().await.map_err(|e| e.to_string()),
            Sink::Memory(_) => Ok(()),
        }
    }
}

pub(crate) struct Publisher {
    pub client: Sink,
    pub subject: async_nats::Subject,
    pub publisher_id: u64,
    pub buffer: Arc<Buffer>,
    pub metrics: Arc<Metrics>,
    pub conn: Arc<Conn>,
    pub publish_timeout: Duration,
    pub sequence: u64,
    /// The envelope being encoded (reused).
    pub scratch: Vec<u8>,
    /// Envelopes handed to the NATS client share chunks of this (no allocation per message).
    pub arena: bytes::BytesMut,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Publisher {
    fn connected(&self) -> bool {
        let up = self.client.connected();
        self.metrics.connected.set(i64::from(up));
        up
    }

    async fn publish(&mut self, item: Item, timeout: Duration) {
        Envelope {
            publisher_id: self.publisher_id,
            sequence: self.sequence,
            published_at: unix_ms(),
            topic: FPM_TOPIC,
            payload: &item.payload,
        }
        .encode_into(&mut self.scratch);
        let body = crate::ingest::copy_into(&mut self.arena, &self.scratch);
        let fut = self.client.publish(self.subject.clone(), body);
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(())) => {
                self.sequence += 1;
                self.metrics.published.inc();
                self.metrics
                    .latency
                    .observe(item.received.elapsed().as_secs_f64());
            }
            Ok(Err(e)) => {
                self.metrics.drop_msgs(DropReason::PublishError, 1);
                warn!(error = %e, "NATS publish failed; message dropped");
            }
            Err(_) => {
                self.metrics.drop_msgs(DropReason::PublishTimeout, 1);
                warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "NATS publish timed out; message dropped"
                );
            }
        }
    }

    /// Publishes until `stop` fires.
    pub async fn run(&mut self, stop: &CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            if !self.connected() {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.conn.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            let Some(item) = self.buffer.pop() else {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return,
                    _ = self.buffer.notify.notified() => {}
                }
                continue;
            };
            let t = self.publish_timeout;
            self.publish(item, t).await;
        }
    }

    /// Publishes what is left, flushes, and counts what could not go out by `deadline` as
    /// dropped (`reason="shutdown"`).
    pub async fn drain(&mut self, deadline: Instant) {
        loop {
            let now = Instant::now();
            if now >= deadline || self.buffer.is_empty() {
                break;
            }
            if !self.connected() {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.conn.changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            }
            let Some(item) = self.buffer.pop() else { break };
            let t = self.publish_timeout.min(deadline - now);
            self.publish(item, t).await;
        }
        if self.connected() {
            let grace = deadline.max(Instant::now() + Duration::from_millis(200));
            if tokio::time::timeout_at(grace, self.client.flush())
                .await
                .is_err()
            {
                warn!("NATS flush did not finish before the shutdown timeout");
            }
        }
        let left = self.buffer.clear();
        if left > 0 {
            self.metrics.drop_msgs(DropReason::Shutdown, left);
            warn!(
                dropped = left,
                "shutdown timeout: buffered messages dropped"
            );
        }
    }
}
