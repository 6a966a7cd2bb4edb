//! The planner's load models: Dynamo's FPM regression models, reimplemented.
//!
//! Dynamo's planner (`dynamo/planner/core/perf_model/{base,prefill,decode,agg}.py` in
//! `ai-dynamo==1.6.1`) fits a linear model of an iteration's `wall_time` on the batch it
//! ran, then uses it to estimate TTFT/ITL and the request rate one engine sustains under an
//! SLA. This module does the same, with the same results (the contract tests run both on
//! thousands of random sequences):
//!
//! | model | features `x` | estimators |
//! | --- | --- | --- |
//! | [`PrefillModel`] | `[sum_prefill_tokens]` | [`estimate_next_ttft`](PrefillModel::estimate_next_ttft), [`find_best_engine_prefill_rps`](PrefillModel::find_best_engine_prefill_rps) |
//! | [`DecodeModel`] | `[num_decode_requests, sum_decode_kv_tokens]` | [`estimate_next_itl`](DecodeModel::estimate_next_itl), [`find_best_engine_decode_rps`](DecodeModel::find_best_engine_decode_rps) |
//! | [`AggModel`] | `[sum_prefill_tokens, sum_decode_kv_tokens]` | [`estimate_next_ttft`](AggModel::estimate_next_ttft), [`estimate_next_itl`](AggModel::estimate_next_itl), [`find_best_engine_agg_rps`](AggModel::find_best_engine_agg_rps) |
//!
//! Every [`ForwardPassMetrics`] fed to `observe` updates the moving averages (window
//! `max_samples`, leading zeros skipped, see [`MovingAverage`]); only those with
//! `wall_time != 0` (not heartbeats) become samples. Samples are kept in equal-width buckets
//! over the observed range of each axis; past `max_samples` the oldest sample of the fullest
//! bucket is retired. A fit needs `min_observations` samples and is rejected when a
//! coefficient is negative (the decode model tolerates a negative `num_decode_requests`
//! coefficient, clamped to 0 below -1e-6).
//!
//! Beyond upstream: [`PerfModel`] drives any of the three from one
//! `(max_samples, bucket_size, min_observations)` [`ModelConfig`] and reports a
//! [`FitSummary`]; [`FitQuality`] gives R² and the residual p99; [`TickFeeder`] chooses
//! between Dynamo's one-sample-per-stream-per-tick feeding and every iteration; and
//! [`DpRankReport`] checks attention-DP rank sets per worker.
//!
//! ```
//! use fpm_schema::{ForwardPassMetrics, ScheduledRequestMetrics};
//! use fpm_subscriber::planner::{ModelConfig, ModelKind, PerfModel};
//!
//! let mut model = PerfModel::new(ModelKind::Prefill, &ModelConfig::default()).unwrap();
//! for tokens in [512_i64, 1024, 2048, 4096, 8192] {
//!     model.observe(&ForwardPassMetrics {
//!         wall_time: 0.004 + tokens as f64 * 2e-6,
//!         scheduled_requests: ScheduledRequestMetrics {
//!             num_prefill_requests: 1,
//!             sum_prefill_tokens: tokens,
//!             ..Default::default()
//!         },
//!         ..Default::default()
//!     });
//! }
//! let summary = model.summary();
//! assert!(summary.fitted);
//! assert!((summary.coef.unwrap()[0] - 2e-6).abs() < 1e-12);
//! assert_eq!(summary.avg_decode_length, None); // not a prefill quantity
//! ```

use std::fmt;
use std::str::FromStr;

use fpm_schema::ForwardPassMetrics;

/// The accessors every model shares over its `core` (one definition for the three).
macro_rules! core_accessors {
    () => {
        /// Samples retained.
        pub fn num_observations(&self) -> usize {
            self.core.store.len()
        }

        /// At least `min_observations` samples (upstream's `has_sufficient_data`).
        pub fn has_sufficient_data(&self) -> bool {
            self.core.store.len() >= self.core.min_observations
        }

        /// The retained samples, in the order the fit sees them.
        pub fn samples(&self) -> impl Iterator<Item = &Sample> {
            self.core.store.iter()
        }

        /// `(min, max)` per feature axis seen (the bucket ranges).
        pub fn bounds(&self) -> Vec<(f64, f64)> {
            self.core.store.bounds()
        }

        /// Fits if needed.
        ///
        /// # Errors
        ///
        /// Why there is no usable fit, see [`FitError`].
        pub fn fit(&mut self) -> Result<Fit, FitError> {
            self.core.fit()
        }

        /// R² and residual p99 of the current fit.
        pub fn quality(&mut self) -> Option<FitQuality> {
            self.core.quality()
        }
    };
}

