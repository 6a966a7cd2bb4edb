//! Connecting to NATS the same way in every fpm process (the relay, `fpm record`, `fpm watch`):
//! checks that fail fast at start-up, auth and TLS, retry forever with back-off, and failed
//! attempts logged with the server and the cause.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, ServerAddr};
use tracing::{debug, warn};

use crate::config::{NatsAuth, NatsConfig};
use crate::Error;

fn parse_urls(url: &str) -> Result<Vec<ServerAddr>, Error> {
    let addrs: Vec<ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            ServerAddr::from_str(s).map_err(|e| Error::NatsUrl {
                url: url.to_owned(),
                source: Some(e),
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(Error::NatsUrl {
            url: url.to_owned(),
            source: None,
        });
    }
    Ok(addrs)
}

/// Fails when no server's host name resolves: the client would retry a name that does not
/// exist forever. A server that resolves but is down is waited for.
async fn check_resolvable(url: &str, servers: &[ServerAddr]) -> Result<(), Error> {
    let mut why = Vec::new();
    for s in servers {
        let (host, port) = (s.host().to_owned(), s.port());
        let lookup = tokio::net::lookup_host((host.clone(), port));
        match tokio::time::timeout(Duration::from_secs(5), lookup).await {
            Ok(Ok(addrs)) => {
                if addrs.count() > 0 {
                    return Ok(());
                }
                why.push(format!("host {host:?} has no address"));
            }
            Ok(Err(e)) => why.push(format!("host {host:?} cannot be resolved: {e}")),
            Err(_) => why.push(format!("resolving host {host:?} timed out")),
        }
    }
    Err(Error::NatsUnresolvable {
        url: url.to_owned(),
        hosts: why.join("; "),
    })
}

/// At most one warning about failed NATS connection attempts per this long.
const NATS_LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs failed connection attempts (server and cause) at WARN, at most every
/// [`NATS_LOG_EVERY`]. Called by the client before each attempt, with each server's last error.
fn log_failed_attempts(servers: &[async_nats::Server], last: &Mutex<Option<Instant>>) {
    let failing: Vec<&async_nats::Server> = servers
        .iter()
        .filter(|s| s.failed_attempts > 0 && s.last_error.is_some())
        .collect();
    if failing.is_empty() {
        return;
    }
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < NATS_LOG_EVERY) {
        for s in failing {
            debug!(server = %s.addr.as_url_str(), error = s.last_error.as_deref().unwrap_or(""), "NATS connection attempt failed");
        }
        return;
    }
    *last = Some(now);
    for s in failing {
        warn!(
            server = %s.addr.as_url_str(),
            error = s.last_error.as_deref().unwrap_or(""),
            failed_attempts = s.failed_attempts,
            "cannot connect to NATS; retrying (logged at most every 10 s)"
        );
    }
}

