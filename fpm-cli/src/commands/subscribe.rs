//! What `fpm record` and `fpm watch` share: which subjects, how to reach NATS, and the
//! subscription set-up.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use fpm_subscriber::{ScopeFilter, SubjectFilter, Subscriber, SubscriberConfig, TrackerConfig};

use super::{parse_duration, NatsArgs};

/// Subject layouts to subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeChoice {
    /// `namespace.{ns}.component.{c}.endpoint.{e}.forward-pass-metrics` (Dynamo 1.6.1).
    Endpoint,
    /// `namespace.{ns}.component.{c}.forward-pass-metrics` (older Dynamo releases).
    Component,
    /// Both.
    Any,
}

/// Which FPM events to subscribe to, and how to reach NATS.
#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Dynamo namespace, or `*` for any.
    #[arg(long, env = "DYN_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,
    /// Dynamo component, or `*` for any.
    #[arg(long, default_value = "*")]
    pub component: String,
    /// Dynamo endpoint, or `*` for any (endpoint scope).
    #[arg(long, default_value = "*")]
    pub endpoint: String,
    /// Subject layout: `endpoint` (Dynamo 1.6.1), `component` (older releases) or `any`.
    #[arg(long, value_enum, default_value = "endpoint")]
    pub scope: ScopeChoice,
    /// A stream silent this long (heartbeats included) is reported stale.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub stale_after: Duration,
    /// A stream silent this long is removed (its counts stay in the totals).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub remove_after: Duration,
    /// Streams tracked at most; beyond, stale streams make room, else new ones are counted
    /// as untracked (their messages are still recorded).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_streams: u64,
    /// Largest FPM payload accepted, in bytes; larger ones are counted.
    #[arg(long, env = "FPM_MAX_PAYLOAD_BYTES", default_value_t = fpm_schema::DEFAULT_MAX_SIZE)]
    pub max_payload_bytes: usize,
    /// How to reach NATS.
    #[command(flatten)]
    pub nats: NatsArgs,
}

impl SubscribeArgs {
    /// The subject filter.
    ///
    /// # Errors
    /// A message naming the flag.
    pub fn filter(&self) -> Result<SubjectFilter> {
        let scope = match self.scope {
            ScopeChoice::Endpoint => ScopeFilter::Endpoint,
            ScopeChoice::Component => ScopeFilter::Component,
            ScopeChoice::Any => ScopeFilter::Any,
        };
        SubjectFilter::parse(&self.namespace, &self.component, &self.endpoint, scope)
            .map_err(|e| anyhow::anyhow!("{e}: check --namespace, --component and --endpoint"))
    }

    /// Checks everything and subscribes (NATS may still be down: the client retries, and
    /// the subscription starts once it connects).
    ///
    /// # Errors
    /// Flags that cannot work (bad names, URL, credentials, a host that does not resolve).
    pub async fn subscribe(&self, name: &str) -> Result<(async_nats::Client, Subscriber)> {
        if self.remove_after < self.stale_after {
            anyhow::bail!(
                "--remove-after ({:?}) must be at least --stale-after ({:?})",
                self.remove_after,
                self.stale_after
            );
        }
        let filter = self.filter()?;
        let nats = self.nats.to_config(name)?;
        let (servers, options) = fpm_relay::nats::prepare(&nats).await?;
        let slow = Arc::new(AtomicU64::new(0));
        let s = slow.clone();
        let client = options
            .event_callback(move |event| {
                if let async_nats::Event::SlowConsumer(_) = event {
                    s.fetch_add(1, Relaxed);
                }
                async {}
            })
            .connect(servers)
            .await
            .with_context(|| format!("cannot connect to NATS at {}", nats.url))?;
        let mut config = SubscriberConfig::new(filter);
        config.max_payload = self.max_payload_bytes;
        config.tracker = TrackerConfig {
            stale_after: self.stale_after,
            remove_after: self.remove_after,
            max_streams: self.max_streams as usize,
            ..TrackerConfig::default()
        };
        let sub = Subscriber::subscribe(&client, config)
            .await
            .context("cannot subscribe")?
            .with_slow_consumer_counter(slow);
        tracing::info!(
            subjects = %self.filter()?.nats_subjects().join(" "),
            nats = %nats.url,
            "subscribed"
        );
        Ok((client, sub))
    }
}

/// One line summing up a subscriber's counts.
pub fn summary(stats: &fpm_subscriber::SubscriberStats) -> String {
    let s = &stats.streams;
    format!(
        "{} messages ({} iterations, {} heartbeats), {} streams; lost: {} in {} counter gaps, \
         {} before start, {} relay envelopes; {} duplicates, {} reordered, {} late, {} restarts; \
         {} rejected, {} slow-consumer drops",
        stats.samples,
        s.iterations,
        s.heartbeats,
        stats.tracked_streams,
        s.gap_messages,
        s.gaps,
        s.missed_before_start,
        stats.sequence.gap_messages,
        s.duplicates,
        s.reordered,
        s.late,
        s.restarts,
        stats.rejected.total(),
        stats.slow_consumer_drops
    )
}
