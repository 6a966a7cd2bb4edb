//! Dynamo's `DecodeRegressionModel`: `wall_time ~ num_decode_requests + sum_decode_kv_tokens`.

use fpm_schema::ForwardPassMetrics;

use super::{
    int_div, py_int, py_max, Core, Fit, FitError, FitQuality, ModelConfig, MovingAverage,
    PlannerError, Sample,
};

/// Predicts a decode engine's iteration time from its batch size and KV tokens.
///
/// Under multicollinearity the `num_decode_requests` coefficient may come out negative: that
/// alone does not reject the fit; beyond -1e-6 it is clamped to 0 (upstream's
/// `_relaxable_feature_indices = {0}`).
#[derive(Debug, Clone)]
pub struct DecodeModel {
    pub(super) core: Core,
    /// KV tokens per decode request, over iterations that had decode requests.
    avg_decode_len: MovingAverage,
    /// Decode requests per iteration.
    avg_num_decode: MovingAverage,
    /// Largest `sum_decode_kv_tokens` seen: the batch-size cap when the KV capacity is not
    /// given.
    max_observed_kv: f64,
}

impl DecodeModel {
    /// An empty model.
    ///
    /// # Errors
    ///
    /// See [`ModelConfig::validate`].
    pub fn new(config: &ModelConfig) -> Result<Self, PlannerError> {
        Ok(DecodeModel {
            core: Core::new(config, 2, Some(0))?,
            avg_decode_len: MovingAverage::new(config.max_samples),
            avg_num_decode: MovingAverage::new(config.max_samples),
            max_observed_kv: 0.0,
        })
    }

    /// Feeds one message: moving averages always, a sample unless it is a heartbeat.
    pub fn observe(&mut self, fpm: &ForwardPassMetrics) {
        let s = &fpm.scheduled_requests;
        if s.num_decode_requests > 0 {
            self.avg_decode_len
                .add(int_div(s.sum_decode_kv_tokens, s.num_decode_requests));
        }
        self.avg_num_decode.add(s.num_decode_requests as f64);
        if s.sum_decode_kv_tokens as f64 > self.max_observed_kv {
            self.max_observed_kv = s.sum_decode_kv_tokens as f64;
        }
        self.core.add(fpm, &super::ModelKind::Decode.features(fpm));
    }

    /// Moving average of KV tokens per decode request (upstream's `avg_decode_length`).
    pub fn avg_decode_length(&self) -> f64 {
        self.avg_decode_len.value()
    }

    /// Moving average of decode requests per iteration.
    pub fn avg_num_decode(&self) -> f64 {
        self.avg_num_decode.value()
    }

    /// Largest `sum_decode_kv_tokens` observed (heartbeats included; 0 before any).
    pub fn max_observed_kv(&self) -> f64 {
        self.max_observed_kv
    }

    core_accessors!();

    /// Estimated next decode iteration time (seconds) with one more request of average
    /// length: `x = [avg_num_decode + 1, scheduled + queued + avg_decode_length]`.
    pub fn estimate_next_itl(
        &mut self,
        scheduled_decode_kv: i64,
        queued_decode_kv: i64,
    ) -> Option<f64> {
        self.core.fit().ok()?;
        let kv = (i128::from(scheduled_decode_kv) + i128::from(queued_decode_kv)) as f64;
        let total_kv = kv + self.avg_decode_len.value();
        let num_req = self.avg_num_decode.value() + 1.0;
        self.core.predict(&[num_req, total_kv])
    }

