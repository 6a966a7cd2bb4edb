//! Test helpers: a fake engine (ZeroMQ PUB), a NATS test subscriber, relay start-up, and
//! Python peers (interop/dynamo_peer.py) read line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fpm_relay::{Relay, RelayConfig};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Dynamo's default subject (namespace dynamo, component backend, endpoint generate).
pub const SUBJECT: &str =
    "namespace.dynamo.component.backend.endpoint.generate.forward-pass-metrics";

pub fn fpm(worker: &str, dp_rank: i64, counter: i64) -> Vec<u8> {
    let mut b = fpm_schema::ScheduledRequestsBuilder::new();
    b.add_prefill(100 + counter, 100 + counter, 7);
    b.add_decode(900);
    fpm_schema::encode(&fpm_schema::ForwardPassMetrics {
        worker_id: worker.into(),
        dp_rank,
        counter_id: counter,
        wall_time: 0.001 * (counter + 1) as f64,
        scheduled_requests: b.build(),
        ..Default::default()
    })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port p with p and p+1 both free (for two data-parallel ranks).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair");
}

/// A fake engine: a bound ZeroMQ PUB sending 3-frame FPM messages.
pub struct Engine {
    _ctx: zmq::Context,
    sock: zmq::Socket,
    /// Next counter frame value.
    pub counter: u64,
}

impl Engine {
    pub fn bind(endpoint: &str) -> Self {
        Self::bind_with(endpoint, |_| {})
    }

    /// Like [`Engine::bind`], with extra socket options set before binding.
    pub fn bind_with(endpoint: &str, options: impl FnOnce(&zmq::Socket)) -> Self {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::PUB).unwrap();
        sock.set_sndhwm(1_000_000).unwrap();
        sock.set_linger(1000).unwrap();
        options(&sock);
        sock.bind(endpoint).unwrap();
        Engine {
            _ctx: ctx,
            sock,
            counter: 0,
        }
    }

    pub fn send_frames(&self, frames: &[Vec<u8>]) {
        self.sock.send_multipart(frames, 0).unwrap();
    }

    /// Sends `payload` with the next counter.
    pub fn send(&mut self, payload: &[u8]) {
        let c = self.counter;
        self.counter += 1;
        self.sock
            .send_multipart([&[][..], &c.to_be_bytes()[..], payload], 0)
            .unwrap();
    }

    /// Sends an FPM for `worker` stamped with the next counter.
    pub fn send_next(&mut self, worker: &str) {
        let p = fpm(worker, 0, self.counter as i64);
        self.send(&p);
    }

    /// Skips `n` counter values (messages "lost upstream").
    pub fn skip(&mut self, n: u64) {
        self.counter += n;
    }

    /// Sends `n` FPMs for `worker` and waits until the relay has published everything it
    /// received before them plus these `n`. Returns the received count before sending.
    pub async fn send_and_wait_published(&mut self, relay: &Relay, worker: &str, n: u64) -> u64 {
        let base = relay.stats().received;
        for _ in 0..n {
            self.send_next(worker);
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().published == base + n
        })
        .await;
        base
    }

    /// Sends messages until the relay has published one (the SUB has joined; ZeroMQ drops
    /// what a PUB sends before that), then waits until all sent ones are through.
    pub async fn warm_up(&mut self, relay: &Relay, worker: &str) {
        self.warm_up_with(relay, worker, SUBJECT).await;
    }

    pub async fn warm_up_with(&mut self, relay: &Relay, worker: &str, _subject: &str) {
        let start = relay.stats().received;
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.stats().received == start {
            assert!(
                Instant::now() < deadline,
                "the relay never received from the engine"
            );
            self.send_next(worker);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let everything sent so far arrive and be processed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        wait_for(Duration::from_secs(5), || {
            let s = relay.stats();
            let settled = s.published + s.dropped.total() + s.invalid.total() + s.buffered;
            settled == s.received && (s.buffered == 0 || !s.nats_connected)
        })
        .await;
    }
}

/// Awaits `f`, panicking if it takes longer than `secs` seconds (every await in a test is
/// bounded).
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("not done within {secs} s"))
}

/// Cancels `token` and waits (bounded) for the relay to stop; returns its final counters.
pub async fn shut_down(relay: Relay, token: &CancellationToken) -> fpm_relay::Stats {
    token.cancel();
    within(10, relay.wait()).await
}

/// The value of the sample `name_and_labels` (e.g. `fpm_relay_received_messages_total` or
/// `x_total{a="b"}`) in an OpenMetrics text, if present.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

/// Polls `cond` every 10 ms; panics after `timeout`.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn start(
    endpoints: Vec<String>,
    nats_url: &str,
    tweak: impl FnOnce(&mut RelayConfig),
) -> (Relay, CancellationToken) {
    let mut c = RelayConfig::new(endpoints);
    c.nats.url = nats_url.to_owned();
    c.nats.reconnect_delay_max = Duration::from_millis(500);
    tweak(&mut c);
    let token = CancellationToken::new();
    let relay = tokio::time::timeout(Duration::from_secs(10), Relay::start(c, token.clone()))
        .await
        .expect("start in time")
        .expect("relay starts");
    // The first connection to a local server takes a few ms.
    wait_for(Duration::from_secs(5), || relay.stats().nats_connected).await;
    (relay, token)
}

