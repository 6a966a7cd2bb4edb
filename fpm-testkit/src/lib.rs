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

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fpm-testkit sits in the repo root")
        .to_path_buf()
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
    if py.exists() && venv.join(".fpm-setup-v2").exists() {
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
    let log = dir.join("nats.log");
    let _ = fs::remove_file(&log);
    let store = dir.join("store");
    let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-l"])
            .arg(&log)
            .arg("--store_dir")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server not found: install it (apt-get install nats-server)");
        // Wait for "client connections on 127.0.0.1:PORT" in the log.
        while Instant::now() < deadline {
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(&log) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(p) = parse_port(&text) {
                return (child, p);
            }
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited (port still in TIME_WAIT on restart): retry
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            Instant::now() < deadline,
            "nats-server did not start; log:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn parse_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("client connections on"))?;
    line.rsplit(':').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_line() {
        let log = "[1] 2026/11/25 [INF] Listening for client connections on 127.0.0.1:40123\n";
        assert_eq!(parse_port(log), Some(40123));
    }

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