mod agg;
mod buckets;
mod decode;
mod dp;
mod feed;
mod moving_average;
mod prefill;
mod regression;

pub use agg::AggModel;
pub use buckets::Sample;
pub use decode::DecodeModel;
pub use dp::DpRankReport;
pub use feed::{FeedingPolicy, TickFeeder};
pub use moving_average::MovingAverage;
pub use prefill::PrefillModel;
pub use regression::{Fit, FitQuality};

use buckets::SampleStore;

/// Which of the three models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Prefill engines: `wall_time ~ sum_prefill_tokens`.
    Prefill,
    /// Decode engines: `wall_time ~ num_decode_requests + sum_decode_kv_tokens`.
    Decode,
    /// Aggregated engines: `wall_time ~ sum_prefill_tokens + sum_decode_kv_tokens`.
    Agg,
}

impl ModelKind {
    /// The model's features `x` of one message (the one definition the models use):
    /// prefill `[sum_prefill_tokens]`, decode `[num_decode_requests, sum_decode_kv_tokens]`,
    /// agg `[sum_prefill_tokens, sum_decode_kv_tokens]`.
    pub fn features(self, fpm: &ForwardPassMetrics) -> Features {
        let s = &fpm.scheduled_requests;
        match self {
            ModelKind::Prefill => Features([s.sum_prefill_tokens as f64, 0.0], 1),
            ModelKind::Decode => Features(
                [s.num_decode_requests as f64, s.sum_decode_kv_tokens as f64],
                2,
            ),
            ModelKind::Agg => Features(
                [s.sum_prefill_tokens as f64, s.sum_decode_kv_tokens as f64],
                2,
            ),
        }
    }

    /// `"prefill"`, `"decode"` or `"agg"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Prefill => "prefill",
            ModelKind::Decode => "decode",
            ModelKind::Agg => "agg",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelKind {
    type Err = PlannerError;

    fn from_str(s: &str) -> Result<Self, PlannerError> {
        match s {
            "prefill" => Ok(ModelKind::Prefill),
            "decode" => Ok(ModelKind::Decode),
            "agg" => Ok(ModelKind::Agg),
            _ => Err(PlannerError::UnknownModel(s.to_owned())),
        }
    }
}

/// A model's features of one message (one or two values; no allocation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features([f64; 2], usize);

impl std::ops::Deref for Features {
    type Target = [f64];
    fn deref(&self) -> &[f64] {
        &self.0[..self.1]
    }
}

/// How a model keeps samples: Dynamo's `max_num_fpm_samples`, `fpm_sample_bucket_size` and
/// `load_min_observations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Samples kept (and the moving averages' window). Dynamo's default: 64.
    pub max_samples: usize,
    /// Buckets: that many along the prefill axis, `isqrt` of it per axis for 2-D models
    /// (Dynamo's config requires a perfect square). Dynamo's default: 16.
    pub bucket_size: usize,
    /// Samples needed before a fit is attempted. Dynamo's default: 5.
    pub min_observations: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_samples: 64,
            bucket_size: 16,
            min_observations: 5,
        }
    }
}

impl ModelConfig {
    /// Checks the values a model cannot work with.
    ///
    /// # Errors
    ///
    /// [`PlannerError::InvalidConfig`] when `max_samples` or `bucket_size` is 0 (upstream's
    /// moving average fails on a zero window; zero buckets leave nothing to retire from).
    pub fn validate(&self) -> Result<(), PlannerError> {
        if self.max_samples == 0 {
            return Err(PlannerError::InvalidConfig {
                field: "max_samples",
                reason: "must be at least 1",
            });
        }
        if self.bucket_size == 0 {
            return Err(PlannerError::InvalidConfig {
                field: "bucket_size",
                reason: "must be at least 1",
            });
        }
        Ok(())
    }
}

/// Errors building a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlannerError {
    /// A [`ModelConfig`] field is out of range.
    #[error("invalid model config: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A model name other than `prefill`, `decode` or `agg`.
    #[error("unknown model {0:?}: expected prefill, decode or agg")]
    UnknownModel(String),
    /// A feeding policy other than `latest-per-tick` or `every-iteration`.
    #[error("unknown feeding policy {0:?}: expected latest-per-tick or every-iteration")]
    UnknownFeedingPolicy(String),
}

