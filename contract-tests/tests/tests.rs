//! Contract tests of fpm-schema against the upstream msgspec structs.
//!
//! `golden` runs everywhere from the committed vectors; `live` runs the real upstream modules
//! (Dynamo's and SGLang's) in the venv made by `contract-tests/setup.sh`.

use contract_tests::*;
use fpm_schema::{decode, encode, DecodeError, SCHEMA};
use serde_json::Value;

/// Where we differ from msgspec on purpose. msgspec fails on ignored values nested deeper than
/// Python's recursion limit (about 1,000 levels, depending on the interpreter's stack): that
/// is an artefact of its recursive decoder, not a wire rule. Ours skips ignored values
/// iteratively and accepts any depth within the size limit.
const DOCUMENTED_DIVERGENCES: [&str; 1] = ["deep_nested_depth2000"];

/// Checks one vector against our decoder (and encoder where the bytes came from msgspec
/// encoding a struct). Returns a failure description.
fn check_vector(v: &Vector) -> Result<(), String> {
    let got = decode(&v.msgpack);
    if DOCUMENTED_DIVERGENCES.iter().any(|d| v.name.contains(d)) {
        return match got {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{}: divergence case must decode, got {e}", v.name)),
        };
    }
    match v.expect {
        Expect::Ok => {
            let want = v.value.as_ref().ok_or("ok vector without value")?;
            let m = got.map_err(|e| format!("{}: decode failed: {e}", v.name))?;
            if !same(&m, want) {
                return Err(format!("{}: decoded {m:?}, want {want:?}", v.name));
            }
            if v.source != "msgpack" && encode(want) != v.msgpack {
                return Err(format!(
                    "{}: our bytes differ from {}'s:\nours   {}\ntheirs {}",
                    v.name,
                    v.source,
                    hex_encode(&encode(want)),
                    hex_encode(&v.msgpack)
                ));
            }
        }
        Expect::UnsupportedVersion => {
            let want = v.value.as_ref().map(|m| m.version);
            match got {
                Err(DecodeError::UnsupportedVersion { version }) if Some(version) == want => {}
                other => {
                    return Err(format!(
                        "{}: want UnsupportedVersion {want:?}, got {other:?}",
                        v.name
                    ))
                }
            }
        }
        Expect::Error => match got {
            Ok(m) => return Err(format!("{}: want an error, decoded {m:?}", v.name)),
            Err(e) => {
                // msgspec names the field (dotted path) unless the error is about the whole
                // message (""); then there is nothing to compare. Otherwise our error must
                // name exactly that field.
                if let Some(field) = v.error_field.as_deref().filter(|f| !f.is_empty()) {
                    match e.field() {
                        Some(ours) if ours == field => {}
                        Some(ours) => {
                            return Err(format!(
                                "{}: error \"{e}\" is about `{ours}`, want `{field}`",
                                v.name
                            ))
                        }
                        None => {
                            return Err(format!(
                                "{}: error \"{e}\" names no field, want `{field}`",
                                v.name
                            ))
                        }
                    }
                }
            }
        },
    }
    Ok(())
}

/// The error-field check itself: an error about another field, or about no field, fails it.
#[test]
fn error_field_check_rejects_a_wrong_or_missing_field() {
    // {"counter_id": 1.0}: a float for an int, which our decoder reports for `counter_id`.
    let float_for_counter = b"\x81\xaacounter_id\xcb\x3f\xf0\0\0\0\0\0\0".to_vec();
    let vector = |msgpack: Vec<u8>, field: &str| Vector {
        name: format!("field-check/{field}"),
        source: "msgpack".into(),
        msgpack,
        expect: Expect::Error,
        value: None,
        error_field: Some(field.into()),
    };
    assert_eq!(
        check_vector(&vector(float_for_counter.clone(), "counter_id")),
        Ok(())
    );
    // msgspec names no field: nothing to compare.
    assert_eq!(check_vector(&vector(float_for_counter.clone(), "")), Ok(()));
    let wrong = check_vector(&vector(float_for_counter.clone(), "dp_rank")).unwrap_err();
    assert!(
        wrong.contains("is about `counter_id`, want `dp_rank`"),
        "{wrong}"
    );
    // A suffix or prefix of the right path is still the wrong field.
    let nested = check_vector(&vector(float_for_counter, "scheduled_requests.counter_id"));
    assert!(nested.is_err());
    // Trailing bytes: our error names no field, so it cannot be about `dp_rank`.
    let trailing = [encode(&Default::default()), vec![0xc0]].concat();
    let none = check_vector(&vector(trailing, "dp_rank")).unwrap_err();
    assert!(none.contains("names no field, want `dp_rank`"), "{none}");
}

