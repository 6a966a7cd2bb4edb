//! Dynamo's `AggRegressionModel`: `wall_time ~ sum_prefill_tokens + sum_decode_kv_tokens`.

use fpm_schema::ForwardPassMetrics;

use super::{
    clamp_kv_hit_rate, int_div, py_int, py_max, py_min, simulate_prefill, Core, Fit, FitError,
    FitQuality, ModelConfig, MovingAverage, PlannerError, Sample,
};

/// Predicts an aggregated (chunked prefill + decode) engine's iteration time.
#[derive(Debug, Clone)]
pub struct AggModel {
    pub(super) core: Core,
    /// Prefill tokens per prefill request, over iterations that had prefill requests.
    avg_isl: MovingAverage,
    /// KV tokens per decode request, over iterations that had decode requests.
    avg_decode_len: MovingAverage,
    /// Prefill tokens per iteration: the prefill piggybacked on a decode iteration.
    avg_prefill_tokens: MovingAverage,
    /// Kept for parity with upstream (tracked, not used by the estimators).
    avg_num_prefill: MovingAverage,
    /// Kept for parity with upstream (tracked, not used by the estimators).
    avg_num_decode: MovingAverage,
}

impl AggModel {
    /// An empty model.
    ///
    /// # Errors
    ///
    /// See [`ModelConfig::validate`].
    pub fn new(config: &ModelConfig) -> Result<Self, PlannerError> {
        let avg = || MovingAverage::new(config.max_samples);
        Ok(AggModel {
            core: Core::new(config, 2, None)?,
            avg_isl: avg(),
            avg_decode_len: avg(),
            avg_prefill_tokens: avg(),
            avg_num_prefill: avg(),
            avg_num_decode: avg(),
        })
    }

    /// Feeds one message: moving averages always, a sample unless it is a heartbeat.
    pub fn observe(&mut self, fpm: &ForwardPassMetrics) {
        let s = &fpm.scheduled_requests;
        if s.num_prefill_requests > 0 {
            self.avg_isl
                .add(int_div(s.sum_prefill_tokens, s.num_prefill_requests));
        }
        if s.num_decode_requests > 0 {
            self.avg_decode_len
                .add(int_div(s.sum_decode_kv_tokens, s.num_decode_requests));
        }
        self.avg_prefill_tokens.add(s.sum_prefill_tokens as f64);
        self.avg_num_prefill.add(s.num_prefill_requests as f64);
        self.avg_num_decode.add(s.num_decode_requests as f64);
        self.core.add(fpm, &super::ModelKind::Agg.features(fpm));
    }

    /// Moving average of prefill tokens per prefill request.
    pub fn avg_isl(&self) -> f64 {
        self.avg_isl.value()
    }

    /// Moving average of KV tokens per decode request.
    pub fn avg_decode_length(&self) -> f64 {
        self.avg_decode_len.value()
    }

    /// Moving average of prefill tokens per iteration.
    pub fn avg_prefill_tokens(&self) -> f64 {
        self.avg_prefill_tokens.value()
    }

    /// Moving average of prefill requests per iteration.
    pub fn avg_num_prefill(&self) -> f64 {
        self.avg_num_prefill.value()
    }

    /// Moving average of decode requests per iteration.
    pub fn avg_num_decode(&self) -> f64 {
        self.avg_num_decode.value()
    }

    core_accessors!();

    /// Estimated TTFT (seconds): like [`PrefillModel::estimate_next_ttft`] with every
    /// chunk predicted alongside `current_decode_kv` decode tokens.
    ///
    /// [`PrefillModel::estimate_next_ttft`]: super::PrefillModel::estimate_next_ttft
    pub fn estimate_next_ttft(
        &mut self,
        queued_prefill_tokens: i64,
        max_num_batched_tokens: i64,
        current_decode_kv: i64,
        kv_hit_rate: Option<f64>,
    ) -> Option<f64> {
        self.core.fit().ok()?;
        if max_num_batched_tokens <= 0 {
            return None;
        }
        let scale = 1.0 - clamp_kv_hit_rate(kv_hit_rate);
        let total_tokens = (queued_prefill_tokens as f64 + self.avg_isl.value()) * scale;
        let decode_kv = current_decode_kv as f64;
        let core = &mut self.core;
        simulate_prefill(total_tokens, max_num_batched_tokens, |chunk| {
            core.predict(&[chunk, decode_kv])
        })
    }

