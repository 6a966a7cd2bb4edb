//! Parity of `fpm_subscriber::planner` with Dynamo's planner regression models.
//!
//! Random sequences (seeded, seed printed) are run through the real upstream classes
//! (`python/planner.py` loads them from the ai-dynamo wheel) and through ours. Compared at
//! every checkpoint: retained samples (exact, in gather order), axis bounds, observation
//! count, moving averages and `_max_observed_kv` (bit-exact), fit status, coefficients and
//! intercept (1e-9 relative), and every estimator's output (1e-9 relative).

use contract_tests::{python, run_script, seeded_rng, VectorRng};
use fpm_schema::{ForwardPassMetrics, ScheduledRequestMetrics};
use fpm_subscriber::planner::{
    AggModel, DecodeModel, FitError, ModelConfig, ModelKind, PrefillModel,
};
use rand::RngExt;
use serde_json::{json, Value};

/// Relative tolerance the issue sets for coefficients, intercepts and estimates.
const REL_TOL: f64 = 1e-9;

fn fh(x: f64) -> Value {
    Value::String(format!("f64:{:016x}", x.to_bits()))
}

fn hf(v: &Value) -> f64 {
    let s = v
        .as_str()
        .and_then(|s| s.strip_prefix("f64:"))
        .unwrap_or_else(|| panic!("not a float: {v}"));
    f64::from_bits(u64::from_str_radix(s, 16).unwrap())
}

fn opt_i(v: Option<i64>) -> Value {
    v.map_or(Value::Null, |x| json!(x))
}

fn opt_f(v: Option<f64>) -> Value {
    v.map_or(Value::Null, fh)
}

#[derive(Debug, Clone)]
enum Query {
    PrefillTtft {
        q: i64,
        mbt: i64,
        kv: Option<f64>,
    },
    AggTtft {
        q: i64,
        mbt: i64,
        cur_kv: i64,
        kv: Option<f64>,
    },
    Itl {
        s: i64,
        q: i64,
    },
    PrefillRps {
        sla: f64,
        isl: f64,
        mbt: Option<i64>,
    },
    DecodeRps {
        itl: f64,
        ctx: f64,
        osl: f64,
        max_kv: Option<i64>,
        max_seqs: Option<i64>,
        acc: f64,
    },
    AggRps {
        isl: f64,
        osl: f64,
        mbt: i64,
        ttft: f64,
        itl: f64,
        max_kv: Option<i64>,
        max_seqs: Option<i64>,
        kv: Option<f64>,
        acc: f64,
    },
}