fn check_all(vectors: &[Vector]) -> usize {
    let failures: Vec<String> = vectors
        .iter()
        .filter_map(|v| check_vector(v).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} vectors failed:\n{}",
        failures.len(),
        vectors.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    vectors.len()
}

fn our_schema_json() -> Value {
    let mut out = serde_json::Map::new();
    for (name, fields) in SCHEMA {
        out.insert(
            name.to_owned(),
            Value::Array(
                fields
                    .iter()
                    .map(|(f, t)| Value::Array(vec![(*f).into(), (*t).into()]))
                    .collect(),
            ),
        );
    }
    Value::Object(out)
}

/// Compares our field list with an upstream module's introspected schema.
fn assert_schema_matches(module: &str, upstream: &Value) {
    let ours = our_schema_json();
    for (name, fields) in ours.as_object().unwrap() {
        let theirs = upstream[name]
            .as_array()
            .unwrap_or_else(|| panic!("{module}: upstream has no struct {name}: {upstream}"));
        let theirs: Vec<Value> = theirs
            .iter()
            .map(|f| Value::Array(f.as_array().unwrap()[..2].to_vec()))
            .collect();
        assert_eq!(
            fields.as_array().unwrap(),
            &theirs,
            "SCHEMA DRIFT: {module}'s {name} no longer matches fpm-schema (fields, order or types)"
        );
    }
    assert_eq!(upstream["FPM_VERSION"], 1, "{module}: FPM_VERSION changed");
    for name in ours.as_object().unwrap().keys() {
        if let Some(cfg) = upstream.get("config").and_then(|c| c.get(name)) {
            assert_eq!(
                cfg["array_like"], false,
                "{module} {name} became array_like"
            );
            assert_eq!(
                cfg["omit_defaults"], false,
                "{module} {name} omits defaults"
            );
        }
    }
}

mod golden {
    use super::*;
    use std::fs;

    fn vectors(file: &str) -> Vec<Vector> {
        let path = repo_root().join("contract-tests/vectors").join(file);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (regenerate with make_golden.py)", path.display()));
        parse_vectors(&text)
    }

    #[test]
    fn dynamo_vectors_decode_and_encode_identically() {
        assert!(check_all(&vectors("dynamo.jsonl")) > 200);
    }

    #[test]
    fn sglang_vectors_decode_and_encode_identically() {
        assert!(check_all(&vectors("sglang.jsonl")) > 200);
    }

    #[test]
    fn extension_and_error_vectors_behave_like_msgspec() {
        for file in ["extras-dynamo.jsonl", "extras-sglang.jsonl"] {
            assert!(check_all(&vectors(file)) > 20, "{file}");
        }
    }

    #[test]
    fn schema_matches_upstream_snapshot() {
        let path = repo_root().join("contract-tests/vectors/schema.json");
        let schema: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        assert_schema_matches("dynamo (golden)", &schema["dynamo"]);
        assert_schema_matches("sglang (golden)", &schema["sglang"]);
    }

    #[test]
    fn dynamo_envelopes_decode_and_re_encode_byte_identical() {
        let path = repo_root().join("contract-tests/vectors/envelopes-dynamo-1.6.1.hex");
        let text = fs::read_to_string(path).unwrap();
        let mut n = 0;
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let bytes: Vec<u8> = (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
                .collect();
            let env = fpm_schema::Envelope::decode(&bytes).unwrap();
            assert_eq!(env.topic, fpm_schema::FPM_TOPIC);
            assert!(env.publisher_id < 1 << 53);
            assert_eq!(env.sequence, 0);
            // Unix milliseconds in 2026.
            assert!((1_700_000_000_000..2_000_000_000_000).contains(&env.published_at));
            let m = decode(env.payload).unwrap();
            assert!(m.worker_id.starts_with("worker-"));
            assert_eq!(encode(&m), env.payload, "payload re-encodes identically");
            assert_eq!(env.encode(), bytes, "envelope re-encodes identically");
            n += 1;
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn welford_matches_python_accumulator() {
        let path = repo_root().join("contract-tests/vectors/welford.jsonl");
        assert_eq!(check_welford(&fs::read_to_string(path).unwrap()), 50);
    }
}

/// Checks Welford results from Python: count and sum exact, and the variance bit for bit
/// (`fpm_schema::Welford` does the upstream accumulators' arithmetic in the same order, and
/// Python's int -> float conversion rounds to nearest even as Rust's `as f64` does).
fn check_welford(text: &str) -> usize {
    let mut cases = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        let mut w = fpm_schema::Welford::new();
        for x in v["values"].as_array().unwrap() {
            w.add(x.as_i64().unwrap());
        }
        assert_eq!(w.count(), v["n"].as_i64().unwrap());
        assert_eq!(w.sum(), v["s"].as_i64().unwrap());
        let want = f64::from_bits(
            u64::from_str_radix(
                v["variance"].as_str().unwrap().trim_start_matches("f64:"),
                16,
            )
            .unwrap(),
        );
        let got = w.variance();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "variance {got:e} vs python {want:e} for {line}"
        );
        cases += 1;
    }
    assert!(cases >= 20);
    cases
}

