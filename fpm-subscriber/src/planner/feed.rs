//! How messages reach the models: Dynamo's one per stream per tick, or every iteration.

use std::collections::BTreeMap;
use std::str::FromStr;

use fpm_schema::ForwardPassMetrics;

use super::PlannerError;

/// Which messages a planner tick feeds to its model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FeedingPolicy {
    /// Dynamo's behaviour: at each tick (`load_adjustment_interval`, 5 s by default), the
    /// latest message of each `(worker_id, dp_rank)` stream. Everything else in the
    /// interval is ignored.
    #[default]
    LatestPerTick,
    /// Every message received in the interval, in arrival order: many more samples per
    /// tick, so the buckets fill with the whole operating range sooner.
    EveryIteration,
}

impl FeedingPolicy {
    /// `"latest-per-tick"` or `"every-iteration"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedingPolicy::LatestPerTick => "latest-per-tick",
            FeedingPolicy::EveryIteration => "every-iteration",
        }
    }
}

impl FromStr for FeedingPolicy {
    type Err = PlannerError;

    fn from_str(s: &str) -> Result<Self, PlannerError> {
        match s {
            "latest-per-tick" => Ok(FeedingPolicy::LatestPerTick),
            "every-iteration" => Ok(FeedingPolicy::EveryIteration),
            _ => Err(PlannerError::UnknownFeedingPolicy(s.to_owned())),
        }
    }
}

/// Buffers messages between ticks according to a [`FeedingPolicy`].
///
/// A stream that sent nothing during an interval contributes nothing at that tick
/// (Dynamo's tracker would hand the planner its last message again; with 1 s heartbeats and
/// 5 s ticks a live engine always has a fresh one).
#[derive(Debug, Clone, Default)]
pub struct TickFeeder {
    policy: FeedingPolicy,
    /// `LatestPerTick`: newest message per `(worker_id, dp_rank)`.
    latest: BTreeMap<(String, i64), ForwardPassMetrics>,
    /// `EveryIteration`: everything, in arrival order.
    all: Vec<ForwardPassMetrics>,
}

impl TickFeeder {
    /// An empty feeder.
    pub fn new(policy: FeedingPolicy) -> Self {
        TickFeeder {
            policy,
            ..Default::default()
        }
    }

    /// The policy.
    pub fn policy(&self) -> FeedingPolicy {
        self.policy
    }

    /// Takes one received message.
    pub fn push(&mut self, fpm: ForwardPassMetrics) {
        match self.policy {
            FeedingPolicy::LatestPerTick => {
                self.latest
                    .insert((fpm.worker_id.clone(), fpm.dp_rank), fpm);
            }
            FeedingPolicy::EveryIteration => self.all.push(fpm),
        }
    }

    /// The messages to feed at this tick (latest-per-tick: ordered by `(worker_id,
    /// dp_rank)`); the buffer starts empty again.
    pub fn tick(&mut self) -> Vec<ForwardPassMetrics> {
        match self.policy {
            FeedingPolicy::LatestPerTick => {
                std::mem::take(&mut self.latest).into_values().collect()
            }
            FeedingPolicy::EveryIteration => std::mem::take(&mut self.all),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(worker: &str, rank: i64, counter: i64) -> ForwardPassMetrics {
        ForwardPassMetrics {
            worker_id: worker.into(),
            dp_rank: rank,
            counter_id: counter,
            wall_time: 0.01,
            ..Default::default()
        }
    }

    #[test]
    fn latest_per_tick_keeps_one_per_stream() {
        let mut f = TickFeeder::new(FeedingPolicy::default());
        for (w, r, c) in [
            ("b", 0, 0),
            ("a", 1, 0),
            ("b", 0, 1),
            ("a", 0, 0),
            ("a", 1, 1),
        ] {
            f.push(m(w, r, c));
        }
        let got: Vec<_> = f
            .tick()
            .iter()
            .map(|x| (x.worker_id.clone(), x.dp_rank, x.counter_id))
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), 0, 0), ("a".into(), 1, 1), ("b".into(), 0, 1)]
        );
        assert!(f.tick().is_empty());
    }

    #[test]
    fn every_iteration_keeps_everything_in_order() {
        let mut f = TickFeeder::new("every-iteration".parse().unwrap());
        for c in 0..5 {
            f.push(m("a", 0, c));
        }
        let got: Vec<i64> = f.tick().iter().map(|x| x.counter_id).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!("sometimes".parse::<FeedingPolicy>().is_err());
        assert_eq!(FeedingPolicy::EveryIteration.as_str(), "every-iteration");
    }
}
