//! Bucketed sample storage: Dynamo's `_BaseRegressionModel` bookkeeping.
//!
//! Each input axis is cut into equal-width buckets between the smallest and largest value
//! seen on it (1-D: `bucket_size` buckets; 2-D: `isqrt(bucket_size)` per axis). Past
//! `max_samples`, the oldest sample of the fullest bucket is retired, so sustained traffic at
//! one operating point cannot push out the others. When an axis range grows, every sample is
//! re-bucketed. Bucket order is Python's dict insertion order, which decides ties.

use std::collections::VecDeque;

/// One retained observation: the model's input features and the iteration's wall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Features; only the first `ndim` are meaningful.
    x: [f64; 2],
    /// 1 for the prefill model, 2 for decode and agg.
    ndim: u8,
    wall_time: f64,
}

impl Sample {
    pub(crate) fn new(features: &[f64], wall_time: f64) -> Self {
        let mut x = [0.0; 2];
        x[..features.len()].copy_from_slice(features);
        Sample {
            x,
            ndim: features.len() as u8,
            wall_time,
        }
    }

    /// The input features (one value for prefill, two for decode and agg).
    pub fn features(&self) -> &[f64] {
        &self.x[..self.ndim as usize]
    }

    /// The iteration's wall time in seconds: the regression target.
    pub fn wall_time(&self) -> f64 {
        self.wall_time
    }
}

type Key = [i64; 2];

/// The bucketed samples of one model.
#[derive(Debug, Clone)]
pub(crate) struct SampleStore {
    ndim: usize,
    buckets_per_axis: i64,
    max_samples: usize,
    /// Python's `dict[key, deque]`: a Vec keeps insertion order, and a removed key that
    /// comes back goes to the end, as in a dict.
    buckets: Vec<(Key, VecDeque<Sample>)>,
    total: usize,
    axis_min: [f64; 2],
    axis_max: [f64; 2],
}

impl SampleStore {
    pub(crate) fn new(ndim: usize, bucket_size: usize, max_samples: usize) -> Self {
        assert!(ndim == 1 || ndim == 2);
        let buckets_per_axis = if ndim == 1 {
            bucket_size
        } else {
            bucket_size.isqrt()
        };
        SampleStore {
            ndim,
            buckets_per_axis: buckets_per_axis as i64,
            max_samples,
            buckets: Vec::new(),
            total: 0,
            axis_min: [f64::INFINITY; 2],
            axis_max: [f64::NEG_INFINITY; 2],
        }
    }

    fn key(&self, s: &Sample) -> Key {
        let mut key = [0; 2];
        for (i, k) in key.iter_mut().enumerate().take(self.ndim) {
            let (lo, hi) = (self.axis_min[i], self.axis_max[i]);
            if hi > lo {
                // Python: int((v - lo) / (hi - lo) * buckets), truncated, then clamped.
                let idx = ((s.x[i] - lo) / (hi - lo) * self.buckets_per_axis as f64).trunc() as i64;
                *k = idx.min(self.buckets_per_axis - 1).max(0);
            }
        }
        key
    }

    fn update_bounds(&mut self, s: &Sample) -> bool {
        let mut changed = false;
        for i in 0..self.ndim {
            let v = s.x[i];
            if v < self.axis_min[i] {
                self.axis_min[i] = v;
                changed = true;
            }
            if v > self.axis_max[i] {
                self.axis_max[i] = v;
                changed = true;
            }
        }
        changed
    }

    fn insert(&mut self, s: Sample) {
        let key = self.key(&s);
        match self.buckets.iter_mut().find(|(k, _)| *k == key) {
            Some((_, b)) => b.push_back(s),
            None => self.buckets.push((key, VecDeque::from([s]))),
        }
    }

    fn rebuild(&mut self) {
        let all: Vec<Sample> = self.iter().copied().collect();
        self.buckets.clear();
        for s in all {
            self.insert(s);
        }
    }

    /// Adds a sample (upstream's `add_observation` after the heartbeat check).
    pub(crate) fn add(&mut self, s: Sample) {
        debug_assert_eq!(s.ndim as usize, self.ndim);
        if self.update_bounds(&s) && self.total > 0 {
            self.rebuild();
        }
        self.insert(s);
        self.total += 1;
        if self.total > self.max_samples {
            // Python's max(): the first bucket of greatest length in insertion order.
            let mut fattest = 0;
            for (i, (_, b)) in self.buckets.iter().enumerate() {
                if b.len() > self.buckets[fattest].1.len() {
                    fattest = i;
                }
            }
            let bucket = &mut self.buckets[fattest].1;
            bucket.pop_front();
            if bucket.is_empty() {
                self.buckets.remove(fattest);
            }
            self.total -= 1;
        }
    }

