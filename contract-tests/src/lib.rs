//! Shared helpers of the contract tests: finding the Python venv with the real upstream
//! modules, running the Python side (`python/fpmcontract.py`), reading and writing test
//! vectors, and a seeded generator of messages for the Rust → Python direction.
//!
//! The vector format is documented in `python/README.md`: one JSON object per line with the
//! payload as hex and the value with every float as `"f64:<16 hex digits>"` (exact bits).
#![deny(missing_docs)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use fpm_schema::ForwardPassMetrics;
use rand::{Rng, RngExt};
use serde_json::{json, Value};

pub use fpm_testkit::{python, repo_root};

/// Runs `fpmcontract.py` with `args`, feeding `stdin`; returns stdout. Panics with stderr on
/// a non-zero exit unless `allow_failure`.
pub fn run_contract(py: &Path, args: &[&str], stdin: &[u8], allow_failure: bool) -> (bool, String) {
    run_script(py, "fpmcontract.py", args, stdin, allow_failure)
}

/// Runs `contract-tests/python/<script>` with `args`, feeding `stdin`; returns stdout. Panics
/// with stderr on a non-zero exit unless `allow_failure`.
pub fn run_script(
    py: &Path,
    script: &str,
    args: &[&str],
    stdin: &[u8],
    allow_failure: bool,
) -> (bool, String) {
    let script = repo_root().join("contract-tests/python").join(script);
    let mut child = Command::new(py)
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let mut sin = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = sin.write_all(&input);
    });
    let out = child.wait_with_output().expect("python output");
    writer.join().unwrap();
    let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
    if !out.status.success() && !allow_failure {
        panic!(
            "{} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            script.display(),
            out.status,
            &stdout[..stdout.len().min(4000)],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), stdout)
}

/// What a vector expects a decoder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Decodes to `value`.
    Ok,
    /// Fails to decode.
    Error,
    /// Decodes, but the version is not 1.
    UnsupportedVersion,
}

/// One test vector.
#[derive(Debug, Clone)]
pub struct Vector {
    /// Descriptive name.
    pub name: String,
    /// Who encoded it: `dynamo`, `sglang`, `rust` or `msgpack` (hand-built).
    pub source: String,
    /// The payload.
    pub msgpack: Vec<u8>,
    /// The expected outcome.
    pub expect: Expect,
    /// The value (for `Ok` and `UnsupportedVersion`).
    pub value: Option<ForwardPassMetrics>,
    /// The field an error is about, when known (`""` for whole-message errors).
    pub error_field: Option<String>,
}

fn hex_decode(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Lowercase hex of `b`.
pub fn hex_encode(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn f64_of(v: &Value, path: &str) -> f64 {
    let s = v
        .as_str()
        .and_then(|s| s.strip_prefix("f64:"))
        .unwrap_or_else(|| panic!("{path}: float must be \"f64:<hex>\", got {v}"));
    f64::from_bits(u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("{path}: bad hex {s}")))
}

fn f64_json(x: f64) -> Value {
    Value::String(format!("f64:{:016x}", x.to_bits()))
}

/// The fields of struct `name` in [`fpm_schema::SCHEMA`], the crate's field table.
fn schema_fields(name: &str) -> &'static [(&'static str, &'static str)] {
    fpm_schema::SCHEMA
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no struct {name} in fpm_schema::SCHEMA"))
        .1
}

/// Visits every leaf of a VALUE object by the field table: checks that each field is present
/// with its type's JSON form and hands each float slot to `float`.
fn walk_value(v: &mut Value, name: &str, path: &str, float: &mut impl FnMut(&mut Value, &str)) {
    for (field, ty) in schema_fields(name) {
        let at = format!("{path}{field}");
        let slot = v
            .get_mut(*field)
            .unwrap_or_else(|| panic!("VALUE has no `{at}`"));
        match *ty {
            "int" => assert!(slot.is_i64(), "{at}: expected an i64, got {slot}"),
            "str" => assert!(slot.is_string(), "{at}: expected a str, got {slot}"),
            "float" => float(slot, &at),
            nested => walk_value(slot, nested, &format!("{at}."), float),
        }
    }
}

