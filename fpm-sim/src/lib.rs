//! A synthetic LLM engine that emits through the real [`Emitter`](fpm_emitter::Emitter): for
//! demos, tests and load tests without a GPU. A crate of its own so that engines linking
//! `fpm-emitter` do not carry it.
//!
//! Per data-parallel rank, a scheduler thread runs in real time: Poisson arrivals, prompt and
//! output lengths drawn from log-normal distributions, chunked prefill limited by
//! `max_num_batched_tokens`, a KV-cache capacity with preemption back to the queue (recompute,
//! as vLLM does), and an iteration time from a linear cost model plus noise. The iteration is
//! "run" by sleeping for that time inside a timed segment, so the emitter measures it with its
//! clock like a real forward pass, and a downstream regression has something real to learn.
//! Random draws come from `rand`/`rand_distr`, seeded per rank from [`SimConfig::seed`], so a
//! run's requests are reproducible from its seed.
//!
//! With [`SimConfig::rate`] set, the model is ignored and messages go out at a fixed rate (or
//! as fast as possible) for load tests.
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use std::time::Duration;
//! use fpm_emitter::Endpoint;
//! use fpm_sim::SimConfig;
//!
//! let mut config = SimConfig::new(Endpoint::IpcBase("ipc:///tmp/fpm-sim".into()), "sim-1");
//! config.dp_size = 2;
//! config.duration = Duration::from_secs(5);
//! for rank in fpm_sim::run(&config, Arc::new(AtomicBool::new(false)))? {
//!     println!("rank {}: {} iterations", rank.dp_rank, rank.iterations);
//! }
//! # Ok::<(), fpm_emitter::EmitterError>(())
//! ```
#![deny(missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fpm_emitter::{
    ClockChoice, Emitter, EmitterConfig, EmitterError, EmitterStats, Endpoint, StreamHandle,
};
use fpm_schema::{QueuedRequestsBuilder, ScheduledRequestsBuilder};
use rand::rngs::Xoshiro256PlusPlus;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, LogNormal, StandardNormal};

/// The linear iteration-time model: `base + prefill * tokens + decode_kv * kv_tokens +
/// decode_req * requests`, times `1 + noise * N(0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Fixed cost per iteration, seconds.
    pub base_s: f64,
    /// Seconds per prefill token computed.
    pub prefill_token_s: f64,
    /// Seconds per KV token read by decode requests.
    pub decode_kv_token_s: f64,
    /// Seconds per decode request.
    pub decode_request_s: f64,
    /// Relative standard deviation of the multiplicative noise.
    pub noise: f64,
}

impl Default for CostModel {
    /// Roughly an 8B model on one modern GPU: 4 ms per step, 20 µs per prefill token,
    /// 20 ns per KV token read, 10 µs per decode request, 3% noise.
    fn default() -> Self {
        CostModel {
            base_s: 0.004,
            prefill_token_s: 20e-6,
            decode_kv_token_s: 20e-9,
            decode_request_s: 10e-6,
            noise: 0.03,
        }
    }
}

impl CostModel {
    /// The noiseless iteration time.
    pub fn expected(
        &self,
        prefill_tokens: i64,
        decode_kv_tokens: i64,
        decode_requests: i64,
    ) -> f64 {
        self.base_s
            + self.prefill_token_s * prefill_tokens as f64
            + self.decode_kv_token_s * decode_kv_tokens as f64
            + self.decode_request_s * decode_requests as f64
    }
}

/// A fixed message rate for load tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// This many messages per second per rank.
    PerSecond(f64),
    /// As fast as the emitter accepts them.
    Max,
}

/// Simulation settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where each rank's emitter binds.
    pub endpoint: Endpoint,
    /// Engine identity.
    pub worker_id: String,
    /// Data-parallel ranks (one scheduler thread and one socket each).
    pub dp_size: u32,
    /// How long to run.
    pub duration: Duration,
    /// Request arrivals per second, across all ranks (split evenly).
    pub rps: f64,
    /// Mean prompt length, tokens.
    pub prompt_len_mean: f64,
    /// Mean output length, tokens.
    pub output_len_mean: f64,
    /// Token budget per iteration (chunked prefill limit).
    pub max_num_batched_tokens: i64,
    /// Running requests per rank, at most.
    pub max_num_seqs: usize,
    /// KV-cache capacity per rank, tokens.
    pub kv_capacity: i64,
    /// Iteration time model.
    pub cost: CostModel,
    /// Fixed message rate instead of the model.
    pub rate: Option<Rate>,
    /// Random seed (rank r uses `seed + r`).
    pub seed: u64,
    /// Heartbeat interval while idle.
    pub heartbeat_interval: Duration,
}

