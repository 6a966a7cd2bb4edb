//! Tracking: the latest metrics of every engine stream (`worker_id`, `dp_rank`) with loss
//! accounting, staleness, and a cap on what is tracked.
//!
//! Rules, per stream, on the engine's `counter_id`:
//! - the first message of a stream with counter `c > 0` counts `c` as `missed_before_start`;
//! - `c == last + 1` is in order; `c > last + 1` counts `c - last - 1` messages as a gap;
//! - `c == last` is a duplicate (e.g. two relays on one engine);
//! - `c < last` through another relay than the latest message's (`publisher_id`), within
//!   `window`: a message that relay delivers late — if it was missing, it is taken back out of
//!   `gap_messages` (or `missed_before_start`) and counted `late`, else it is a `reordered`
//!   copy; either way it does not overwrite the newer latest. (One relay delivers an engine's
//!   messages in order, so older counters only arrive late through another one.)
//! - `c < last` through the same relay, or further back than `window`, is a producer
//!   restart: counted, and the stream starts over from `c` (a restart whose first counter is
//!   `c > 0` also counts `missed_before_start`).
//!
//! A stream silent for `stale_after` (heartbeats keep it alive) is reported stale, and removed
//! after `remove_after`; its counts stay in the totals. At most `max_streams` streams are
//! tracked: a new stream over the cap takes the place of the longest-silent stale stream if
//! there is one, else it is not tracked and counted (`untracked`); its samples still flow.
//! Envelope sequence numbers are checked per relay (`publisher_id`) the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fpm_schema::ForwardPassMetrics;

use crate::filter::Source;
use crate::ingest::Sample;

/// Limits and timings of a [`Tracker`].
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// A stream silent this long is stale.
    pub stale_after: Duration,
    /// A stream silent this long is removed.
    pub remove_after: Duration,
    /// Streams tracked, at most (also the cap on relays tracked by `publisher_id`).
    pub max_streams: usize,
    /// How far back a counter may be and still count as reordered rather than a restart.
    pub reorder_window: u64,
    /// Recent iterations kept per stream for rates and percentiles.
    pub recent: usize,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            stale_after: Duration::from_secs(5),
            remove_after: Duration::from_secs(60),
            max_streams: 4096,
            reorder_window: 1024,
            recent: 256,
        }
    }
}

/// One engine stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The engine.
    pub worker_id: String,
    /// Its data-parallel rank.
    pub dp_rank: i64,
}

/// Loss and traffic counts (per stream, and summed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LossCounts {
    /// Messages received.
    pub received: u64,
    /// Of which iterations (`wall_time > 0`).
    pub iterations: u64,
    /// Of which idle heartbeats.
    pub heartbeats: u64,
    /// Messages missing between received ones (counter gaps).
    pub gap_messages: u64,
    /// Gaps (each one or more missing messages).
    pub gaps: u64,
    /// Duplicated counters.
    pub duplicates: u64,
    /// Counters older than the latest that were already received (copies), not applied.
    pub reordered: u64,
    /// Messages that arrived after a newer one, into a gap already counted: taken back out
    /// of `gap_messages` (within the reorder window), not applied as the latest.
    pub late: u64,
    /// Producer restarts.
    pub restarts: u64,
    /// Messages the producer sent before this subscriber saw the stream (first counter > 0).
    pub missed_before_start: u64,
}

impl LossCounts {
    fn add(&mut self, o: &LossCounts) {
        self.received = self.received.saturating_add(o.received);
        self.iterations = self.iterations.saturating_add(o.iterations);
        self.heartbeats = self.heartbeats.saturating_add(o.heartbeats);
        self.gap_messages = self.gap_messages.saturating_add(o.gap_messages);
        self.gaps = self.gaps.saturating_add(o.gaps);
        self.duplicates = self.duplicates.saturating_add(o.duplicates);
        self.reordered = self.reordered.saturating_add(o.reordered);
        self.late = self.late.saturating_add(o.late);
        self.restarts = self.restarts.saturating_add(o.restarts);
        self.missed_before_start = self
            .missed_before_start
            .saturating_add(o.missed_before_start);
    }
}

