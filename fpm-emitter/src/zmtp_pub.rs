//! The ZeroMQ publisher: a PUB socket speaking ZMTP 3.0 (NULL security) to SUB peers over
//! tcp or ipc, on one background I/O thread.
//!
//! Why not libzmq (measured, issue 15): a lingering libzmq socket that closes while a
//! subscriber is behind discards the batch its I/O thread has not yet written (up to 8 KiB:
//! 109 of 111,114 messages in one loaded test run), and no API says how many. Here every
//! message's bytes are tracked until the kernel has taken all of them, so at shutdown the
//! messages that did not leave are known exactly and counted (`dropped{reason="shutdown"}`).
//!
//! Semantics are libzmq's XPUB with `ZMQ_XPUB_NODROP`: a message goes to every peer
//! subscribed to the empty prefix (our topic frame is empty), or to none: with no subscriber
//! `send` fails with [`SendError::NoSubscriber`]; when any subscriber already has `send_hwm`
//! messages not yet taken by the kernel, it fails with [`SendError::WouldBlock`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fpm_zmtp::{ProtocolError, Subscription, Unit};
use tracing::{debug, warn};

use crate::error::EmitterError;
use crate::transport::{SendError, Transport, Unsent};

/// Most connections (subscribers and peers still handshaking) at once; more are refused.
const MAX_PEERS: usize = 256;
/// A peer must finish the greeting and READY within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message or command a subscriber may send (subscriptions are a few bytes).
const MAX_INBOUND: usize = 4096;
/// PONGs waiting to be written to one peer; PINGs beyond this are not answered.
const MAX_PONGS: usize = 16;
/// Bytes queued for all subscribers together (each has its own copy); beyond this `send`
/// fails as a full queue (`send_hwm`), so many subscribers cannot run the engine out of memory.
const MAX_QUEUED_BYTES: usize = 256 << 20;
/// Marks a heartbeat's sequence number (counted apart from iteration messages).
const HEARTBEAT: u64 = 1 << 63;

/// The ZeroMQ transport: a PUB socket bound to the endpoint (`ipc://PATH`, `ipc://@NAME` for
/// Linux's abstract namespace, or `tcp://HOST:PORT` with `*` for all interfaces and port `*`
/// or `0` for any free one).
pub struct ZmqTransport {
    hub: Arc<Hub>,
    /// The I/O thread; `None` once closed.
    io: Option<std::thread::JoinHandle<()>>,
    stop: Arc<tokio::sync::Notify>,
    endpoint: String,
    /// The socket file to remove at close (not for abstract sockets).
    ipc_file: Option<String>,
    next_seq: u64,
    frame: Vec<u8>,
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// What the publisher thread and the I/O thread share.
#[derive(Debug)]
struct Hub {
    peers: Mutex<Vec<Arc<Peer>>>,
    hwm: usize,
    /// Connections open (handshaking or subscribed).
    connections: AtomicUsize,
    /// Messages still queued for a subscriber when it disconnected.
    lost_with_peer: AtomicU64,
    /// Set by the I/O thread when it stops: what some subscriber may not have.
    unsent: Mutex<Unsent>,
    /// Bytes in every peer's `bytes` and unwritten entries.
    queued_bytes: AtomicUsize,
}

#[derive(Debug)]
struct Peer {
    out: Mutex<Outbox>,
    wake: tokio::sync::Notify,
    /// The connection's descriptor, to ask the kernel how much it still holds (valid while
    /// the peer is in the hub: the connection task removes it before closing the socket).
    fd: RawFd,
}

/// One subscriber's outgoing bytes.
#[derive(Debug, Default)]
struct Outbox {
    /// Bytes queued since the writer last took them.
    bytes: Vec<u8>,
    /// Every message (and PONG: `None`) with its length in bytes, oldest first: the first
    /// `tail` entries are written (kept while the kernel may still hold them, see
    /// `tail_cap`), the rest not yet completely written.
    queue: VecDeque<(Option<u64>, usize)>,
    /// Written entries at the front of `queue`, and their bytes.
    tail: usize,
    tail_bytes: usize,
    /// Written bytes to keep track of: on a Unix socket, written bytes sit in the
    /// subscriber's receive queue until it reads them, and a libzmq SUB that sees the
    /// connection close while its own queue is full discards them (`EPOLLHUP` with input
    /// stopped). The socket's send buffer size bounds them. Zero on TCP, where the kernel
    /// delivers what it took even after close.
    tail_cap: usize,
    /// Bytes of the oldest unwritten entry already written.
    partial: usize,
    /// Unwritten messages (not PONGs) in `queue`.
    messages: usize,
    pongs: usize,
    /// Subscriptions to the empty prefix (the only one our messages match).
    subscriptions: u32,
    closed: bool,
}

impl Outbox {
    fn receives(&self) -> bool {
        self.subscriptions > 0 && !self.closed
    }