/// A plain NATS subscriber on `subject`, subscribed at the server when this returns.
pub async fn subscribe(url: &str, subject: &str) -> async_nats::Subscriber {
    let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
        .await
        .expect("connect in time")
        .expect("connect");
    let sub = within(5, client.subscribe(subject.to_owned()))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .unwrap()
        .unwrap();
    sub
}

/// One received NATS message: its envelope fields, owned.
#[derive(Debug, Clone)]
pub struct Got {
    pub publisher_id: u64,
    pub sequence: u64,
    pub published_at: u64,
    pub payload: Vec<u8>,
    pub body: Vec<u8>,
}

/// Receives up to `n` messages (fewer if `timeout` passes first); checks each is a valid
/// Dynamo envelope without headers.
pub async fn collect(sub: &mut async_nats::Subscriber, n: usize, timeout: Duration) -> Vec<Got> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await else {
            break;
        };
        assert!(m.headers.is_none(), "no headers");
        assert!(m.reply.is_none(), "no reply subject");
        let e = fpm_schema::Envelope::decode_with_limit(&m.payload, 1 << 20).expect("an envelope");
        assert_eq!(e.topic, fpm_schema::FPM_TOPIC);
        // Byte-identical re-encoding: the same layout Dynamo 1.6.1 writes.
        assert_eq!(e.encode(), m.payload.to_vec());
        out.push(Got {
            publisher_id: e.publisher_id,
            sequence: e.sequence,
            published_at: e.published_at,
            payload: e.payload.to_vec(),
            body: m.payload.to_vec(),
        });
    }
    out
}

pub fn collect_all_envelopes(got: &[Got]) -> Vec<(u64, u64, u64)> {
    got.iter()
        .map(|g| (g.publisher_id, g.sequence, g.published_at))
        .collect()
}

/// A minimal HTTP GET; returns (status code, body).
/// Sends `request` as is and returns everything the server answered before closing.
pub async fn http_raw(addr: SocketAddr, request: &[u8]) -> String {
    http_raw_within(addr, request, Duration::from_secs(5)).await
}

/// Like [`http_raw`], waiting at most `limit` for the whole answer.
pub async fn http_raw_within(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    };
    tokio::time::timeout(limit, fut)
        .await
        .expect("http in time")
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let text = http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Sends a message every 20 ms until a stage of `relay` dies (bounded: 10 s).
pub async fn send_until_failed(relay: &Relay, engine: &mut Engine) {
    within(10, async {
        loop {
            tokio::select! {
                () = relay.failed() => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => engine.send_next("w"),
            }
        }
    })
    .await;
}

/// A Python peer (interop/dynamo_peer.py) whose stdout JSON lines are read by a thread.
pub struct Peer {
    child: Child,
    rx: mpsc::Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    args: String,
}

impl Peer {
    pub fn spawn(py: &Path, args: &[&str], nats_url: &str, kv: &Path) -> Self {
        let script = fpm_testkit::repo_root().join("interop/dynamo_peer.py");
        let mut child = Command::new(py)
            .arg(&script)
            .args(args)
            .env("NATS_SERVER", nats_url)
            .env("DYN_FILE_KV", kv)
            .env("DYN_LOG", "error")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("peer: {line}"),
                }
            }
        });
        Peer {
            child,
            rx,
            seen: Vec::new(),
            args: args.join(" "),
        }
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[serde_json::Value] {
        &self.seen
    }

    /// Reads lines until one matches `pred`, which is returned.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(e) => panic!(
                    "peer `{}`: no matching line within {timeout:?} ({e}); saw {:?}",
                    self.args,
                    self.seen.iter().rev().take(3).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Reads lines until `n` match `pred` (or `timeout`); returns the matching ones.
    pub fn collect(
        &mut self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        out.push(v);
                    }
                }
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `nats-server` with extra arguments (auth, TLS), killed on drop.
pub struct CustomNats {
    child: Child,
    pub port: u16,
}

impl CustomNats {
    pub fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        CustomNats { child, port }
    }
}

impl Drop for CustomNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with
/// the `openssl` command: returns the directory holding ca.pem, server.{pem,key},
/// client.{pem,key}.
pub fn make_certs() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let run = |args: &str| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("openssl {args}"))
            .current_dir(d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args}");
    };
    run("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=fpm-test-ca");
    std::fs::write(
        d.path().join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(d.path().join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        run(&format!(
            "req -newkey rsa:2048 -nodes -keyout {who}.key -out {who}.csr -subj /CN=fpm-{who}"
        ));
        run(&format!(
            "x509 -req -in {who}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {who}.pem -days 2 -extfile {who}.ext"
        ));
    }
    d
}
