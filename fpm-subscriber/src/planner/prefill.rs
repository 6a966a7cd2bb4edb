//! Dynamo's `PrefillRegressionModel`: `wall_time ~ sum_prefill_tokens`.

use fpm_schema::ForwardPassMetrics;

use super::{
    clamp_kv_hit_rate, py_int, simulate_prefill, Core, Fit, FitError, FitQuality, ModelConfig,
    MovingAverage, PlannerError, Sample,
};

/// Predicts a prefill engine's iteration time from the prefill tokens it computes.
#[derive(Debug, Clone)]
pub struct PrefillModel {
    pub(super) core: Core,
    /// Prefill tokens per prefill request, per iteration (0 when none ran).
    avg_isl: MovingAverage,
    /// Kept for parity with upstream (which tracks it but does not use it yet).
    avg_num_prefill: MovingAverage,
}

impl PrefillModel {
    /// An empty model.
    ///
    /// # Errors
    ///
    /// See [`ModelConfig::validate`].
    pub fn new(config: &ModelConfig) -> Result<Self, PlannerError> {
        Ok(PrefillModel {
            core: Core::new(config, 1, None)?,
            avg_isl: MovingAverage::new(config.max_samples),
            avg_num_prefill: MovingAverage::new(config.max_samples),
        })
    }

    /// Feeds one message: moving averages always, a sample unless it is a heartbeat.
    pub fn observe(&mut self, fpm: &ForwardPassMetrics) {
        let s = &fpm.scheduled_requests;
        if s.num_prefill_requests > 0 {
            self.avg_isl
                .add(super::int_div(s.sum_prefill_tokens, s.num_prefill_requests));
        } else {
            self.avg_isl.add(0.0);
        }
        self.avg_num_prefill.add(s.num_prefill_requests as f64);
        self.core.add(fpm, &super::ModelKind::Prefill.features(fpm));
    }

    /// Moving average of prefill tokens per request (upstream's `avg_isl`).
    pub fn avg_isl(&self) -> f64 {
        self.avg_isl.value()
    }

    /// Moving average of prefill requests per iteration.
    pub fn avg_num_prefill(&self) -> f64 {
        self.avg_num_prefill.value()
    }

    core_accessors!();

    /// Estimated TTFT (seconds) of the next request: `queued_prefill_tokens + avg_isl`,
    /// discounted by the KV hit rate (clamped to `[0, 0.95]`), chunked into
    /// `max_num_batched_tokens` iterations. `None` without a fit or with a non-positive
    /// token budget.
    pub fn estimate_next_ttft(
        &mut self,
        queued_prefill_tokens: i64,
        max_num_batched_tokens: i64,
        kv_hit_rate: Option<f64>,
    ) -> Option<f64> {
        self.core.fit().ok()?;
        if max_num_batched_tokens <= 0 {
            return None;
        }
        let scale = 1.0 - clamp_kv_hit_rate(kv_hit_rate);
        let total_tokens = (queued_prefill_tokens as f64 + self.avg_isl.value()) * scale;
        let core = &mut self.core;
        simulate_prefill(total_tokens, max_num_batched_tokens, |chunk| {
            core.predict(&[chunk])
        })
    }

    /// `(engine_rps, ttft_ms)` for one prefill of `isl` tokens (chunked past
    /// `max_num_batched_tokens`): `engine_rps = 1 / wall_time`. `(0, 0)` without a fit or
    /// with `isl <= 0`. An unreachable `ttft_sla` (ms) still returns the best rate.
    pub fn find_best_engine_prefill_rps(
        &mut self,
        ttft_sla: f64,
        isl: f64,
        max_num_batched_tokens: Option<i64>,
    ) -> (f64, f64) {
        let _ = ttft_sla; // upstream only logs against it
        if self.core.fit().is_err() || isl <= 0.0 {
            return (0.0, 0.0);
        }
        let wt = match max_num_batched_tokens {
            Some(mbt) if mbt > 0 && isl > mbt as f64 => {
                let num_chunks = py_int((isl / mbt as f64).ceil());
                let full = (num_chunks - 1) as f64;
                let remainder = isl - ((i128::from(num_chunks) - 1) * i128::from(mbt)) as f64;
                full * self.predict(mbt as f64) + self.predict(remainder)
            }
            _ => self.predict(isl),
        };
        (1.0 / wt, wt * 1000.0)
    }

