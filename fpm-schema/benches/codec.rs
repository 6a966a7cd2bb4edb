//! Codec benchmarks: encode, decode, key peek, envelope wrap/unwrap, one group per payload
//! shape. At the end, msgspec's own encode/decode of the same message is timed by the contract
//! venv in this same run and compared with ours, timed the same way (best of 5 loops), like
//! for like: allocating encode with `Encoder.encode`, encode into a reused buffer with
//! `Encoder.encode_into` into a reused `bytearray`, decode to a new struct with
//! `Decoder(ForwardPassMetrics).decode`; each ratio is printed.
//!
//! `cargo bench -p fpm-schema --bench codec` (set `FPM_BENCH_SKIP_PEER=1` to skip msgspec).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput};
use fpm_schema::testing::encode_with_rmp_primitives;
use fpm_schema::{
    decode, encode, encode_into, peek_key, serde_codec, Decoder, Envelope, ForwardPassMetrics,
    QueuedRequestMetrics, ScheduledRequestMetrics, FPM_TOPIC,
};

/// The message `fpmcontract.py bench` times (446 bytes), so the ratio compares like with like.
fn representative() -> ForwardPassMetrics {
    ForwardPassMetrics {
        version: 1,
        worker_id: "worker-0123456789abcdef".into(),
        dp_rank: 3,
        counter_id: 123456,
        wall_time: 0.0123,
        scheduled_requests: ScheduledRequestMetrics {
            num_prefill_requests: 4,
            sum_prefill_tokens: 8192,
            var_prefill_length: 1234.5,
            sum_prefill_kv_tokens: 2048,
            num_decode_requests: 120,
            sum_decode_kv_tokens: 250000,
            var_decode_kv_tokens: 98765.4321,
        },
        queued_requests: QueuedRequestMetrics {
            num_prefill_requests: 7,
            sum_prefill_tokens: 14000,
            var_prefill_length: 555.5,
            num_decode_requests: 2,
            sum_decode_kv_tokens: 9000,
            var_decode_kv_tokens: 10.25,
        },
    }
}

fn shapes() -> Vec<(&'static str, ForwardPassMetrics)> {
    vec![
        ("heartbeat", ForwardPassMetrics::heartbeat("worker-1", 0)),
        ("representative", representative()),
        (
            "long_worker_id",
            ForwardPassMetrics {
                worker_id: "w".repeat(300),
                ..representative()
            },
        ),
    ]
}

fn bench_codec(c: &mut Criterion) {
    for (name, m) in shapes() {
        let bytes = encode(&m);
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut buf = Vec::with_capacity(1024);
        g.bench_function(BenchmarkId::new("encode_into", bytes.len()), |b| {
            b.iter(|| encode_into(black_box(&m), &mut buf))
        });
        g.bench_function("encode", |b| b.iter(|| encode(black_box(&m))));
        g.bench_function("decode", |b| b.iter(|| decode(black_box(&bytes)).unwrap()));
        let mut out = ForwardPassMetrics::default();
        g.bench_function("decode_into", |b| {
            b.iter(|| {
                Decoder::new()
                    .decode_into(black_box(&bytes), &mut out)
                    .unwrap()
            })
        });
        // The same operations with rmp-serde (`serde_codec`) and with the `rmp` crate's
        // primitive writers, for the 2x rule (see `compare_with_rmp`).
        g.bench_function("rmp_serde_encode_into", |b| {
            b.iter(|| serde_codec::encode_into(black_box(&m), &mut buf))
        });
        g.bench_function("rmp_primitives_encode_into", |b| {
            b.iter(|| encode_with_rmp_primitives(black_box(&m), &mut buf))
        });
        g.bench_function("rmp_serde_decode", |b| {
            b.iter(|| serde_codec::decode(black_box(&bytes)).unwrap())
        });
        g.bench_function("peek_key", |b| {
            b.iter(|| peek_key(black_box(&bytes)).unwrap())
        });
        let mut env_buf = Vec::with_capacity(1024);
        g.bench_function("envelope_wrap", |b| {
            b.iter(|| {
                Envelope {
                    publisher_id: 123_456_789,
                    sequence: 42,
                    published_at: 1_764_000_000_000,
                    topic: FPM_TOPIC,
                    payload: black_box(&bytes),
                }
                .encode_into(&mut env_buf)
            })
        });
        let wrapped = Envelope {
            publisher_id: 123_456_789,
            sequence: 42,
            published_at: 1_764_000_000_000,
            topic: FPM_TOPIC,
            payload: &bytes,
        }
        .encode();
        g.bench_function("envelope_unwrap", |b| {
            b.iter(|| Envelope::decode(black_box(&wrapped)).unwrap())
        });
        g.finish();
    }
}