impl SimConfig {
    /// Defaults: one rank, 4 requests/s, prompts of ~1024 and outputs of ~256 tokens, 2048
    /// batched tokens, 256 sequences, 262,144 KV tokens, the default cost model.
    pub fn new(endpoint: Endpoint, worker_id: impl Into<String>) -> Self {
        SimConfig {
            endpoint,
            worker_id: worker_id.into(),
            dp_size: 1,
            duration: Duration::from_secs(30),
            rps: 4.0,
            prompt_len_mean: 1024.0,
            output_len_mean: 256.0,
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            kv_capacity: 262_144,
            cost: CostModel::default(),
            rate: None,
            seed: 0,
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// What one rank did.
#[derive(Debug, Clone)]
pub struct RankReport {
    /// The rank.
    pub dp_rank: u32,
    /// The address its emitter bound.
    pub endpoint: String,
    /// Scheduler iterations run.
    pub iterations: u64,
    /// Requests that arrived.
    pub arrived: u64,
    /// Requests that finished.
    pub finished: u64,
    /// Preemptions (KV cache full).
    pub preemptions: u64,
    /// The emitter's final counters.
    pub emitter: EmitterStats,
}

/// Runs the simulation until `duration` passes or `stop` is set; one thread per rank.
///
/// # Errors
/// The first emitter that fails to start (for example an address in use).
pub fn run(config: &SimConfig, stop: Arc<AtomicBool>) -> Result<Vec<RankReport>, EmitterError> {
    let mut emitters = Vec::new();
    for rank in 0..config.dp_size {
        let ec = EmitterConfig::new(config.endpoint.clone(), config.worker_id.clone(), rank)
            .with_clock(ClockChoice::Cpu)
            .with_heartbeat_interval(config.heartbeat_interval);
        emitters.push(Emitter::start(ec)?);
    }
    let threads: Vec<_> = emitters
        .into_iter()
        .enumerate()
        .map(|(rank, emitter)| {
            let cfg = config.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("fpm-sim-{rank}"))
                .spawn(move || Rank::new(cfg, rank as u32, emitter).run(&stop))
        })
        .collect::<Result<_, _>>()?;
    Ok(threads.into_iter().filter_map(|t| t.join().ok()).collect())
}

/// A rank's random draws: a seeded generator (xoshiro256++, the same sequence on every
/// platform) and the distributions the model samples.
#[derive(Debug, Clone)]
struct Draws {
    rng: Xoshiro256PlusPlus,
    prompt: LogNormal<f64>,
    output: LogNormal<f64>,
    /// Gaps between arrivals; `None` when nothing arrives (rate 0 or not a number).
    arrival_gap: Option<Exp<f64>>,
}

impl Draws {
    /// Log-space sigma of the length distributions.
    const SIGMA: f64 = 0.6;

    fn new(seed: u64, prompt_mean: f64, output_mean: f64, arrivals_per_s: f64) -> Self {
        Draws {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            prompt: Self::lengths(prompt_mean),
            output: Self::lengths(output_mean),
            arrival_gap: (arrivals_per_s > 0.0)
                .then(|| Exp::new(arrivals_per_s).ok())
                .flatten(),
        }
    }

    /// Log-normal with the given mean (kept within 1..2^20, so the parameters are always
    /// valid) and a log-space sigma of 0.6.
    fn lengths(mean: f64) -> LogNormal<f64> {
        let mean = if mean.is_nan() {
            1.0
        } else {
            mean.clamp(1.0, (1 << 20) as f64)
        };
        let mu = mean.ln() - Self::SIGMA * Self::SIGMA / 2.0;
        LogNormal::new(mu, Self::SIGMA).expect("finite mu, positive finite sigma")
    }

    fn length(dist: &LogNormal<f64>, rng: &mut Xoshiro256PlusPlus) -> i64 {
        (dist.sample(rng).round() as i64).clamp(1, 1 << 20)
    }

    fn prompt_len(&mut self) -> i64 {
        Self::length(&self.prompt, &mut self.rng)
    }

    fn output_len(&mut self) -> i64 {
        Self::length(&self.output, &mut self.rng)
    }

    /// Time to the next arrival; `None` if there is none.
    fn arrival_gap(&mut self) -> Option<Duration> {
        let gap = self.arrival_gap?.sample(&mut self.rng);
        Duration::try_from_secs_f64(gap).ok()
    }

    /// A standard normal draw.
    fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.rng)
    }
}

#[derive(Debug, Clone)]
struct Request {
    prompt: i64,
    output: i64,
    generated: i64,
    /// KV tokens held: the (re)prefill computed so far, then one more per generated token.
    prefilled: i64,
    /// Was running and got preempted (queued decode).
    preempted: bool,
}

