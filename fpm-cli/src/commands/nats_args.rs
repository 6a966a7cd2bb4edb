//! The NATS flags every command that talks to NATS takes (`relay`, `record`, `watch`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fpm_relay::{NatsAuth, NatsConfig};

/// How to reach NATS: server, credentials, TLS.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated. Falls back to $NATS_SERVER (Dynamo's variable),
    /// then nats://127.0.0.1:4222.
    #[arg(long, env = "NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, env = "NATS_USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// NATS password (with --nats-user).
    #[arg(
        long,
        env = "NATS_PASSWORD",
        hide_env_values = true,
        requires = "nats_user"
    )]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true, conflicts_with_all = ["nats_user", "nats_creds", "nats_nkey"])]
    pub nats_token: Option<String>,
    /// NATS credentials file (`.creds`: JWT and nkey seed).
    #[arg(long, env = "NATS_CREDS", value_name = "FILE", conflicts_with_all = ["nats_user", "nats_nkey"])]
    pub nats_creds: Option<PathBuf>,
    /// NATS nkey seed: a file holding it, or the seed itself (`SU...`).
    #[arg(
        long,
        env = "NATS_NKEY",
        hide_env_values = true,
        value_name = "FILE|SEED",
        conflicts_with = "nats_user"
    )]
    pub nats_nkey: Option<String>,
    /// CA certificate (PEM) to verify the NATS server; turns TLS on.
    #[arg(long, env = "NATS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (with --nats-tls-key).
    #[arg(
        long,
        env = "NATS_CERT",
        value_name = "FILE",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (with --nats-tls-cert).
    #[arg(
        long,
        env = "NATS_KEY",
        value_name = "FILE",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS even without certificates given. From the environment: `FPM_NATS_TLS=true`
    /// (or 1, yes, on; false, 0, no, off).
    #[arg(long, env = "FPM_NATS_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_tls: bool,
}

impl NatsArgs {
    /// The NATS configuration (`name` is the connection name the server shows).
    ///
    /// # Errors
    /// A message saying which flag to fix.
    pub fn to_config(&self, name: &str) -> Result<NatsConfig> {
        let mut c = NatsConfig {
            name: name.to_owned(),
            ..NatsConfig::default()
        };
        c.url = self
            .nats_url
            .clone()
            .or_else(|| std::env::var("NATS_SERVER").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        c.auth = if let (Some(user), Some(password)) = (&self.nats_user, &self.nats_password) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }
        } else if let Some(t) = &self.nats_token {
            NatsAuth::Token(t.clone())
        } else if let Some(p) = &self.nats_creds {
            NatsAuth::CredsFile(p.clone())
        } else if let Some(n) = &self.nats_nkey {
            let path = PathBuf::from(n);
            let seed = if path.is_file() {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the nkey seed file {n:?}"))?
                    .trim()
                    .to_owned()
            } else if n.starts_with("SU") {
                n.clone()
            } else {
                bail!("--nats-nkey {n:?} is neither a file nor a user seed (SU...)");
            };
            NatsAuth::NkeySeed(seed)
        } else {
            NatsAuth::None
        };
        c.tls_ca.clone_from(&self.nats_tls_ca);
        c.tls_client = self.nats_tls_cert.clone().zip(self.nats_tls_key.clone());
        c.require_tls = self.nats_tls;
        Ok(c)
    }
}