    /// Appends one message or command; whether the writer needs waking.
    fn push(&mut self, seq: Option<u64>, bytes: &[u8]) -> bool {
        let wake = self.bytes.is_empty();
        self.bytes.extend_from_slice(bytes);
        self.queue.push_back((seq, bytes.len()));
        if seq.is_some() {
            self.messages += 1;
        } else {
            self.pongs += 1;
        }
        wake
    }

    /// Appends one message of which the kernel already took the first `n` bytes (only when
    /// nothing else is unwritten); whether the writer needs waking for the rest.
    fn push_partly_written(&mut self, seq: Option<u64>, bytes: &[u8], n: usize) -> bool {
        if n == 0 {
            return self.push(seq, bytes);
        }
        debug_assert!(self.messages == 0 && self.pongs == 0 && self.partial == 0);
        self.queue.push_back((seq, bytes.len()));
        if seq.is_some() {
            self.messages += 1;
        } else {
            self.pongs += 1;
        }
        self.written(n);
        let rest = &bytes[n.min(bytes.len())..];
        let wake = !rest.is_empty() && self.bytes.is_empty();
        self.bytes.extend_from_slice(rest);
        wake
    }

    /// The kernel took `n` more bytes.
    fn written(&mut self, mut n: usize) {
        while n > 0 {
            let Some(&(seq, len)) = self.queue.get(self.tail) else {
                break;
            };
            let left = len - self.partial;
            if n < left {
                self.partial += n;
                break;
            }
            n -= left;
            self.partial = 0;
            self.tail += 1;
            self.tail_bytes += len;
            if seq.is_some() {
                self.messages -= 1;
            } else {
                self.pongs -= 1;
            }
        }
        // Keep just enough written entries to cover `tail_cap` bytes.
        while let Some(&(_, len)) = self.queue.front() {
            if self.tail == 0 || self.tail_bytes - len < self.tail_cap {
                break;
            }
            self.queue.pop_front();
            self.tail -= 1;
            self.tail_bytes -= len;
        }
    }

    /// The messages a subscriber may not have: every unwritten one (a partly written one
    /// too), and on a Unix socket the written ones within the last `kernel_held` bytes
    /// (an upper bound: the kernel counts its own overhead too).
    fn unsent(&self, kernel_held: usize) -> impl Iterator<Item = u64> + '_ {
        // The newest bytes the kernel holds are those of the partly written entry.
        let mut held = kernel_held
            .saturating_sub(self.partial)
            .min(self.tail_bytes);
        let mut from = self.tail;
        while held > 0 && from > 0 {
            from -= 1;
            held = held.saturating_sub(self.queue[from].1);
        }
        self.queue.iter().skip(from).filter_map(|(seq, _)| *seq)
    }
}

