//! Integration tests of the simulated engine: real ZeroMQ sockets, real time.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fpm_emitter::Endpoint;
use fpm_schema::decode;
use fpm_sim::{CostModel, SimConfig};

/// Least squares for y = X b (normal equations, Gaussian elimination).
#[allow(clippy::needless_range_loop)]
fn fit(xs: &[Vec<f64>], ys: &[f64]) -> Vec<f64> {
    let k = xs[0].len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (x, y) in xs.iter().zip(ys) {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += x[i] * x[j];
            }
            a[i][k] += x[i] * y;
        }
    }
    for c in 0..k {
        let p = (c..k)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        for r in 0..k {
            if r != c {
                let f = a[r][c] / a[c][c];
                for j in c..=k {
                    a[r][j] -= f * a[c][j];
                }
            }
        }
    }
    (0..k).map(|i| a[i][k] / a[i][i]).collect()
}

/// The simulated engine publishes per rank through real sockets, with contiguous counters,
/// and its timings carry the cost model (a regression recovers the prefill slope).
#[test]
fn two_ranks_emit_learnable_timings() {
    let dir = tempfile::tempdir().unwrap();
    let base = fpm_testkit::ipc_base(dir.path(), "sim");
    let mut cfg = SimConfig::new(Endpoint::IpcBase(base.clone()), "sim-worker");
    cfg.dp_size = 2;
    cfg.duration = Duration::from_secs(4);
    cfg.rps = 40.0;
    cfg.prompt_len_mean = 600.0;
    cfg.output_len_mean = 40.0;
    cfg.max_num_batched_tokens = 1024;
    cfg.cost = CostModel {
        base_s: 0.002,
        prefill_token_s: 10e-6,
        decode_kv_token_s: 0.0,
        decode_request_s: 50e-6,
        noise: 0.01,
    };
    let ctx = zmq::Context::new();
    let subs: Vec<zmq::Socket> = (0..2)
        .map(|r| {
            let s = ctx.socket(zmq::SUB).unwrap();
            s.set_subscribe(b"").unwrap();
            s.set_rcvtimeo(100).unwrap();
            s.connect(&format!("{base}.{r}")).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let cfg = cfg.clone();
        let stop = stop.clone();
        std::thread::spawn(move || fpm_sim::run(&cfg, stop))
    };
    let mut got: Vec<Vec<(u64, fpm_schema::ForwardPassMetrics)>> = vec![Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runner.is_finished() && Instant::now() < deadline {
        for (r, s) in subs.iter().enumerate() {
            while let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
                let c = u64::from_be_bytes(frames[1].clone().try_into().unwrap());
                got[r].push((c, decode(&frames[2]).unwrap()));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let reports = runner.join().unwrap().unwrap();
    for (r, s) in subs.iter().enumerate() {
        while let Ok(frames) = s.recv_multipart(zmq::DONTWAIT) {
            let c = u64::from_be_bytes(frames[1].clone().try_into().unwrap());
            got[r].push((c, decode(&frames[2]).unwrap()));
        }
    }
    assert_eq!(reports.len(), 2);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (r, msgs) in got.iter().enumerate() {
        let report = &reports[r];
        assert!(report.iterations > 100, "rank {r}: {report:?}");
        assert!(msgs.len() > 100, "rank {r}: {} messages", msgs.len());
        // After the slow-joiner start, nothing is lost.
        assert!(
            msgs.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "rank {r} gap"
        );
        for (_, m) in msgs {
            assert_eq!((m.worker_id.as_str(), m.dp_rank), ("sim-worker", r as i64));
            if m.wall_time > 0.0 {
                let s = &m.scheduled_requests;
                xs.push(vec![
                    1.0,
                    s.sum_prefill_tokens as f64,
                    s.num_decode_requests as f64,
                ]);
                ys.push(m.wall_time);
            }
        }
        let e = report.emitter;
        assert_eq!(e.submitted, e.published + e.dropped.total(), "{e:?}");
    }
    let b = fit(&xs, &ys);
    eprintln!(
        "fit over {} samples: base {:.5} s, prefill {:.3e} s/token, decode {:.3e} s/request",
        ys.len(),
        b[0],
        b[1],
        b[2]
    );
    assert!((b[1] - 10e-6).abs() < 3e-6, "prefill slope {:e}", b[1]);
    assert!(b[0] > 0.0015 && b[0] < 0.004, "intercept {}", b[0]);
}
