//! Tests of the shared interface, and the message helper the model tests use.

use fpm_schema::{ForwardPassMetrics, ScheduledRequestMetrics};
use proptest::prelude::*;

use super::*;

/// A message with the fields the models read.
pub(crate) fn fpm(wall_time: f64, npr: i64, spt: i64, ndr: i64, sdkv: i64) -> ForwardPassMetrics {
    ForwardPassMetrics {
        wall_time,
        scheduled_requests: ScheduledRequestMetrics {
            num_prefill_requests: npr,
            sum_prefill_tokens: spt,
            num_decode_requests: ndr,
            sum_decode_kv_tokens: sdkv,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn config_is_validated() {
    for (c, field) in [
        (
            ModelConfig {
                max_samples: 0,
                ..Default::default()
            },
            "max_samples",
        ),
        (
            ModelConfig {
                bucket_size: 0,
                ..Default::default()
            },
            "bucket_size",
        ),
    ] {
        for kind in [ModelKind::Prefill, ModelKind::Decode, ModelKind::Agg] {
            match PerfModel::new(kind, &c) {
                Err(PlannerError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(
        ModelConfig::default(),
        ModelConfig {
            max_samples: 64,
            bucket_size: 16,
            min_observations: 5
        }
    );
}

#[test]
fn kind_names_round_trip() {
    for k in [ModelKind::Prefill, ModelKind::Decode, ModelKind::Agg] {
        assert_eq!(k.as_str().parse::<ModelKind>().unwrap(), k);
        assert_eq!(k.to_string(), k.as_str());
    }
    let e = "both".parse::<ModelKind>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown model \"both\": expected prefill, decode or agg"
    );
}

#[test]
fn summary_json_omits_what_does_not_apply() {
    let mut m = PerfModel::new(ModelKind::Decode, &ModelConfig::default()).unwrap();
    m.observe(&fpm(0.01, 0, 0, 2, 300));
    let j = serde_json::to_value(m.summary()).unwrap();
    assert_eq!(
        j,
        serde_json::json!({"model": "decode", "fitted": false, "observations": 1, "avg_decode_length": 150.0})
    );
    for r in 1..6 {
        m.observe(&fpm(
            0.01 + 0.001 * f64::from(r),
            0,
            0,
            2 * i64::from(r),
            500 * i64::from(r) + 7 * i64::from(r * r),
        ));
    }
    let s = m.summary();
    assert!(s.fitted && s.coef.as_ref().unwrap().len() == 2 && s.intercept.is_some());
    assert_eq!(s.avg_isl, None);
    let j = serde_json::to_value(&s).unwrap();
    let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    let mut agg = PerfModel::new(ModelKind::Agg, &ModelConfig::default()).unwrap();
    agg.observe(&fpm(0.0, 1, 100, 1, 50));
    let s = agg.summary();
    assert_eq!(
        (s.avg_isl, s.avg_decode_length, s.observations),
        (Some(100.0), Some(50.0), 0)
    );
}

#[test]
fn quality_reports_r_squared_and_residuals() {
    let mut m = PerfModel::new(ModelKind::Prefill, &ModelConfig::default()).unwrap();
    assert_eq!(m.quality(), None);
    for (t, noise) in [
        (100, 0.0),
        (200, 0.001),
        (300, -0.001),
        (400, 0.0),
        (500, 0.002),
        (600, 0.0),
    ] {
        m.observe(&fpm(
            0.01 + 1e-5 * f64::from(t) + noise,
            1,
            i64::from(t),
            0,
            0,
        ));
    }
    let q = m.quality().unwrap();
    assert_eq!(q.samples, 6);
    assert!(q.r_squared > 0.5 && q.r_squared < 1.0, "{q:?}");
    // p99 over 6 residuals is the largest one.
    let fit = m.fit().unwrap();
    let max_res = m
        .samples()
        .map(|s| (s.wall_time() - fit.predict(s.features())).abs())
        .fold(0.0, f64::max);
    assert_eq!(q.residual_p99, max_res);
}

#[test]
fn non_finite_wall_time_is_kept_but_blocks_the_fit() {
    // Upstream keeps the sample and scikit-learn raises on every fit until it is retired.
    let mut m = PerfModel::new(
        ModelKind::Prefill,
        &ModelConfig {
            max_samples: 5,
            bucket_size: 1,
            min_observations: 1,
        },
    )
    .unwrap();
    m.observe(&fpm(f64::NAN, 1, 100, 0, 0));
    assert_eq!(m.num_observations(), 1);
    assert_eq!(m.fit(), Err(FitError::NonFinite));
    for t in 1..=5 {
        m.observe(&fpm(0.01 * f64::from(t), 1, 100 * i64::from(t), 0, 0));
    }
    assert!(
        m.fit().is_ok(),
        "the NaN sample was the oldest of the only bucket"
    );
}

fn arb_fpm() -> impl Strategy<Value = ForwardPassMetrics> {
    (
        prop_oneof![Just(0.0), 0.0001f64..0.5],
        0i64..8,
        0i64..20_000,
        0i64..300,
        0i64..2_000_000,
    )
        .prop_map(|(wt, npr, spt, ndr, sdkv)| fpm(wt, npr, spt, ndr, sdkv))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn models_never_exceed_max_and_fits_are_non_negative(
        kind in prop_oneof![Just(ModelKind::Prefill), Just(ModelKind::Decode), Just(ModelKind::Agg)],
        max_samples in 1usize..40,
        bucket_size in 1usize..20,
        msgs in proptest::collection::vec(arb_fpm(), 0..150),
    ) {
        let config = ModelConfig { max_samples, bucket_size, min_observations: 3 };
        let mut m = PerfModel::new(kind, &config).unwrap();
        let mut non_heartbeats = 0;
        for msg in &msgs {
            m.observe(msg);
            non_heartbeats += usize::from(msg.wall_time != 0.0);
            prop_assert_eq!(m.num_observations(), non_heartbeats.min(max_samples));
            prop_assert!(m.samples().all(|s| s.wall_time() != 0.0));
        }
        if let Ok(fit) = m.fit() {
            prop_assert!(fit.coef().iter().all(|c| *c >= 0.0 || (kind == ModelKind::Decode && *c > -1e-6)));
            prop_assert!(m.summary().fitted);
        }
    }
}