impl Request {
    /// Tokens to prefill: the prompt, plus what was generated before a preemption (recompute).
    fn prefill_target(&self) -> i64 {
        self.prompt + self.generated
    }

    /// KV tokens it holds.
    fn kv(&self) -> i64 {
        self.prefilled
    }

    /// Prefill done: it decodes (one token per iteration).
    fn decoding(&self) -> bool {
        self.prefilled >= self.prefill_target()
    }
}

struct Rank {
    cfg: SimConfig,
    rank: u32,
    emitter: Emitter,
    draws: Draws,
    waiting: VecDeque<Request>,
    running: Vec<Request>,
    kv_used: i64,
    iterations: u64,
    arrived: u64,
    finished: u64,
    preemptions: u64,
}

impl Rank {
    fn new(cfg: SimConfig, rank: u32, emitter: Emitter) -> Self {
        let draws = Draws::new(
            cfg.seed.wrapping_add(u64::from(rank)),
            cfg.prompt_len_mean,
            cfg.output_len_mean,
            cfg.rps / f64::from(cfg.dp_size.max(1)),
        );
        Rank {
            cfg,
            rank,
            emitter,
            draws,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: 0,
            iterations: 0,
            arrived: 0,
            finished: 0,
            preemptions: 0,
        }
    }

    fn run(mut self, stop: &AtomicBool) -> RankReport {
        let start = Instant::now();
        let end = start + self.cfg.duration;
        match self.cfg.rate {
            Some(rate) => self.run_fixed_rate(rate, end, stop),
            None => self.run_model(start, end, stop),
        }
        let endpoint = self.emitter.endpoint().to_owned();
        let emitter = self.emitter.shutdown(Duration::from_secs(2));
        RankReport {
            dp_rank: self.rank,
            endpoint,
            iterations: self.iterations,
            arrived: self.arrived,
            finished: self.finished,
            preemptions: self.preemptions,
            emitter,
        }
    }