/// What the tracker made of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// A new stream; `missed` messages before it (first counter).
    First {
        /// `missed_before_start` added.
        missed: u64,
    },
    /// The next counter.
    InOrder,
    /// `missing` messages skipped.
    Gap {
        /// Messages missing.
        missing: u64,
    },
    /// The same counter again: not applied.
    Duplicate,
    /// An older counter already received: not applied.
    Reordered,
    /// An older counter that was missing (inside a counted gap): the gap shrinks; not applied
    /// as the latest.
    Late,
    /// The producer restarted; `missed` messages before its first seen one.
    Restart {
        /// `missed_before_start` added.
        missed: u64,
    },
    /// Over the stream cap: not tracked.
    Untracked,
}

impl Observation {
    /// Is this sample an iteration not seen before, of a tracked stream? True for all but
    /// duplicates, reordered copies and untracked streams' samples (which cannot be told
    /// apart from copies): what histograms and models should take, so that a sample two
    /// relays deliver counts once.
    pub fn is_new_iteration(&self) -> bool {
        !matches!(
            self,
            Observation::Duplicate | Observation::Reordered | Observation::Untracked
        )
    }

    /// Did this sample become the stream's latest?
    pub fn applied(&self) -> bool {
        !matches!(
            self,
            Observation::Duplicate
                | Observation::Reordered
                | Observation::Late
                | Observation::Untracked
        )
    }
}

/// The state of one stream.
#[derive(Debug, Clone)]
pub struct StreamState {
    /// Which stream.
    pub key: StreamKey,
    /// Where its messages arrive from (the latest's subject).
    pub source: Arc<Source>,
    /// The newest message (by counter).
    pub latest: ForwardPassMetrics,
    /// When the stream was first seen and last heard (Unix ns, receive time).
    pub first_seen_ns: u64,
    /// Last message of any kind (heartbeats included).
    pub last_seen_ns: u64,
    /// Counts.
    pub counts: LossCounts,
    /// Silent for longer than `stale_after` at the last sweep.
    pub stale: bool,
    /// Recent iterations: (receive time ns, wall_time s), oldest first.
    recent: VecDeque<(u64, f64)>,
    recent_cap: usize,
    /// The relay (`publisher_id`) that delivered the latest message.
    latest_publisher: u64,
    /// Which of the last `reorder_window` counters are still missing: index `i` is counter
    /// `latest - i`; `RECEIVED`, `IN_GAP` (counted in `gap_messages`) or `BEFORE_START`
    /// (counted in `missed_before_start`). A late arrival fills its slot and is taken back
    /// out of the count it was in.
    missing: VecDeque<u8>,
}

impl StreamState {
    /// Iterations per second over the recent window ending at `now_ns` (the last 10 s at most).
    pub fn iteration_rate(&self, now_ns: u64) -> f64 {
        let from = now_ns.saturating_sub(10_000_000_000);
        let mut n = 0u64;
        let mut first = u64::MAX;
        for &(t, _) in self.recent.iter().rev() {
            if t < from {
                break;
            }
            n += 1;
            first = first.min(t);
        }
        if n == 0 {
            return 0.0;
        }
        // Over the span the kept iterations cover: a full ring may hold less than 10 s.
        let span = if self.recent.len() == self.recent_cap {
            now_ns.saturating_sub(first)
        } else {
            now_ns.saturating_sub(from.max(self.first_seen_ns))
        };
        if span == 0 {
            0.0
        } else {
            n as f64 / (span as f64 / 1e9)
        }
    }

    /// The `q` quantile (0..=1) of the recent iterations' wall_time (nearest rank), if any.
    pub fn wall_time_quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.recent.iter().map(|&(_, w)| w).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
        Some(v[rank - 1])
    }
}

const RECEIVED: u8 = 0;
const IN_GAP: u8 = 1;
const BEFORE_START: u8 = 2;

/// The missing-counter window of a run whose first seen counter is `c`: `c` received, the
/// counters below it (within the window) missing before start.
fn start_window(c: i64, window: u64) -> VecDeque<u8> {
    let mut w = VecDeque::from([RECEIVED]);
    for _ in 0..(c.max(0) as u64).min(window) {
        w.push_back(BEFORE_START);
    }
    w
}