/// Parses a VALUE object: every field of the table present, floats as `"f64:<hex>"`.
pub fn value_from_json(v: &Value) -> ForwardPassMetrics {
    let mut v = v.clone();
    walk_value(&mut v, "ForwardPassMetrics", "", &mut |slot, at| {
        f64_of(slot, at);
    });
    // fpm-schema's JSON form reads `"f64:<hex>"` floats bit for bit.
    serde_json::from_value(v).unwrap_or_else(|e| panic!("bad VALUE: {e}"))
}

/// Writes a VALUE object (keys in declaration order, floats as `"f64:<hex>"`).
pub fn value_to_json(m: &ForwardPassMetrics) -> Value {
    let mut v = serde_json::to_value(m).expect("a message serializes");
    walk_value(&mut v, "ForwardPassMetrics", "", &mut |slot, at| {
        // fpm-schema's JSON float is lossless: a number, or one of its strings.
        let x = match slot {
            Value::Number(n) => n.as_f64().expect("finite"),
            Value::String(s) => {
                serde_json::from_value::<ForwardPassMetrics>(json!({ "wall_time": s }))
                    .unwrap_or_else(|e| panic!("{at}: {e}"))
                    .wall_time
            }
            other => panic!("{at}: not a float: {other}"),
        };
        *slot = f64_json(x);
    });
    v
}

/// Parses one vector line.
pub fn parse_vector(line: &str) -> Vector {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad vector {e}: {line}"));
    let expect = match v["expect"].as_str() {
        Some("ok") => Expect::Ok,
        Some("error") => Expect::Error,
        Some("unsupported_version") => Expect::UnsupportedVersion,
        other => panic!("bad expect {other:?}"),
    };
    Vector {
        name: v["name"].as_str().unwrap_or("?").to_owned(),
        source: v["source"].as_str().unwrap_or("?").to_owned(),
        msgpack: hex_decode(v["msgpack"].as_str().expect("msgpack hex")),
        expect,
        value: match &v["value"] {
            Value::Null => None,
            val => Some(value_from_json(val)),
        },
        error_field: v
            .get("error_field")
            .and_then(|f| f.as_str())
            .map(str::to_owned),
    }
}

/// Parses every non-empty line.
pub fn parse_vectors(text: &str) -> Vec<Vector> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_vector)
        .collect()
}

/// A vector line for a message encoded by Rust (`msgpack`: our encoding of `m`).
pub fn rust_vector_line(name: &str, m: &ForwardPassMetrics, msgpack: &[u8]) -> String {
    json!({
        "name": name,
        "source": "rust",
        "msgpack": hex_encode(msgpack),
        "expect": "ok",
        "value": value_to_json(m),
    })
    .to_string()
}

/// Bitwise equality (floats compared by bits, so NaN equals the same NaN): the encodings
/// are equal, as the encoding holds every field's bits.
pub fn same(a: &ForwardPassMetrics, b: &ForwardPassMetrics) -> bool {
    fpm_schema::encode(a) == fpm_schema::encode(b)
}

/// The seeded generator of the random vectors: `rand`'s xoshiro256++, the same sequence on
/// every platform, so a failing run is reproduced from the seed it prints.
pub type VectorRng = rand::rngs::Xoshiro256PlusPlus;

/// A [`VectorRng`] from `seed`.
pub fn seeded_rng(seed: u64) -> VectorRng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// Every int-size boundary of msgpack, both signs.
pub use fpm_schema::testing::INT_FORM_BOUNDARIES as INT_BOUNDARIES;

/// Float edge cases.
pub const FLOAT_EDGES: [f64; 13] = [
    0.0,
    -0.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    5e-324,
    f64::MIN_POSITIVE,
    f64::MAX,
    f64::MIN,
    1e-300,
    1e300,
    0.1,
    1.0 / 3.0,
];

fn rand_i64(r: &mut impl Rng) -> i64 {
    match r.random_range(0..4) {
        0 => r.random_range(-40..160),
        1 => {
            let b = INT_BOUNDARIES[r.random_range(0..INT_BOUNDARIES.len())];
            b.saturating_add(r.random_range(-2..=2))
        }
        2 => r.random_range(0..1 << 20),
        _ => r.next_u64() as i64,
    }
}