/// Bytes the kernel still holds for the peer (`SIOCOUTQ`, which is `TIOCOUTQ`'s number): on a
/// Unix socket, those the peer has not read yet (plus the kernel's own accounting overhead,
/// so an upper bound); on TCP, those it has not acknowledged.
#[cfg(target_os = "linux")]
fn kernel_held(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is an open socket (see `Peer::fd`); SIOCOUTQ writes one c_int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// Elsewhere the kernel is not asked: on ipc, written messages count as delivered (the
/// crate is built and tested on Linux).
#[cfg(not(target_os = "linux"))]
fn kernel_held(_fd: RawFd) -> usize {
    0
}

/// The socket's send buffer size (what `SO_SNDBUF` reports), or a generous default.
fn send_buffer(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket; the option value is a c_int of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&mut n as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    match usize::try_from(n) {
        Ok(n) if rc == 0 => n,
        _ => 4 << 20,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl ZmqTransport {
    /// Binds to `endpoint`, removing a stale ipc socket file first (never a live one), and
    /// starts the I/O thread. `send_hwm` is the per-subscriber queue limit, in messages.
    ///
    /// # Errors
    /// [`EmitterError::Config`] for an address that is not `ipc://` or `tcp://`,
    /// [`EmitterError::InUse`] when another process listens on the ipc path,
    /// [`EmitterError::Bind`] when binding fails, [`EmitterError::Spawn`] when the thread
    /// cannot start.
    pub fn bind(endpoint: &str, send_hwm: i32) -> Result<Self, EmitterError> {
        let bind_err = |source| EmitterError::Bind {
            endpoint: endpoint.to_owned(),
            source,
        };
        let (listener, described, ipc_file) = if let Some(path) = endpoint.strip_prefix("ipc://") {
            if path.is_empty() {
                return Err(EmitterError::Config(format!("{endpoint:?}: no ipc path")));
            }
            if let Some(name) = path.strip_prefix('@') {
                (
                    Listener::Unix(bind_abstract(name).map_err(bind_err)?),
                    endpoint.to_owned(),
                    None,
                )
            } else {
                // A socket file left by a crashed process makes bind fail: remove it, but only
                // if nobody is listening there; a live one belongs to another engine (or
                // another `fpm sim`), which binding here would silently cut off.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(EmitterError::InUse {
                        endpoint: endpoint.to_owned(),
                    });
                }
                let _ = std::fs::remove_file(path);
                let l = std::os::unix::net::UnixListener::bind(path).map_err(bind_err)?;
                (
                    Listener::Unix(l),
                    endpoint.to_owned(),
                    Some(path.to_owned()),
                )
            }
        } else if let Some(rest) = endpoint.strip_prefix("tcp://") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
                EmitterError::Config(format!("{endpoint:?}: expected tcp://HOST:PORT"))
            })?;
            let port: u16 = match port {
                "*" => 0,
                p => p.parse().map_err(|_| {
                    EmitterError::Config(format!("{endpoint:?}: {port:?} is not a port number"))
                })?,
            };
            let host = match host {
                "*" => "0.0.0.0",
                h => h.trim_start_matches('[').trim_end_matches(']'),
            };
            let l = std::net::TcpListener::bind((host, port)).map_err(bind_err)?;
            let local = l.local_addr().map_err(bind_err)?;
            let shown_host = rest.rsplit_once(':').map_or("*", |(h, _)| h);
            (
                Listener::Tcp(l),
                format!("tcp://{shown_host}:{}", local.port()),
                None,
            )
        } else {
            return Err(EmitterError::Config(format!(
                "{endpoint:?}: the FPM publisher binds ipc://PATH or tcp://HOST:PORT addresses"
            )));
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
        .map_err(bind_err)?;
        let hub = Arc::new(Hub {
            peers: Mutex::new(Vec::new()),
            hwm: usize::try_from(send_hwm.max(1)).unwrap_or(1),
            connections: AtomicUsize::new(0),
            lost_with_peer: AtomicU64::new(0),
            unsent: Mutex::new(Unsent::default()),
            queued_bytes: AtomicUsize::new(0),
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let io = {
            let hub = Arc::clone(&hub);
            let stop = Arc::clone(&stop);
            let name = described.clone();
            std::thread::Builder::new()
                .name("fpm-emitter-io".into())
                .spawn(move || runtime.block_on(serve(listener, hub, stop, name)))?
        };
        Ok(ZmqTransport {
            hub,
            io: Some(io),
            stop,
            endpoint: described,
            ipc_file,
            next_seq: 0,
            frame: Vec::with_capacity(1024),
        })
    }

    /// Subscribers connected now (for tests and logs).
    pub fn subscribers(&self) -> usize {
        lock(&self.hub.peers)
            .iter()
            .filter(|p| lock(&p.out).receives())
            .count()
    }
}

#[cfg(target_os = "linux")]
fn bind_abstract(name: &str) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixListener::bind_addr(&addr)
}

