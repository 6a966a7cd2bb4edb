//! The NATS side: one task takes messages from the buffer and publishes them, wrapped in
//! Dynamo's envelope, while the connection is up.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::connection::State;
use bytes::Bytes;
use fpm_schema::{Envelope, FPM_TOPIC};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::buffer::{Buffer, Item};
use crate::metrics::{Metrics, RelayDropReason};

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

/// An error from the event plane (logged and counted; the message is dropped).
pub(crate) type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// The seam between the relay's buffer and the event plane: what the [`Forwarder`] needs from
/// NATS, and nothing else. The relay uses [`Sink`]; unit tests use a fake.
pub(crate) trait EventSink {
    /// Whether publishing can go ahead now.
    fn connected(&self) -> bool;
    /// Hands one envelope to the plane.
    fn publish(
        &self,
        subject: async_nats::Subject,
        body: Bytes,
    ) -> impl std::future::Future<Output = Result<(), SinkError>>;
    /// Waits until what was handed over has been written out.
    fn flush(&self) -> impl std::future::Future<Output = Result<(), SinkError>>;
}

/// Where envelopes go.
pub(crate) enum Sink {
    Nats(async_nats::Client),
    Memory(crate::MemoryPlane),
}

impl EventSink for Sink {
    fn connected(&self) -> bool {
        match self {
            Sink::Nats(c) => c.connection_state() == State::Connected,
            Sink::Memory(_) => true,
        }
    }

    async fn publish(&self, subject: async_nats::Subject, body: Bytes) -> Result<(), SinkError> {
        match self {
            Sink::Nats(c) => Ok(c.publish(subject, body).await?),
            Sink::Memory(tx) => {
                // No receiver is like no subscriber on NATS: published, nobody got it.
                let _ = tx.send((subject.to_string(), body));
                Ok(())
            }
        }
    }

    async fn flush(&self) -> Result<(), SinkError> {
        match self {
            Sink::Nats(c) => Ok(c.flush().await?),
            Sink::Memory(_) => Ok(()),
        }
    }
}

/// Takes messages from the buffer and publishes them in Dynamo's envelope, while the plane
/// is up.
pub(crate) struct Forwarder<S> {
    pub sink: S,
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
    /// Fault injection for tests: panic once this many messages were published.
    pub panic_after: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<S: EventSink> Forwarder<S> {
    fn connected(&self) -> bool {
        let up = self.sink.connected();
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
        let mut fut = std::pin::pin!(self.sink.publish(self.subject.clone(), body));
        // The client's queue almost always has room: only a publish that has to wait gets a
        // timer (setting one up per message is measurable at low rates).
        let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        let outcome = match first {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => tokio::time::timeout(timeout, fut).await,
        };
        match outcome {
            Ok(Ok(())) => {
                self.sequence += 1;
                self.metrics.published.inc();
                self.metrics
                    .latency
                    .observe(item.received.elapsed().as_secs_f64());
                if self.panic_after.is_some_and(|n| self.sequence >= n) {
                    panic!(
                        "fault injection: the publisher panics after {} messages",
                        self.sequence
                    );
                }
            }
            Ok(Err(e)) => {
                self.metrics.drop_msgs(RelayDropReason::PublishError, 1);
                warn!(error = %e, "NATS publish failed; message dropped");
            }
            Err(_) => {
                self.metrics.drop_msgs(RelayDropReason::PublishTimeout, 1);
                warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "NATS publish timed out; message dropped"
                );
            }
        }
    }