#[derive(Debug, Clone, Copy, Default)]
struct PublisherState {
    last: u64,
    last_seen_ns: u64,
}

/// Envelope sequence accounting across relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SequenceCounts {
    /// Relays seen.
    pub publishers: u64,
    /// Envelopes missing between received ones.
    pub gap_messages: u64,
    /// Sequence going backwards (a relay restart reusing its id, or reordering).
    pub resets: u64,
    /// Envelopes from relays over the cap (not checked).
    pub untracked: u64,
}

/// What one sweep changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Streams that became stale.
    pub stale: Vec<StreamKey>,
    /// Streams removed.
    pub removed: Vec<StreamKey>,
}

/// Latest metrics and loss accounting per stream.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    streams: HashMap<StreamKey, StreamState>,
    /// Counts of removed streams, so totals never go down.
    removed: LossCounts,
    untracked: u64,
    evicted: u64,
    publishers: HashMap<u64, PublisherState>,
    sequence: SequenceCounts,
}

impl Tracker {
    /// An empty tracker.
    pub fn new(config: TrackerConfig) -> Self {
        Tracker {
            config,
            streams: HashMap::new(),
            removed: LossCounts::default(),
            untracked: 0,
            evicted: 0,
            publishers: HashMap::new(),
            sequence: SequenceCounts::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Takes one sample into account.
    pub fn observe(&mut self, s: &Sample) -> Observation {
        self.observe_sequence(s);
        let now = s.received_at_ns;
        let key = StreamKey {
            worker_id: s.metrics.worker_id.clone(),
            dp_rank: s.metrics.dp_rank,
        };
        let c = s.metrics.counter_id;
        let heartbeat = s.metrics.wall_time == 0.0;
        let window = self.config.reorder_window;
        let cap = self.config.recent.max(1);
        if let Some(st) = self.streams.get_mut(&key) {
            st.last_seen_ns = st.last_seen_ns.max(now);
            st.stale = false;
            st.counts.received += 1;
            if heartbeat {
                st.counts.heartbeats += 1;
            } else {
                st.counts.iterations += 1;
            }
            let last = st.latest.counter_id;
            // Counters are untrusted input: compare and subtract without overflow.
            let ahead = i128::from(c) - i128::from(last);
            let obs = if ahead == 1 {
                Observation::InOrder
            } else if ahead > 1 {
                let missing = u64::try_from(ahead - 1).unwrap_or(u64::MAX);
                st.counts.gaps += 1;
                st.counts.gap_messages = st.counts.gap_messages.saturating_add(missing);
                Observation::Gap { missing }
            } else if c == last {
                st.counts.duplicates += 1;
                Observation::Duplicate
            } else if s.publisher_id != st.latest_publisher
                && c >= 0
                && last.saturating_sub(c) as u64 <= window
            {
                // Through another relay than the latest (two relays on one engine): one relay
                // delivers in order, so an older counter from another one is a copy, or a
                // message that relay was first to deliver late.
                match st.missing.get((last - c) as usize).copied() {
                    Some(slot) if slot != RECEIVED => {
                        if slot == IN_GAP {
                            st.counts.gap_messages = st.counts.gap_messages.saturating_sub(1);
                        } else {
                            st.counts.missed_before_start =
                                st.counts.missed_before_start.saturating_sub(1);
                        }
                        st.missing[(last - c) as usize] = RECEIVED;
                        st.counts.late += 1;
                        Observation::Late
                    }
                    _ => {
                        st.counts.reordered += 1;
                        Observation::Reordered
                    }
                }
            } else {
                // Through the same relay, which delivers an engine's messages in order: the
                // producer started over.
                st.counts.restarts += 1;
                let missed = c.max(0) as u64;
                st.counts.missed_before_start += missed;
                Observation::Restart { missed }
            };
            match obs {
                Observation::Restart { .. } => {
                    st.missing = start_window(c, window);
                }
                Observation::InOrder | Observation::Gap { .. } => {
                    let gap = u64::try_from(ahead - 1).unwrap_or(u64::MAX);
                    for _ in 0..gap.min(window) {
                        st.missing.push_front(IN_GAP);
                    }
                    st.missing.push_front(RECEIVED);
                    st.missing.truncate(window.max(1) as usize);
                }
                _ => {}
            }
            if obs.applied() {
                st.latest_publisher = s.publisher_id;
                st.latest = s.metrics.clone();
                st.source = s.source.clone();
                if !heartbeat {
                    if st.recent.len() == cap {
                        st.recent.pop_front();
                    }
                    st.recent.push_back((now, s.metrics.wall_time));
                }
            }
            return obs;
        }
        if self.streams.len() >= self.config.max_streams && !self.evict_one(now) {
            self.untracked += 1;
            return Observation::Untracked;
        }
        let missed = c.max(0) as u64;
        let mut recent = VecDeque::with_capacity(cap);
        if !heartbeat {
            recent.push_back((now, s.metrics.wall_time));
        }
        let counts = LossCounts {
            received: 1,
            iterations: u64::from(!heartbeat),
            heartbeats: u64::from(heartbeat),
            missed_before_start: missed,
            ..LossCounts::default()
        };
        self.streams.insert(
            key.clone(),
            StreamState {
                key,
                source: s.source.clone(),
                latest: s.metrics.clone(),
                first_seen_ns: now,
                last_seen_ns: now,
                counts,
                stale: false,
                recent,
                recent_cap: cap,
                latest_publisher: s.publisher_id,
                missing: start_window(c, window),
            },
        );
        Observation::First { missed }
    }

    fn observe_sequence(&mut self, s: &Sample) {
        let now = s.received_at_ns;
        if let Some(p) = self.publishers.get_mut(&s.publisher_id) {
            if s.sequence > p.last {
                self.sequence.gap_messages = self
                    .sequence
                    .gap_messages
                    .saturating_add(s.sequence - p.last - 1);
            } else {
                self.sequence.resets += 1;
            }
            p.last = s.sequence;
            p.last_seen_ns = now;
            return;
        }
        if self.publishers.len() >= self.config.max_streams {
            // Forget the longest-silent relay, if it has been silent past the stale time.
            let stale = now.saturating_sub(self.config.stale_after.as_nanos() as u64);
            let oldest = self
                .publishers
                .iter()
                .filter(|(_, p)| p.last_seen_ns < stale)
                .min_by_key(|(_, p)| p.last_seen_ns)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    self.publishers.remove(&k);
                }
                None => {
                    self.sequence.untracked += 1;
                    return;
                }
            }
        }
        self.sequence.publishers += 1;
        self.publishers.insert(
            s.publisher_id,
            PublisherState {
                last: s.sequence,
                last_seen_ns: now,
            },
        );
    }