impl Query {
    fn to_json(&self) -> Value {
        match *self {
            Query::PrefillTtft { q, mbt, kv } => json!(["ttft", q, mbt, opt_f(kv)]),
            Query::AggTtft { q, mbt, cur_kv, kv } => json!(["ttft", q, mbt, cur_kv, opt_f(kv)]),
            Query::Itl { s, q } => json!(["itl", s, q]),
            Query::PrefillRps { sla, isl, mbt } => {
                json!(["prefill_rps", fh(sla), fh(isl), opt_i(mbt)])
            }
            Query::DecodeRps {
                itl,
                ctx,
                osl,
                max_kv,
                max_seqs,
                acc,
            } => json!([
                "decode_rps",
                fh(itl),
                fh(ctx),
                fh(osl),
                opt_i(max_kv),
                opt_i(max_seqs),
                fh(acc)
            ]),
            Query::AggRps {
                isl,
                osl,
                mbt,
                ttft,
                itl,
                max_kv,
                max_seqs,
                kv,
                acc,
            } => json!([
                "agg_rps",
                fh(isl),
                fh(osl),
                mbt,
                fh(ttft),
                fh(itl),
                opt_i(max_kv),
                opt_i(max_seqs),
                opt_f(kv),
                fh(acc)
            ]),
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Obs(ForwardPassMetrics),
    Check(Vec<Query>),
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    kind: ModelKind,
    config: ModelConfig,
    events: Vec<Event>,
}

impl Case {
    fn to_json(&self) -> Value {
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|e| match e {
                Event::Obs(m) => {
                    let s = &m.scheduled_requests;
                    json!([
                        "obs",
                        fh(m.wall_time),
                        s.num_prefill_requests,
                        s.sum_prefill_tokens,
                        s.num_decode_requests,
                        s.sum_decode_kv_tokens
                    ])
                }
                Event::Check(qs) => {
                    json!(["check", qs.iter().map(Query::to_json).collect::<Vec<_>>()])
                }
            })
            .collect();
        json!({
            "name": self.name, "model": self.kind.as_str(), "max_samples": self.config.max_samples,
            "bucket_size": self.config.bucket_size, "min_observations": self.config.min_observations,
            "events": events,
        })
    }
}

fn unit(r: &mut VectorRng) -> f64 {
    r.random::<f64>()
}

fn pick<T: Copy>(r: &mut VectorRng, xs: &[T]) -> T {
    xs[r.random_range(0..xs.len())]
}

fn maybe<T>(r: &mut VectorRng, p_none: u64, f: impl FnOnce(&mut VectorRng) -> T) -> Option<T> {
    if r.random_range(0..100) < p_none {
        None
    } else {
        Some(f(r))
    }
}

fn kv_rate(r: &mut VectorRng) -> Option<f64> {
    match r.random_range(0..10) {
        0..=3 => None,
        4 => Some(f64::NAN),
        5 => Some(pick(r, &[-0.5, 0.0, 0.95, 1.0, 1.5])),
        _ => Some(unit(r)),
    }
}

fn gen_query(r: &mut VectorRng, kind: ModelKind) -> Query {
    // Upstream predicts once per chunk of `mbt` tokens (sklearn's predict costs ~0.1 ms), so
    // budgets stay large enough that a query is at most a few hundred predictions.
    let mbt = pick(r, &[0, 256, 512, 1024, 2048, 8192]);
    let sweep_mbt = pick(r, &[32, 64, 256, 1024]);
    // Agg's SLA sweep is the slow one upstream (a prediction per batch size): 1 query in 5.
    match (kind, r.random_range(0..10)) {
        (ModelKind::Prefill, 0..=4) => Query::PrefillTtft {
            q: r.random_range(0..20 * mbt.max(1) as u64) as i64 - 100,
            mbt,
            kv: kv_rate(r),
        },
        (ModelKind::Prefill, _) => Query::PrefillRps {
            sla: unit(r) * 500.0,
            isl: if r.random_range(0..10) == 0 {
                -unit(r) * 10.0
            } else {
                unit(r) * 20_000.0
            },
            mbt: maybe(r, 30, |r| pick(r, &[0, 64, 512, 2048, 8192])),
        },
        (ModelKind::Decode, 0..=4) | (ModelKind::Agg, 0..=3) => Query::Itl {
            s: r.random_range(0..2_000_000) as i64,
            q: r.random_range(0..100_000) as i64,
        },
        (ModelKind::Decode, _) => Query::DecodeRps {
            itl: if r.random_range(0..20) == 0 {
                0.0
            } else {
                unit(r) * 80.0
            },
            ctx: if r.random_range(0..20) == 0 {
                0.0
            } else {
                1.0 + unit(r) * 8000.0
            },
            osl: 1.0 + unit(r) * 2000.0,
            max_kv: maybe(r, 40, |r| r.random_range(0..3_000_000) as i64),
            max_seqs: maybe(r, 50, |r| r.random_range(0..600) as i64),
            acc: pick(r, &[1.0, 1.0, 0.5, 1.7, 3.0]),
        },
        (ModelKind::Agg, 4..=7) => Query::AggTtft {
            q: r.random_range(0..20 * mbt.max(1) as u64) as i64 - 100,
            mbt,
            cur_kv: r.random_range(0..2_000_000) as i64,
            kv: kv_rate(r),
        },
        (ModelKind::Agg, _) => Query::AggRps {
            isl: if r.random_range(0..20) == 0 {
                0.0
            } else {
                1.0 + unit(r) * 8000.0
            },
            osl: 1.0 + unit(r) * 2000.0,
            mbt: sweep_mbt,
            ttft: unit(r) * 2000.0,
            itl: unit(r) * 100.0,
            max_kv: maybe(r, 40, |r| r.random_range(0..3_000_000) as i64),
            max_seqs: maybe(r, 50, |r| r.random_range(0..600) as i64),
            kv: kv_rate(r),
            acc: pick(r, &[1.0, 1.0, 0.5, 1.7, 3.0]),
        },
    }
}

/// One random case: bucket geometry, a regime whose feature ranges grow in stages (bound
/// changes), discrete feature sets (ties), heartbeats, negative slopes (rejections),
/// collinear decode batches, rare NaN/inf wall times, short and long runs.
fn gen_case(r: &mut VectorRng, kind: ModelKind, name: String) -> Case {
    let config = ModelConfig {
        max_samples: pick(r, &[1, 2, 3, 4, 5, 8, 12, 16, 32, 64, 64, 64]),
        bucket_size: match kind {
            ModelKind::Prefill => pick(r, &[1, 2, 3, 4, 7, 16, 16]),
            _ => pick(r, &[1, 2, 4, 9, 16, 16, 25]),
        },
        min_observations: pick(r, &[0, 1, 2, 3, 5, 5, 5]),
    };
    let len = if r.random_range(0..8) == 0 {
        100 + r.random_range(0..300)
    } else {
        1 + r.random_range(0..40)
    };
    let discrete = r.random_range(0..4) == 0;
    let collinear = r.random_range(0..8) == 0;
    let base = 0.001 + unit(r) * 0.01;
    let slope = |r: &mut VectorRng, scale: f64| {
        if r.random_range(0..12) == 0 {
            -unit(r) * scale
        } else {
            unit(r) * scale
        }
    };
    let (a0, a1) = match kind {
        ModelKind::Prefill => (slope(r, 2e-5), 0.0),
        ModelKind::Decode => (slope(r, 2e-4), slope(r, 2e-7)),
        ModelKind::Agg => (slope(r, 2e-5), slope(r, 2e-7)),
    };
    let noise = pick(r, &[0.0, 1e-4, 1e-3, 5e-3]);
    let avg_len = 50 + r.random_range(0..4000) as i64;
    let mut stage = 1u32;
    let p_check = 3.0 / len as f64;
    let mut events = Vec::new();
    for _ in 0..len {
        if r.random_range(0..20) == 0 {
            stage = (stage + 1).min(10);
        }
        let scale = 1u64 << (4 + stage);
        let prefill_tokens = |r: &mut VectorRng| -> i64 {
            if discrete {
                pick(r, &[0, 128, 256, 512, 1024])
            } else {
                r.random_range(0..scale) as i64
            }
        };
        let decode = |r: &mut VectorRng| -> (i64, i64) {
            let n = if discrete {
                pick(r, &[0, 1, 8, 32])
            } else {
                r.random_range(0..1 + scale.min(256)) as i64
            };
            let per = if collinear {
                avg_len
            } else {
                avg_len / 2 + r.random_range(0..avg_len as u64 + 1) as i64
            };
            (n, n * per)
        };
        let (npr, spt, ndr, kv) = match kind {
            ModelKind::Prefill => {
                let spt = prefill_tokens(r);
                (
                    if spt == 0 {
                        0
                    } else {
                        1 + r.random_range(0..4) as i64
                    },
                    spt,
                    0,
                    0,
                )
            }
            ModelKind::Decode => {
                let (n, kv) = decode(r);
                (0, 0, n, kv)
            }
            ModelKind::Agg => {
                let spt = prefill_tokens(r);
                let (n, kv) = decode(r);
                (
                    i64::from(spt > 0) * (1 + r.random_range(0..3) as i64),
                    spt,
                    n,
                    kv,
                )
            }
        };
        let (x0, x1) = match kind {
            ModelKind::Prefill => (spt as f64, 0.0),
            ModelKind::Decode => (ndr as f64, kv as f64),
            ModelKind::Agg => (spt as f64, kv as f64),
        };
        let wall_time = match r.random_range(0..1000) {
            0..=99 => 0.0, // heartbeat (its fields still feed the moving averages)
            100..=104 => f64::NAN,
            105..=106 => f64::INFINITY,
            _ => base + a0 * x0 + a1 * x1 + noise * (unit(r) - 0.5),
        };
        events.push(Event::Obs(ForwardPassMetrics {
            wall_time,
            scheduled_requests: ScheduledRequestMetrics {
                num_prefill_requests: npr,
                sum_prefill_tokens: spt,
                num_decode_requests: ndr,
                sum_decode_kv_tokens: kv,
                ..Default::default()
            },
            ..Default::default()
        }));
        if unit(r) < p_check {
            events.push(Event::Check((0..3).map(|_| gen_query(r, kind)).collect()));
        }
    }
    events.push(Event::Check((0..3).map(|_| gen_query(r, kind)).collect()));
    Case {
        name,
        kind,
        config,
        events,
    }
}

/// What one model exposes, so the three can be driven alike.
enum Model {
    P(PrefillModel),
    D(DecodeModel),
    A(AggModel),
}

/// `None` for upstream's `None`, else the float(s) returned.
fn run_query(m: &mut Model, q: &Query) -> Option<Vec<f64>> {
    match (m, q.clone()) {
        (Model::P(m), Query::PrefillTtft { q, mbt, kv }) => {
            m.estimate_next_ttft(q, mbt, kv).map(|v| vec![v])
        }
        (Model::P(m), Query::PrefillRps { sla, isl, mbt }) => {
            let (a, b) = m.find_best_engine_prefill_rps(sla, isl, mbt);
            Some(vec![a, b])
        }
        (Model::D(m), Query::Itl { s, q }) => m.estimate_next_itl(s, q).map(|v| vec![v]),
        (
            Model::D(m),
            Query::DecodeRps {
                itl,
                ctx,
                osl,
                max_kv,
                max_seqs,
                acc,
            },
        ) => {
            let (a, b) = m.find_best_engine_decode_rps(itl, ctx, osl, max_kv, max_seqs, acc);
            Some(vec![a, b])
        }
        (Model::A(m), Query::AggTtft { q, mbt, cur_kv, kv }) => {
            m.estimate_next_ttft(q, mbt, cur_kv, kv).map(|v| vec![v])
        }
        (Model::A(m), Query::Itl { s, q }) => m.estimate_next_itl(s, q).map(|v| vec![v]),
        (
            Model::A(m),
            Query::AggRps {
                isl,
                osl,
                mbt,
                ttft,
                itl,
                max_kv,
                max_seqs,
                kv,
                acc,
            },
        ) => {
            let (a, b, c) =
                m.find_best_engine_agg_rps(isl, osl, mbt, ttft, itl, max_kv, max_seqs, kv, acc);
            Some(vec![a, b, c])
        }
        (_, q) => panic!("query {q:?} does not apply"),
    }
}

/// Worst relative differences seen, for the report.
#[derive(Debug, Default)]
struct Worst {
    coef: f64,
    intercept: f64,
    estimate: f64,
    fits: usize,
    estimates: usize,
    checks: usize,
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b || (a.is_nan() && b.is_nan()) {
        return 0.0;
    }
    (a - b).abs() / a.abs().max(b.abs())
}

fn compare_case(case: &Case, result: &Value, worst: &mut Worst) -> Result<(), String> {
    let mut model = match case.kind {
        ModelKind::Prefill => Model::P(PrefillModel::new(&case.config).unwrap()),
        ModelKind::Decode => Model::D(DecodeModel::new(&case.config).unwrap()),
        ModelKind::Agg => Model::A(AggModel::new(&case.config).unwrap()),
    };
    let checks = result["checks"].as_array().ok_or("no checks")?;
    let mut ci = 0;
    for ev in &case.events {
        let queries = match ev {
            Event::Obs(m) => {
                match &mut model {
                    Model::P(x) => x.observe(m),
                    Model::D(x) => x.observe(m),
                    Model::A(x) => x.observe(m),
                }
                continue;
            }
            Event::Check(q) => q,
        };
        let py = &checks[ci];
        let at = format!("{} check {ci}", case.name);
        ci += 1;
        worst.checks += 1;
        let (n, sufficient, samples, bounds, fit, avgs) = match &mut model {
            Model::P(m) => (
                m.num_observations(),
                m.has_sufficient_data(),
                m.samples().copied().collect::<Vec<_>>(),
                m.bounds(),
                m.fit(),
                vec![
                    ("_avg_isl", m.avg_isl()),
                    ("_avg_num_prefill", m.avg_num_prefill()),
                ],
            ),
            Model::D(m) => (
                m.num_observations(),
                m.has_sufficient_data(),
                m.samples().copied().collect(),
                m.bounds(),
                m.fit(),
                vec![
                    ("_avg_decode_len", m.avg_decode_length()),
                    ("_avg_num_decode", m.avg_num_decode()),
                ],
            ),
            Model::A(m) => (
                m.num_observations(),
                m.has_sufficient_data(),
                m.samples().copied().collect(),
                m.bounds(),
                m.fit(),
                vec![
                    ("_avg_isl", m.avg_isl()),
                    ("_avg_decode_len", m.avg_decode_length()),
                    ("_avg_prefill_tokens", m.avg_prefill_tokens()),
                    ("_avg_num_prefill", m.avg_num_prefill()),
                    ("_avg_num_decode", m.avg_num_decode()),
                ],
            ),
        };
        if py["n"] != json!(n) || py["sufficient"] != json!(sufficient) {
            return Err(format!(
                "{at}: n/sufficient {n} {sufficient} vs {} {}",
                py["n"], py["sufficient"]
            ));
        }
        let ours: Vec<Vec<u64>> = samples
            .iter()
            .map(|s| {
                s.features()
                    .iter()
                    .chain([s.wall_time()].iter())
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect();
        let theirs: Vec<Vec<u64>> = py["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| hf(v).to_bits())
                    .collect()
            })
            .collect();
        if ours != theirs {
            return Err(format!(
                "{at}: samples differ\nours   {samples:?}\ntheirs {}",
                py["samples"]
            ));
        }
        let theirs_bounds: Vec<(f64, f64)> = py["bounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (hf(&b[0]), hf(&b[1])))
            .collect();
        if bounds != theirs_bounds {
            return Err(format!("{at}: bounds {bounds:?} vs {theirs_bounds:?}"));
        }
        for (name, v) in &avgs {
            let t = hf(&py["avgs"][name]);
            if t.to_bits() != v.to_bits() {
                return Err(format!("{at}: {name} {v:e} vs {t:e}"));
            }
        }
        if let Model::D(m) = &model {
            if m.max_observed_kv().to_bits() != hf(&py["max_observed_kv"]).to_bits() {
                return Err(format!("{at}: max_observed_kv differs"));
            }
        }
        let status = match fit {
            Ok(_) => "ok",
            Err(FitError::TooFewObservations { .. }) => "too_few",
            Err(FitError::NegativeCoefficient { .. }) => "rejected",
            Err(FitError::NonFinite | FitError::NoSamples) => "error",
            Err(e) => panic!("unexpected {e:?}"),
        };
        if py["fit"] != status {
            return Err(format!(
                "{at}: fit {status} ({fit:?}) vs {}; samples {samples:?}",
                py["fit"]
            ));
        }
        if let Ok(f) = fit {
            worst.fits += 1;
            for (j, (c, t)) in f
                .coef()
                .iter()
                .zip(py["coef"].as_array().unwrap())
                .enumerate()
            {
                let d = rel(*c, hf(t));
                worst.coef = worst.coef.max(d);
                if d > REL_TOL {
                    return Err(format!(
                        "{at}: coef[{j}] {c:e} vs {:e} (rel {d:e}); samples {samples:?}",
                        hf(t)
                    ));
                }
            }
            let d = rel(f.intercept(), hf(&py["intercept"]));
            worst.intercept = worst.intercept.max(d);
            if d > REL_TOL {
                return Err(format!(
                    "{at}: intercept {:e} vs {:e} (rel {d:e})",
                    f.intercept(),
                    hf(&py["intercept"])
                ));
            }
        }
        for (k, q) in queries.iter().enumerate() {
            let theirs = &py["estimates"][k];
            let ours = run_query(&mut model, q);
            if theirs == "error" {
                if status != "error" {
                    return Err(format!("{at}: {q:?} raised upstream only"));
                }
                continue;
            }
            worst.estimates += 1;
            let theirs: Option<Vec<f64>> = match theirs {
                Value::Null => None,
                Value::Array(xs) => Some(xs.iter().map(hf).collect()),
                v => Some(vec![hf(v)]),
            };
            match (&ours, &theirs) {
                (None, None) => {}
                (Some(a), Some(b)) if a.len() == b.len() => {
                    for (x, y) in a.iter().zip(b) {
                        let d = rel(*x, *y);
                        worst.estimate = worst.estimate.max(d);
                        if d > REL_TOL {
                            return Err(format!(
                                "{at}: {q:?}: ours {a:?} theirs {b:?} (rel {d:e})"
                            ));
                        }
                    }
                }
                _ => return Err(format!("{at}: {q:?}: ours {ours:?} theirs {theirs:?}")),
            }
        }
    }
    if ci != checks.len() {
        return Err(format!(
            "{}: {} checks upstream, {ci} here",
            case.name,
            checks.len()
        ));
    }
    Ok(())
}

fn parity(kind: ModelKind, count: usize) {
    let Some(py) = python() else { return };
    let seed = super::live::seed();
    let mut r = seeded_rng(seed ^ kind as u64);
    let cases: Vec<Case> = (0..count)
        .map(|i| gen_case(&mut r, kind, format!("{kind}-{seed}-{i}")))
        .collect();
    let mut input = String::new();
    for c in &cases {
        input.push_str(&c.to_json().to_string());
        input.push('\n');
    }
    if let Some(dir) = std::env::var_os("FPM_PLANNER_DUMP") {
        std::fs::write(
            std::path::Path::new(&dir).join(format!("{kind}.jsonl")),
            &input,
        )
        .unwrap();
    }
    let started = std::time::Instant::now();
    let (_, out) = run_script(&py, "planner.py", &[], input.as_bytes(), false);
    eprintln!(
        "{kind}: upstream took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let results: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), cases.len(), "one result per case");
    let mut worst = Worst::default();
    let mut failures = Vec::new();
    for (c, res) in cases.iter().zip(&results) {
        assert_eq!(res["name"], json!(c.name));
        if let Err(e) = compare_case(c, res, &mut worst) {
            failures.push(e);
        }
    }
    eprintln!(
        "{kind}: {count} sequences, {} checks, {} fits, {} estimates; worst relative difference: coef {:e}, intercept {:e}, estimates {:e}",
        worst.checks, worst.fits, worst.estimates, worst.coef, worst.intercept, worst.estimate
    );
    assert!(
        failures.is_empty(),
        "{} of {count} {kind} sequences differ (seed {seed}); first: {}",
        failures.len(),
        failures
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        worst.fits > count / 4 && worst.estimates > count,
        "too few fits to mean anything: {worst:?}"
    );
}

#[test]
fn prefill_model_matches_dynamo() {
    parity(ModelKind::Prefill, 2000);
}

#[test]
fn decode_model_matches_dynamo() {
    parity(ModelKind::Decode, 2000);
}

#[test]
fn agg_model_matches_dynamo() {
    parity(ModelKind::Agg, 2000);
}
