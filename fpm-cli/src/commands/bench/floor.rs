//! `--peer floor`: the least a relay can do on this machine, as a yardstick for the others.
//!
//! One thread of the bench process, blocking sockets, no runtime: it reads the engine's
//! ZeroMQ PUB over ipc (ZMTP 3, our codec), wraps each message's payload in Dynamo's envelope
//! and writes `PUB` lines straight to nats-server, one `write` per read. No validation, no
//! buffering, no metrics, no reconnects, no auth: a message costs one `recvfrom` (sleeping in
//! it) and one `write`, the kernel work every relay pays. A second thread answers the
//! server's PINGs (rare). Its CPU is the two threads' `schedstat`; its memory is the bench's,
//! so no RSS is reported for it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fpm_schema::{Envelope, FPM_TOPIC};
use fpm_zmtp::Unit;

use super::{own_schedstat_path, thread_cpu_ns};

/// Largest message the floor relay reads (the bench sends about 450 bytes).
const MAX_MESSAGE: usize = 1 << 20;

/// The floor relay's two threads; stopped and joined on drop.
pub(super) struct FloorRelay {
    zmq: UnixStream,
    nats: TcpStream,
    schedstats: Vec<PathBuf>,
    threads: Vec<JoinHandle<()>>,
}

impl FloorRelay {
    /// Connects to the engine at `ipc_path` and to nats-server at `nats_addr`, and starts
    /// relaying onto `subject`.
    pub fn start(ipc_path: &Path, nats_addr: &str, subject: &str) -> Result<FloorRelay> {
        let mut zmq = UnixStream::connect(ipc_path)
            .with_context(|| format!("floor relay: cannot connect to {}", ipc_path.display()))?;
        zmq.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = Vec::with_capacity(MAX_MESSAGE);
        zmq.write_all(&fpm_zmtp::greeting())?;
        read_until(&mut zmq, &mut buf, |b| b.len() >= fpm_zmtp::GREETING_LEN)?;
        fpm_zmtp::check_greeting(&buf)?;
        buf.drain(..fpm_zmtp::GREETING_LEN);
        zmq.write_all(&fpm_zmtp::ready_and_subscribe())?;
        // No timeout from here on: a timed read would arm a kernel timer per message.
        zmq.set_read_timeout(None)?;

        let mut nats = TcpStream::connect(nats_addr).with_context(|| {
            format!("floor relay: cannot connect to nats-server at {nats_addr}")
        })?;
        nats.set_nodelay(true)?;
        nats.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut line = Vec::new();
        read_until(&mut nats, &mut line, |b| b.ends_with(b"\r\n"))?;
        if !line.starts_with(b"INFO ") {
            bail!("floor relay: nats-server did not greet with INFO");
        }
        nats.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")?;
        line.clear();
        read_until(&mut nats, &mut line, |b| b.ends_with(b"PONG\r\n"))?;
        nats.set_read_timeout(None)?;

        let writer = Arc::new(Mutex::new(nats.try_clone()?));
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<PathBuf>>();
        let mut threads = Vec::new();
        let (zmq_in, out, subject) = (zmq.try_clone()?, writer.clone(), subject.to_owned());
        let data_tx = tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("fpm-bench-floor".into())
                .spawn(move || {
                    let _ = data_tx.send(own_schedstat_path());
                    relay(zmq_in, buf, &out, &subject);
                })?,
        );
        let nats_in = nats.try_clone()?;
        threads.push(
            std::thread::Builder::new()
                .name("fpm-bench-floor-ping".into())
                .spawn(move || {
                    let _ = tx.send(own_schedstat_path());
                    answer_pings(nats_in, &writer);
                })?,
        );
        let mut schedstats = Vec::new();
        for _ in 0..2 {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(p)) => schedstats.push(p),
                Ok(Err(e)) => bail!("floor relay: {e}"),
                Err(_) => bail!("floor relay: a thread did not start"),
            }
        }
        Ok(FloorRelay {
            zmq,
            nats,
            schedstats,
            threads,
        })
    }

    /// CPU nanoseconds its threads have used.
    pub fn cpu_ns(&self) -> u64 {
        self.schedstats.iter().map(|p| thread_cpu_ns(p)).sum()
    }
}

impl Drop for FloorRelay {
    fn drop(&mut self) {
        // Both threads sleep in a read: shutting the sockets down wakes them.
        let _ = self.zmq.shutdown(Shutdown::Both);
        let _ = self.nats.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Reads into `buf` until `done` holds for it.
fn read_until(s: &mut impl Read, buf: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) -> Result<()> {
    let mut chunk = [0u8; 4096];
    while !done(buf) {
        let n = s.read(&mut chunk).context("floor relay: handshake")?;
        if n == 0 {
            bail!("floor relay: the peer closed during the handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Until the engine's socket closes (or is shut down): read what arrived, write one `PUB`
/// per message in one `write`.
fn relay(mut zmq: UnixStream, mut buf: Vec<u8>, nats: &Mutex<TcpStream>, subject: &str) {
    let publisher_id = 1 + (std::process::id() as u64) % (1 << 52);
    let mut sequence = 0u64;
    let (mut envelope, mut out) = (Vec::with_capacity(1024), Vec::with_capacity(64 << 10));
    // What followed the engine's greeting is already in `buf`.
    let (mut start, mut end) = (0, buf.len());
    buf.resize(MAX_MESSAGE, 0);
    loop {
        while let Ok(Some(unit)) = fpm_zmtp::next(&buf[start..end], MAX_MESSAGE) {
            match unit {
                Unit::Message { len, frames } => {
                    let (f, n) = frames.slices(&buf[start..start + len]);
                    if n == 3 {
                        Envelope {
                            publisher_id,
                            sequence,
                            published_at: unix_ms(),
                            topic: FPM_TOPIC,
                            payload: f[2],
                        }
                        .encode_into(&mut envelope);
                        sequence += 1;
                        let _ = write!(out, "PUB {subject} {}\r\n", envelope.len());
                        out.extend_from_slice(&envelope);
                        out.extend_from_slice(b"\r\n");
                    }
                    start += len;
                }
                Unit::Command { len, .. } => start += len,
            }
        }
        if !out.is_empty() {
            let mut s = nats.lock().unwrap_or_else(|e| e.into_inner());
            if s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }
        match zmq.read(&mut buf[end..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => end += n,
        }
    }
}

/// Answers nats-server's keep-alive PINGs until the connection ends.
fn answer_pings(mut nats: TcpStream, writer: &Mutex<TcpStream>) {
    let mut buf = [0u8; 4096];
    loop {
        match nats.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if buf[..n].windows(6).any(|w| w == b"PING\r\n") {
                    let mut s = writer.lock().unwrap_or_else(|e| e.into_inner());
                    if s.write_all(b"PONG\r\n").is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
