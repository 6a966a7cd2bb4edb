//! Contract tests of fpm-schema against the upstream msgspec structs.
//!
//! `golden` runs everywhere from the committed vectors; `live` runs the real upstream modules
//! (Dynamo's and SGLang's) in the venv made by `contract-tests/setup.sh`.

use contract_tests::*;
use fpm_schema::{decode, encode, serde_codec, DecodeError, ForwardPassMetrics, SCHEMA};
use serde_json::Value;

/// Where the hand-written decoder differs from msgspec on purpose. msgspec fails on ignored
/// values nested deeper than Python's recursion limit (about 1,000 levels, depending on the
/// interpreter's stack): that is an artefact of its recursive decoder, not a wire rule. Ours
/// skips ignored values iteratively and accepts any depth within the size limit. (The
/// `rmp-serde` path has a depth limit of 1,024 and rejects it, as msgspec does.)
const DOCUMENTED_DIVERGENCES: [&str; 1] = ["deep_nested_depth2000"];

/// fpm-schema's two msgpack codecs; every vector is checked against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    /// `fpm_schema::{encode, decode}`, written by hand over the field table.
    HandWritten,
    /// `fpm_schema::serde_codec`, written with `rmp-serde`.
    RmpSerde,
}

const CODECS: [Codec; 2] = [Codec::HandWritten, Codec::RmpSerde];

/// What a decoder did with a payload.
enum Outcome {
    Ok(ForwardPassMetrics),
    UnsupportedVersion(i64),
    /// Rejected; `field` is the field the error names, when the decoder names fields.
    Error {
        field: Option<&'static str>,
        message: String,
    },
}

impl Codec {
    fn encode(self, m: &ForwardPassMetrics) -> Vec<u8> {
        match self {
            Codec::HandWritten => encode(m),
            Codec::RmpSerde => serde_codec::encode(m),
        }
    }

    fn decode(self, bytes: &[u8]) -> Outcome {
        match self {
            Codec::HandWritten => match decode(bytes) {
                Ok(m) => Outcome::Ok(m),
                Err(DecodeError::UnsupportedVersion { version }) => {
                    Outcome::UnsupportedVersion(version)
                }
                Err(e) => Outcome::Error {
                    field: e.field(),
                    message: e.to_string(),
                },
            },
            Codec::RmpSerde => match serde_codec::decode(bytes) {
                Ok(m) => Outcome::Ok(m),
                Err(serde_codec::SerdeDecodeError::UnsupportedVersion { version }) => {
                    Outcome::UnsupportedVersion(version)
                }
                Err(e) => Outcome::Error {
                    field: None,
                    message: format!("{e}: {:?}", std::error::Error::source(&e)),
                },
            },
        }
    }

    /// Whether its errors name the field (rmp-serde's do not).
    fn names_fields(self) -> bool {
        self == Codec::HandWritten
    }

    fn divergences(self) -> &'static [&'static str] {
        match self {
            Codec::HandWritten => &DOCUMENTED_DIVERGENCES,
            Codec::RmpSerde => &[],
        }
    }
}

