//! A live NATS subscription feeding [`Ingest`] and [`Tracker`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::{SelectAll, StreamExt};

use crate::filter::SubjectFilter;
use crate::ingest::{Ingest, RejectCounts, Sample};
use crate::tracker::{LossCounts, Observation, SequenceCounts, Sweep, Tracker, TrackerConfig};

/// The wall clock in Unix nanoseconds (receive timestamps).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What to subscribe to and how to track it.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Subjects.
    pub filter: SubjectFilter,
    /// Tracking limits and timings.
    pub tracker: TrackerConfig,
    /// Largest FPM payload accepted (bytes); larger ones are counted `too_large`.
    pub max_payload: usize,
    /// How often [`Subscriber::next`] sweeps for stale streams while messages flow.
    pub sweep_interval: Duration,
}

impl SubscriberConfig {
    /// Defaults for everything but the filter.
    pub fn new(filter: SubjectFilter) -> Self {
        SubscriberConfig {
            filter,
            tracker: TrackerConfig::default(),
            max_payload: fpm_schema::DEFAULT_MAX_SIZE,
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// A snapshot of a subscriber's counters. `received == samples + rejected.total()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberStats {
    /// NATS messages received.
    pub received: u64,
    /// Samples made.
    pub samples: u64,
    /// Messages rejected, by reason.
    pub rejected: RejectCounts,
    /// Per-stream loss accounting, summed.
    pub streams: LossCounts,
    /// Envelope sequence accounting across relays.
    pub sequence: SequenceCounts,
    /// Streams tracked now.
    pub tracked_streams: u64,
    /// Samples of streams over the cap.
    pub untracked: u64,
    /// Messages the NATS client dropped because this subscriber fell behind, as reported by
    /// the client's slow-consumer events (see [`Subscriber::slow_consumer_counter`]).
    pub slow_consumer_drops: u64,
}

/// Subscribes, decodes, tracks. Pull samples with [`Subscriber::next`].
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use fpm_subscriber::{ScopeFilter, SubjectFilter, Subscriber, SubscriberConfig};
/// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let filter = SubjectFilter::parse("dynamo", "*", "*", ScopeFilter::Endpoint)?;
/// let mut sub = Subscriber::subscribe(&client, SubscriberConfig::new(filter)).await?;
/// while let Some(sample) = sub.next().await {
///     println!("{} rank {}: {} s", sample.metrics.worker_id, sample.metrics.dp_rank, sample.metrics.wall_time);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Subscriber {
    source: Input,
    ingest: Ingest,
    tracker: Tracker,
    slow_consumer: Arc<AtomicU64>,
    sweep_interval_ns: u64,
    last_sweep_ns: u64,
    last_observation: Option<Observation>,
}

/// Where messages come from.
#[derive(Debug)]
enum Input {
    Nats(SelectAll<async_nats::Subscriber>),
    /// An in-process event plane (`(subject, envelope)` broadcast); no server-side subject
    /// filtering, so other subjects are skipped here.
    Memory(tokio::sync::broadcast::Receiver<(String, bytes::Bytes)>),
}

impl Subscriber {
    /// Subscribes to an in-process event plane (a relay's `EventPlane::Memory` sender's
    /// `subscribe()`). Messages on subjects outside the filter are skipped; messages lost
    /// because this subscriber fell more than the channel's capacity behind are counted as
    /// slow-consumer drops.
    pub fn from_memory(
        rx: tokio::sync::broadcast::Receiver<(String, bytes::Bytes)>,
        config: SubscriberConfig,
    ) -> Self {
        Subscriber {
            source: Input::Memory(rx),
            ingest: Ingest::new(config.filter, config.max_payload),
            tracker: Tracker::new(config.tracker),
            slow_consumer: Arc::new(AtomicU64::new(0)),
            sweep_interval_ns: config.sweep_interval.as_nanos() as u64,
            last_sweep_ns: unix_now_ns(),
            last_observation: None,
        }
    }