/// Why a model has no usable fit. Upstream's estimators return `None` (or zero rates) in
/// every case; upstream raises `ValueError` where we return [`NonFinite`](Self::NonFinite)
/// or [`NoSamples`](Self::NoSamples).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FitError {
    /// Fewer samples than `min_observations`.
    #[error("{have} samples, {need} needed")]
    TooFewObservations {
        /// Samples retained.
        have: usize,
        /// `min_observations`.
        need: usize,
    },
    /// A coefficient came out negative ("more load, less time"); the fit is rejected.
    #[error("negative coefficient {value} on feature {index}")]
    NegativeCoefficient {
        /// The feature (0-based).
        index: usize,
        /// The coefficient.
        value: f64,
    },
    /// A retained wall time is NaN or infinite (or the centred data overflowed).
    #[error("a sample's wall time is not finite")]
    NonFinite,
    /// `min_observations` is 0 and nothing was observed.
    #[error("no samples")]
    NoSamples,
}

/// What `fpm fit` prints: the model's state in upstream's terms. Fields that do not apply
/// to the model, and `coef`/`intercept` without a fit, are `None` (omitted in JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FitSummary {
    /// The model.
    pub model: ModelKind,
    /// Whether a fit is usable (enough samples, no rejected coefficient).
    pub fitted: bool,
    /// Samples retained.
    pub observations: usize,
    /// Coefficients, one per feature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coef: Option<Vec<f64>>,
    /// Intercept, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<f64>,
    /// Moving average of prefill tokens per prefill request (prefill, agg).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg_isl: Option<f64>,
    /// Moving average of decode KV tokens per decode request (decode, agg).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg_decode_length: Option<f64>,
}

/// Any of the three models behind one interface.
#[derive(Debug, Clone)]
pub enum PerfModel {
    /// See [`PrefillModel`].
    Prefill(PrefillModel),
    /// See [`DecodeModel`].
    Decode(DecodeModel),
    /// See [`AggModel`].
    Agg(AggModel),
}

impl PerfModel {
    /// An empty model of `kind`.
    ///
    /// # Errors
    ///
    /// [`PlannerError::InvalidConfig`], see [`ModelConfig::validate`].
    pub fn new(kind: ModelKind, config: &ModelConfig) -> Result<Self, PlannerError> {
        Ok(match kind {
            ModelKind::Prefill => PerfModel::Prefill(PrefillModel::new(config)?),
            ModelKind::Decode => PerfModel::Decode(DecodeModel::new(config)?),
            ModelKind::Agg => PerfModel::Agg(AggModel::new(config)?),
        })
    }

    fn core(&self) -> &Core {
        match self {
            PerfModel::Prefill(m) => &m.core,
            PerfModel::Decode(m) => &m.core,
            PerfModel::Agg(m) => &m.core,
        }
    }

    fn core_mut(&mut self) -> &mut Core {
        match self {
            PerfModel::Prefill(m) => &mut m.core,
            PerfModel::Decode(m) => &mut m.core,
            PerfModel::Agg(m) => &mut m.core,
        }
    }

    /// Which model this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            PerfModel::Prefill(_) => ModelKind::Prefill,
            PerfModel::Decode(_) => ModelKind::Decode,
            PerfModel::Agg(_) => ModelKind::Agg,
        }
    }

    /// Feeds one message (upstream's `add_observation`).
    pub fn observe(&mut self, fpm: &ForwardPassMetrics) {
        match self {
            PerfModel::Prefill(m) => m.observe(fpm),
            PerfModel::Decode(m) => m.observe(fpm),
            PerfModel::Agg(m) => m.observe(fpm),
        }
    }

    /// Samples retained.
    pub fn num_observations(&self) -> usize {
        self.core().store.len()
    }

    /// The retained samples, in the order the fit sees them.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.core().store.iter()
    }

    /// Fits if needed and returns the fit.
    ///
    /// # Errors
    ///
    /// Why there is no usable fit, see [`FitError`].
    pub fn fit(&mut self) -> Result<Fit, FitError> {
        self.core_mut().fit()
    }

    /// R² and residual p99 of the current fit over the retained samples.
    pub fn quality(&mut self) -> Option<FitQuality> {
        self.core_mut().quality()
    }

    /// The model's state as `fpm fit` reports it.
    pub fn summary(&mut self) -> FitSummary {
        let fit = self.fit().ok();
        let (avg_isl, avg_decode_length) = match self {
            PerfModel::Prefill(m) => (Some(m.avg_isl()), None),
            PerfModel::Decode(m) => (None, Some(m.avg_decode_length())),
            PerfModel::Agg(m) => (Some(m.avg_isl()), Some(m.avg_decode_length())),
        };
        FitSummary {
            model: self.kind(),
            fitted: fit.is_some(),
            observations: self.num_observations(),
            coef: fit.map(|f| f.coef().to_vec()),
            intercept: fit.map(|f| f.intercept()),
            avg_isl,
            avg_decode_length,
        }
    }
}