    /// Estimated decode iteration time (seconds) with the average piggybacked prefill:
    /// `x = [avg_prefill_tokens, scheduled + queued + avg_decode_length]`.
    pub fn estimate_next_itl(
        &mut self,
        scheduled_decode_kv: i64,
        queued_decode_kv: i64,
    ) -> Option<f64> {
        self.core.fit().ok()?;
        let kv = (i128::from(scheduled_decode_kv) + i128::from(queued_decode_kv)) as f64;
        let total_kv = kv + self.avg_decode_len.value();
        let prefill = self.avg_prefill_tokens.value();
        self.core.predict(&[prefill, total_kv])
    }

    /// `(engine_rps, ttft_ms, itl_ms)`: sweeps the batch size from 1 up to the smallest of
    /// the KV cap (`max_kv_tokens / (isl + osl / 2)`, else 1024), `max_num_seqs` and the
    /// prefill/decode balance point, stopping at the first batch whose ITL or TTFT misses
    /// its SLA (ms); the rate is `min(decode egress, prefill admission)`. If batch 1 already
    /// misses, the batch-1 figures. `(0, 0, 0)` without a fit or with a non-positive `isl`,
    /// `osl` or `max_num_batched_tokens`.
    #[allow(clippy::too_many_arguments)] // upstream's signature, argument for argument
    pub fn find_best_engine_agg_rps(
        &mut self,
        isl: f64,
        osl: f64,
        max_num_batched_tokens: i64,
        ttft_sla: f64,
        itl_sla: f64,
        max_kv_tokens: Option<i64>,
        max_num_seqs: Option<i64>,
        kv_hit_rate: Option<f64>,
        accept_length: f64,
    ) -> (f64, f64, f64) {
        let mbt = max_num_batched_tokens;
        if self.core.fit().is_err() || isl <= 0.0 || osl <= 0.0 || mbt <= 0 {
            return (0.0, 0.0, 0.0);
        }
        let accept_length = py_max(1.0, accept_length);
        let effective_isl = isl * (1.0 - clamp_kv_hit_rate(kv_hit_rate));
        let avg_ctx = isl + osl / 2.0;
        let kv_cap = match max_kv_tokens {
            Some(m) if m > 0 => py_int(m as f64 / py_max(1.0, avg_ctx)).max(1),
            _ => 1024,
        };
        let seq_cap = match max_num_seqs {
            Some(s) if s > 0 => s,
            _ => kv_cap,
        };
        let hard_cap = kv_cap.min(seq_cap).min(mbt - 1);
        let osl_div = py_max(1.0, osl);
        let prefill_balanced = |x: i64| {
            let budget = mbt - x;
            budget > 0 && x as f64 * accept_length * effective_isl / osl_div <= budget as f64
        };
        let (mut lo, mut hi) = (1_i64, hard_cap.max(1));
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2;
            if prefill_balanced(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let max_bs = lo;

        let (mut best_rps, mut best_ttft_ms, mut best_itl_ms) = (0.0, 0.0, 0.0);
        let rates = |bs: i64, wt: f64| {
            let decode_rps = bs as f64 * accept_length / (osl * wt);
            let budget = py_max(0.0, (mbt - bs) as f64);
            let prefill_rps = if effective_isl <= 0.0 {
                f64::INFINITY
            } else {
                budget / (effective_isl * wt)
            };
            py_min(decode_rps, prefill_rps)
        };
        for bs in 1..=max_bs {
            let decode_kv = bs as f64 * avg_ctx;
            let prefill_per_iter = py_min(
                bs as f64 * accept_length * effective_isl / osl_div,
                mbt as f64,
            );
            let wt = self
                .core
                .predict(&[prefill_per_iter, decode_kv])
                .expect("fitted");
            let itl_ms = wt * 1000.0 / accept_length;
            let raw_prefill_per_iter =
                py_min(bs as f64 * accept_length * isl / osl_div, mbt as f64);
            let ttft_ms = self
                .estimate_next_ttft(
                    py_int(raw_prefill_per_iter),
                    mbt,
                    py_int(decode_kv),
                    kv_hit_rate,
                )
                .map_or(0.0, |t| t * 1000.0);
            if itl_ms > itl_sla || ttft_ms > ttft_sla {
                if bs == 1 {
                    (best_rps, best_ttft_ms, best_itl_ms) = (rates(1, wt), ttft_ms, itl_ms);
                }
                break;
            }
            (best_rps, best_ttft_ms, best_itl_ms) = (rates(bs, wt), ttft_ms, itl_ms);
        }
        (best_rps, best_ttft_ms, best_itl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::tests::fpm;

    /// wall_time = 0.004 + 2e-6 * prefill + 1e-7 * kv on a grid.
    fn fitted() -> AggModel {
        let mut m = AggModel::new(&ModelConfig::default()).unwrap();
        for p in [0, 512, 2048] {
            for kv in [1000, 20_000, 100_000] {
                let npr = i64::from(p > 0);
                m.observe(&fpm(
                    0.004 + 2e-6 * p as f64 + 1e-7 * kv as f64,
                    npr,
                    p,
                    10,
                    kv,
                ));
            }
        }
        m
    }

    #[test]
    fn averages_skip_iterations_without_requests() {
        let m = fitted();
        assert!((m.avg_isl() - 1280.0).abs() < 1e-9, "{}", m.avg_isl());
        // The three leading zero-prefill iterations are skipped, like upstream.
        assert!((m.avg_prefill_tokens() - 1280.0).abs() < 1e-9);
        assert!((m.avg_decode_length() - 12_100.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn ttft_and_itl_use_the_two_features() {
        let mut m = fitted();
        let t = m.estimate_next_ttft(720, 1000, 50_000, None).unwrap();
        // 720 + 1280 = 2000 tokens: two chunks of 1000, each next to 50k decode tokens.
        let want = 2.0 * (0.004 + 2e-6 * 1000.0 + 1e-7 * 50_000.0);
        assert!((t - want).abs() < 1e-12, "{t} vs {want}");
        let itl = m.estimate_next_itl(30_000, 0).unwrap();
        let want =
            0.004 + 2e-6 * m.avg_prefill_tokens() + 1e-7 * (30_000.0 + m.avg_decode_length());
        assert!((itl - want).abs() < 1e-12);
    }

    #[test]
    fn agg_rps_stops_at_the_first_sla_miss() {
        let mut m = fitted();
        let (rps, ttft, itl) =
            m.find_best_engine_agg_rps(1000.0, 200.0, 4096, 1000.0, 20.0, None, None, None, 1.0);
        assert!(rps > 0.0 && ttft > 0.0 && itl <= 20.0, "{rps} {ttft} {itl}");
        // One more request per batch would break the ITL SLA: itl(bs) = 4 + 0.01 bs + 0.11 bs.
        let bs = ((itl - 4.0) / (0.01 + 0.11)).round();
        assert!(4.0 + 0.12 * (bs + 1.0) > 20.0 && bs >= 1.0, "bs {bs}");
        // An impossible SLA gives the batch-1 figures, not zeros.
        let (rps, _, itl) =
            m.find_best_engine_agg_rps(1000.0, 200.0, 4096, 1000.0, 0.1, None, None, None, 1.0);
        assert!(rps > 0.0 && (itl - 4.12).abs() < 1e-9, "{rps} {itl}");
        assert_eq!(
            m.find_best_engine_agg_rps(0.0, 200.0, 4096, 1.0, 1.0, None, None, None, 1.0),
            (0.0, 0.0, 0.0)
        );
    }
}
