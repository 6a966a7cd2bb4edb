//! Where encoded messages go: one trait, a ZeroMQ implementation (the real one,
//! [`ZmqTransport`]) and an in-memory one for tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::zmtp_pub::ZmqTransport;

/// Why a message was not sent. The emitter counts each as a drop with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// No subscriber is connected: a PUB socket would discard the message.
    NoSubscriber,
    /// A subscriber's queue is full (ZeroMQ's send high-water mark).
    WouldBlock,
    /// Any other transport failure.
    Failed,
}

impl SendError {
    /// The drop reason label.
    pub fn reason(&self) -> &'static str {
        match self {
            SendError::NoSubscriber => "no_subscriber",
            SendError::WouldBlock => "send_hwm",
            SendError::Failed => "send_error",
        }
    }
}

/// What a transport could not deliver by its close deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsent {
    /// Iteration messages.
    pub messages: u64,
    /// Idle heartbeats.
    pub heartbeats: u64,
}

/// Sends one FPM message: the 8-byte big-endian counter frame and the payload (the empty
/// topic frame is the transport's business).
pub trait Transport: Send + 'static {
    /// Sends without blocking.
    ///
    /// # Errors
    /// [`SendError`] saying why the message was not sent.
    fn send(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError>;

    /// Sends an idle heartbeat (a transport that tells them apart reports them apart in
    /// [`Unsent`]).
    ///
    /// # Errors
    /// As [`Transport::send`].
    fn send_heartbeat(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError> {
        self.send(counter, payload)
    }

    /// Gives queued messages up to `timeout` to leave before the transport closes. Returns
    /// what `send`/`send_heartbeat` accepted that some subscriber may not have (the emitter
    /// counts those messages as dropped `shutdown` instead of `published`, and those
    /// heartbeats as `heartbeats_dropped`).
    fn close(&mut self, timeout: Duration) -> Unsent;

    /// Where it sends to, for logs.
    fn describe(&self) -> String;

    /// Messages accepted by `send` that were still queued for a subscriber when it
    /// disconnected, so far (see [`crate::EmitterStats::lost_with_subscribers`]).
    fn lost_with_subscribers(&self) -> u64 {
        0
    }
}

/// One message captured by [`MemoryTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    /// The counter frame.
    pub counter: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

/// An in-memory transport for tests: keeps every message; can refuse sends to simulate a full
/// subscriber queue.
#[derive(Debug, Clone, Default)]
pub struct MemoryTransport {
    sent: Arc<Mutex<Vec<SentMessage>>>,
    refuse: Arc<Mutex<Option<SendError>>>,
}

impl MemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything sent so far.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Makes every later send fail with `err` (or succeed again with `None`).
    pub fn refuse(&self, err: Option<SendError>) {
        if let Ok(mut r) = self.refuse.lock() {
            *r = err;
        }
    }
}

impl Transport for MemoryTransport {
    fn send(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError> {
        if let Some(e) = self.refuse.lock().ok().and_then(|r| *r) {
            return Err(e);
        }
        self.sent
            .lock()
            .map_err(|_| SendError::Failed)?
            .push(SentMessage {
                counter,
                payload: payload.to_vec(),
            });
        Ok(())
    }

    fn close(&mut self, _timeout: Duration) -> Unsent {
        Unsent::default()
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
