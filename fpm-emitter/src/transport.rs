//! Where encoded messages go: one trait, a ZeroMQ implementation (the real one) and an
//! in-memory one for tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::EmitterError;

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

/// Sends one FPM message: the 8-byte big-endian counter frame and the payload (the empty
/// topic frame is the transport's business).
pub trait Transport: Send + 'static {
    /// Sends without blocking.
    ///
    /// # Errors
    /// [`SendError`] saying why the message was not sent.
    fn send(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError>;

    /// Gives queued messages up to `timeout` to leave before the transport closes.
    fn close(&mut self, timeout: Duration);

    /// Where it sends to, for logs.
    fn describe(&self) -> String;
}

/// The ZeroMQ transport: an XPUB socket bound to the endpoint (XPUB behaves as PUB for
/// subscribers, and tells us whether any subscriber exists, so messages no one can receive are
/// counted instead of vanishing). `ZMQ_XPUB_NODROP` makes a full subscriber queue an error we
/// count, instead of a silent discard.
pub struct ZmqTransport {
    /// `None` once closed.
    ctx: Option<zmq::Context>,
    /// `None` once closed.
    socket: Option<zmq::Socket>,
    endpoint: String,
    subscribed: bool,
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("endpoint", &self.endpoint)
            .field("subscribed", &self.subscribed)
            .finish()
    }
}

impl ZmqTransport {
    /// Binds to `endpoint` (`ipc://path` or `tcp://host:port`), removing a stale ipc socket
    /// file first. `send_hwm` is the per-subscriber queue limit.
    ///
    /// # Errors
    /// [`EmitterError::Bind`].
    pub fn bind(endpoint: &str, send_hwm: i32) -> Result<Self, EmitterError> {
        let bind_err = |source| EmitterError::Bind {
            endpoint: endpoint.to_owned(),
            source,
        };
        if let Some(path) = endpoint.strip_prefix("ipc://") {
            // A socket file left by a crashed process makes bind fail with EADDRINUSE: remove
            // it, but only if nobody is listening there; a live one belongs to another engine
            // (or another `fpm sim`), which binding here would silently cut off.
            if ipc_listener_alive(path) {
                return Err(EmitterError::InUse {
                    endpoint: endpoint.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let ctx = zmq::Context::new();
        let mut socket = ctx.socket(zmq::XPUB).map_err(bind_err)?;
        socket.set_sndhwm(send_hwm).map_err(bind_err)?;
        socket.set_linger(0).map_err(bind_err)?;
        set_xpub_nodrop(&mut socket).map_err(bind_err)?;
        socket.bind(endpoint).map_err(bind_err)?;
        Ok(ZmqTransport {
            ctx: Some(ctx),
            socket: Some(socket),
            endpoint: endpoint.to_owned(),
            subscribed: false,
        })
    }

    /// Reads pending subscription messages: `0x01` + topic subscribes, `0x00` + topic
    /// unsubscribes. Without `XPUB_VERBOSE`, libzmq reports the first subscription to a topic
    /// and the last unsubscription, which is exactly "is anyone listening".
    fn update_subscriptions(&mut self) {
        let Some(socket) = &self.socket else { return };
        while let Ok(msg) = socket.recv_bytes(zmq::DONTWAIT) {
            match msg.first() {
                Some(1) => self.subscribed = true,
                Some(0) => self.subscribed = false,
                _ => {}
            }
        }
    }
}

/// Is a process listening on the Unix socket at `path`? (A stale file refuses connections.)
fn ipc_listener_alive(path: &str) -> bool {
    #[cfg(unix)]
    {
        std::os::unix::net::UnixStream::connect(path).is_ok()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn set_xpub_nodrop(socket: &mut zmq::Socket) -> Result<(), zmq::Error> {
    let on: std::os::raw::c_int = 1;
    // The zmq crate has no setter for this option; set it through libzmq directly.
    // SAFETY: `socket` is a live socket; the option value is a c_int of the stated size.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            socket.as_mut_ptr(),
            zmq_sys::ZMQ_XPUB_NODROP as std::os::raw::c_int,
            (&on as *const std::os::raw::c_int).cast(),
            std::mem::size_of::<std::os::raw::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: reads libzmq's thread-local errno.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}

impl Transport for ZmqTransport {
    fn send(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError> {
        self.update_subscriptions();
        if !self.subscribed {
            return Err(SendError::NoSubscriber);
        }
        let counter = counter.to_be_bytes();
        let frames: [&[u8]; 3] = [b"", &counter, payload];
        let Some(socket) = &self.socket else {
            return Err(SendError::Failed);
        };
        match socket.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            Err(zmq::Error::EAGAIN) => Err(SendError::WouldBlock),
            Err(_) => Err(SendError::Failed),
        }
    }

    /// Lets what is queued for connected subscribers leave within `timeout` (the socket
    /// lingers; terminating the context waits for it), then removes the ipc socket file.
    /// (Unbinding first would discard the queued messages.)
    fn close(&mut self, timeout: Duration) {
        if let Some(socket) = self.socket.take() {
            let _ = socket.set_linger(timeout.as_millis().min(i32::MAX as u128) as i32);
            drop(socket);
        }
        // Blocks until the lingering messages are sent or the linger expires.
        drop(self.ctx.take());
        if let Some(path) = self.endpoint.strip_prefix("ipc://") {
            let _ = std::fs::remove_file(path);
        }
    }

    fn describe(&self) -> String {
        self.endpoint.clone()
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

    fn close(&mut self, _timeout: Duration) {}

    fn describe(&self) -> String {
        "memory".into()
    }
}