#[cfg(not(target_os = "linux"))]
fn bind_abstract(_name: &str) -> io::Result<std::os::unix::net::UnixListener> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract ipc sockets (ipc://@name) exist only on Linux",
    ))
}

impl ZmqTransport {
    fn send_marked(&mut self, counter: u64, payload: &[u8], mark: u64) -> Result<(), SendError> {
        let peers = lock(&self.hub.peers);
        let mut any = 0usize;
        for p in peers.iter() {
            let out = lock(&p.out);
            if out.receives() {
                any += 1;
                if out.messages >= self.hub.hwm {
                    return Err(SendError::WouldBlock);
                }
            }
        }
        if any == 0 {
            return Err(SendError::NoSubscriber);
        }
        let size = payload.len() + 22;
        if self.hub.queued_bytes.load(Relaxed) + size * any > MAX_QUEUED_BYTES {
            return Err(SendError::WouldBlock);
        }
        let f = &mut self.frame;
        f.clear();
        fpm_zmtp::frame_header(true, 0, f);
        fpm_zmtp::frame_header(true, 8, f);
        f.extend_from_slice(&counter.to_be_bytes());
        fpm_zmtp::frame_header(false, payload.len(), f);
        f.extend_from_slice(payload);
        let seq = self.next_seq | mark;
        self.next_seq += 1;
        let mut pushed = 0usize;
        for p in peers.iter() {
            let mut out = lock(&p.out);
            if out.receives() {
                pushed += 1;
                // Nothing unwritten (so the writer has nothing in flight): write it now, on
                // this thread, and save the I/O thread a wake-up per message at low rates.
                let n = if out.messages == 0 && out.pongs == 0 {
                    // An error shows on the writer task's next write.
                    send_some(p.fd, f).unwrap_or(0)
                } else {
                    0
                };
                self.hub.queued_bytes.fetch_add(f.len() - n, Relaxed);
                if out.push_partly_written(Some(seq), f, n) {
                    drop(out);
                    p.wake.notify_one();
                }
            }
        }
        // Every subscriber left between the check and here.
        if pushed == 0 {
            return Err(SendError::NoSubscriber);
        }
        Ok(())
    }
}