    fn run_fixed_rate(&mut self, rate: Rate, end: Instant, stop: &AtomicBool) {
        let mut sched = ScheduledRequestsBuilder::new();
        sched.add_prefill(1024, 512, 512);
        for i in 0..32 {
            sched.add_decode(800 + 16 * i);
        }
        let sched = sched.build();
        let mut queued = QueuedRequestsBuilder::new();
        queued.add_waiting(2048);
        let queued = queued.build();
        let period = match rate {
            Rate::PerSecond(r) if r > 0.0 => Some(Duration::from_secs_f64(1.0 / r)),
            _ => None,
        };
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            if let Some(p) = period {
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                next += p;
            }
            self.emitter.begin_iteration();
            self.emitter.segment_start(StreamHandle::DEFAULT);
            self.emitter.segment_end(StreamHandle::DEFAULT);
            self.emitter.submit(sched, queued);
            self.iterations += 1;
        }
    }

    fn run_model(&mut self, start: Instant, end: Instant, stop: &AtomicBool) {
        // No arrival (rate 0) or one too far away to represent: none before the end.
        let after =
            |t: Instant, gap: Option<Duration>| gap.and_then(|g| t.checked_add(g)).unwrap_or(end);
        let mut next_arrival = after(start, self.draws.arrival_gap());
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            while next_arrival <= now {
                let prompt = self.draws.prompt_len();
                let output = self.draws.output_len();
                self.waiting.push_back(Request {
                    prompt,
                    output,
                    generated: 0,
                    prefilled: 0,
                    preempted: false,
                });
                self.arrived += 1;
                next_arrival = after(next_arrival, self.draws.arrival_gap());
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                self.emitter.set_idle(true);
                let wake = next_arrival.min(end);
                // Sleep in short steps so `stop` is noticed promptly.
                while Instant::now() < wake && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep((wake - Instant::now()).min(Duration::from_millis(50)));
                }
                continue;
            }
            self.emitter.set_idle(false);
            self.step();
        }
    }

    /// One scheduler iteration.
    fn step(&mut self) {
        let cfg = &self.cfg;
        // Decode requests need one more KV slot each; preempt the newest until they fit.
        loop {
            let decoding = self.running.iter().filter(|r| r.decoding()).count() as i64;
            if self.kv_used + decoding <= cfg.kv_capacity || self.running.is_empty() {
                break;
            }
            let mut victim = self.running.pop().expect("not empty");
            self.kv_used -= victim.kv();
            victim.prefilled = 0;
            victim.preempted = true;
            self.preemptions += 1;
            self.waiting.push_front(victim);
        }

        let mut sched = ScheduledRequestsBuilder::new();
        let mut decode_kv = 0i64;
        let mut decode_n = 0i64;
        for r in self.running.iter().filter(|r| r.decoding()) {
            let kv = r.prefill_target();
            sched.add_decode(kv);
            decode_kv += kv;
            decode_n += 1;
        }
        let mut budget = (cfg.max_num_batched_tokens - decode_n).max(0);
        let mut prefill_tokens = 0i64;
        // Chunked-prefill continuations first, then new (or preempted) requests in order.
        for r in self.running.iter_mut().filter(|r| !r.decoding()) {
            if budget == 0 {
                break;
            }
            let room = cfg.kv_capacity - self.kv_used;
            let chunk = (r.prefill_target() - r.prefilled).min(budget).min(room);
            if chunk <= 0 {
                continue;
            }
            sched.add_prefill(r.prefill_target(), chunk, r.prefilled);
            r.prefilled += chunk;
            self.kv_used += chunk;
            budget -= chunk;
            prefill_tokens += chunk;
        }
        while budget > 0 && self.running.len() < cfg.max_num_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let room = cfg.kv_capacity - self.kv_used;
            let chunk = front.prefill_target().min(budget).min(room);
            if chunk <= 0 {
                break;
            }
            let mut r = self.waiting.pop_front().expect("front exists");
            r.preempted = false;
            sched.add_prefill(r.prefill_target(), chunk, 0);
            r.prefilled = chunk;
            self.kv_used += chunk;
            budget -= chunk;
            prefill_tokens += chunk;
            self.running.push(r);
        }
        let mut queued = QueuedRequestsBuilder::new();
        for r in &self.waiting {
            if r.preempted {
                queued.add_preempted(r.prompt + r.generated);
            } else {
                queued.add_waiting(r.prompt);
            }
        }

        let expected = cfg.cost.expected(prefill_tokens, decode_kv, decode_n);
        let secs = (expected * (1.0 + cfg.cost.noise * self.draws.normal())).max(0.0);
        self.emitter.begin_iteration();
        self.emitter.time_segment(StreamHandle::DEFAULT, || {
            std::thread::sleep(Duration::from_secs_f64(secs))
        });
        self.emitter.submit(sched.build(), queued.build());
        self.iterations += 1;

        // Advance: decoders generate a token, and so do requests whose prefill just completed
        // (their first token); each new token takes a KV slot. Finished requests free theirs.
        let mut finished = 0;
        let mut kv_delta = 0;
        self.running.retain_mut(|r| {
            if r.decoding() {
                r.generated += 1;
                r.prefilled += 1;
                kv_delta += 1;
            }
            if r.generated >= r.output {
                finished += 1;
                kv_delta -= r.prefilled;
                false
            } else {
                true
            }
        });
        self.kv_used += kv_delta;
        self.finished += finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_have_roughly_the_requested_mean() {
        let mut d = Draws::new(7, 1000.0, 50.0, 1.0);
        let n = 20_000;
        let mean = (0..n).map(|_| d.prompt_len()).sum::<i64>() as f64 / n as f64;
        assert!((950.0..1050.0).contains(&mean), "{mean}");
        let mean = (0..n).map(|_| d.output_len()).sum::<i64>() as f64 / n as f64;
        assert!((47.5..52.5).contains(&mean), "{mean}");
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate() {
        let mut d = Draws::new(3, 1.0, 1.0, 20.0);
        let n = 20_000;
        let total: f64 = (0..n).map(|_| d.arrival_gap().unwrap().as_secs_f64()).sum();
        let mean_gap = total / n as f64;
        assert!((0.0475..0.0525).contains(&mean_gap), "{mean_gap}");
        assert_eq!(Draws::new(3, 1.0, 1.0, 0.0).arrival_gap(), None);
        assert_eq!(Draws::new(3, 1.0, 1.0, f64::NAN).arrival_gap(), None);
    }

    #[test]
    fn odd_means_still_give_valid_lengths() {
        for mean in [f64::NAN, f64::INFINITY, -5.0, 0.0, 1e300] {
            let mut d = Draws::new(1, mean, mean, 1.0);
            let l = d.prompt_len();
            assert!((1..=1 << 20).contains(&l), "{mean}: {l}");
        }
    }

    #[test]
    fn a_seed_reproduces_its_draws_and_ranks_differ() {
        let sample = |seed| {
            let mut d = Draws::new(seed, 1000.0, 100.0, 4.0);
            (0..32)
                .map(|_| {
                    (
                        d.prompt_len(),
                        d.output_len(),
                        d.arrival_gap(),
                        d.normal().to_bits(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(sample(42), sample(42));
        assert_ne!(sample(42), sample(43));
    }

    #[test]
    fn cost_model_is_linear() {
        let c = CostModel::default();
        let a = c.expected(1000, 0, 0) - c.expected(0, 0, 0);
        let b = c.expected(2000, 0, 0) - c.expected(1000, 0, 0);
        assert!((a - b).abs() < 1e-12);
    }
}
