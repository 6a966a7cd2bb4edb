//! Helpers for the integration tests of this workspace (never a dependency of a library).
//!
//! - [`NatsServer`]: a private `nats-server` on a free port with its own store dir, killed on
//!   drop, restartable on the same port (for outage tests).
//! - [`python`]: the contract venv (`contract-tests/setup.sh`) with the real upstream packages.
//! - [`ipc_base`]: a fresh `ipc://` base path in a temp dir.
#![deny(missing_docs)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A global allocator that counts the allocations (and reallocations) of the threads that
/// opted in with [`CountingAlloc::count_this_thread`]; a test binary installs it with
/// `#[global_allocator] static A: fpm_testkit::CountingAlloc = fpm_testkit::CountingAlloc;`.
#[derive(Debug)]
pub struct CountingAlloc;

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl CountingAlloc {
    /// Starts (or stops) counting the calling thread's allocations.
    pub fn count_this_thread(on: bool) {
        COUNTING.with(|c| c.set(on));
    }

    /// Allocations counted so far, over all opted-in threads.
    pub fn allocations() -> u64 {
        ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn counted() {
        if COUNTING.try_with(std::cell::Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

// SAFETY: forwards every call to the system allocator unchanged; counting touches only a
// thread-local flag (without allocating) and an atomic.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::counted();
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        Self::counted();
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fpm-testkit sits in the repo root")
        .to_path_buf()
}

/// The stamp `contract-tests/setup.sh` leaves in a venv it completed, read from the script
/// itself (one place says which version of the venv is current).
fn setup_stamp() -> String {
    let script = std::fs::read_to_string(repo_root().join("contract-tests/setup.sh"))
        .expect("contract-tests/setup.sh");
    script
        .lines()
        .find_map(|l| {
            let at = l.find(".fpm-setup-v")?;
            let rest = &l[at..];
            Some(rest[..rest.find('"').unwrap_or(rest.len())].to_owned())
        })
        .expect("a stamp line in contract-tests/setup.sh")
}

/// The venv's python if the venv exists (made by `contract-tests/setup.sh`).
///
/// When it does not: panics if `FPM_REQUIRE_PYTHON=1` (CI), otherwise prints why the calling
/// test is skipped and returns `None`.
pub fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("FPM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/fpm-venv"));
    let py = venv.join("bin/python");
    if py.exists() && venv.join(setup_stamp()).exists() {
        return Some(py);
    }
    if std::env::var("FPM_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!(
            "FPM_REQUIRE_PYTHON=1 but no venv at {}: run contract-tests/setup.sh",
            venv.display()
        );
    }
    eprintln!(
        "SKIPPED: no Python venv at {} (run contract-tests/setup.sh to run the tests against the real upstream packages)",
        venv.display()
    );
    None
}

/// Starts Dynamo 1.6.1's own relay (`FpmEventRelay`, through `interop/dynamo_peer.py
/// dynamo-relay`) reading `zmq_endpoint` and publishing to `nats_url` under `namespace`, its
/// discovery records in `kv`: stdout piped (its JSON lines), stderr inherited.
pub fn dynamo_relay(
    py: &Path,
    namespace: &str,
    zmq_endpoint: &str,
    kv: &Path,
    nats_url: &str,
) -> Child {
    Command::new(py)
        .arg(repo_root().join("interop/dynamo_peer.py"))
        .args(["dynamo-relay", "--namespace", namespace, "--zmq-endpoint"])
        .arg(zmq_endpoint)
        .args(["--count", "100000", "--timeout", "60"])
        .env("DYN_FILE_KV", kv)
        .env("NATS_SERVER", nats_url)
        .env("DYN_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python starts")
}

/// A fresh `ipc://` base in `dir` (the emitter appends `.{dp_rank}`).
pub fn ipc_base(dir: &Path, name: &str) -> String {
    format!("ipc://{}", dir.join(name).display())
}

/// A private `nats-server`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    /// Starts one on a free port. Panics if `nats-server` is missing or does not come up.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (child, port) = spawn(dir.path(), None);
        NatsServer {
            child: Some(child),
            port,
            dir,
        }
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port after [`NatsServer::stop`].
    pub fn restart(&mut self) {
        self.stop();
        let (child, port) = spawn(self.dir.path(), Some(self.port));
        assert_eq!(port, self.port);
        self.child = Some(child);
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(dir: &Path, port: Option<u16>) -> (Child, u16) {
    match fpm_relay::nats::spawn_local_server(dir, port) {
        Ok(x) => x,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("nats-server not found: install it (apt-get install nats-server)")
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_setup_stamp_is_read_from_the_script() {
        let stamp = super::setup_stamp();
        assert!(
            stamp.starts_with(".fpm-setup-v") && !stamp.contains('"'),
            "{stamp}"
        );
    }

    use super::*;

    #[test]
    fn starts_stops_restarts() {
        let mut s = NatsServer::start();
        let port = s.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        s.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        s.restart();
        assert_eq!(s.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP/1.1 GET (no dependencies): `(status code, body)`, or an error text.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status code")?;
    Ok((code, body.to_owned()))
}

/// A private Prometheus server (Debian's `prometheus`) scraping one target every second,
/// killed on drop.
///
/// Returns `None` (and says why the test is skipped) when `prometheus` is not installed,
/// unless `FPM_REQUIRE_PROMETHEUS=1` (CI), which panics instead.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts one scraping `target` (`HOST:PORT`, path `/metrics`) every second.
    pub fn start(target: &str) -> Option<Self> {
        let bin = ["prometheus", "/usr/bin/prometheus"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok());
        let Some(bin) = bin else {
            if std::env::var("FPM_REQUIRE_PROMETHEUS").as_deref() == Ok("1") {
                panic!("FPM_REQUIRE_PROMETHEUS=1 but `prometheus` is not installed (apt-get install prometheus)");
            }
            eprintln!("SKIPPED: `prometheus` is not installed (apt-get install prometheus)");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: fpm\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(http_get(&p.addr, "/-/ready"), Ok((200, _))) {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus did not become ready on {}", p.addr);
    }

    /// Runs an instant PromQL query; returns the JSON response body.
    pub fn query(&self, promql: &str) -> String {
        const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        let q = percent_encoding::utf8_percent_encode(promql, QUERY).to_string();
        match http_get(&self.addr, &format!("/api/v1/query?query={q}")) {
            Ok((200, body)) => body,
            other => panic!("query {promql:?} failed: {other:?}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