/// Checks that files exist, off the async runtime.
async fn check_files(paths: Vec<PathBuf>) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || {
        for p in paths {
            if !p.is_file() {
                return Err(Error::TlsFile(p));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal {
        what: "the TLS file check failed",
        source: std::io::Error::other(e),
    })?
}

/// Checks a NATS configuration and builds the connect options every fpm process uses:
/// the URLs parse and at least one host resolves (a name that does not exist would be retried
/// forever; a server that is merely down is waited for), credentials and TLS files are usable;
/// auth, TLS, connection name, retry forever with back-off up to `reconnect_delay_max`, failed
/// attempts logged at WARN (server and cause, at most every 10 s). Callers add their own
/// `event_callback` and connect to the returned servers.
///
/// # Errors
/// [`Error::NatsUrl`], [`Error::NatsUnresolvable`], [`Error::NatsRefused`],
/// [`Error::NatsTls`], [`Error::CredsFile`], [`Error::NkeySeed`] or [`Error::TlsFile`], naming
/// the flag to fix.
pub async fn prepare(cfg: &NatsConfig) -> Result<(Vec<ServerAddr>, ConnectOptions), Error> {
    let servers = parse_urls(&cfg.url)?;
    check_resolvable(&cfg.url, &servers).await?;
    probe_credentials(cfg, &servers).await?;
    Ok((servers, connect_options(cfg).await?))
}

/// One connection attempt without retries: a server that is up and refuses the credentials
/// (or the TLS set-up) is a start-up error, named; a server that is down is waited for later.
async fn probe_credentials(cfg: &NatsConfig, servers: &[ServerAddr]) -> Result<(), Error> {
    use async_nats::ConnectErrorKind as K;
    let probe = base_options(cfg)
        .await?
        .name(&cfg.name)
        .max_reconnects(Some(1))
        .connection_timeout(Duration::from_secs(3));
    match probe.connect(servers.to_vec()).await {
        Ok(client) => {
            drop(client);
            Ok(())
        }
        Err(e) => match e.kind() {
            K::AuthorizationViolation | K::Authentication => Err(Error::NatsRefused {
                url: cfg.url.clone(),
                source: e,
            }),
            K::Tls => Err(Error::NatsTls {
                url: cfg.url.clone(),
                source: e,
            }),
            _ => {
                debug!(error = %e, "NATS not reachable at start-up; will keep trying");
                Ok(())
            }
        },
    }
}

/// Auth and TLS options, nothing else.
async fn base_options(cfg: &NatsConfig) -> Result<ConnectOptions, Error> {
    let mut o = ConnectOptions::new();
    o = match &cfg.auth {
        NatsAuth::None => o,
        NatsAuth::UserPassword { user, password } => {
            o.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(t) => o.token(t.clone()),
        NatsAuth::CredsFile(p) => {
            o.credentials_file(p)
                .await
                .map_err(|source| Error::CredsFile {
                    path: p.clone(),
                    source,
                })?
        }
        NatsAuth::NkeySeed(seed) => {
            if let Err(e) = nkeys::KeyPair::from_seed(seed) {
                return Err(Error::NkeySeed(e));
            }
            o.nkey(seed.clone())
        }
    };
    check_files(
        cfg.tls_ca
            .iter()
            .chain(cfg.tls_client.iter().flat_map(|(c, k)| [c, k]))
            .cloned()
            .collect(),
    )
    .await?;
    if let Some(ca) = &cfg.tls_ca {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &cfg.tls_client {
        o = o
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if cfg.require_tls {
        o = o.require_tls(true);
    }
    Ok(o)
}

async fn connect_options(cfg: &NatsConfig) -> Result<ConnectOptions, Error> {
    let o = base_options(cfg).await?;
    let max = cfg.reconnect_delay_max;
    let last_log = Arc::new(Mutex::new(None));
    Ok(o.name(&cfg.name)
        .retry_on_initial_connect()
        // The one subject the relay publishes on is checked at start (`FpmSubject::new`);
        // the client need not scan it again per message.
        .skip_subject_validation(true)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            if attempts <= 1 {
                Duration::ZERO
            } else {
                let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
                (Duration::from_millis(50) * 2u32.pow(exp)).min(max)
            }
        })
        .reconnect_to_server_callback(move |servers, _info| {
            log_failed_attempts(&servers, &last_log);
            std::future::ready(None)
        }))
}

/// Starts a private `nats-server` on 127.0.0.1 with its log and store in `dir`: on `port`,
/// or on a free one (`None`). Returns the child and the port it listens on. Used by
/// `fpm demo` and the tests; the caller kills the child.
///
/// # Errors
/// `nats-server` is not installed ([`std::io::ErrorKind::NotFound`]), or it did not start
/// within 10 s (the error carries its log).
pub fn spawn_local_server(
    dir: &std::path::Path,
    port: Option<u16>,
) -> std::io::Result<(std::process::Child, u16)> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let log = dir.join("nats.log");
    let _ = std::fs::remove_file(&log);
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
            .spawn()?;
        // Wait for "client connections on 127.0.0.1:PORT" in the log.
        while Instant::now() < deadline {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(p) = parse_server_port(&text) {
                return Ok((child, p));
            }
            if let Ok(Some(_)) = child.try_wait() {
                break; // exited (port still in TIME_WAIT on restart): retry
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(std::io::Error::other(format!(
                "nats-server did not start within 10 s: {} (log {})",
                last_error_line(&text).unwrap_or("no log line"),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The port in nats-server's "Listening for client connections on 127.0.0.1:PORT" line.
fn parse_server_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("client connections on"))?;
    line.rsplit(':').next()?.trim().parse().ok()
}

/// The line of nats-server's log that says why it stopped: the last fatal or error line,
/// else the last line. One line, for a one-line error.
fn last_error_line(log: &str) -> Option<&str> {
    let lines = || log.lines().rev().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.contains("[FTL]") || l.contains("[ERR]"))
        .or_else(|| lines().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_line_is_one_line() {
        let log = "[1] [INF] Starting nats-server\n[1] [FTL] Error listening on port: 127.0.0.1:4222, \"address already in use\"\n[1] [INF] Server Exiting..\n\n";
        assert_eq!(
            last_error_line(log),
            Some("[1] [FTL] Error listening on port: 127.0.0.1:4222, \"address already in use\"")
        );
        assert_eq!(last_error_line("[INF] a\n[INF] b\n"), Some("[INF] b"));
        assert_eq!(last_error_line(""), None);
    }

    #[test]
    fn parses_the_port_line() {
        let log = "[1] 2026/11/25 [INF] Listening for client connections on 127.0.0.1:40123\n";
        assert_eq!(parse_server_port(log), Some(40123));
        assert_eq!(parse_server_port("[INF] Starting nats-server\n"), None);
    }
}