impl Transport for ZmqTransport {
    fn send(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError> {
        self.send_marked(counter, payload, 0)
    }

    fn send_heartbeat(&mut self, counter: u64, payload: &[u8]) -> Result<(), SendError> {
        self.send_marked(counter, payload, HEARTBEAT)
    }

    /// Lets what is queued for connected subscribers leave within `timeout` (on ipc, until
    /// they have read it), then closes every connection and the listener, and removes the
    /// ipc socket file. Returns what some subscriber may not have at the deadline: not yet
    /// (wholly) written to its socket, or on ipc written but not yet read by it.
    fn close(&mut self, timeout: Duration) -> Unsent {
        let Some(io) = self.io.take() else {
            return Unsent::default();
        };
        let deadline = Instant::now() + timeout;
        loop {
            // Done when every subscriber has everything (on ipc: has read it).
            let pending = lock(&self.hub.peers).iter().any(|p| {
                let out = lock(&p.out);
                !out.closed && (out.messages > 0 || (out.tail > 0 && kernel_held(p.fd) > 0))
            });
            if !pending || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The I/O thread counts what did not leave, then closes every connection.
        self.stop.notify_one();
        let _ = io.join();
        let unsent = *lock(&self.hub.unsent);
        if let Some(path) = self.ipc_file.take() {
            let _ = std::fs::remove_file(path);
        }
        if unsent.messages + unsent.heartbeats > 0 {
            warn!(endpoint = %self.endpoint, messages = unsent.messages, heartbeats = unsent.heartbeats, "FPM messages still queued for a subscriber at the shutdown deadline: counted as dropped (shutdown)");
        }
        unsent
    }

    fn describe(&self) -> String {
        self.endpoint.clone()
    }

    /// Counted once per message and subscriber.
    fn lost_with_subscribers(&self) -> u64 {
        self.hub.lost_with_peer.load(Relaxed)
    }
}

impl Drop for ZmqTransport {
    fn drop(&mut self) {
        if self.io.is_some() {
            self.close(Duration::ZERO);
        }
    }
}

/// The I/O thread: accepts connections until `stop`.
async fn serve(listener: Listener, hub: Arc<Hub>, stop: Arc<tokio::sync::Notify>, name: String) {
    let accept = async {
        match listener {
            Listener::Tcp(l) => {
                let l = match tokio::net::TcpListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        return warn!(endpoint = %name, error = %e, "FPM publisher cannot listen")
                    }
                };
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            match s.into_std() {
                                Ok(s) => admit(&hub, OwnedFd::from(s), false, &name),
                                Err(e) => accept_failed(&name, e).await,
                            }
                        }
                        Err(e) => accept_failed(&name, e).await,
                    }
                }
            }
            Listener::Unix(l) => {
                let l = match tokio::net::UnixListener::from_std(l) {
                    Ok(l) => l,
                    Err(e) => {
                        return warn!(endpoint = %name, error = %e, "FPM publisher cannot listen")
                    }
                };
                loop {
                    match l.accept().await {
                        Ok((s, _)) => match s.into_std() {
                            Ok(s) => admit(&hub, OwnedFd::from(s), true, &name),
                            Err(e) => accept_failed(&name, e).await,
                        },
                        Err(e) => accept_failed(&name, e).await,
                    }
                }
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = stop.notified() => {}
    }
    // No other task runs until this returns and the runtime (with every connection) is
    // dropped: the writers are stopped, the sockets still open.
    let mut unsent: Vec<u64> = Vec::new();
    for p in lock(&hub.peers).iter() {
        let out = lock(&p.out);
        if out.closed {
            // Its writer failed and its task had not finished: lost with that subscriber.
            hub.lost_with_peer.fetch_add(
                out.unsent(0).filter(|s| s & HEARTBEAT == 0).count() as u64,
                Relaxed,
            );
            continue;
        }
        // Read what the peer sent since (a late PING): closing a TCP socket with unread
        // input resets the connection, and the peer's kernel may discard what it holds.
        drain_input(p.fd);
        let held = if out.tail_cap > 0 {
            kernel_held(p.fd)
        } else {
            0
        };
        if held > out.tail_bytes + out.partial {
            debug!(
                held,
                kept = out.tail_bytes,
                "the kernel holds more than was kept track of: every kept message counted"
            );
        }
        unsent.extend(out.unsent(held));
    }
    unsent.sort_unstable();
    unsent.dedup();
    let heartbeats = unsent.iter().filter(|s| *s & HEARTBEAT != 0).count() as u64;
    *lock(&hub.unsent) = Unsent {
        messages: unsent.len() as u64 - heartbeats,
        heartbeats,
    };
}

/// Reads and discards whatever input is waiting on the socket, without blocking.
fn drain_input(fd: RawFd) {
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `fd` is an open socket (see `Peer::fd`); `buf` is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            return;
        }
    }
}

