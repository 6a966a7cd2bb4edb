//! Attention-DP consistency: which data-parallel ranks each worker reports.

use std::collections::{BTreeMap, BTreeSet};

/// The dp ranks seen per worker, and the workers that disagree with the rest.
///
/// With attention data parallelism one engine (worker) publishes one stream per dp rank.
/// Dynamo's planner groups streams by `worker_id` and skips scaling unless every worker has
/// the same number of ranks. This report is stricter and says who differs: the expected set
/// is the one most workers report (ties: the smallest set in `BTreeSet` order), and every
/// worker with another set is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DpRankReport {
    ranks: BTreeMap<String, BTreeSet<i64>>,
}

impl DpRankReport {
    /// Groups `(worker_id, dp_rank)` stream keys by worker.
    pub fn from_streams<'a>(streams: impl IntoIterator<Item = (&'a str, i64)>) -> Self {
        let mut ranks: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        for (worker, rank) in streams {
            ranks.entry(worker.to_owned()).or_default().insert(rank);
        }
        DpRankReport { ranks }
    }

    /// Each worker's dp ranks.
    pub fn workers(&self) -> &BTreeMap<String, BTreeSet<i64>> {
        &self.ranks
    }

    /// The rank set most workers report; `None` without workers.
    pub fn expected_ranks(&self) -> Option<&BTreeSet<i64>> {
        let mut counts: BTreeMap<&BTreeSet<i64>, usize> = BTreeMap::new();
        for set in self.ranks.values() {
            *counts.entry(set).or_default() += 1;
        }
        // max_by_key returns the last maximum; iterate in reverse so ties go to the smallest.
        counts
            .into_iter()
            .rev()
            .max_by_key(|&(_, n)| n)
            .map(|(set, _)| set)
    }

    /// Workers whose rank set differs from [`expected_ranks`](Self::expected_ranks).
    pub fn mismatched(&self) -> Vec<&str> {
        let Some(expected) = self.expected_ranks() else {
            return Vec::new();
        };
        self.ranks
            .iter()
            .filter(|(_, set)| *set != expected)
            .map(|(w, _)| w.as_str())
            .collect()
    }

    /// True when every worker reports the same rank set.
    pub fn is_consistent(&self) -> bool {
        self.mismatched().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_worker_and_names_the_odd_one_out() {
        let r = DpRankReport::from_streams([
            ("a", 0),
            ("a", 1),
            ("b", 1),
            ("b", 0),
            ("c", 0),
            ("a", 1),
        ]);
        assert_eq!(r.workers()["a"], BTreeSet::from([0, 1]));
        assert_eq!(r.expected_ranks(), Some(&BTreeSet::from([0, 1])));
        assert_eq!(r.mismatched(), vec!["c"]);
        assert!(!r.is_consistent());
    }

    #[test]
    fn same_size_but_different_ranks_is_a_mismatch() {
        // Upstream compares only the number of ranks; {0, 1} vs {0, 2} passes there.
        let r = DpRankReport::from_streams([("a", 0), ("a", 1), ("b", 0), ("b", 2)]);
        assert_eq!(r.expected_ranks(), Some(&BTreeSet::from([0, 1])));
        assert_eq!(r.mismatched(), vec!["b"]);
    }

    #[test]
    fn consistent_and_empty() {
        let r = DpRankReport::from_streams([("a", 0), ("b", 0)]);
        assert!(r.is_consistent());
        let empty = DpRankReport::from_streams([]);
        assert!(empty.is_consistent() && empty.expected_ranks().is_none());
    }
}
