//! The v1 message types, their builders and the Welford accumulator.

use crate::table::fpm_struct;

/// The schema version this crate reads and writes.
pub const FPM_VERSION: i64 = 1;

fpm_struct! {
    map = "<message>";
    /// One scheduler iteration (one forward pass) of one engine data-parallel rank.
    ///
    /// Field order and defaults are those of the msgspec `ForwardPassMetrics` struct shipped in
    /// `dynamo.common.forward_pass_metrics` and `sglang.srt.observability.forward_pass_metrics`;
    /// the msgpack encoding is a map keyed by these names, in this order.
    #[derive(Debug, Clone, PartialEq)]
    pub struct ForwardPassMetrics {
        /// Schema version; consumers reject anything but [`FPM_VERSION`].
        pub version: i64 = FPM_VERSION,
        /// The engine's identity (Dynamo's runtime connection id, as a string).
        pub worker_id: String,
        /// Data-parallel rank; each rank has its own scheduler and its own socket.
        pub dp_rank: i64,
        /// Sequence number per `(worker_id, dp_rank)`, stamped by the publisher, so consumers can
        /// see gaps.
        pub counter_id: i64,
        /// The iteration's duration in seconds; `0.0` on an idle heartbeat.
        pub wall_time: f64,
        /// What ran in this iteration.
        pub scheduled_requests: ScheduledRequestMetrics,
        /// What was waiting while it ran.
        pub queued_requests: QueuedRequestMetrics,
    }
}

impl ForwardPassMetrics {
    /// An idle heartbeat: all-zero metrics with only the identity set.
    pub fn heartbeat(worker_id: impl Into<String>, dp_rank: i64) -> Self {
        ForwardPassMetrics {
            worker_id: worker_id.into(),
            dp_rank,
            ..Default::default()
        }
    }

    /// True for an idle heartbeat (`wall_time == 0`), which planners do not use as a sample.
    pub fn is_heartbeat(&self) -> bool {
        self.wall_time == 0.0
    }
}

fpm_struct! {
    map = "scheduled_requests";
    /// Requests that were scheduled and executed in the iteration.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct ScheduledRequestMetrics {
        /// Prefill requests (new requests and chunked-prefill continuations).
        pub num_prefill_requests: i64,
        /// Tokens freshly computed for prefill this iteration (the chunk, for chunked prefill).
        pub sum_prefill_tokens: i64,
        /// Population variance of the full prompt lengths (not chunk sizes) of prefill requests.
        pub var_prefill_length: f64,
        /// KV tokens read but not computed for prefill: prefix-cache hits and earlier chunks.
        pub sum_prefill_kv_tokens: i64,
        /// Decode requests (each generating one token).
        pub num_decode_requests: i64,
        /// Sum of KV context lengths of decode requests.
        pub sum_decode_kv_tokens: i64,
        /// Population variance of KV context lengths of decode requests.
        pub var_decode_kv_tokens: f64,
    }
}

fpm_struct! {
    map = "queued_requests";
    /// Requests waiting while the iteration ran. Token counts are raw (prefix-cache effects are
    /// unknown until a request is scheduled).
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct QueuedRequestMetrics {
        /// Waiting (never scheduled) requests.
        pub num_prefill_requests: i64,
        /// Sum of prompt lengths of waiting requests.
        pub sum_prefill_tokens: i64,
        /// Population variance of prompt lengths of waiting requests.
        pub var_prefill_length: f64,
        /// Preempted requests (were decoding, evicted back to the queue).
        pub num_decode_requests: i64,
        /// Sum of KV context lengths of preempted requests.
        pub sum_decode_kv_tokens: i64,
        /// Population variance of KV context lengths of preempted requests.
        pub var_decode_kv_tokens: f64,
    }
}

/// Welford's online count / sum / population variance, bit-for-bit the same arithmetic as the
/// `WelfordAccumulator` in Dynamo and SGLang (so variances agree with theirs exactly: the
/// contract tests compare the bits with both Python implementations on random inputs,
/// including values beyond 2^53 and negative ones). The one difference: the sum saturates at
/// the i64 limits where Python's int keeps growing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Welford {
    n: i64,
    sum: i64,
    mean: f64,
    m2: f64,
}

impl Welford {
    /// An empty accumulator.
    pub const fn new() -> Self {
        Welford {
            n: 0,
            sum: 0,
            mean: 0.0,
            m2: 0.0,
        }
    }

    /// Adds one value.
    #[inline]
    pub fn add(&mut self, v: i64) {
        self.n += 1;
        self.sum = self.sum.saturating_add(v);
        let x = v as f64;
        let delta = x - self.mean;
        self.mean += delta / self.n as f64;
        let delta2 = x - self.mean;
        self.m2 += delta * delta2;
    }

    /// Values added so far.
    pub fn count(&self) -> i64 {
        self.n
    }

    /// Sum of the values (saturating at the i64 limits).
    pub fn sum(&self) -> i64 {
        self.sum
    }

    /// Mean of the values (0 when empty).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Population variance (0 when empty).
    pub fn variance(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.m2 / self.n as f64
        }
    }
}

/// Builds [`ScheduledRequestMetrics`] from per-request lengths, one call per request.
///
/// ```
/// use fpm_schema::ScheduledRequestsBuilder;
/// let mut b = ScheduledRequestsBuilder::new();
/// b.add_prefill(1000, 512, 488); // prompt of 1000, 512 computed now, 488 already in KV
/// b.add_decode(2048);
/// let m = b.build();
/// assert_eq!((m.sum_prefill_tokens, m.sum_prefill_kv_tokens, m.num_decode_requests), (512, 488, 1));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct ScheduledRequestsBuilder {
    prompt_lengths: Welford,
    computed_tokens: i64,
    cached_tokens: i64,
    decode_kv: Welford,
}