    /// `(engine_rps, itl_ms)`: the largest batch size (binary search, capped by KV capacity
    /// `max_kv_tokens / context_length`, `max_num_seqs`, else the largest KV seen or 256)
    /// whose predicted ITL (`wall_time / accept_length`) is within `itl` ms, turned into a
    /// rate by Little's law: `batch / (osl * wall_time / accept_length)`. If even batch 1
    /// misses `itl`, the batch-1 rate. `(0, 0)` without a fit or with a non-positive
    /// `itl`, `context_length` or `osl`.
    pub fn find_best_engine_decode_rps(
        &mut self,
        itl: f64,
        context_length: f64,
        osl: f64,
        max_kv_tokens: Option<i64>,
        max_num_seqs: Option<i64>,
        accept_length: f64,
    ) -> (f64, f64) {
        if self.core.fit().is_err() || context_length <= 0.0 || osl <= 0.0 || itl <= 0.0 {
            return (0.0, 0.0);
        }
        let accept_length = py_max(1.0, accept_length);
        let kv_cap = match max_kv_tokens {
            Some(m) if m > 0 => py_int(m as f64 / context_length).max(1),
            _ if self.max_observed_kv > 0.0 => py_int(self.max_observed_kv / context_length).max(1),
            _ => 256,
        };
        let seq_cap = match max_num_seqs {
            Some(s) if s > 0 => s,
            _ => kv_cap,
        };
        let max_batch = kv_cap.min(seq_cap).max(1);
        let (mut lo, mut hi) = (1_i64, max_batch);
        let (mut best_bs, mut best_wt) = (1_i64, self.predict(1.0, context_length));
        let best_itl_ms = best_wt * 1000.0 / accept_length;
        if best_itl_ms > itl {
            return (
                best_bs as f64 / (osl * (best_wt / accept_length)),
                best_itl_ms,
            );
        }
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let kv = mid as f64 * context_length;
            let wt = self.predict(mid as f64, kv);
            if wt * 1000.0 / accept_length <= itl {
                (best_bs, best_wt) = (mid, wt);
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
        (
            best_bs as f64 / (osl * (best_wt / accept_length)),
            best_wt * 1000.0 / accept_length,
        )
    }

    fn predict(&mut self, num_requests: f64, kv_tokens: f64) -> f64 {
        self.core
            .predict(&[num_requests, kv_tokens])
            .expect("fitted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::fpm;

    /// wall_time = 0.005 + 1e-4 * requests + 1e-7 * kv on a grid (not collinear).
    fn fitted() -> DecodeModel {
        let mut m = DecodeModel::new(&ModelConfig::default()).unwrap();
        for r in [1, 4, 16, 64] {
            for kv_per in [100, 1000, 4000] {
                let kv = r * kv_per;
                m.observe(&fpm(
                    0.005 + 1e-4 * r as f64 + 1e-7 * kv as f64,
                    0,
                    0,
                    r,
                    kv,
                ));
            }
        }
        m
    }

    #[test]
    fn itl_adds_one_average_request() {
        let mut m = fitted();
        let (n, len) = (m.avg_num_decode(), m.avg_decode_length());
        assert!(
            (n - 21.25).abs() < 1e-12 && (len - 1700.0).abs() < 1e-9,
            "{n} {len}"
        );
        let itl = m.estimate_next_itl(10_000, 500).unwrap();
        let want = 0.005 + 1e-4 * (n + 1.0) + 1e-7 * (10_500.0 + len);
        assert!((itl - want).abs() < 1e-12, "{itl} vs {want}");
    }

    #[test]
    fn decode_rps_binary_searches_batch_size() {
        let mut m = fitted();
        // ctx 1000: wt(b) = 0.005 + 1e-4 b + 1e-4 b = 0.005 + 2e-4 b. ITL 10.1 ms -> b = 25.
        let (rps, itl) =
            m.find_best_engine_decode_rps(10.1, 1000.0, 100.0, Some(1_000_000), None, 1.0);
        assert!((itl - 10.0).abs() < 1e-6, "{itl}");
        assert!((rps - 25.0 / (100.0 * 0.010)).abs() < 1e-6, "{rps}");
        // max_num_seqs caps the batch.
        let (rps, itl) =
            m.find_best_engine_decode_rps(10.1, 1000.0, 100.0, Some(1_000_000), Some(5), 1.0);
        assert!((itl - 6.0).abs() < 1e-9 && (rps - 5.0 / (100.0 * 0.006)).abs() < 1e-6);
        // Unreachable: batch 1 rate; speculative accept length divides the ITL.
        let (rps, itl) = m.find_best_engine_decode_rps(1.0, 1000.0, 100.0, None, None, 2.0);
        assert!((itl - 2.6).abs() < 1e-9 && (rps - 1.0 / (100.0 * 0.0026)).abs() < 1e-6);
        assert_eq!(
            m.find_best_engine_decode_rps(0.0, 1000.0, 100.0, None, None, 1.0),
            (0.0, 0.0)
        );
    }

    #[test]
    fn negative_request_coefficient_is_relaxed_and_clamped() {
        // wall_time falls with requests at fixed kv; rises with kv.
        let mut m = DecodeModel::new(&ModelConfig::default()).unwrap();
        for (r, kv) in [
            (1, 1000),
            (2, 1000),
            (1, 5000),
            (2, 5000),
            (3, 9000),
            (1, 9000),
        ] {
            m.observe(&fpm(0.01 - 1e-3 * r as f64 + 1e-6 * kv as f64, 0, 0, r, kv));
        }
        let f = m.fit().unwrap();
        assert_eq!(f.coef()[0], 0.0, "clamped: {f:?}");
        assert!((f.coef()[1] - 1e-6).abs() < 1e-12);
        // A negative kv coefficient rejects the fit.
        let mut m = DecodeModel::new(&ModelConfig::default()).unwrap();
        for (r, kv) in [
            (1, 1000),
            (2, 1000),
            (1, 5000),
            (2, 5000),
            (3, 9000),
            (1, 9000),
        ] {
            m.observe(&fpm(0.05 + 1e-3 * r as f64 - 1e-6 * kv as f64, 0, 0, r, kv));
        }
        assert!(matches!(
            m.fit(),
            Err(FitError::NegativeCoefficient { index: 1, .. })
        ));
        assert_eq!(m.estimate_next_itl(0, 0), None);
    }

    #[test]
    fn max_observed_kv_counts_heartbeats_too() {
        let mut m = DecodeModel::new(&ModelConfig::default()).unwrap();
        m.observe(&fpm(0.0, 0, 0, 3, 7000));
        assert_eq!((m.max_observed_kv(), m.num_observations()), (7000.0, 0));
        assert!((m.avg_decode_length() - 7000.0 / 3.0).abs() < 1e-12);
    }
}