/// Checks one vector against one codec's decoder (and encoder where the bytes came from
/// msgspec encoding a struct). Returns a failure description.
fn check_vector(v: &Vector, codec: Codec) -> Result<(), String> {
    let got = codec.decode(&v.msgpack);
    if codec.divergences().iter().any(|d| v.name.contains(d)) {
        return match got {
            Outcome::Ok(_) => Ok(()),
            _ => Err(format!("{}: divergence case must decode", v.name)),
        };
    }
    match v.expect {
        Expect::Ok => {
            let want = v.value.as_ref().ok_or("ok vector without value")?;
            let m = match got {
                Outcome::Ok(m) => m,
                Outcome::UnsupportedVersion(version) => {
                    return Err(format!("{}: decode failed: version {version}", v.name))
                }
                Outcome::Error { message, .. } => {
                    return Err(format!("{}: decode failed: {message}", v.name))
                }
            };
            if !same(&m, want) {
                return Err(format!("{}: decoded {m:?}, want {want:?}", v.name));
            }
            let ours = codec.encode(want);
            if v.source != "msgpack" && ours != v.msgpack {
                return Err(format!(
                    "{}: our bytes differ from {}'s:\nours   {}\ntheirs {}",
                    v.name,
                    v.source,
                    hex_encode(&ours),
                    hex_encode(&v.msgpack)
                ));
            }
        }
        Expect::UnsupportedVersion => {
            let want = v.value.as_ref().map(|m| m.version);
            match got {
                Outcome::UnsupportedVersion(version) if Some(version) == want => {}
                Outcome::Ok(m) => {
                    return Err(format!(
                        "{}: want UnsupportedVersion {want:?}, decoded {m:?}",
                        v.name
                    ))
                }
                Outcome::UnsupportedVersion(version) => {
                    return Err(format!(
                        "{}: want UnsupportedVersion {want:?}, got version {version}",
                        v.name
                    ))
                }
                Outcome::Error { message, .. } => {
                    return Err(format!(
                        "{}: want UnsupportedVersion {want:?}, got {message}",
                        v.name
                    ))
                }
            }
        }
        Expect::Error => match got {
            Outcome::Ok(m) => return Err(format!("{}: want an error, decoded {m:?}", v.name)),
            Outcome::UnsupportedVersion(version) => {
                return Err(format!("{}: want an error, got version {version}", v.name))
            }
            Outcome::Error {
                field: ours,
                message,
            } => {
                // msgspec names the field (dotted path) unless the error is about the whole
                // message (""); then there is nothing to compare. Otherwise our error must
                // name exactly that field (where the codec names fields at all).
                let want = v.error_field.as_deref().filter(|f| !f.is_empty());
                if let (Some(field), true) = (want, codec.names_fields()) {
                    match ours {
                        Some(ours) if ours == field => {}
                        Some(ours) => {
                            return Err(format!(
                                "{}: error \"{message}\" is about `{ours}`, want `{field}`",
                                v.name
                            ))
                        }
                        None => {
                            return Err(format!(
                                "{}: error \"{message}\" names no field, want `{field}`",
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

/// The decision check holds for both codecs: a vector whose expectation is wrong fails it,
/// whichever codec decodes.
#[test]
fn vector_check_fails_a_wrong_expectation_for_each_codec() {
    let good = encode(&ForwardPassMetrics::heartbeat("w", 1));
    let v2 = encode(&ForwardPassMetrics {
        version: 2,
        ..Default::default()
    });
    let vector = |msgpack: Vec<u8>, expect, value| Vector {
        name: "wrong-expectation".into(),
        source: "msgpack".into(),
        msgpack,
        expect,
        value,
        error_field: None,
    };
    let heartbeat = Some(ForwardPassMetrics::heartbeat("w", 1));
    for codec in CODECS {
        // Right expectations pass.
        assert_eq!(
            check_vector(&vector(good.clone(), Expect::Ok, heartbeat.clone()), codec),
            Ok(())
        );
        assert_eq!(
            check_vector(&vector(vec![0x90], Expect::Error, None), codec),
            Ok(())
        );
        // Wrong ones fail: an error expected of a good message, a value from an array, the
        // wrong value, a version-2 message as ok or as an error.
        assert!(check_vector(&vector(good.clone(), Expect::Error, None), codec).is_err());
        assert!(check_vector(&vector(vec![0x90], Expect::Ok, heartbeat.clone()), codec).is_err());
        let other = Some(ForwardPassMetrics::heartbeat("w", 2));
        assert!(check_vector(&vector(good.clone(), Expect::Ok, other), codec).is_err());
        assert!(check_vector(&vector(v2.clone(), Expect::Error, None), codec).is_err());
        let v2_value = Some(ForwardPassMetrics {
            version: 2,
            ..Default::default()
        });
        assert!(check_vector(&vector(v2.clone(), Expect::Ok, v2_value.clone()), codec).is_err());
        assert_eq!(
            check_vector(
                &vector(v2.clone(), Expect::UnsupportedVersion, v2_value),
                codec
            ),
            Ok(())
        );
        // Bytes that differ from the source's encoding fail the encode check.
        let mut msgspec = vector(good.clone(), Expect::Ok, heartbeat.clone());
        msgspec.source = "dynamo".into();
        assert_eq!(check_vector(&msgspec, codec), Ok(()));
        msgspec.msgpack[1] ^= 1; // the first key's fixstr header
        assert!(check_vector(&msgspec, codec).is_err());
    }
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
        check_vector(
            &vector(float_for_counter.clone(), "counter_id"),
            Codec::HandWritten
        ),
        Ok(())
    );
    // msgspec names no field: nothing to compare.
    assert_eq!(
        check_vector(&vector(float_for_counter.clone(), ""), Codec::HandWritten),
        Ok(())
    );
    let wrong = check_vector(
        &vector(float_for_counter.clone(), "dp_rank"),
        Codec::HandWritten,
    )
    .unwrap_err();
    assert!(
        wrong.contains("is about `counter_id`, want `dp_rank`"),
        "{wrong}"
    );
    // A suffix or prefix of the right path is still the wrong field.
    let nested = check_vector(
        &vector(float_for_counter, "scheduled_requests.counter_id"),
        Codec::HandWritten,
    );
    assert!(nested.is_err());
    // Trailing bytes: our error names no field, so it cannot be about `dp_rank`.
    let trailing = [encode(&Default::default()), vec![0xc0]].concat();
    let none = check_vector(&vector(trailing, "dp_rank"), Codec::HandWritten).unwrap_err();
    assert!(none.contains("names no field, want `dp_rank`"), "{none}");
}

/// Checks every vector against both codecs.
fn check_all(vectors: &[Vector]) -> usize {
    let failures: Vec<String> = CODECS
        .iter()
        .flat_map(|&codec| {
            vectors.iter().filter_map(move |v| {
                check_vector(v, codec)
                    .err()
                    .map(|e| format!("{codec:?}: {e}"))
            })
        })
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
            for codec in CODECS {
                let name = format!("{codec:?}/{name}");
                lines.push_str(&rust_vector_line(&name, &m, &codec.encode(&m)));
                lines.push('\n');
                n += 1;
            }
        }
        for i in 0..2000 {
            let m = random_message(&mut rng);
            for codec in CODECS {
                let name = format!("{codec:?}/rand-{seed}-{i}");
                lines.push_str(&rust_vector_line(&name, &m, &codec.encode(&m)));
                lines.push('\n');
                n += 1;
            }
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

    /// The Python helper's own layout (`fpmcontract.py layout`, which it checks the upstream
    /// classes against) is fpm-schema's field table, field for field.
    #[test]
    fn helper_layout_is_the_field_table() {
        let Some(py) = python() else { return };
        let (_, out) = run_contract(&py, &["layout"], b"", false);
        let helper: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            helper,
            our_schema_json(),
            "fpmcontract.py's layout differs from SCHEMA"
        );
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