impl ScheduledRequestsBuilder {
    /// An empty builder.
    pub const fn new() -> Self {
        ScheduledRequestsBuilder {
            prompt_lengths: Welford::new(),
            computed_tokens: 0,
            cached_tokens: 0,
            decode_kv: Welford::new(),
        }
    }

    /// A prefill request: its full prompt length, the tokens computed this iteration, and the
    /// KV tokens it reads without computing (prefix-cache hits plus earlier chunks).
    #[inline]
    pub fn add_prefill(&mut self, prompt_len: i64, computed_tokens: i64, cached_tokens: i64) {
        self.prompt_lengths.add(prompt_len);
        self.computed_tokens = self.computed_tokens.saturating_add(computed_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(cached_tokens);
    }

    /// A decode request with its KV context length (prompt plus tokens generated so far).
    #[inline]
    pub fn add_decode(&mut self, kv_tokens: i64) {
        self.decode_kv.add(kv_tokens);
    }

    /// The metrics for everything added.
    pub fn build(&self) -> ScheduledRequestMetrics {
        ScheduledRequestMetrics {
            num_prefill_requests: self.prompt_lengths.count(),
            sum_prefill_tokens: self.computed_tokens,
            var_prefill_length: self.prompt_lengths.variance(),
            sum_prefill_kv_tokens: self.cached_tokens,
            num_decode_requests: self.decode_kv.count(),
            sum_decode_kv_tokens: self.decode_kv.sum(),
            var_decode_kv_tokens: self.decode_kv.variance(),
        }
    }
}

/// Builds [`QueuedRequestMetrics`] from the waiting queue, one call per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedRequestsBuilder {
    waiting: Welford,
    preempted: Welford,
}

impl QueuedRequestsBuilder {
    /// An empty builder.
    pub const fn new() -> Self {
        QueuedRequestsBuilder {
            waiting: Welford::new(),
            preempted: Welford::new(),
        }
    }

    /// A waiting (never scheduled) request with its prompt length.
    #[inline]
    pub fn add_waiting(&mut self, prompt_len: i64) {
        self.waiting.add(prompt_len);
    }

    /// A preempted request with its KV context length.
    #[inline]
    pub fn add_preempted(&mut self, kv_tokens: i64) {
        self.preempted.add(kv_tokens);
    }

    /// The metrics for everything added.
    pub fn build(&self) -> QueuedRequestMetrics {
        QueuedRequestMetrics {
            num_prefill_requests: self.waiting.count(),
            sum_prefill_tokens: self.waiting.sum(),
            var_prefill_length: self.waiting.variance(),
            num_decode_requests: self.preempted.count(),
            sum_decode_kv_tokens: self.preempted.sum(),
            var_decode_kv_tokens: self.preempted.variance(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welford_matches_two_pass_variance() {
        let xs = [3i64, 7, 7, 19, 1000, 2, 0];
        let mut w = Welford::new();
        xs.iter().for_each(|&x| w.add(x));
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<i64>() as f64 / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert_eq!(w.count(), 7);
        assert_eq!(w.sum(), xs.iter().sum::<i64>());
        assert!((w.variance() - var).abs() <= 1e-12 * var);
        assert_eq!(Welford::new().variance(), 0.0);
    }

    #[test]
    fn builders_fill_every_field() {
        let mut s = ScheduledRequestsBuilder::new();
        s.add_prefill(100, 60, 40);
        s.add_prefill(300, 300, 0);
        s.add_decode(10);
        s.add_decode(30);
        let m = s.build();
        assert_eq!(m.num_prefill_requests, 2);
        assert_eq!(m.sum_prefill_tokens, 360);
        assert_eq!(m.sum_prefill_kv_tokens, 40);
        assert_eq!(m.var_prefill_length, 10000.0);
        assert_eq!(m.num_decode_requests, 2);
        assert_eq!(m.sum_decode_kv_tokens, 40);
        assert_eq!(m.var_decode_kv_tokens, 100.0);

        let mut q = QueuedRequestsBuilder::new();
        q.add_waiting(5);
        q.add_preempted(9);
        q.add_preempted(11);
        let q = q.build();
        assert_eq!(
            (
                q.num_prefill_requests,
                q.sum_prefill_tokens,
                q.var_prefill_length
            ),
            (1, 5, 0.0)
        );
        assert_eq!(
            (
                q.num_decode_requests,
                q.sum_decode_kv_tokens,
                q.var_decode_kv_tokens
            ),
            (2, 20, 1.0)
        );
    }

    #[test]
    fn json_non_finite_floats_round_trip() {
        let m = ForwardPassMetrics {
            wall_time: f64::NAN,
            scheduled_requests: ScheduledRequestMetrics {
                var_prefill_length: f64::INFINITY,
                var_decode_kv_tokens: f64::NEG_INFINITY,
                ..Default::default()
            },
            ..Default::default()
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains("\"wall_time\":\"NaN\""), "{j}");
        let back: ForwardPassMetrics = serde_json::from_str(&j).unwrap();
        assert!(back.wall_time.is_nan());
        assert_eq!(back.scheduled_requests.var_prefill_length, f64::INFINITY);
        assert_eq!(
            back.scheduled_requests.var_decode_kv_tokens,
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn json_rejects_float_for_int_and_accepts_int_for_float() {
        let bad = serde_json::from_str::<ForwardPassMetrics>(r#"{"dp_rank": 1.5}"#);
        assert!(bad.is_err());
        let ok: ForwardPassMetrics = serde_json::from_str(r#"{"wall_time": 2}"#).unwrap();
        assert_eq!(ok.wall_time, 2.0);
        assert_eq!(ok.version, 1);
    }
}