fn rand_f64(r: &mut impl Rng) -> f64 {
    match r.random_range(0..4) {
        0 => f64::from_bits(r.next_u64()),
        1 => FLOAT_EDGES[r.random_range(0..FLOAT_EDGES.len())],
        2 => r.random::<f64>() * 1e6,
        _ => f64::from(r.random_range(0..100_000)) / 64.0,
    }
}

fn rand_string(r: &mut impl Rng) -> String {
    const POOL: [char; 12] = [
        'a', 'Z', '0', '-', '_', ' ', 'é', 'ß', '中', '文', '🚀', '\u{301}',
    ];
    let len = match r.random_range(0..4) {
        0 => 0,
        1 => r.random_range(0..32),
        2 => r.random_range(0..300),
        _ => 20,
    };
    (0..len)
        .map(|_| POOL[r.random_range(0..POOL.len())])
        .collect()
}

/// A random version-1 message.
pub fn random_message(r: &mut impl Rng) -> ForwardPassMetrics {
    let mut v = value_to_json(&ForwardPassMetrics::default());
    for (path, ty) in leaves() {
        let slot = leaf_mut(&mut v, &path);
        *slot = match ty {
            "int" if path == ["version"] => json!(1),
            "int" => json!(rand_i64(r)),
            "float" => f64_json(rand_f64(r)),
            _ => json!(rand_string(r)),
        };
    }
    value_from_json(&v)
}

/// Every leaf field of a message by the field table: its path and its type (`int`, `float`,
/// `str`), in declaration order.
pub fn leaves() -> Vec<(Vec<&'static str>, &'static str)> {
    fn walk(name: &str, prefix: &[&'static str], out: &mut Vec<(Vec<&'static str>, &'static str)>) {
        for (field, ty) in schema_fields(name) {
            let mut path = prefix.to_vec();
            path.push(field);
            match *ty {
                "int" | "float" | "str" => out.push((path, ty)),
                nested => walk(nested, &path, out),
            }
        }
    }
    let mut out = Vec::new();
    walk("ForwardPassMetrics", &[], &mut out);
    out
}

fn leaf_mut<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Value {
    path.iter()
        .fold(v, |v, k| v.get_mut(*k).expect("a field of the table"))
}

/// A default message with the leaf at `path` set to `value` (its JSON VALUE form).
fn with_leaf(path: &[&str], value: Value) -> ForwardPassMetrics {
    let mut v = value_to_json(&ForwardPassMetrics::default());
    *leaf_mut(&mut v, path) = value;
    value_from_json(&v)
}

/// The boundary cases: every int boundary in every int field, every float edge in every
/// float field, and worker ids of every string-size boundary, non-ASCII included.
pub fn boundary_messages() -> Vec<(String, ForwardPassMetrics)> {
    let mut out = Vec::new();
    for (path, ty) in leaves() {
        let at = path.join(".");
        match ty {
            "int" if path == ["version"] => {}
            "int" => {
                for &b in &INT_BOUNDARIES {
                    out.push((format!("int-{at}-{b}"), with_leaf(&path, json!(b))));
                }
            }
            "float" => {
                for &f in &FLOAT_EDGES {
                    out.push((format!("float-{at}-{f:e}"), with_leaf(&path, f64_json(f))));
                }
            }
            _ => {}
        }
    }
    for len in [0usize, 1, 31, 32, 255, 256, 1000, 65535 - 500] {
        let m = ForwardPassMetrics {
            worker_id: "w".repeat(len),
            ..Default::default()
        };
        out.push((format!("worker-id-len-{len}"), m));
    }
    for s in [
        "中文工作者",
        "🚀-worker-ü",
        "e\u{301}",
        "ünïcödé".repeat(40).as_str(),
    ] {
        out.push((
            format!("worker-id-{}", s.chars().take(8).collect::<String>()),
            ForwardPassMetrics {
                worker_id: s.to_owned(),
                ..Default::default()
            },
        ));
    }
    out
}