/// What the three models share: upstream's `_BaseRegressionModel`.
#[derive(Debug, Clone)]
struct Core {
    store: SampleStore,
    ndim: usize,
    min_observations: usize,
    /// The decode model's `_relaxable_feature_indices` (`{0}`); `None` elsewhere.
    relaxable: Option<usize>,
    /// The last fit of the current samples (upstream's `_is_fitted` plus the model).
    fit: Option<Result<Fit, FitError>>,
}

/// Coefficients of relaxable features more negative than this are clamped to 0.
const RELAXABLE_NEG_TOLERANCE: f64 = 1e-6;

impl Core {
    fn new(
        config: &ModelConfig,
        ndim: usize,
        relaxable: Option<usize>,
    ) -> Result<Self, PlannerError> {
        config.validate()?;
        Ok(Core {
            store: SampleStore::new(ndim, config.bucket_size, config.max_samples),
            ndim,
            min_observations: config.min_observations,
            relaxable,
            fit: None,
        })
    }

    /// Records a sample unless `fpm` is a heartbeat.
    fn add(&mut self, fpm: &ForwardPassMetrics, features: &[f64]) {
        if fpm.wall_time == 0.0 {
            return;
        }
        self.store.add(Sample::new(features, fpm.wall_time));
        self.fit = None;
    }

    fn fit(&mut self) -> Result<Fit, FitError> {
        if let Some(r) = self.fit {
            return r;
        }
        let r = self.compute_fit();
        self.fit = Some(r);
        r
    }

    fn compute_fit(&self) -> Result<Fit, FitError> {
        let samples: Vec<Sample> = self.store.iter().copied().collect();
        if samples.len() < self.min_observations {
            return Err(FitError::TooFewObservations {
                have: samples.len(),
                need: self.min_observations,
            });
        }
        let mut fit = regression::least_squares(&samples, self.ndim)?;
        let coef = fit.coef_mut();
        if let Some((index, &value)) = coef
            .iter()
            .enumerate()
            .find(|&(i, c)| *c < 0.0 && Some(i) != self.relaxable)
        {
            return Err(FitError::NegativeCoefficient { index, value });
        }
        if let Some(i) = self.relaxable {
            if coef[i] < -RELAXABLE_NEG_TOLERANCE {
                coef[i] = 0.0;
            }
        }
        Ok(fit)
    }

    fn quality(&mut self) -> Option<FitQuality> {
        let fit = self.fit().ok()?;
        let samples: Vec<Sample> = self.store.iter().copied().collect();
        Some(regression::quality(&fit, &samples))
    }

    /// Upstream's `_predict_*`: the prediction, at least 1 µs. `None` without a fit.
    fn predict(&mut self, x: &[f64]) -> Option<f64> {
        let fit = self.fit().ok()?;
        Some(py_max(1e-6, fit.predict(x)))
    }
}

/// Python's `max(a, b)`: `b` only when `b > a` (so NaN in `b` gives `a`).
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: `b` only when `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// Upstream's `_clamp_kv_hit_rate`: `None`/NaN → 0, else clamped into `[0, 0.95]`.
fn clamp_kv_hit_rate(kv_hit_rate: Option<f64>) -> f64 {
    match kv_hit_rate {
        None => 0.0,
        Some(r) if r.is_nan() => 0.0,
        Some(r) => py_max(0.0, py_min(0.95, r)),
    }
}

/// Python's `a / b` on ints. Exact (correctly rounded) like Python's while both fit in 53
/// bits, which token counts always do.
fn int_div(a: i64, b: i64) -> f64 {
    a as f64 / b as f64
}

/// Python's `int(x)` for a float, saturating where Python would grow a big int.
fn py_int(x: f64) -> i64 {
    x.trunc() as i64
}

/// The simulated-prefill loop shared by the prefill and agg `estimate_next_ttft`: chunk
/// `total_tokens` into `max_num_batched_tokens` pieces and sum the predicted wall times.
fn simulate_prefill(
    total_tokens: f64,
    max_num_batched_tokens: i64,
    mut predict: impl FnMut(f64) -> Option<f64>,
) -> Option<f64> {
    if total_tokens <= 0.0 {
        return Some(0.0);
    }
    let mbt = max_num_batched_tokens as f64;
    let iterations = (total_tokens / mbt).ceil() as u64;
    let mut total_time = 0.0;
    let mut remaining = total_tokens;
    for _ in 0..iterations {
        let chunk = py_min(remaining, mbt);
        total_time += predict(chunk)?;
        remaining -= chunk;
    }
    Some(total_time)
}

#[cfg(test)]
mod tests;