    /// Subscribes to every subject of `config.filter` on `client`.
    ///
    /// # Errors
    /// A subscription the client refused.
    pub async fn subscribe(
        client: &async_nats::Client,
        config: SubscriberConfig,
    ) -> Result<Self, async_nats::SubscribeError> {
        let mut subs = SelectAll::new();
        for subject in config.filter.nats_subjects() {
            subs.push(client.subscribe(subject).await?);
        }
        Ok(Subscriber {
            source: Input::Nats(subs),
            ingest: Ingest::new(config.filter, config.max_payload),
            tracker: Tracker::new(config.tracker),
            slow_consumer: Arc::new(AtomicU64::new(0)),
            sweep_interval_ns: config.sweep_interval.as_nanos() as u64,
            last_sweep_ns: unix_now_ns(),
            last_observation: None,
        })
    }

    /// The next sample (already tracked); bad messages are counted and skipped. `None` once
    /// the subscriptions end (client closed).
    pub async fn next(&mut self) -> Option<Sample> {
        loop {
            let sample = match &mut self.source {
                Input::Nats(subs) => {
                    let msg = subs.next().await?;
                    let now = self.maybe_sweep();
                    self.ingest.ingest(msg.subject.as_str(), &msg.payload, now)
                }
                Input::Memory(rx) => match rx.recv().await {
                    Ok((subject, body)) => {
                        if self.ingest.filter().source_of(&subject).is_none() {
                            continue;
                        }
                        let now = self.maybe_sweep();
                        self.ingest.ingest(&subject, &body, now)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        self.slow_consumer.fetch_add(n, Relaxed);
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                },
            };
            if let Ok(sample) = sample {
                self.last_observation = Some(self.tracker.observe(&sample));
                return Some(sample);
            }
        }
    }

    /// What the tracker made of the sample [`Subscriber::next`] returned last (`None` before
    /// the first). Feed histograms and models only samples whose observation
    /// [`Observation::is_new_iteration`], or a sample two relays deliver counts twice.
    pub fn last_observation(&self) -> Option<Observation> {
        self.last_observation
    }

    fn maybe_sweep(&mut self) -> u64 {
        let now = unix_now_ns();
        if now.saturating_sub(self.last_sweep_ns) >= self.sweep_interval_ns {
            self.sweep(now);
        }
        now
    }

    /// Marks stale and removes silent streams as of `now_ns` (call it on a timer when
    /// messages may stop altogether).
    pub fn sweep(&mut self, now_ns: u64) -> Sweep {
        self.last_sweep_ns = now_ns;
        self.tracker.sweep(now_ns)
    }

    /// The tracker.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// The decoder and its counts.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// A counter to increment from the NATS client's event callback on
    /// `async_nats::Event::SlowConsumer` (the client owns the callback, so the subscriber
    /// cannot install it). Each event is one message dropped by the client; when the
    /// client's own event queue is full events are lost too, so envelope sequence gaps
    /// ([`SequenceCounts::gap_messages`]) are the complete count of lost envelopes.
    pub fn slow_consumer_counter(&self) -> Arc<AtomicU64> {
        self.slow_consumer.clone()
    }

    /// Uses `counter` as the slow-consumer counter (one made before the client connected).
    pub fn with_slow_consumer_counter(mut self, counter: Arc<AtomicU64>) -> Self {
        self.slow_consumer = counter;
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> SubscriberStats {
        SubscriberStats {
            received: self.ingest.received(),
            samples: self.ingest.samples(),
            rejected: self.ingest.rejected(),
            streams: self.tracker.totals(),
            sequence: self.tracker.sequence(),
            tracked_streams: self.tracker.streams().count() as u64,
            untracked: self.tracker.untracked(),
            slow_consumer_drops: self.slow_consumer.load(Relaxed),
        }
    }
}