async fn accept_failed(name: &str, e: io::Error) {
    // Out of file descriptors and the like: do not spin.
    debug!(endpoint = %name, error = %e, "FPM publisher: accept failed");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Starts serving one connection (a non-blocking socket), unless there are too many.
fn admit(hub: &Arc<Hub>, stream: OwnedFd, unix: bool, name: &str) {
    if hub.connections.fetch_add(1, Relaxed) >= MAX_PEERS {
        hub.connections.fetch_sub(1, Relaxed);
        warn!(endpoint = %name, limit = MAX_PEERS, "FPM publisher: connection refused, too many connections");
        return;
    }
    let hub = Arc::clone(hub);
    let name = name.to_owned();
    tokio::spawn(async move {
        match connection(&hub, stream, unix).await {
            Ok(()) => debug!(endpoint = %name, "FPM subscriber disconnected"),
            Err(e) => debug!(endpoint = %name, error = %e, "FPM subscriber connection closed"),
        }
        hub.connections.fetch_sub(1, Relaxed);
    });
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("no subscription to every message within {0:?}")]
    NoSubscription(Duration),
}

/// One connection, registered for reading only. (Tokio's streams also register for
/// writability, and on a Unix socket every read by the subscriber then wakes this thread and
/// makes the subscriber's `recv` pay for the wake-up: measured at 17 µs per `recvfrom` in the
/// relay against 3 µs with libzmq's publisher, which asks for writability only while it has
/// something to write. Writes here are non-blocking `send`s that back off on a full socket.)
type Conn = tokio::io::unix::AsyncFd<OwnedFd>;

/// How long a writer waits before trying a full socket again.
const FULL_SOCKET_RETRY: Duration = Duration::from_millis(1);

/// Handshakes, then reads subscriptions while a writer task sends the queue.
async fn connection(hub: &Arc<Hub>, stream: OwnedFd, unix: bool) -> Result<(), Ended> {
    let fd = stream.as_raw_fd();
    // A Unix stream send may pass the buffer size by one whole skb: keep twice as much.
    let tail_cap = if unix {
        2 * send_buffer(fd) + (64 << 10)
    } else {
        0
    };
    // SAFETY: an `OwnedFd` keeps its descriptor open, and always the same one, until dropped.
    let conn = unsafe { Conn::register_with_interest(stream, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut buf = Vec::with_capacity(256);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&conn, &mut buf))
        .await
        .map_err(|_| Ended::Timeout(HANDSHAKE_TIMEOUT))??;
    let peer = Arc::new(Peer {
        out: Mutex::new(Outbox {
            tail_cap,
            ..Outbox::default()
        }),
        wake: tokio::sync::Notify::new(),
        fd,
    });
    lock(&hub.peers).push(Arc::clone(&peer));
    // The writer uses the descriptor, which `conn` keeps open until after the writer is
    // stopped below.
    let writer = tokio::spawn(write_queue(Arc::clone(hub), Arc::clone(&peer)));
    let result = read_subscriptions(hub, &peer, &conn, &mut buf).await;
    // The peer is gone (or broke the protocol): stop writing to it.
    lock(&peer.out).closed = true;
    writer.abort();
    let _ = writer.await;
    let lost = {
        let out = lock(&peer.out);
        let unwritten: usize = out.queue.iter().skip(out.tail).map(|e| e.1).sum();
        hub.queued_bytes
            .fetch_sub(unwritten.saturating_sub(out.partial), Relaxed);
        out.unsent(0).filter(|s| s & HEARTBEAT == 0).count()
    };
    lock(&hub.peers).retain(|p| !Arc::ptr_eq(p, &peer));
    if lost > 0 {
        hub.lost_with_peer.fetch_add(lost as u64, Relaxed);
        warn!(
            messages = lost,
            "FPM subscriber disconnected with messages still queued for it"
        );
    }
    result
}

