//! Dynamo's `_MovingAverage`: a fixed window that ignores leading zeros.

use std::collections::VecDeque;

/// Fixed-window moving average that skips zeros until the first non-zero value.
///
/// Same arithmetic as Dynamo's `_MovingAverage` (a running sum: the oldest value is
/// subtracted before the new one is added), so values are bit-identical to upstream's.
#[derive(Debug, Clone)]
pub struct MovingAverage {
    window: VecDeque<f64>,
    /// The window size; upstream uses the model's `max_num_fpm_samples`.
    capacity: usize,
    sum: f64,
    /// Leading zeros (an idle engine before traffic) would drag the average down.
    seen_nonzero: bool,
}

impl MovingAverage {
    /// An empty average over the last `capacity` values (`capacity` >= 1).
    pub fn new(capacity: usize) -> Self {
        assert!(
            capacity >= 1,
            "moving-average window must hold at least one value"
        );
        MovingAverage {
            window: VecDeque::with_capacity(capacity),
            capacity,
            sum: 0.0,
            seen_nonzero: false,
        }
    }

    /// Adds `value`, unless it is a zero and no non-zero value has been seen yet.
    pub fn add(&mut self, value: f64) {
        if value == 0.0 && !self.seen_nonzero {
            return;
        }
        if value != 0.0 {
            self.seen_nonzero = true;
        }
        if self.window.len() == self.capacity {
            self.sum -= self.window.pop_front().expect("window is full");
        }
        self.window.push_back(value);
        self.sum += value;
    }

    /// The average of the window, `0.0` when it is empty.
    pub fn value(&self) -> f64 {
        if self.window.is_empty() {
            0.0
        } else {
            self.sum / self.window.len() as f64
        }
    }

    /// How many values the window holds.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// True when no value has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_skipped_later_zeros_count() {
        let mut a = MovingAverage::new(3);
        a.add(0.0);
        a.add(0.0);
        assert!(a.is_empty());
        assert_eq!(a.value(), 0.0);
        a.add(4.0);
        a.add(0.0);
        assert_eq!(a.len(), 2);
        assert_eq!(a.value(), 2.0);
    }

    #[test]
    fn window_keeps_the_last_values() {
        let mut a = MovingAverage::new(2);
        for v in [1.0, 2.0, 3.0, 5.0] {
            a.add(v);
        }
        assert_eq!(a.len(), 2);
        assert_eq!(a.value(), 4.0);
    }

    #[test]
    fn running_sum_matches_upstream_rounding() {
        // Upstream keeps a running sum, so the value can differ from a fresh sum in the last
        // bits; this sequence shows the difference (Python gives 0.6499999999999999 too).
        let mut a = MovingAverage::new(2);
        for v in [0.5, 0.9, 0.4] {
            a.add(v);
        }
        assert_eq!(a.value(), 0.6499999999999999);
        assert_ne!(a.value(), (0.9 + 0.4) / 2.0);
    }
}