    /// Removes the longest-silent stale stream to make room; false if none is stale.
    fn evict_one(&mut self, now: u64) -> bool {
        let stale = now.saturating_sub(self.config.stale_after.as_nanos() as u64);
        let victim = self
            .streams
            .values()
            .filter(|st| st.last_seen_ns < stale)
            .min_by_key(|st| st.last_seen_ns)
            .map(|st| st.key.clone());
        match victim {
            Some(k) => {
                if let Some(st) = self.streams.remove(&k) {
                    self.removed.add(&st.counts);
                }
                self.evicted += 1;
                true
            }
            None => false,
        }
    }

    /// Marks streams silent past `stale_after` as stale and removes those silent past
    /// `remove_after`, as of `now_ns` (Unix ns).
    pub fn sweep(&mut self, now_ns: u64) -> Sweep {
        let stale_before = now_ns.saturating_sub(self.config.stale_after.as_nanos() as u64);
        let remove_before = now_ns.saturating_sub(self.config.remove_after.as_nanos() as u64);
        let mut out = Sweep::default();
        let mut gone = Vec::new();
        for st in self.streams.values_mut() {
            if st.last_seen_ns < remove_before {
                gone.push(st.key.clone());
            } else if st.last_seen_ns < stale_before && !st.stale {
                st.stale = true;
                out.stale.push(st.key.clone());
            }
        }
        for k in gone {
            if let Some(st) = self.streams.remove(&k) {
                self.removed.add(&st.counts);
            }
            out.removed.push(k);
        }
        out.stale.sort();
        out.removed.sort();
        out
    }