    fn predict(&mut self, tokens: f64) -> f64 {
        self.core.predict(&[tokens]).expect("fitted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::fpm;

    fn fitted() -> PrefillModel {
        let mut m = PrefillModel::new(&ModelConfig::default()).unwrap();
        // wall_time = 0.01 + 1e-5 * tokens, one request per iteration.
        for t in [100, 200, 400, 800, 1600] {
            m.observe(&fpm(0.01 + 1e-5 * t as f64, 1, t, 0, 0));
        }
        m
    }

    #[test]
    fn ttft_chunks_queue_plus_avg_isl() {
        let mut m = fitted();
        assert!((m.avg_isl() - 620.0).abs() < 1e-12);
        // 1000 queued + 620 avg = 1620 tokens, budget 1000: chunks 1000 and 620.
        let t = m.estimate_next_ttft(1000, 1000, None).unwrap();
        let want = (0.01 + 1e-5 * 1000.0) + (0.01 + 1e-5 * 620.0);
        assert!((t - want).abs() < 1e-12, "{t} vs {want}");
        // A 50% hit rate halves the work: 810 tokens, one chunk.
        let t = m.estimate_next_ttft(1000, 1000, Some(0.5)).unwrap();
        assert!((t - (0.01 + 1e-5 * 810.0)).abs() < 1e-12);
        // The discount is capped at 0.95; NaN means none.
        let capped = m.estimate_next_ttft(1000, 1000, Some(1.0)).unwrap();
        assert!((capped - (0.01 + 1e-5 * 81.0)).abs() < 1e-12);
        assert_eq!(
            m.estimate_next_ttft(1000, 1000, Some(f64::NAN)),
            m.estimate_next_ttft(1000, 1000, None)
        );
        assert_eq!(m.estimate_next_ttft(1000, 0, None), None);
        assert_eq!(m.estimate_next_ttft(-5000, 1000, None), Some(0.0));
    }

    #[test]
    fn prefill_rps_chunks_long_prompts() {
        let mut m = fitted();
        let (rps, ms) = m.find_best_engine_prefill_rps(100.0, 500.0, Some(1000));
        assert!((ms - 15.0).abs() < 1e-9 && (rps - 1.0 / 0.015).abs() < 1e-9);
        // 2500 tokens with a 1000 budget: two full chunks and 500.
        let (_, ms) = m.find_best_engine_prefill_rps(100.0, 2500.0, Some(1000));
        assert!((ms - (2.0 * 20.0 + 15.0)).abs() < 1e-9, "{ms}");
        assert_eq!(m.find_best_engine_prefill_rps(100.0, 0.0, None), (0.0, 0.0));
    }

    #[test]
    fn not_fitted_until_min_observations_and_heartbeats_are_no_samples() {
        let mut m = PrefillModel::new(&ModelConfig::default()).unwrap();
        for _ in 0..10 {
            m.observe(&fpm(0.0, 0, 0, 0, 0));
        }
        assert_eq!(m.num_observations(), 0);
        for t in [100, 200, 300, 400] {
            m.observe(&fpm(0.01 + 1e-5 * t as f64, 2, t, 0, 0));
        }
        assert!(!m.has_sufficient_data());
        assert_eq!(
            m.fit(),
            Err(FitError::TooFewObservations { have: 4, need: 5 })
        );
        assert_eq!(m.estimate_next_ttft(0, 100, None), None);
        // A heartbeat still moves the (already started) averages.
        let before = m.avg_isl();
        m.observe(&fpm(0.0, 0, 0, 0, 0));
        assert!(m.avg_isl() < before);
        m.observe(&fpm(0.02, 1, 500, 0, 0));
        assert!(m.fit().is_ok());
    }

    #[test]
    fn negative_slope_is_rejected() {
        let mut m = PrefillModel::new(&ModelConfig::default()).unwrap();
        for t in [100, 200, 300, 400, 500] {
            m.observe(&fpm(0.1 - 1e-4 * t as f64, 1, t, 0, 0));
        }
        assert!(matches!(
            m.fit(),
            Err(FitError::NegativeCoefficient { index: 0, .. })
        ));
        assert_eq!(m.find_best_engine_prefill_rps(1.0, 100.0, None), (0.0, 0.0));
    }
}