mod planner_parity;

mod live {
    use super::*;

    pub(crate) fn seed() -> u64 {
        let seed = std::env::var("FPM_CONTRACT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    % 1_000_000_007
            });
        eprintln!("contract seed: {seed} (rerun with FPM_CONTRACT_SEED={seed})");
        seed
    }

    fn python_to_rust(module: &str) {
        let Some(py) = python() else { return };
        let seed = seed().to_string();
        let (_, out) = run_contract(
            &py,
            &[
                "gen", "--module", module, "--seed", &seed, "--count", "2000",
            ],
            b"",
            false,
        );
        let vectors = parse_vectors(&out);
        assert!(vectors.len() >= 2000 + 50, "only {} vectors", vectors.len());
        check_all(&vectors);
    }

    fn rust_to_python(module: &str) {
        let Some(py) = python() else { return };
        let seed = seed();
        let mut rng = seeded_rng(seed);
        let mut lines = String::new();
        let mut n = 0;
        for (name, m) in boundary_messages() {
            lines.push_str(&rust_vector_line(&name, &m));
            lines.push('\n');
            n += 1;
        }
        for i in 0..2000 {
            let m = random_message(&mut rng);
            lines.push_str(&rust_vector_line(&format!("rand-{seed}-{i}"), &m));
            lines.push('\n');
            n += 1;
        }
        let (ok, out) = run_contract(&py, &["check", "--module", module], lines.as_bytes(), true);
        let summary: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!("check output is not JSON ({e}): {out}");
        });
        assert!(ok, "{module} rejected Rust-encoded vectors: {summary:#}");
        assert_eq!(summary["checked"], n, "{summary}");
    }

    #[test]
    fn dynamo_encoded_decodes_in_rust() {
        python_to_rust("dynamo");
    }

    #[test]
    fn sglang_encoded_decodes_in_rust() {
        python_to_rust("sglang");
    }

    #[test]
    fn rust_encoded_decodes_in_dynamo_byte_identical() {
        rust_to_python("dynamo");
    }

    #[test]
    fn rust_encoded_decodes_in_sglang_byte_identical() {
        rust_to_python("sglang");
    }

    #[test]
    fn decoder_semantics_match_both_modules() {
        let Some(py) = python() else { return };
        for module in ["dynamo", "sglang"] {
            let (_, out) = run_contract(&py, &["extras", "--module", module], b"", false);
            assert!(check_all(&parse_vectors(&out)) > 20, "{module}");
        }
    }

    #[test]
    fn schema_has_not_drifted_upstream() {
        let Some(py) = python() else { return };
        let (_, out) = run_contract(&py, &["schema"], b"", false);
        let schema: Value = serde_json::from_str(&out).unwrap();
        assert_schema_matches("dynamo", &schema["dynamo"]);
        assert_schema_matches("sglang", &schema["sglang"]);
    }

    /// The committed golden vectors are exactly what `make_golden.py` generates from the
    /// upstream modules now (so a new upstream behaviour cannot hide behind stale files).
    #[test]
    fn golden_vectors_are_current() {
        let Some(py) = python() else { return };
        let out = std::process::Command::new(py)
            .arg(repo_root().join("contract-tests/python/make_golden.py"))
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "golden vectors are stale (regenerate with make_golden.py): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn welford_matches_both_modules() {
        let Some(py) = python() else { return };
        let seed = seed().to_string();
        for module in ["dynamo", "sglang"] {
            let (_, out) = run_contract(
                &py,
                &[
                    "welford", "--module", module, "--seed", &seed, "--count", "1000",
                ],
                b"",
                false,
            );
            assert_eq!(check_welford(&out), 1000, "{module}");
        }
    }
}