/// Per-op nanoseconds, best of `repeats` loops of `iterations`: the same method the Python
/// side uses for msgspec.
fn best_of(iterations: u32, repeats: u32, mut f: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iterations {
                f();
            }
            t.elapsed().as_nanos() as f64 / iterations as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn compare_with_msgspec() {
    if std::env::var("FPM_BENCH_SKIP_PEER").as_deref() == Ok("1") {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::env::var_os("FPM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/fpm-venv"));
    let py = venv.join("bin/python");
    if !py.exists() {
        println!("msgspec comparison skipped: no venv (run contract-tests/setup.sh)");
        return;
    }
    let iterations = 200_000;
    let out = Command::new(&py)
        .arg(root.join("contract-tests/python/fpmcontract.py"))
        .args([
            "bench",
            "--module",
            "dynamo",
            "--iterations",
            &iterations.to_string(),
        ])
        .output()
        .expect("run python bench");
    if !out.status.success() {
        println!(
            "msgspec comparison failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| -> f64 {
        let at = text.find(&format!("\"{k}\": ")).expect(k) + k.len() + 4;
        text[at..]
            .split([',', '}'])
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (py_enc, py_enc_into, py_dec, py_bytes) = (
        field("encode_ns"),
        field("encode_into_ns"),
        field("decode_ns"),
        field("bytes"),
    );
    let m = representative();
    let bytes = encode(&m);
    assert_eq!(bytes.len() as f64, py_bytes, "bench messages differ");
    let rs_enc = best_of(iterations, 5, || {
        black_box(encode(black_box(&m)));
    });
    let mut buf = Vec::with_capacity(1024);
    let rs_enc_into = best_of(iterations, 5, || encode_into(black_box(&m), &mut buf));
    let rs_dec = best_of(iterations, 5, || {
        black_box(decode(black_box(&bytes)).unwrap());
    });
    let mut reused = ForwardPassMetrics::default();
    let rs_dec_into = best_of(iterations, 5, || {
        Decoder::new()
            .decode_into(black_box(&bytes), &mut reused)
            .unwrap();
    });
    println!();
    println!("same-run comparison with msgspec 0.22 (dynamo module), {} B message, best of 5 x {iterations}:", bytes.len());
    let row = |what: &str, ours: f64, theirs: f64, note: &str| {
        println!(
            "  {what:<36} fpm-schema {ours:7.1} ns  msgspec {theirs:7.1} ns  ratio {:5.1}x  {note}",
            theirs / ours
        );
    };
    row(
        "encode, new buffer (encode)",
        rs_enc,
        py_enc,
        "(Encoder.encode)",
    );
    row(
        "encode, reused buffer (encode_into)",
        rs_enc_into,
        py_enc_into,
        "(Encoder.encode_into, reused bytearray)",
    );
    row(
        "decode to a new struct (decode)",
        rs_dec,
        py_dec,
        "(Decoder(ForwardPassMetrics).decode; target >= 5x)",
    );
    row(
        "decode into a reused struct",
        rs_dec_into,
        py_dec,
        "(decode_into; msgspec has no counterpart)",
    );
}

/// The 2x rule of issue 11: the hand-written path stays only where it is at least 2x faster
/// than rmp-serde on the same message, in the same run; and the `rmp` crate's primitive
/// writers replace the hand-written ones if they are as fast.
fn compare_with_rmp() {
    let iterations = 200_000;
    let m = representative();
    let bytes = encode(&m);
    let mut buf = Vec::with_capacity(1024);
    let hand_enc = best_of(iterations, 5, || encode_into(black_box(&m), &mut buf));
    let serde_enc = best_of(iterations, 5, || {
        serde_codec::encode_into(black_box(&m), &mut buf)
    });
    let prim_enc = best_of(iterations, 5, || {
        encode_with_rmp_primitives(black_box(&m), &mut buf)
    });
    let hand_dec = best_of(iterations, 5, || {
        black_box(decode(black_box(&bytes)).unwrap());
    });
    let serde_dec = best_of(iterations, 5, || {
        black_box(serde_codec::decode(black_box(&bytes)).unwrap());
    });
    println!();
    println!(
        "same-run comparison with rmp-serde 1.3, {} B message, best of 5 x {iterations}:",
        bytes.len()
    );
    let row = |what: &str, hand: f64, other: f64, name: &str| {
        let ratio = other / hand;
        println!(
            "  {what:<28} hand-written {hand:7.1} ns  {name} {other:7.1} ns  ratio {ratio:5.2}x  {}",
            if ratio >= 2.0 { "keep hand-written" } else { "under 2x" }
        );
    };
    row(
        "encode into a reused buffer",
        hand_enc,
        serde_enc,
        "rmp-serde",
    );
    row("encode, rmp primitives", hand_enc, prim_enc, "rmp::encode");
    row("decode to a new struct", hand_dec, serde_dec, "rmp-serde");
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_codec(&mut c);
    c.final_summary();
    compare_with_rmp();
    compare_with_msgspec();
}