    /// Publishes until `stop` fires.
    pub async fn run(&mut self, stop: &CancellationToken) {
        // Waiting for the next message waits on the buffer alone (registering with the
        // token too costs two lock round trips per message): `stop` wakes the buffer.
        let buffer = self.buffer.clone();
        let watch = stop.clone();
        let _wake_on_stop = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            watch.cancelled().await;
            buffer.notify.notify_one();
        }));
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
                self.buffer.notify.notified().await;
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
            if tokio::time::timeout_at(grace, self.sink.flush())
                .await
                .is_err()
            {
                warn!("NATS flush did not finish before the shutdown timeout");
            }
        }
        let left = self.buffer.clear();
        if left > 0 {
            self.metrics.drop_msgs(RelayDropReason::Shutdown, left);
            warn!(
                dropped = left,
                "shutdown timeout: buffered messages dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use fpm_schema::Envelope;

    use super::*;
    use crate::config::BufferLimits;

    /// A fake plane: connected or not, fails or stalls on demand, records what it got.
    #[derive(Default)]
    struct Fake {
        down: AtomicBool,
        fail_next: AtomicUsize,
        stall_next: AtomicUsize,
        got: Mutex<Vec<Bytes>>,
    }

    impl EventSink for &Fake {
        fn connected(&self) -> bool {
            !self.down.load(Ordering::SeqCst)
        }
        async fn publish(&self, _: async_nats::Subject, body: Bytes) -> Result<(), SinkError> {
            if self.stall_next.load(Ordering::SeqCst) > 0 {
                self.stall_next.fetch_sub(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if self.fail_next.load(Ordering::SeqCst) > 0 {
                self.fail_next.fetch_sub(1, Ordering::SeqCst);
                return Err("refused".into());
            }
            self.got.lock().unwrap().push(body);
            Ok(())
        }
        async fn flush(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    fn forwarder(fake: &Fake) -> Forwarder<&Fake> {
        let metrics = Arc::new(Metrics::new());
        Forwarder {
            sink: fake,
            subject: "s".into(),
            publisher_id: 7,
            buffer: Arc::new(Buffer::new(BufferLimits::default(), metrics.clone())),
            metrics,
            conn: Arc::new(Conn::default()),
            publish_timeout: Duration::from_millis(50),
            sequence: 0,
            scratch: Vec::new(),
            arena: bytes::BytesMut::new(),
            panic_after: None,
        }
    }

    fn push(f: &Forwarder<&Fake>, payloads: impl IntoIterator<Item = u8>) {
        for p in payloads {
            let item = Item {
                payload: Bytes::from(vec![p; 3]),
                received: std::time::Instant::now(),
            };
            assert!(f.buffer.push(item).is_ok());
        }
    }

    /// Runs the forwarder until `until` holds for its counters (bounded), then stops it
    /// through its token (never by dropping it mid-publish).
    async fn run_until(f: &mut Forwarder<&Fake>, until: impl Fn(&crate::Stats) -> bool) {
        let stop = CancellationToken::new();
        let metrics = f.metrics.clone();
        let watch = async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !until(&metrics.stats()) {
                assert!(Instant::now() < deadline, "not reached in time");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.cancel();
        };
        tokio::join!(f.run(&stop), watch);
    }

    fn envelopes(fake: &Fake) -> Vec<(u64, Vec<u8>)> {
        fake.got
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let e = Envelope::decode(b).unwrap();
                assert_eq!(e.publisher_id, 7);
                (e.sequence, e.payload.to_vec())
            })
            .collect()
    }

    #[tokio::test]
    async fn buffer_to_plane_in_order_with_a_sequence_without_holes() {
        let fake = Fake::default();
        let mut f = forwarder(&fake);
        push(&f, 0..5);
        fake.fail_next.store(1, Ordering::SeqCst);
        run_until(&mut f, |s| s.published == 4).await;
        let got = envelopes(&fake);
        // The first one was refused (counted); the others keep the sequence from 0.
        assert_eq!(
            got,
            (1..5u8)
                .enumerate()
                .map(|(i, p)| (i as u64, vec![p; 3]))
                .collect::<Vec<_>>()
        );
        let s = f.metrics.stats();
        assert_eq!(s.dropped_for(RelayDropReason::PublishError), 1);
        assert_eq!(s.buffered, 0);
    }

    #[tokio::test]
    async fn a_stalled_publish_times_out_and_is_counted() {
        let fake = Fake::default();
        let mut f = forwarder(&fake);
        push(&f, 0..3);
        fake.stall_next.store(1, Ordering::SeqCst);
        run_until(&mut f, |s| s.published == 2).await;
        let s = f.metrics.stats();
        assert_eq!(s.dropped_for(RelayDropReason::PublishTimeout), 1, "{s:?}");
        assert_eq!(envelopes(&fake), vec![(0, vec![1; 3]), (1, vec![2; 3])]);
    }

    #[tokio::test]
    async fn while_the_plane_is_down_messages_wait_then_go() {
        let fake = Fake::default();
        fake.down.store(true, Ordering::SeqCst);
        let mut f = forwarder(&fake);
        push(&f, 0..4);
        let stop = CancellationToken::new();
        let _ = tokio::time::timeout(Duration::from_millis(150), f.run(&stop)).await;
        assert!(fake.got.lock().unwrap().is_empty());
        assert_eq!(f.metrics.stats().buffered, 4);
        fake.down.store(false, Ordering::SeqCst);
        f.conn.changed.notify_one();
        run_until(&mut f, |s| s.published == 4).await;
        assert_eq!(envelopes(&fake).len(), 4);
    }

    #[tokio::test]
    async fn drain_counts_what_cannot_go_as_shutdown() {
        let fake = Fake::default();
        let mut f = forwarder(&fake);
        push(&f, 0..2);
        f.drain(Instant::now() + Duration::from_millis(500)).await;
        assert_eq!(f.metrics.stats().published, 2, "drained while up");
        fake.down.store(true, Ordering::SeqCst);
        push(&f, 0..6);
        let t = Instant::now();
        f.drain(Instant::now() + Duration::from_millis(100)).await;
        assert!(t.elapsed() < Duration::from_secs(2));
        let s = f.metrics.stats();
        assert_eq!(s.dropped_for(RelayDropReason::Shutdown), 6, "{s:?}");
        assert_eq!(s.buffered, 0);
    }
}