/// Writes all of `bytes`, waiting while the socket is full; for the handshake only.
async fn send_all(fd: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match send_some(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(FULL_SOCKET_RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking `send`: how much the kernel took, `WouldBlock` when the socket is full.
fn send_some(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is an open socket (see `Peer::fd`); `bytes` is readable for its length.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match usize::try_from(n) {
        Ok(0) if !bytes.is_empty() => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => Ok(n),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

async fn handshake(conn: &Conn, buf: &mut Vec<u8>) -> Result<(), Ended> {
    let mut hello = fpm_zmtp::greeting().to_vec();
    hello.extend_from_slice(&fpm_zmtp::ready("PUB"));
    send_all(conn.as_raw_fd(), &hello).await?;
    while buf.len() < fpm_zmtp::GREETING_LEN {
        read_more(conn, buf).await?;
        // A peer that is not ZeroMQ at all shows it in its first byte.
        if buf.first().is_some_and(|&b| b != 0xff) {
            return Err(ProtocolError::BadGreeting.into());
        }
    }
    fpm_zmtp::check_greeting(&buf[..fpm_zmtp::GREETING_LEN])?;
    buf.drain(..fpm_zmtp::GREETING_LEN);
    loop {
        match fpm_zmtp::next(buf, 0)? {
            Some(Unit::Command { len, name, body }) => {
                fpm_zmtp::check_ready_for("PUB", &buf[name], &buf[body])?;
                buf.drain(..len);
                return Ok(());
            }
            Some(Unit::Message { .. }) => return Err(ProtocolError::BadHandshake.into()),
            None => read_more(conn, buf).await?,
        }
    }
}

/// Reads more bytes into `buf`; EOF is an error (`UnexpectedEof`).
async fn read_more(conn: &Conn, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 1024];
    loop {
        let mut ready = conn.readable().await?;
        let read = ready.try_io(|fd| {
            // SAFETY: `fd` is an open socket; `chunk` is writable for its length.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        });
        match read {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(());
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            // Not readable after all: wait again.
            Err(_) => {}
        }
    }
}

/// Applies the peer's subscriptions and answers its PINGs until it disconnects. A peer that
/// has not subscribed within [`HANDSHAKE_TIMEOUT`] is cut off (a SUB subscribes right after
/// its READY; libzmq reconnects and subscribes again), so idle connections cannot hold the
/// connection slots.
async fn read_subscriptions(
    hub: &Hub,
    peer: &Peer,
    conn: &Conn,
    buf: &mut Vec<u8>,
) -> Result<(), Ended> {
    let subscribe_by = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut subscribed = false;
    loop {
        while let Some(unit) = fpm_zmtp::next(buf, MAX_INBOUND)? {
            let (len, sub) = match unit {
                Unit::Message { len, frames } => {
                    let (f, n) = frames.slices(buf);
                    (
                        len,
                        (n == 1).then(|| Subscription::from_message(f[0])).flatten(),
                    )
                }
                Unit::Command { len, name, body } => {
                    if &buf[name.clone()] == b"PING" {
                        // PING: TTL (2 bytes), then up to 16 bytes of context to echo.
                        let ctx = buf.get(body.start + 2..body.end).unwrap_or_default();
                        let pong = fpm_zmtp::pong(ctx);
                        let mut out = lock(&peer.out);
                        if out.pongs < MAX_PONGS {
                            hub.queued_bytes.fetch_add(pong.len(), Relaxed);
                            if out.push(None, &pong) {
                                drop(out);
                                peer.wake.notify_one();
                            }
                        }
                    }
                    (len, Subscription::from_command(&buf[name], &buf[body]))
                }
            };
            match sub {
                Some(Subscription::Subscribe(b"")) => {
                    let mut out = lock(&peer.out);
                    out.subscriptions = out.subscriptions.saturating_add(1);
                    subscribed = true;
                }
                Some(Subscription::Cancel(b"")) => {
                    let mut out = lock(&peer.out);
                    out.subscriptions = out.subscriptions.saturating_sub(1);
                }
                _ => {}
            }
            buf.drain(..len);
        }
        let read = if subscribed {
            read_more(conn, buf).await
        } else {
            match tokio::time::timeout_at(subscribe_by, read_more(conn, buf)).await {
                Ok(read) => read,
                Err(_) => return Err(Ended::NoSubscription(HANDSHAKE_TIMEOUT)),
            }
        };
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes the peer's queue as it fills, recording how much the kernel took.
async fn write_queue(hub: Arc<Hub>, peer: Arc<Peer>) {
    let mut chunk = Vec::new();
    loop {
        {
            let mut out = lock(&peer.out);
            if out.closed {
                return;
            }
            chunk.clear();
            std::mem::swap(&mut chunk, &mut out.bytes);
        }
        if chunk.is_empty() {
            // Do not keep a burst's buffer for good.
            if chunk.capacity() > 1 << 20 {
                chunk = Vec::new();
            }
            peer.wake.notified().await;
            continue;
        }
        let mut pos = 0;
        while pos < chunk.len() {
            match send_some(peer.fd, &chunk[pos..]) {
                Ok(n) => {
                    pos += n;
                    lock(&peer.out).written(n);
                    hub.queued_bytes.fetch_sub(n, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The subscriber is behind: try again shortly (no writability
                    // registration, see `Conn`).
                    tokio::time::sleep(FULL_SOCKET_RETRY).await;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    lock(&peer.out).closed = true;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_counts_partial_writes() {
        let mut o = Outbox::default();
        let unsent = |o: &Outbox, held| o.unsent(held).collect::<Vec<_>>();
        assert!(o.push(Some(0), &[1; 10]));
        assert!(!o.push(None, &[2; 3]));
        assert!(!o.push(Some(1), &[3; 5]));
        assert_eq!((o.messages, o.pongs), (2, 1));
        o.written(4);
        assert_eq!((o.queue.len(), o.partial), (3, 4));
        assert_eq!(unsent(&o, 0), [0, 1]);
        o.written(6);
        assert_eq!((o.messages, o.queue.len(), o.partial), (1, 2, 0));
        assert_eq!(unsent(&o, 0), [1]);
        o.written(5);
        assert_eq!(
            (o.messages, o.pongs, o.queue.len(), o.partial),
            (1, 0, 1, 2)
        );
        o.written(3);
        assert!(o.queue.is_empty());
        assert_eq!(o.messages, 0);
        assert_eq!(unsent(&o, 100), Vec::<u64>::new());
        // Writing more than is queued (cannot happen) does not underflow.
        o.written(7);
        assert_eq!(o.messages, 0);
    }

    #[test]
    fn outbox_written_on_the_spot() {
        let mut o = Outbox::default();
        // Wholly written: nothing for the writer.
        assert!(!o.push_partly_written(Some(0), &[1; 10], 10));
        assert_eq!((o.messages, o.bytes.len(), o.queue.len()), (0, 0, 0));
        // Partly written: the rest queued, the writer woken.
        assert!(o.push_partly_written(Some(1), &[2, 3, 4, 5], 1));
        assert_eq!(
            (o.messages, o.partial, &o.bytes[..]),
            (1, 1, &[3, 4, 5][..])
        );
        assert_eq!(o.unsent(0).collect::<Vec<_>>(), [1]);
        o.written(3);
        assert_eq!((o.messages, o.queue.len()), (0, 0));
    }

    #[test]
    fn outbox_keeps_what_the_kernel_may_hold() {
        let mut o = Outbox {
            tail_cap: 25,
            ..Outbox::default()
        };
        let unsent = |o: &Outbox, held| o.unsent(held).collect::<Vec<_>>();
        for seq in 0..10 {
            o.push(Some(seq), &[0; 10]);
        }
        o.written(95);
        // 9 written, 3 kept (30 bytes cover the 25), 1 partly written.
        assert_eq!((o.tail, o.tail_bytes, o.messages, o.partial), (3, 30, 1, 5));
        assert_eq!(unsent(&o, 0), [9]);
        // The kernel still holds 16 bytes: 5 of the partly written message, the last written
        // one, and one byte of the one before.
        assert_eq!(unsent(&o, 16), [7, 8, 9]);
        assert_eq!(unsent(&o, 15), [8, 9]);
        assert_eq!(unsent(&o, 5), [9]);
        // More than we kept track of: everything kept.
        assert_eq!(unsent(&o, 1000), [6, 7, 8, 9]);
        o.written(5);
        assert_eq!((o.tail, o.tail_bytes), (3, 30));
        assert_eq!(unsent(&o, 0), Vec::<u64>::new());
    }
}