    /// Samples in upstream's `_gather_observations()` order: bucket by bucket in insertion
    /// order, then the order samples entered the bucket (a re-bucketing re-enters them in
    /// the previous gather order, so that is not always arrival order). The fit sees them
    /// in this order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.buckets.iter().flat_map(|(_, b)| b.iter())
    }

    pub(crate) fn len(&self) -> usize {
        self.total
    }

    /// `(min, max)` seen on each axis (infinite before the first sample).
    pub(crate) fn bounds(&self) -> Vec<(f64, f64)> {
        (0..self.ndim)
            .map(|i| (self.axis_min[i], self.axis_max[i]))
            .collect()
    }

    /// `(bucket key, number of samples)` in insertion order (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn bucket_sizes(&self) -> Vec<(Key, usize)> {
        self.buckets.iter().map(|(k, b)| (*k, b.len())).collect()
    }

    /// Every sample sits in the bucket its features map to under the current bounds.
    #[cfg(test)]
    pub(crate) fn buckets_consistent(&self) -> bool {
        let keys_unique = self
            .buckets
            .iter()
            .enumerate()
            .all(|(i, (k, _))| self.buckets[..i].iter().all(|(o, _)| o != k));
        keys_unique
            && self
                .buckets
                .iter()
                .all(|(k, b)| !b.is_empty() && b.iter().all(|s| self.key(s) == *k))
            && self.iter().count() == self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s1(x: f64) -> Sample {
        Sample::new(&[x], 1.0)
    }

    #[test]
    fn first_sample_goes_to_bucket_zero() {
        let mut st = SampleStore::new(1, 4, 10);
        st.add(s1(5.0));
        assert_eq!(st.bucket_sizes(), vec![([0, 0], 1)]);
        assert_eq!(st.bounds(), vec![(5.0, 5.0)]);
    }

    #[test]
    fn growing_range_rebuckets_everything() {
        let mut st = SampleStore::new(1, 4, 10);
        for x in [0.0, 10.0, 5.0] {
            st.add(s1(x));
        }
        // Range 0..10, 4 buckets: 0 -> 0, 10 -> 3 (clamped), 5 -> 2.
        assert_eq!(
            st.bucket_sizes(),
            vec![([0, 0], 1), ([3, 0], 1), ([2, 0], 1)]
        );
        st.add(s1(40.0));
        // Range 0..40, re-bucketed in gather order (0, 10, 5): 0 -> 0, 10 -> 1, 5 -> 0; then
        // 40 -> 3. The gather order changes: 5 now comes before 10.
        assert_eq!(
            st.bucket_sizes(),
            vec![([0, 0], 2), ([1, 0], 1), ([3, 0], 1)]
        );
        let order: Vec<f64> = st.iter().map(|s| s.features()[0]).collect();
        assert_eq!(order, vec![0.0, 5.0, 10.0, 40.0]);
        assert!(st.buckets_consistent());
    }

    #[test]
    fn retires_oldest_of_first_fullest_bucket() {
        let mut st = SampleStore::new(1, 2, 4);
        // Range 0..10 after the second sample; two buckets, both reach 2 samples.
        for x in [0.0, 10.0, 1.0, 9.0] {
            st.add(s1(x));
        }
        assert_eq!(st.bucket_sizes(), vec![([0, 0], 2), ([1, 0], 2)]);
        st.add(s1(8.0)); // bucket 1 now 3: it is the fullest, its oldest (10.0) goes
        let order: Vec<f64> = st.iter().map(|s| s.features()[0]).collect();
        assert_eq!(order, vec![0.0, 1.0, 9.0, 8.0]);
        st.add(s1(2.0)); // tie 2 vs 2 after insert -> 3 vs 2: bucket 0 loses 0.0
        let order: Vec<f64> = st.iter().map(|s| s.features()[0]).collect();
        assert_eq!(order, vec![1.0, 2.0, 9.0, 8.0]);
    }

    #[test]
    fn tie_goes_to_first_inserted_bucket_and_emptied_bucket_moves_to_end() {
        let mut st = SampleStore::new(1, 2, 2);
        st.add(s1(0.0));
        st.add(s1(10.0)); // buckets [0]:{0}, [1]:{10}
        st.add(s1(10.0)); // [1] has 2: fullest, loses the first 10
        assert_eq!(st.bucket_sizes(), vec![([0, 0], 1), ([1, 0], 1)]);
        st.add(s1(1.0)); // [0] has 2 -> loses 0.0
        assert_eq!(st.bucket_sizes(), vec![([0, 0], 1), ([1, 0], 1)]);
        let mut st = SampleStore::new(1, 2, 1);
        st.add(s1(0.0));
        st.add(s1(10.0)); // rebuild: [0]:{0}, [1]:{10}; tie 1 vs 1: [0] emptied and removed
        assert_eq!(st.bucket_sizes(), vec![([1, 0], 1)]);
        st.add(s1(2.0)); // [0] comes back after [1]; tie: [1] is first now
        assert_eq!(st.bucket_sizes(), vec![([0, 0], 1)]);
    }

    #[test]
    fn two_dims_use_isqrt_buckets_per_axis() {
        let mut st = SampleStore::new(2, 16, 100);
        for (a, b) in [(0.0, 0.0), (100.0, 100.0), (30.0, 80.0), (99.0, 24.0)] {
            st.add(Sample::new(&[a, b], 1.0));
        }
        let keys: Vec<Key> = st.bucket_sizes().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![[0, 0], [3, 3], [1, 3], [3, 0]]);
        let mut st = SampleStore::new(2, 5, 100); // isqrt(5) = 2
        for (a, b) in [(0.0, 0.0), (10.0, 10.0), (6.0, 4.0)] {
            st.add(Sample::new(&[a, b], 1.0));
        }
        let keys: Vec<Key> = st.bucket_sizes().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![[0, 0], [1, 1], [1, 0]]);
    }

    proptest! {
        #[test]
        fn never_over_max_and_buckets_cover_every_sample(
            ndim in 1usize..=2,
            bucket_size in 1usize..20,
            max in 1usize..30,
            xs in proptest::collection::vec((0u32..1000, 0u32..1000), 0..200),
        ) {
            let mut st = SampleStore::new(ndim, bucket_size, max);
            for (i, (a, b)) in xs.iter().enumerate() {
                let f = [f64::from(*a), f64::from(*b)];
                st.add(Sample::new(&f[..ndim], i as f64));
                prop_assert!(st.len() <= max);
                prop_assert_eq!(st.len(), (i + 1).min(max));
                prop_assert!(st.buckets_consistent());
                let bpa = if ndim == 1 { bucket_size } else { bucket_size.isqrt() };
                prop_assert!(st.bucket_sizes().len() <= bpa.pow(ndim as u32));
            }
        }
    }
}