    /// The streams, in no particular order.
    pub fn streams(&self) -> impl Iterator<Item = &StreamState> {
        self.streams.values()
    }

    /// The streams sorted by worker and rank.
    pub fn sorted(&self) -> Vec<&StreamState> {
        let mut v: Vec<&StreamState> = self.streams.values().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// One stream.
    pub fn get(&self, worker_id: &str, dp_rank: i64) -> Option<&StreamState> {
        self.streams.get(&StreamKey {
            worker_id: worker_id.to_owned(),
            dp_rank,
        })
    }

    /// Counts over every stream ever tracked (removed ones included).
    pub fn totals(&self) -> LossCounts {
        let mut t = self.removed;
        for st in self.streams.values() {
            t.add(&st.counts);
        }
        t
    }

    /// Samples of streams over the cap (not tracked).
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Stale streams evicted to make room for new ones.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Envelope sequence accounting.
    pub fn sequence(&self) -> SequenceCounts {
        self.sequence
    }

    /// Attention-DP check over the tracked streams: each worker's dp ranks, and the workers
    /// whose set differs from the one most workers report (Dynamo's planner skips scaling
    /// unless every worker reports the same).
    pub fn dp_ranks(&self) -> crate::planner::DpRankReport {
        crate::planner::DpRankReport::from_streams(
            self.streams
                .keys()
                .map(|k| (k.worker_id.as_str(), k.dp_rank)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn src() -> Arc<Source> {
        Arc::new(Source {
            namespace: "ns".into(),
            component: "c".into(),
            endpoint: Some("e".into()),
        })
    }

    fn sample(worker: &str, rank: i64, counter: i64, wall: f64, t_ms: u64) -> Sample {
        let mut m = ForwardPassMetrics::heartbeat(worker, rank);
        m.counter_id = counter;
        m.wall_time = wall;
        Sample {
            received_at_ns: t_ms * 1_000_000,
            publisher_id: 1,
            sequence: t_ms,
            published_at_ms: t_ms,
            source: src(),
            metrics: m,
        }
    }

    #[test]
    fn counters_gaps_duplicates_reorders_restarts() {
        let mut t = Tracker::new(TrackerConfig::default());
        // (counter, relay, what the tracker makes of it)
        let seq = [
            (5, 1, Observation::First { missed: 5 }),
            (6, 1, Observation::InOrder),
            (9, 1, Observation::Gap { missing: 2 }),
            (9, 2, Observation::Duplicate),
            (8, 2, Observation::Late),
            (6, 2, Observation::Reordered),
            (3, 2, Observation::Late), // before start, delivered by the other relay
            (10, 1, Observation::InOrder),
            (0, 1, Observation::Restart { missed: 0 }),
            (1, 1, Observation::InOrder),
            (5000, 1, Observation::Gap { missing: 4998 }),
            (3, 1, Observation::Restart { missed: 3 }),
        ];
        for (i, (c, relay, want)) in seq.iter().enumerate() {
            let mut s = sample("w", 0, *c, 0.01, i as u64);
            s.publisher_id = *relay;
            let got = t.observe(&s);
            assert_eq!(got, *want, "counter {c} via {relay}");
        }
        let st = t.get("w", 0).unwrap();
        assert_eq!(st.latest.counter_id, 3);
        assert_eq!(
            st.counts,
            LossCounts {
                received: 12,
                iterations: 12,
                heartbeats: 0,
                gap_messages: 4999, // 7 and 4998 in the second gap; 8 came late
                gaps: 2,
                duplicates: 1,
                reordered: 1,
                late: 2,
                restarts: 2,
                missed_before_start: 7, // 5 - 1 (3 came late) + 3
            }
        );
    }

    /// Two relays on one engine: an older counter through the other relay is a copy or a late
    /// arrival, never a restart; through the relay of the latest message it is a restart (one
    /// relay delivers an engine's messages in order).
    #[test]
    fn a_late_copy_of_counter_zero_is_not_a_restart() {
        let via = |relay: u64, mut s: Sample| {
            s.publisher_id = relay;
            s
        };
        let mut t = Tracker::new(TrackerConfig::default());
        for c in 0..5 {
            t.observe(&via(1, sample("w", 0, c, 0.01 + c as f64 * 1e-3, c as u64)));
        }
        assert_eq!(
            t.observe(&via(2, sample("w", 0, 0, 0.01, 6))),
            Observation::Reordered
        );
        assert_eq!(t.get("w", 0).unwrap().counts.restarts, 0);
        // The engine restarts: counter 0 through relay 1, even the same (idle) message.
        assert_eq!(
            t.observe(&via(1, sample("w", 0, 0, 0.01, 7))),
            Observation::Restart { missed: 0 }
        );
        assert_eq!(t.get("w", 0).unwrap().counts.restarts, 1);
    }

    /// Two relays each deliver the engine's messages in order, each missing some; their
    /// streams interleave at random. In the end `gap_messages` is exactly the number of
    /// counters neither delivered, every second copy is a duplicate or reordered, and there is
    /// no restart.
    #[test]
    fn two_in_order_relays_interleaved_leave_exact_gap_counts() {
        let mut x: u64 = 0x1234_5678_9ABC_DEF1;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50 {
            let n = 2000i64;
            let a: Vec<i64> = (0..n).filter(|&c| c == 0 || rnd() % 8 != 0).collect();
            let b: Vec<i64> = (0..n).filter(|_| rnd() % 3 != 0).collect();
            // Relay b lags relay a by up to 100 messages, at random.
            let (mut i, mut j) = (0usize, 0usize);
            let mut order: Vec<(i64, u64)> = Vec::new();
            while i < a.len() || j < b.len() {
                let take_a = j >= b.len()
                    || (i < a.len() && a[i] <= b[j] + 100 && (a[i] < b[j] || rnd() % 2 == 0));
                if take_a {
                    order.push((a[i], 1));
                    i += 1;
                } else {
                    order.push((b[j], 2));
                    j += 1;
                }
            }
            let mut t = Tracker::new(TrackerConfig::default());
            for (k, &(c, relay)) in order.iter().enumerate() {
                let mut s = sample("w", 0, c, 0.01, k as u64);
                s.publisher_id = relay;
                t.observe(&s);
            }
            let distinct: std::collections::BTreeSet<i64> = order.iter().map(|p| p.0).collect();
            let max = *distinct.iter().next_back().unwrap();
            let k = t.get("w", 0).unwrap().counts;
            assert_eq!(k.restarts, 0, "{k:?}");
            assert_eq!(
                k.gap_messages,
                (max + 1) as u64 - distinct.len() as u64,
                "{k:?}"
            );
            assert_eq!(
                k.duplicates + k.reordered,
                order.len() as u64 - distinct.len() as u64,
                "{k:?}"
            );
            assert_eq!(k.received, order.len() as u64);
        }
    }

    /// Counters and sequences are untrusted: extreme values never overflow (no panic in
    /// debug builds), counts saturate.
    #[test]
    fn extreme_counters_and_sequences_do_not_overflow() {
        let mut t = Tracker::new(TrackerConfig::default());
        let extremes = [
            i64::MIN,
            0,
            i64::MAX,
            i64::MIN,
            -1,
            i64::MAX,
            i64::MAX - 1,
            1,
            i64::MAX,
        ];
        for (i, &c) in extremes.iter().enumerate() {
            for relay in [1, 2] {
                let mut s = sample("w", 0, c, 0.01, i as u64);
                s.publisher_id = relay;
                s.sequence = if i % 2 == 0 { u64::MAX } else { 0 };
                t.observe(&s);
            }
        }
        let k = t.get("w", 0).unwrap().counts;
        assert_eq!(k.received, 18);
        // One stream: the totals are its counts, whatever they saturated to.
        assert_eq!(t.totals(), k);
        let _ = t.sequence();
    }

    #[test]
    fn older_counters_never_overwrite_the_latest() {
        // (Through another relay: through the same one an older counter is a restart.)
        let mut t = Tracker::new(TrackerConfig::default());
        t.observe(&sample("w", 0, 10, 0.5, 0));
        let mut older = sample("w", 0, 7, 0.9, 1);
        older.publisher_id = 2;
        t.observe(&older);
        let mut same = sample("w", 0, 10, 0.9, 2);
        same.publisher_id = 2;
        t.observe(&same);
        let st = t.get("w", 0).unwrap();
        assert_eq!((st.latest.counter_id, st.latest.wall_time), (10, 0.5));
    }

    #[test]
    fn stale_then_removed_with_counts_kept() {
        let cfg = TrackerConfig {
            stale_after: Duration::from_secs(5),
            remove_after: Duration::from_secs(20),
            ..TrackerConfig::default()
        };
        let mut t = Tracker::new(cfg);
        t.observe(&sample("a", 0, 0, 0.01, 0));
        t.observe(&sample("b", 0, 0, 0.01, 0));
        // b keeps sending heartbeats: never stale.
        for s in 1..=30 {
            t.observe(&sample("b", 0, s, 0.0, s as u64 * 1000));
        }
        assert_eq!(t.sweep(4_000 * 1_000_000), Sweep::default());
        let sw = t.sweep(6_000 * 1_000_000);
        assert_eq!(sw.stale, vec![key("a")]);
        assert!(t.get("a", 0).unwrap().stale);
        assert!(!t.get("b", 0).unwrap().stale);
        let sw = t.sweep(21_000 * 1_000_000);
        assert_eq!(sw.removed, vec![key("a")]);
        assert!(t.get("a", 0).is_none());
        assert_eq!(t.totals().received, 32);
        // It comes back: a new stream (its counter 5 means 5 missed before it).
        assert_eq!(
            t.observe(&sample("a", 0, 5, 0.01, 22_000)),
            Observation::First { missed: 5 }
        );
    }

    fn key(w: &str) -> StreamKey {
        StreamKey {
            worker_id: w.into(),
            dp_rank: 0,
        }
    }

    #[test]
    fn the_cap_evicts_stale_streams_first_then_refuses() {
        let cfg = TrackerConfig {
            max_streams: 2,
            ..TrackerConfig::default()
        };
        let mut t = Tracker::new(cfg);
        t.observe(&sample("a", 0, 0, 0.01, 0));
        t.observe(&sample("b", 0, 0, 0.01, 1000));
        assert_eq!(
            t.observe(&sample("c", 0, 0, 0.01, 2000)),
            Observation::Untracked
        );
        // a is silent for 6 s: c takes its place.
        assert_eq!(
            t.observe(&sample("c", 0, 0, 0.01, 6500)),
            Observation::First { missed: 0 }
        );
        assert!(t.get("a", 0).is_none());
        assert_eq!((t.untracked(), t.evicted()), (1, 1));
        assert_eq!(t.streams().count(), 2);
        assert_eq!(t.totals().received, 3);
    }

    #[test]
    fn envelope_sequences_per_relay() {
        let mut t = Tracker::new(TrackerConfig::default());
        for (pub_id, seq) in [(1, 0), (1, 1), (1, 4), (2, 10), (1, 2), (2, 11)] {
            let mut s = sample("w", 0, 0, 0.0, 0);
            s.publisher_id = pub_id;
            s.sequence = seq;
            t.observe(&s);
        }
        let q = t.sequence();
        assert_eq!((q.publishers, q.gap_messages, q.resets), (2, 2, 1));
    }

    #[test]
    fn rates_and_percentiles() {
        let mut t = Tracker::new(TrackerConfig::default());
        for i in 0..100 {
            t.observe(&sample("w", 0, i, (i + 1) as f64 / 1000.0, i as u64 * 10));
        }
        let st = t.get("w", 0).unwrap();
        assert_eq!(st.wall_time_quantile(0.5), Some(0.05));
        assert_eq!(st.wall_time_quantile(0.99), Some(0.099));
        let rate = st.iteration_rate(1_000 * 1_000_000);
        assert!((rate - 100.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn attention_dp_rank_sets() {
        let mut t = Tracker::new(TrackerConfig::default());
        for (w, r) in [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)] {
            t.observe(&sample(w, r, 0, 0.01, 0));
        }
        let r = t.dp_ranks();
        assert_eq!(r.mismatched(), vec!["c"]);
        assert_eq!(r.workers()["c"], BTreeSet::from([0]));
    }
}
