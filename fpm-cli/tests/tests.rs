//! End-to-end tests of the `fpm` binary.

/// Real processes and engines shared by the end-to-end modules.
mod procs {
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fpm_emitter::{ClockChoice, Emitter, EmitterConfig, EmitterStats, Endpoint, StreamHandle};
    use fpm_schema::{QueuedRequestMetrics, ScheduledRequestMetrics};
    use fpm_subscriber::record::{read_records, Record};

    pub struct Kill(pub Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub fn fpm() -> Command {
        Command::new(env!("CARGO_BIN_EXE_fpm"))
    }

    /// `fpm relay` from one engine endpoint to `nats`, namespace `ns`.
    pub fn relay(endpoint: &str, nats: &str, ns: &str) -> Kill {
        Kill(
            fpm()
                .args(["-q", "relay", "--zmq-endpoint", endpoint, "--namespace", ns])
                .args(["--nats-url", nats, "--metrics-addr", "off"])
                .spawn()
                .unwrap(),
        )
    }

    pub fn record(out: &std::path::Path, nats: &str, ns: &str) -> Child {
        fpm()
            .args([
                "-q",
                "record",
                "--namespace",
                ns,
                "--nats-url",
                nats,
                "--output",
            ])
            .arg(out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn sigterm(c: &Child) {
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
    }

    /// Waits until `path` has not grown for `quiet` (or `max` has passed).
    pub fn wait_for_quiet_file(path: &std::path::Path, quiet: Duration, max: Duration) {
        let size = || std::fs::metadata(path).map_or(0, |m| m.len());
        let start = std::time::Instant::now();
        let (mut last, mut since) = (size(), std::time::Instant::now());
        while start.elapsed() < max && since.elapsed() < quiet {
            std::thread::sleep(Duration::from_millis(100));
            let now = size();
            if now != last {
                (last, since) = (now, std::time::Instant::now());
            }
        }
    }

    pub fn stop_record(c: Child) -> String {
        sigterm(&c);
        let out = c.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8(out.stdout).unwrap()
    }

    /// An engine emitting `rate` iterations per second until `stop`; returns its final stats.
    pub fn engine(
        endpoint: String,
        rate: f64,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<EmitterStats> {
        std::thread::spawn(move || {
            let cfg = EmitterConfig::new(Endpoint::Exact(endpoint), "faulty-worker", 0)
                .with_clock(ClockChoice::Cpu);
            let mut e = Emitter::start(cfg).unwrap();
            let start = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let next = start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                e.begin_iteration();
                e.time_segment(StreamHandle::DEFAULT, || ());
                e.submit(
                    ScheduledRequestMetrics {
                        num_decode_requests: 4,
                        sum_decode_kv_tokens: 4000,
                        ..Default::default()
                    },
                    QueuedRequestMetrics::default(),
                );
                i += 1;
            }
            e.shutdown(Duration::from_secs(2))
        })
    }

    pub fn records(path: &std::path::Path) -> Vec<Record> {
        read_records(std::io::BufReader::new(std::fs::File::open(path).unwrap()))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// "lost: G in N counter gaps, B before start" and the other counts of a record summary.
    pub fn summary_count(summary: &str, key: &str) -> u64 {
        if key == "lost" {
            return summary
                .split("lost: ")
                .nth(1)
                .and_then(|x| x.split(' ').next())
                .and_then(|x| x.parse().ok())
                .unwrap();
        }
        let at = summary
            .find(key)
            .unwrap_or_else(|| panic!("{key}: {summary}"));
        summary[..at]
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    }
}

mod codec {
    use std::io::Write;
    use std::process::{Command, Output, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Runs `fpm ARGS` with `stdin`; a run that takes over 60 s (a hang) fails the test.
    fn fpm(args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fpm");
        let pid = child.id();
        let mut sin = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        // A broken pipe is fine: fpm may stop reading early on bad input.
        let writer = std::thread::spawn(move || drop(sin.write_all(&input)));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || drop(tx.send(child.wait_with_output())));
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(out) => {
                writer.join().unwrap();
                out.expect("fpm output")
            }
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("fpm {args:?} did not finish within 60 s");
            }
        }
    }

    fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    #[test]
    fn encode_then_decode_round_trips_in_field_order() {
        let json = r#"{"worker_id":"w-ü","dp_rank":2,"counter_id":9,"wall_time":"NaN",
                       "scheduled_requests":{"num_decode_requests":3,"var_decode_kv_tokens":2},
                       "timing_scope":"ignored"}"#;
        let enc = fpm(&["encode", "--lenient"], json.as_bytes());
        assert!(enc.status.success(), "{}", stderr(&enc));
        let m = fpm_schema::decode(&enc.stdout).unwrap();
        assert_eq!(m.worker_id, "w-ü");
        assert!(m.wall_time.is_nan());
        assert_eq!(m.scheduled_requests.var_decode_kv_tokens, 2.0);

        let dec = fpm(&["decode", "--compact"], &enc.stdout);
        assert!(dec.status.success(), "{}", stderr(&dec));
        let text = String::from_utf8(dec.stdout).unwrap();
        assert!(
            text.starts_with(r#"{"version":1,"worker_id":"w-ü","dp_rank":2,"counter_id":9,"wall_time":"NaN","scheduled_requests":{"num_prefill_requests":0"#),
            "{text}"
        );
        // And back again, byte-identical.
        let again = fpm(&["encode"], text.as_bytes());
        assert_eq!(again.stdout, enc.stdout);
    }

    #[test]
    fn envelope_is_auto_detected() {
        let enc = fpm(
            &[
                "encode",
                "--envelope-publisher-id",
                "42",
                "--envelope-sequence",
                "7",
            ],
            b"{\"worker_id\":\"a\"}",
        );
        assert!(enc.status.success(), "{}", stderr(&enc));
        let env = fpm_schema::Envelope::decode(&enc.stdout).unwrap();
        assert_eq!((env.publisher_id, env.sequence), (42, 7));
        let dec = fpm(&["decode", "--compact"], &enc.stdout);
        let text = String::from_utf8(dec.stdout).unwrap();
        assert!(
            text.starts_with(r#"{"publisher_id":42,"sequence":7,"#),
            "{text}"
        );
        assert!(
            text.contains(r#""payload":{"version":1,"worker_id":"a""#),
            "{text}"
        );
        // --payload would read it as a bare FPM map whose keys are all unknown, i.e. the
        // default message: an envelope is recognisable, so that is an error instead.
        let dec = fpm(&["decode", "--payload", "--compact"], &enc.stdout);
        assert_eq!(dec.status.code(), Some(1));
        assert!(dec.stdout.is_empty());
        assert_eq!(
            stderr(&dec),
            "fpm: error: the input is an event-plane envelope, not a bare FPM payload: drop --payload to decode the envelope and the payload inside it\n"
        );
    }

    /// Every error of `fpm decode` / `fpm encode` is exactly one line, says each thing once,
    /// and exits 1.
    #[test]
    fn errors_are_one_exact_line_exit_1() {
        let envelope = fpm(
            &[
                "encode",
                "--envelope-publisher-id",
                "1",
                "--envelope-published-at",
                "2",
            ],
            b"{}",
        );
        assert!(envelope.status.success(), "{}", stderr(&envelope));
        let known = "`version`, `worker_id`, `dp_rank`, `counter_id`, `wall_time`, `scheduled_requests`, `queued_requests`";
        let sched = "`num_prefill_requests`, `sum_prefill_tokens`, `var_prefill_length`, `sum_prefill_kv_tokens`, `num_decode_requests`, `sum_decode_kv_tokens`, `var_decode_kv_tokens`";
        let json_hint = "the input is JSON, not msgpack: `fpm decode` reads msgpack (to turn JSON into msgpack, use `fpm encode`)";
        let cases: Vec<(&[&str], &[u8], String)> = vec![
            (&["encode"], b"{} x", "invalid JSON: trailing characters at line 1 column 4".into()),
            (
                &["encode"],
                br#"{"dp_rank":100000000000000000000}"#,
                "invalid JSON: field `dp_rank`: integer 1e20 is outside the i64 range at line 1 column 32".into(),
            ),
            (
                &["encode"],
                br#"{"queued_requests":{"sum_decode_kv_tokens":18446744073709551615}}"#,
                "invalid JSON: field `queued_requests.sum_decode_kv_tokens`: integer 18446744073709551615 is outside the i64 range at line 1 column 63".into(),
            ),
            (
                &["encode"],
                br#"{"dp_rank":1.5}"#,
                "invalid JSON: field `dp_rank`: invalid type: floating point `1.5`, expected i64 at line 1 column 14".into(),
            ),
            (
                &["encode"],
                br#"{"wall_tme":0.5}"#,
                format!("invalid JSON: unknown field `wall_tme` (expected one of {known}; --lenient ignores unknown fields)"),
            ),
            (
                &["encode"],
                br#"{"scheduled_requests":{"num_prefil_requests":1}}"#,
                format!("invalid JSON: unknown field `scheduled_requests.num_prefil_requests` (expected one of {sched}; --lenient ignores unknown fields)"),
            ),
            (
                &["encode"],
                br#"{"version":2}"#,
                "invalid JSON: field `version`: unsupported version 2 (decoders accept only 1; --lenient writes it anyway)".into(),
            ),
            (&["decode"], br#"{"worker_id":"a"}"#, json_hint.into()),
            (&["decode", "--payload"], b" [1, 2]", json_hint.into()),
            (&["decode", "--envelope"], b"{}", json_hint.into()),
            (&["decode", "--hex"], b"{\"dp_rank\": 1}\n", json_hint.into()),
            (
                &["decode", "/nonexistent/fpm.bin"],
                b"",
                "cannot read /nonexistent/fpm.bin: No such file or directory (os error 2)".into(),
            ),
            (
                &["encode", "-o", "/nonexistent/fpm.bin"],
                b"{}",
                "cannot write /nonexistent/fpm.bin: No such file or directory (os error 2)".into(),
            ),
        ];
        for (args, input, want) in cases {
            let o = fpm(args, input);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
            assert_eq!(stderr(&o), format!("fpm: error: {want}\n"), "{args:?}");
            assert!(o.stdout.is_empty(), "{args:?}");
        }
    }

    #[test]
    fn lenient_ignores_unknown_keys_and_writes_any_version() {
        let o = fpm(&["encode", "--lenient"], br#"{"version":2,"wall_tme":0.5}"#);
        assert!(o.status.success(), "{}", stderr(&o));
        let m = fpm_schema::Decoder::new().decode(&o.stdout);
        assert_eq!(
            m,
            Err(fpm_schema::DecodeError::UnsupportedVersion { version: 2 })
        );
        let o = fpm(&["encode", "--lenient"], br#"{"wall_tme":0.5}"#);
        assert_eq!(fpm_schema::decode(&o.stdout).unwrap(), Default::default());
    }

    /// `fpm decode | fpm encode` gives back exactly the bytes msgspec wrote, for the boundary
    /// cases and random messages encoded by the upstream structs (floats of every class, NaN
    /// payloads, i64 extremes, non-ASCII worker ids up to 60,000 bytes).
    #[test]
    fn decode_then_encode_is_byte_identical_on_upstream_messages() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let seed = std::env::var("FPM_CONTRACT_SEED").unwrap_or_else(|_| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() % 1_000_000_007).to_string()
        });
        eprintln!("contract seed: {seed} (rerun with FPM_CONTRACT_SEED={seed})");
        let script = fpm_testkit::repo_root().join("contract-tests/python/fpmcontract.py");
        let out = Command::new(py)
            .arg(script)
            .args([
                "gen", "--module", "dynamo", "--seed", &seed, "--count", "250",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut n = 0;
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let hex = v["msgpack"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let dec = fpm(&["decode", "--compact"], &bytes);
            assert!(dec.status.success(), "{}: {}", v["name"], stderr(&dec));
            let enc = fpm(&["encode"], &dec.stdout);
            assert!(enc.status.success(), "{}: {}", v["name"], stderr(&enc));
            assert!(
                enc.stdout == bytes,
                "{}: fpm decode | fpm encode changed the bytes; JSON was {}",
                v["name"],
                String::from_utf8_lossy(&dec.stdout)
            );
            n += 1;
        }
        assert!(n >= 250 + 50, "only {n} messages");
    }

    #[test]
    fn hex_in_and_out() {
        let enc = fpm(&["encode", "--hex"], b"{}");
        let text = String::from_utf8(enc.stdout.clone()).unwrap();
        assert_eq!(text.trim().len(), 2 * fpm_schema::ENCODED_DEFAULT_LEN);
        let dec = fpm(&["decode", "--hex", "--compact"], &enc.stdout);
        assert!(dec.status.success(), "{}", stderr(&dec));
    }

    #[test]
    fn bad_input_is_one_line_naming_the_field_exit_1() {
        let cases: [(&[&str], &[u8], &str); 5] = [
            (
                &["encode"],
                br#"{"queued_requests":{"sum_prefill_tokens":1.5}}"#,
                "queued_requests.sum_prefill_tokens",
            ),
            (&["encode"], b"{\"dp_rank\": \"x\"}", "dp_rank"),
            (
                &["decode"],
                b"\x81\xa7dp_rank\xcb\0\0\0\0\0\0\0\0",
                "dp_rank",
            ),
            (&["decode"], b"\x92\x01\x02", "expected map, found array"),
            (&["decode", "--envelope"], b"\x80", "publisher_id"),
        ];
        for (args, input, needle) in cases {
            let o = fpm(args, input);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            let err = stderr(&o);
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn missing_file_says_which() {
        let o = fpm(&["decode", "/nonexistent/fpm.bin"], b"");
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("/nonexistent/fpm.bin"));
    }
}

mod sim {
    use std::process::Command;

    #[test]
    fn sim_runs_and_reports_per_rank() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("ipc://{}", dir.path().join("sim").display());
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args([
                "-q",
                "sim",
                "--duration",
                "1s",
                "--rps",
                "50",
                "--dp-size",
                "2",
            ])
            .args([
                "--endpoint",
                &endpoint,
                "--prompt-len",
                "100",
                "--output-len",
                "10",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("iterations"));
        assert!(lines[1].contains(&format!("{endpoint}.0")), "{text}");
        assert!(lines[2].contains(&format!("{endpoint}.1")), "{text}");
        // Nobody subscribed: every message is counted, none silently lost.
        assert!(lines[1].contains("no_subscriber="), "{text}");
    }

    #[test]
    fn sim_bad_endpoint_is_one_line_exit_1() {
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["sim", "--endpoint", "tcp://nohost"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--endpoint"), "{err}");
    }
    /// The new environment fallbacks are read (FPM_SIM_DURATION, FPM_SIM_RATE), and a flag
    /// wins over its variable (a bad FPM_SIM_RPS is never used when --rps is given).
    #[test]
    fn sim_flags_fall_back_to_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("ipc://{}", dir.path().join("sim").display());
        let t = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["-q", "sim", "--endpoint", &endpoint, "--rps", "50"])
            .env("FPM_SIM_DURATION", "500ms")
            .env("FPM_SIM_RATE", "20")
            .env("FPM_SIM_RPS", "-5")
            .output()
            .unwrap();
        let elapsed = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // The default duration is 30 s.
        assert!(elapsed < std::time::Duration::from_secs(10), "{elapsed:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let row = text.lines().nth(1).unwrap_or_else(|| panic!("{text}"));
        let cols: Vec<u64> = row
            .split_whitespace()
            .skip(2)
            .take(2)
            .map(|c| c.parse().unwrap())
            .collect();
        // Fixed rate: 20/s for 0.5 s, and no requests (the model at 50 rps would see ~25
        // arrivals and run an iteration every few milliseconds).
        assert!((5..=15).contains(&cols[0]), "{text}");
        assert_eq!(cols[1], 0, "{text}");
    }

    /// SIGTERM stops the ranks early; the table is still printed and the exit is 0.
    #[test]
    fn sim_stops_on_sigterm_with_its_report() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("ipc://{}", dir.path().join("sim").display());
        let child = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["-q", "sim", "--endpoint", &endpoint, "--duration", "60s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = super::procs::Kill(child);
        let sock = dir.path().join("sim.0");
        let t = Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(sock.exists(), "fpm sim did not bind {}", sock.display());
        super::procs::sigterm(&child.0);
        let t = Instant::now();
        while child.0.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child
            .0
            .try_wait()
            .unwrap()
            .expect("fpm sim did not exit after SIGTERM");
        let mut text = String::new();
        std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut text).unwrap();
        assert!(status.success(), "{status:?}");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .contains(&format!("{endpoint}.0")),
            "{text}"
        );
    }
}

mod relay {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    fn records(kv: &Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(kv.join("v1/event_channels"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    /// SIGTERM: stop, flush, remove the discovery record, exit 0.
    #[test]
    fn sigterm_exits_0_and_removes_the_discovery_record() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let kv = dir.path().join("kv");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args([
                "-q",
                "relay",
                "--metrics-addr",
                "off",
                "--namespace",
                "sigterm",
            ])
            .arg("--zmq-endpoint")
            .arg(format!("ipc://{}", dir.path().join("engine.0").display()))
            .args(["--nats-url", &nats.url()])
            .arg("--discovery-dir")
            .arg(&kv)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while records(&kv).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(records(&kv).len(), 1, "the relay never wrote its record");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s.code();
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(code, Some(0));
        assert!(records(&kv).is_empty(), "record left behind");
    }

    #[test]
    fn bad_nats_url_is_one_line_exit_nonzero() {
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args([
                "relay",
                "--metrics-addr",
                "off",
                "--zmq-endpoint",
                "ipc:///tmp/x.0",
            ])
            .args(["--nats-url", "http://not a url"])
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.to_lowercase().contains("nats"), "{err}");
    }
}

/// Rules every command keeps: argument errors are one line with exit 1, help names only what
/// exists, logs carry no colour codes off a terminal.
mod cli_rules {
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    fn fpm(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(args)
            .output()
            .unwrap()
    }

    fn one_line_exit_1(args: &[&str], needle: &str) {
        let out = fpm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("fpm: error: "), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: {err} (expected {needle:?})"
        );
    }

    #[test]
    fn sim_rejects_nonsense_numbers_in_one_line() {
        for (flag, value) in [
            ("--rps", "-5"),
            ("--rps", "0"),
            ("--prompt-len", "-100"),
            ("--output-len", "0"),
            ("--noise", "-1"),
            ("--noise", "NaN"),
            ("--cost-base-ms", "-4"),
            ("--cost-prefill-us", "-1"),
            ("--kv-capacity", "0"),
            ("--max-num-batched-tokens", "0"),
            ("--max-num-seqs", "0"),
            ("--dp-size", "0"),
        ] {
            one_line_exit_1(&["sim", flag, value, "--duration", "1s"], flag);
            let joined = format!("{flag}={value}");
            one_line_exit_1(&["sim", &joined, "--duration", "1s"], flag);
        }
        one_line_exit_1(
            &["sim", "--kv-capacity", "100", "--duration", "1s"],
            "--kv-capacity",
        );
        one_line_exit_1(&["sim", "--no-such-flag"], "--no-such-flag");
        one_line_exit_1(&["nonsense"], "nonsense");
    }

    /// A bad value from an environment fallback: one line, exit 1, naming the variable (clap
    /// alone names only the flag, which the user never typed).
    #[test]
    fn bad_environment_values_name_the_variable() {
        for (args, var, value) in [
            (&["sim", "--duration", "1s"][..], "FPM_SIM_RPS", "-5"),
            (&["sim"][..], "FPM_SIM_DURATION", "soon"),
            (&["relay"][..], "FPM_DP_SIZE", "abc"),
            (&["relay"][..], "FPM_SCOPE", "galaxy"),
            (&["relay"][..], "FPM_DP_RANKS", "0,x"),
            (&["relay"][..], "FPM_RELAY_PUBLISH_TIMEOUT", "-1s"),
            (&["relay"][..], "FPM_NATS_TLS", "maybe"),
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
                .args(args)
                .env(var, value)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{var}: {err}");
            assert_eq!(err.lines().count(), 1, "{var}: {err}");
            assert!(err.starts_with("fpm: error: "), "{var}: {err}");
            assert!(err.contains(var), "{var}: {err}");
        }
        // From the command line, the flag is named and the variable is not.
        one_line_exit_1(&["sim", "--rps", "-5"], "--rps");
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["sim", "--rps", "-5"])
            .env("FPM_SIM_RPS", "7")
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("FPM_SIM_RPS"));
    }

    #[test]
    fn dp_size_zero_is_not_a_port_problem() {
        let out = fpm(&["sim", "--dp-size", "0", "--endpoint", "65535"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--dp-size"), "{err}");
        assert!(!err.contains("port"), "{err}");
    }

    #[test]
    fn help_names_only_commands_that_exist() {
        let out = fpm(&["--help"]);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        // The command list: the first word of each line under "Commands:".
        let listed: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .collect();
        let mut expected = vec![
            "decode", "encode", "relay", "sim", "plot", "record", "watch", "fit", "demo", "bench",
        ];
        let mut got = listed.clone();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "{text}");
        // The summary line and the package description name only those.
        let summary = text.lines().next().unwrap();
        for missing in ["inspect", "replay"] {
            assert!(!summary.contains(missing), "{missing} named in: {summary}");
            assert!(!env!("CARGO_PKG_DESCRIPTION").contains(missing));
        }
    }

    #[test]
    fn a_second_sim_on_a_live_ipc_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("ipc://{}", dir.path().join("sim").display());
        let mut first = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["-q", "sim", "--endpoint", &endpoint, "--duration", "20s"])
            .spawn()
            .unwrap();
        let sock = dir.path().join("sim.0");
        let t = Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = fpm(&["-q", "sim", "--endpoint", &endpoint, "--duration", "1s"]);
        let _ = first.kill();
        let _ = first.wait();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("in use by another running process"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // No message repeated in the chain.
        let line = err.trim();
        for part in line.split(": ").filter(|p| p.len() > 12) {
            assert_eq!(line.matches(part).count(), 1, "repeated {part:?} in {line}");
        }
    }

    #[test]
    fn logs_have_no_colour_codes_off_a_terminal_and_the_table_lines_up() {
        let dir = tempfile::tempdir().unwrap();
        let long = dir
            .path()
            .join("a-rather-long-directory-name-for-the-socket");
        std::fs::create_dir(&long).unwrap();
        let endpoint = format!("ipc://{}", long.join("sim").display());
        let out = fpm(&[
            "sim",
            "--endpoint",
            &endpoint,
            "--duration",
            "300ms",
            "--dp-size",
            "2",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("fpm sim running"), "{err}");
        assert!(!err.contains('\x1b'), "colour codes in piped logs: {err:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        // Every column ends where its header ends: the third token (iterations) of each row.
        let ends = |l: &str| -> Vec<usize> {
            let mut v = Vec::new();
            let mut in_tok = false;
            for (i, c) in l.char_indices() {
                if c == ' ' && in_tok {
                    v.push(i);
                }
                in_tok = c != ' ';
            }
            v
        };
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let header = ends(lines[0]);
        for l in &lines[1..] {
            // Right-aligned numeric columns: iterations .. dropped.
            assert_eq!(ends(l)[2..9], header[2..9], "misaligned:\n{text}");
        }
    }

    #[test]
    fn colour_rule() {
        use std::ffi::OsStr;
        assert!(fpm_cli::use_colour(true, None));
        assert!(fpm_cli::use_colour(true, Some(OsStr::new(""))));
        assert!(!fpm_cli::use_colour(true, Some(OsStr::new("1"))));
        assert!(!fpm_cli::use_colour(false, None));
    }
}

mod plot {
    use std::process::Command;

    use fpm_schema::ForwardPassMetrics;
    use fpm_subscriber::record::{Record, RecordWriter};

    fn recording(path: &std::path::Path, n: i64) {
        let mut w = RecordWriter::create(path).unwrap();
        for i in 0..n {
            for rank in 0..2 {
                let mut m = ForwardPassMetrics::heartbeat("w", rank);
                m.counter_id = i;
                m.wall_time = if i % 10 == 9 {
                    0.0
                } else {
                    0.004 + (i % 7) as f64 * 1e-3
                };
                m.scheduled_requests.num_decode_requests = i % 5 + 1;
                m.scheduled_requests.sum_decode_kv_tokens = 1000 * (i % 5 + 1);
                w.write(&Record {
                    received_at_ns: 1_000_000_000 + i as u64 * 10_000_000,
                    publisher_id: 1,
                    sequence: (2 * i + rank) as u64,
                    metrics: m,
                })
                .unwrap();
            }
        }
        w.flush().unwrap();
    }

    #[test]
    fn draws_a_png_of_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("r.jsonl");
        recording(&rec, 300);
        let png = dir.path().join("p.png");
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .arg("plot")
            .arg(&rec)
            .arg("--output")
            .arg(&png)
            .args(["--width", "800", "--panel-height", "120"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("600 records, 2 streams"), "{stdout}");
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (800, 6 * 120)); // five series panels and the agg model's fit
                                            // Not a blank image: many distinct bytes in the compressed pixel data.
        let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 200, "{distinct}");
        // Without the model panel.
        let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .arg("plot")
            .arg(&rec)
            .arg("--output")
            .arg(&png)
            .args(["--width", "800", "--panel-height", "120", "--model", "none"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let bytes = std::fs::read(&png).unwrap();
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!(h, 5 * 120);
    }

    #[test]
    fn bad_recordings_are_one_line_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "").unwrap();
        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"received_at_ns\":1}\n").unwrap();
        for (file, needle) in [
            (empty, "has no records"),
            (bad, "line 1"),
            (dir.path().join("missing.jsonl"), "cannot open"),
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_fpm"))
                .arg("plot")
                .arg(&file)
                .args(["-o", "/dev/null"])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }
}

mod relay_trust {
    //! Issue 7, `fpm relay` as a process: start-up errors, logs, a dead reader, big frames.
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// `fpm relay` with a clean environment (no inputs or NATS settings inherited).
    fn relay_cmd() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fpm"));
        for v in [
            "DYN_FORWARDPASS_METRIC_PORT",
            "FPM_ZMQ_ENDPOINTS",
            "FPM_IPC_BASE",
            "NATS_URL",
            "NATS_SERVER",
            "NATS_NKEY",
            "DYN_FILE_KV",
            "FPM_METRICS_ADDR",
            "RUST_LOG",
        ] {
            c.env_remove(v);
        }
        c.arg("relay");
        c
    }

    /// Kills the child when dropped (a failed assertion never leaves a relay running).
    struct Running {
        child: Child,
        lines: mpsc::Receiver<String>,
    }

    impl Running {
        fn spawn(cmd: &mut Command) -> Self {
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn fpm");
            let stderr = child.stderr.take().unwrap();
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            Running { child, lines }
        }

        /// Lines read until one matches `pred` (returned last), or panics after `timeout`.
        fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
            let deadline = Instant::now() + timeout;
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(l) => {
                        let hit = pred(&l);
                        seen.push(l);
                        if hit {
                            return seen;
                        }
                    }
                    Err(_) => panic!("no matching line within {timeout:?}; saw {seen:#?}"),
                }
            }
        }

        /// Lines read within `d`.
        fn lines_for(&self, d: Duration) -> Vec<String> {
            let deadline = Instant::now() + d;
            let mut seen = Vec::new();
            while let Ok(l) = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                seen.push(l);
            }
            seen
        }

        /// The exit code, waiting at most `timeout`.
        fn exit_code(&mut self, timeout: Duration) -> Option<i32> {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(s) = self.child.try_wait().unwrap() {
                    return s.code();
                }
                assert!(
                    Instant::now() < deadline,
                    "fpm relay still running after {timeout:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn terminate(&mut self) -> Option<i32> {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            self.exit_code(Duration::from_secs(10))
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A bounded HTTP GET: the body.
    fn http_get(addr: &str, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default()
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }

    /// Peak resident memory (VmHWM) of a process, in bytes.
    fn peak_rss(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kb * 1024
    }

    fn good(counter: u64) -> [Vec<u8>; 3] {
        let m = fpm_schema::ForwardPassMetrics {
            worker_id: "w".into(),
            counter_id: counter as i64,
            ..Default::default()
        };
        [
            vec![],
            counter.to_be_bytes().to_vec(),
            fpm_schema::encode(&m),
        ]
    }

    #[test]
    fn unusable_settings_fail_at_startup_in_one_line() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ipc = format!("ipc://{}", dir.path().join("e.0").display());
        let cases: [(&[&str], &str); 4] = [
            (&["--zmq-endpoint", "tcp://127.0.0.1:99999"], "99999"),
            (
                &["--ipc-base", "ipc:///nonexistent/dir/fpm"],
                "/nonexistent/dir",
            ),
            (
                &["--zmq-endpoint", &ipc, "--nats-nkey", "SUgarbage"],
                "nkey",
            ),
            (
                &["--zmq-endpoint", &ipc, "--nats-url", "notaurl"],
                "notaurl",
            ),
        ];
        for (args, needle) in cases {
            let mut cmd = relay_cmd();
            cmd.env("NATS_URL", nats.url())
                .args(["--metrics-addr", "off"])
                .args(args);
            let t = Instant::now();
            let mut r = Running::spawn(&mut cmd);
            let code = r.exit_code(Duration::from_secs(5));
            let lines = r.lines_for(Duration::from_millis(200));
            assert_eq!(code, Some(1), "{args:?}: {lines:?}");
            assert!(t.elapsed() < Duration::from_secs(5), "{args:?}");
            assert_eq!(lines.len(), 1, "{args:?}: {lines:#?}");
            assert!(lines[0].contains(needle), "{args:?}: {lines:?}");
            assert!(lines[0].starts_with("fpm: error: "), "{lines:?}");
        }
    }

    #[test]
    fn nats_down_is_waited_for_and_retries_warn_with_server_and_cause() {
        let port = free_port(); // nothing listens there
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = relay_cmd();
        cmd.args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--nats-url", &format!("nats://127.0.0.1:{port}")])
            .arg("--zmq-endpoint")
            .arg(format!("ipc://{}", dir.path().join("e.0").display()));
        let mut r = Running::spawn(&mut cmd);
        let mut lines = r.wait_line(Duration::from_secs(5), |l| {
            l.contains("WARN") && l.contains("cannot connect to NATS")
        });
        lines.extend(r.lines_for(Duration::from_millis(1500)));
        let warn = lines
            .iter()
            .find(|l| l.contains("cannot connect to NATS"))
            .unwrap();
        assert!(
            warn.contains(&format!("server=nats://127.0.0.1:{port}")),
            "{warn}"
        );
        assert!(warn.to_lowercase().contains("refused"), "the cause: {warn}");
        let retries = lines.iter().filter(|l| l.contains("NATS")).count();
        assert!(retries <= 2, "rate-limited: {lines:#?}");
        assert!(
            lines.iter().all(|l| !l.contains(" INFO async_nats")),
            "{lines:#?}"
        );
        let started = lines.iter().find(|l| l.contains("relay started")).unwrap();
        assert!(started.contains("metrics=127.0.0.1:"), "{started}");
        assert!(
            lines.iter().all(|l| !l.contains("Some(")),
            "no Debug formatting: {lines:#?}"
        );
        // Still running: a server that is down is waited for.
        assert!(r.child.try_wait().unwrap().is_none());
        assert_eq!(r.terminate(), Some(0));
    }

    #[test]
    fn inputs_are_logged_with_where_they_came_from() {
        let nats = fpm_testkit::NatsServer::start();
        let port = free_port();
        let mut cmd = relay_cmd();
        cmd.env("DYN_FORWARDPASS_METRIC_PORT", port.to_string())
            .args(["--metrics-addr", "off", "--nats-url", &nats.url()]);
        let mut r = Running::spawn(&mut cmd);
        let lines = r.wait_line(Duration::from_secs(5), |l| {
            l.contains("reading engine inputs")
        });
        let line = lines.last().unwrap();
        assert!(line.contains(" INFO "), "{line}");
        assert!(
            line.contains(&format!(
                "source=environment DYN_FORWARDPASS_METRIC_PORT={port}"
            )),
            "{line}"
        );
        assert!(
            line.contains(&format!("endpoints=tcp://127.0.0.1:{port}")),
            "{line}"
        );
        assert_eq!(r.terminate(), Some(0));

        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("e.0").display());
        let mut cmd = relay_cmd();
        cmd.args(["--metrics-addr", "off", "--nats-url", &nats.url()])
            .args(["--zmq-endpoint", &ep]);
        let mut r = Running::spawn(&mut cmd);
        let lines = r.wait_line(Duration::from_secs(5), |l| {
            l.contains("reading engine inputs")
        });
        assert!(
            lines
                .last()
                .unwrap()
                .contains(&format!("source=flag --zmq-endpoint {ep}")),
            "{lines:?}"
        );
        assert_eq!(r.terminate(), Some(0));
    }

    #[test]
    fn a_dead_reader_makes_the_relay_exit_1() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("e.0").display());
        let ctx = zmq::Context::new();
        let engine = ctx.socket(zmq::PUB).unwrap();
        engine.bind(&ep).unwrap();
        let mut cmd = relay_cmd();
        cmd.args(["--metrics-addr", "off", "--nats-url", &nats.url()])
            .args(["--zmq-endpoint", &ep, "--fault-panic-reader-after", "3"]);
        let mut r = Running::spawn(&mut cmd);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        let code = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s.code();
            }
            assert!(Instant::now() < deadline, "the relay kept running");
            engine.send_multipart(good(n), 0).unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(code, Some(1));
        let lines = r.lines_for(Duration::from_millis(300));
        let last = lines.last().unwrap();
        assert!(
            last.starts_with("fpm: error:") && last.contains("ZeroMQ reader died"),
            "{lines:#?}"
        );
    }

    /// `fpm relay --engine-metrics URL` listening where `DYN_SYSTEM_PORT` says (no
    /// `--metrics-addr`): one scrape shows the relay's metrics and the engine's `sglang:`
    /// families, not its others; a bad URL is one line at start-up, exit 1.
    #[test]
    fn engine_metrics_on_the_dyn_system_port() {
        let nats = fpm_testkit::NatsServer::start();
        let engine = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let engine_url = format!("http://{}/metrics", engine.local_addr().unwrap());
        std::thread::spawn(move || {
            for s in engine.incoming() {
                let Ok(mut s) = s else { break };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let body = "# HELP sglang:num_queue_reqs Queued.\n# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"m\"} 4.0\n# HELP python_info Python.\n# TYPE python_info gauge\npython_info{version=\"3.11\"} 1.0\n";
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let port = free_port();
        let zmq_port = free_port();
        let mut cmd = relay_cmd();
        cmd.env("DYN_SYSTEM_PORT", port.to_string())
            .env("FPM_ENGINE_METRICS", &engine_url)
            .args(["-q", "--nats-url", &nats.url()])
            .args(["--zmq-endpoint", &format!("tcp://127.0.0.1:{zmq_port}")]);
        let _r = Running::spawn(&mut cmd);
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break http_get(&addr, "/metrics");
            }
            assert!(
                Instant::now() < deadline,
                "nothing on DYN_SYSTEM_PORT {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            sample(&text, "sglang:num_queue_reqs{model_name=\"m\"}"),
            Some(4.0),
            "{text}"
        );
        assert!(text.contains("fpm_relay_received_messages_total"), "{text}");
        assert!(!text.contains("python_info"), "{text}");

        let out = relay_cmd()
            .args([
                "--nats-url",
                &nats.url(),
                "--zmq-endpoint",
                "tcp://127.0.0.1:5",
            ])
            .args(["--engine-metrics", "https://127.0.0.1:1/metrics"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains("https://127.0.0.1:1/metrics") && lines[0].contains("http://"),
            "{err}"
        );
    }

    #[test]
    fn a_16_mib_frame_is_refused_counted_and_traffic_goes_on() {
        let nats = fpm_testkit::NatsServer::start();
        let port = free_port();
        let metrics = format!("127.0.0.1:{}", free_port());
        let ctx = zmq::Context::new();
        let engine = ctx.socket(zmq::PUB).unwrap();
        engine.set_sndhwm(100_000).unwrap();
        engine.bind(&format!("tcp://127.0.0.1:{port}")).unwrap();
        let mut cmd = relay_cmd();
        cmd.args(["-q", "--metrics-addr", &metrics, "--nats-url", &nats.url()])
            .args(["--zmq-endpoint", &format!("tcp://127.0.0.1:{port}")]);
        let r = Running::spawn(&mut cmd);
        let pid = r.child.id();
        let counter = std::cell::Cell::new(0u64);
        let next = || {
            let c = counter.get();
            counter.set(c + 1);
            c
        };
        // Sends good messages until `cond` holds for the relay's /metrics.
        let send_until = |cond: &dyn Fn(&str) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                engine.send_multipart(good(next()), 0).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                if let Ok(_s) = std::net::TcpStream::connect(&metrics) {
                    let text = http_get(&metrics, "/metrics");
                    if cond(&text) {
                        return text;
                    }
                }
                assert!(Instant::now() < deadline, "condition not met");
            }
        };
        let published = |t: &str| sample(t, "fpm_relay_published_messages_total").unwrap_or(0.0);
        send_until(&|t| published(t) >= 1.0);
        let before = peak_rss(pid);

        let big = vec![0u8; 16 << 20];
        engine
            .send_multipart([&[][..], &next().to_be_bytes()[..], &big[..]], 0)
            .unwrap();
        drop(big);
        let oversized = "fpm_relay_invalid_messages_total{reason=\"oversized_frame\"}";
        let text = send_until(&|t| sample(t, oversized) == Some(1.0));
        // Good traffic on the same endpoint goes on after the relay reconnected.
        let after_drop = published(&text);
        let text = send_until(&|t| published(t) >= after_drop + 5.0);
        let grew = peak_rss(pid).saturating_sub(before);
        assert!(
            grew < 4 << 20,
            "peak RSS grew by {grew} bytes for a 16 MiB frame"
        );
        assert_eq!(sample(&text, oversized), Some(1.0), "{text}");
        let received = sample(&text, "fpm_relay_received_messages_total").unwrap();
        let invalid: f64 = text
            .lines()
            .filter(|l| l.starts_with("fpm_relay_invalid_messages_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        let buffered = sample(&text, "fpm_relay_buffered_messages").unwrap();
        assert_eq!(received, invalid + published(&text) + buffered, "{text}");
    }
}

/// `fpm record` and `fpm watch` against a private nats-server, `fpm relay` and a real emitter.
mod subscriber_cmds {
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use fpm_emitter::{ClockChoice, Emitter, EmitterConfig, Endpoint, StreamHandle};
    use fpm_schema::{QueuedRequestMetrics, ScheduledRequestMetrics};
    use fpm_subscriber::record::read_records;

    use crate::procs::{fpm, Kill};

    /// A relay from `{base}.0` and `{base}.1` to `nats` in namespace `ns`.
    fn relay(base: &str, nats: &str, ns: &str) -> Kill {
        Kill(
            fpm()
                .args(["-q", "relay", "--ipc-base", base, "--dp-ranks", "0,1"])
                .args([
                    "--namespace",
                    ns,
                    "--nats-url",
                    nats,
                    "--metrics-addr",
                    "off",
                ])
                .spawn()
                .unwrap(),
        )
    }

    fn emitters(base: &str) -> Vec<Emitter> {
        (0..2)
            .map(|rank| {
                let cfg = EmitterConfig::new(Endpoint::IpcBase(base.into()), "w", rank)
                    .with_clock(ClockChoice::Cpu);
                Emitter::start(cfg).unwrap()
            })
            .collect()
    }

    fn iterate(es: &mut [Emitter], n: i64) {
        for i in 0..n {
            for e in es.iter_mut() {
                e.begin_iteration();
                e.time_segment(StreamHandle::DEFAULT, || {
                    std::thread::sleep(Duration::from_micros(200))
                });
                e.submit(
                    ScheduledRequestMetrics {
                        num_decode_requests: i % 5 + 1,
                        sum_decode_kv_tokens: 1000 * (i % 5 + 1),
                        ..Default::default()
                    },
                    QueuedRequestMetrics::default(),
                );
            }
        }
    }

    fn wait_exit(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < limit, "did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn record_writes_every_message_stops_on_count_and_never_overwrites() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "eng");
        let out = dir.path().join("rec.jsonl");
        let mut es = emitters(&base);
        let _relay = relay(&base, &nats.url(), "rec");
        let rec = fpm()
            .args(["record", "--namespace", "rec", "--nats-url", &nats.url()])
            .args(["--count", "400", "--output"])
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700)); // subscribed
        iterate(&mut es, 200);
        let o = rec.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("recorded 400 messages"), "{stdout}");
        assert!(
            stdout.contains("lost: 0 in 0 counter gaps, 0 before start"),
            "{stdout}"
        );
        let records: Vec<_> =
            read_records(std::io::BufReader::new(std::fs::File::open(&out).unwrap()))
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(records.len(), 400);
        for rank in 0..2 {
            let c: Vec<i64> = records
                .iter()
                .filter(|r| r.metrics.dp_rank == rank)
                .map(|r| r.metrics.counter_id)
                .collect();
            assert_eq!(c, (0..200).collect::<Vec<_>>());
        }
        let before = std::fs::read(&out).unwrap();
        let again = fpm()
            .args([
                "record",
                "--nats-url",
                &nats.url(),
                "--count",
                "1",
                "--output",
            ])
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&again.stderr);
        assert_eq!(again.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn record_stops_on_sigterm_with_exit_0_and_a_summary_flushed() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "eng");
        let out = dir.path().join("rec.jsonl");
        let mut es = emitters(&base);
        let _relay = relay(&base, &nats.url(), "sig");
        let mut rec = fpm()
            .args([
                "-q",
                "record",
                "--namespace",
                "sig",
                "--nats-url",
                &nats.url(),
                "--output",
            ])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        iterate(&mut es, 50);
        // Flushed within about a second while still running.
        let t = Instant::now();
        while std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count()
            < 100
        {
            assert!(t.elapsed() < Duration::from_secs(5), "not flushed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = rec.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = wait_exit(&mut rec, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0));
        let mut stdout = String::new();
        std::io::Read::read_to_string(rec.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        assert!(stdout.contains("recorded 100 messages"), "{stdout}");
        assert!(stdout.contains("stopped by signal"), "{stdout}");
        assert!(stdout.contains("2 streams"), "{stdout}");
    }

    #[test]
    fn bad_subscription_flags_are_one_line_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.jsonl");
        for (args, needle) in [
            (vec!["--namespace", "a.b"], "namespace"),
            (vec!["--nats-url", "notaurl"], "notaurl"),
            (
                vec!["--stale-after", "10s", "--remove-after", "1s"],
                "--remove-after",
            ),
        ] {
            let o = fpm()
                .args(["record", "--count", "1", "--output"])
                .arg(&out)
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!out.exists(), "a file was left behind");
        }
    }

    #[test]
    fn watch_once_json_reports_every_stream() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "eng");
        let mut es = emitters(&base);
        let _relay = relay(&base, &nats.url(), "watch");
        let w = fpm()
            .args(["-q", "watch", "--once", "--json", "--interval", "2s"])
            .args(["--feed", "every-iteration", "--model-interval", "300ms"])
            .args(["--namespace", "watch", "--nats-url", &nats.url()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        iterate(&mut es, 100);
        let o = w.wait_with_output().unwrap();
        assert!(o.status.success());
        let text = String::from_utf8(o.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2, "{text}");
        for (i, s) in streams.iter().enumerate() {
            assert_eq!(s["worker_id"], "w");
            assert_eq!(s["dp_rank"], i as i64);
            assert_eq!(s["source"], "watch/backend/generate");
            assert!(s["iterations_per_s"].as_f64().unwrap() > 0.0, "{s}");
            assert!(s["wall_time_p50"].as_f64().unwrap() > 0.0, "{s}");
            assert_eq!(s["gap_messages"], 0);
            assert_eq!(s["stale"], false);
        }
        assert_eq!(v["totals"]["messages"], 200);
        // The planner models were fed every iteration: the decode model has its samples.
        let models = v["models"].as_array().unwrap();
        let names: Vec<&str> = models
            .iter()
            .map(|m| m["model"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["prefill", "decode", "agg"]);
        assert_eq!(models[1]["observations"], 64, "{text}");
        assert!(
            models[1]["avg_decode_length"].as_f64().unwrap() > 0.0,
            "{text}"
        );
    }

    /// A real Prometheus scrapes `fpm watch --metrics-addr` and answers a PromQL query with
    /// Dynamo's label names.
    #[test]
    fn watch_metrics_scraped_by_a_real_prometheus() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "eng");
        let mut es = emitters(&base);
        let _relay = relay(&base, &nats.url(), "prom");
        let port = fpm_testkit::free_port();
        let addr = format!("127.0.0.1:{port}");
        let _watch = Kill(
            fpm()
                .args(["-q", "watch", "--json", "--namespace", "prom"])
                .args(["--nats-url", &nats.url(), "--metrics-addr", &addr])
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let Some(prom) = fpm_testkit::Prometheus::start(&addr) else {
            return;
        };
        std::thread::sleep(Duration::from_millis(600));
        iterate(&mut es, 100);
        let deadline = Instant::now() + Duration::from_secs(30);
        let q = r#"sum by (dynamo_namespace, dynamo_component, dynamo_endpoint, worker_id) (fpm_stream_messages_total{worker_id="w"})"#;
        loop {
            let body = prom.query(q);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let result = &v["data"]["result"];
            if let Some(r) = result.as_array().and_then(|a| a.first()) {
                if r["value"][1] == "200" {
                    assert_eq!(r["metric"]["dynamo_namespace"], "prom");
                    assert_eq!(r["metric"]["dynamo_component"], "backend");
                    assert_eq!(r["metric"]["dynamo_endpoint"], "generate");
                    break;
                }
            }
            assert!(Instant::now() < deadline, "no answer: {body}");
            std::thread::sleep(Duration::from_millis(300));
        }
        // Every query of the Grafana dashboard runs and finds series.
        let dash: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                fpm_testkit::repo_root().join("deploy/grafana/fpm-dashboard.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let mut n = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$namespace", ".*")
                    .replace("$worker", ".*");
                // rate() needs two scrapes with data: retry for a while.
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    let v: serde_json::Value = serde_json::from_str(&prom.query(&expr)).unwrap();
                    assert_eq!(v["status"], "success", "{expr}: {v}");
                    if !v["data"]["result"].as_array().unwrap().is_empty() {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{expr} found nothing");
                    std::thread::sleep(Duration::from_millis(300));
                }
                n += 1;
            }
        }
        assert!(n >= 9);
        // The histogram is there too, per rank.
        let body = prom.query(r#"count(fpm_iteration_wall_time_seconds_count{worker_id="w"})"#);
        assert!(
            body.contains(r#""value":["#) && body.contains(r#","2"]"#),
            "{body}"
        );
        let (code, health) = fpm_testkit::http_get(&addr, "/health").unwrap();
        assert_eq!((code, health.lines().next()), (200, Some("ok")));
    }
}

mod fit {
    use std::process::Command;

    use fpm_schema::ForwardPassMetrics;
    use fpm_subscriber::record::{Record, RecordWriter};

    /// Appends message `i` (received at `i` ns, relay 1, sequence `i`).
    fn append(w: &mut RecordWriter, i: i64, metrics: ForwardPassMetrics) {
        w.write(&Record {
            received_at_ns: i as u64,
            publisher_id: 1,
            sequence: i as u64,
            metrics,
        })
        .unwrap();
    }

    /// A recording whose wall_time is exactly 3 ms + 1e-5 s per prefill token + 2e-8 s per
    /// decode KV token + 1e-4 s per decode request, with heartbeats in between.
    fn recording(path: &std::path::Path) {
        let mut w = RecordWriter::create(path).unwrap();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for i in 0..500i64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = ForwardPassMetrics::heartbeat("w", 0);
            m.counter_id = i;
            if i % 25 != 24 {
                let s = &mut m.scheduled_requests;
                s.num_prefill_requests = (x % 3) as i64;
                s.sum_prefill_tokens = s.num_prefill_requests * (100 + (x >> 8) as i64 % 900);
                s.num_decode_requests = 1 + (x >> 20) as i64 % 32;
                s.sum_decode_kv_tokens = s.num_decode_requests * (200 + (x >> 30) as i64 % 3000);
                m.wall_time = 0.003
                    + 1e-5 * s.sum_prefill_tokens as f64
                    + 2e-8 * s.sum_decode_kv_tokens as f64
                    + 1e-4 * s.num_decode_requests as f64;
            }
            append(&mut w, i, m);
        }
        w.flush().unwrap();
    }

    fn fit(path: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .arg("fit")
            .arg(path)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    }

    #[test]
    fn json_fields_per_model_and_the_decode_fit_recovers_the_cost() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("r.jsonl");
        recording(&rec);
        let (code, out, err) = fit(&rec, &["--model", "decode", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        // Exactly these keys, in this order.
        let order = [
            "model",
            "fitted",
            "observations",
            "coef",
            "intercept",
            "avg_decode_length",
        ];
        let at: Vec<usize> = order
            .iter()
            .map(|k| out.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{out}");
        assert_eq!(v.as_object().unwrap().len(), order.len(), "{out}");
        assert_eq!(v["model"], "decode");
        assert_eq!(v["fitted"], true);
        assert_eq!(v["observations"], 64);
        // The decode model sees prefill time as noise; on decode-only samples it would be
        // exact. Here: the per-request and per-KV-token costs come out close.
        let coef = v["coef"].as_array().unwrap();
        assert_eq!(coef.len(), 2);
        let (per_req, per_kv) = (coef[0].as_f64().unwrap(), coef[1].as_f64().unwrap());
        assert!(per_req >= 0.0 && per_kv > 0.0, "{v}");

        let (code, out, _) = fit(&rec, &["--model", "prefill", "--json"]);
        assert_eq!(code, Some(0));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(
            v.get("avg_decode_length").is_none() && v.get("avg_isl").is_some(),
            "{v}"
        );
        let (code, out, _) = fit(&rec, &["--model", "agg", "--json", "--max-samples", "200"]);
        assert_eq!(code, Some(0));
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(
            v.get("avg_decode_length").is_some() && v.get("avg_isl").is_some(),
            "{v}"
        );
        assert_eq!(v["observations"], 200);
        // Too few samples: not fitted, no coef/intercept keys.
        let (_, out, _) = fit(
            &rec,
            &["--model", "agg", "--json", "--min-observations", "1000"],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["fitted"], false);
        assert!(
            v.get("coef").is_none() && v.get("intercept").is_none(),
            "{v}"
        );
        // Text form names the formula and the fit quality.
        let (_, out, _) = fit(&rec, &["--model", "agg"]);
        assert!(out.contains("500 records") && out.contains("R²"), "{out}");
    }

    #[test]
    fn an_exact_linear_recording_is_recovered_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("r.jsonl");
        let mut w = RecordWriter::create(&rec).unwrap();
        for i in 0..100i64 {
            let mut m = ForwardPassMetrics::heartbeat("w", 0);
            m.scheduled_requests.num_prefill_requests = 1;
            m.scheduled_requests.sum_prefill_tokens = 64 * (i % 37 + 1);
            m.wall_time = 0.002 + 3e-6 * m.scheduled_requests.sum_prefill_tokens as f64;
            append(&mut w, i, m);
        }
        w.flush().unwrap();
        let (code, out, err) = fit(&rec, &["--model", "prefill", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let c = v["coef"][0].as_f64().unwrap();
        let b = v["intercept"].as_f64().unwrap();
        assert!((c - 3e-6).abs() < 3e-6 * 1e-9, "{c}");
        assert!((b - 0.002).abs() < 0.002 * 1e-9, "{b}");
    }

    #[test]
    fn bad_arguments_are_one_line_exit_1() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join("r.jsonl");
        recording(&rec);
        for (args, needle) in [
            (vec!["--model", "gpu"], "prefill, decode or agg"),
            (
                vec!["--model", "agg", "--bucket-size", "0"],
                "--bucket-size",
            ),
            (
                vec!["--model", "agg", "--max-samples", "-3"],
                "--max-samples",
            ),
        ] {
            let (code, _, err) = fit(&rec, &args);
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let (code, _, err) = fit(&dir.path().join("none.jsonl"), &["--model", "agg"]);
        assert_eq!(code, Some(1));
        assert!(err.contains("cannot open"), "{err}");
    }
}

/// `fpm demo`: the whole pipeline, a PASS verdict as the last line, nothing left behind.
mod demo {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// What a demo left in its own TMPDIR, and child processes it left running.
    fn leftovers(tmp: &Path, pid: u32) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(tmp)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if let Ok(out) = Command::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
        {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !s.is_empty() {
                v.push(format!("child processes {s}"));
            }
        }
        v
    }

    fn demo(tmp: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fpm"));
        c.env("TMPDIR", tmp).args(["-q", "demo"]);
        c
    }

    #[test]
    fn a_short_demo_passes_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let png = dir.path().join("demo.png");
        let child = demo(tmp.path())
            .args(["--duration", "3s", "--workers", "2", "--dp-size", "2"])
            .arg("--plot")
            .arg(&png)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap();
        assert!(last.starts_with("PASS: "), "{last}");
        assert!(last.ends_with(" received, 0 lost"), "{last}");
        // Four streams, the models against the cost model, the plot.
        for w in 0..2 {
            for r in 0..2 {
                assert!(
                    stdout
                        .lines()
                        .any(|l| l.contains(&format!("demo-worker-{w}"))
                            && l.split_whitespace().nth(1) == Some(&r.to_string())),
                    "stream {w}/{r} missing:\n{stdout}"
                );
            }
        }
        assert!(stdout.contains("(given 2.000e-5)"), "{stdout}");
        assert!(std::fs::metadata(&png).unwrap().len() > 10_000);
        assert!(
            leftovers(tmp.path(), pid).is_empty(),
            "{:?}",
            leftovers(tmp.path(), pid)
        );
    }

    #[cfg(unix)]
    #[test]
    fn ctrl_c_stops_everything_and_still_reports() {
        let tmp = tempfile::tempdir().unwrap();
        let child = demo(tmp.path())
            .args(["--duration", "60s", "--workers", "1"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(Duration::from_secs(2));
        Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
        let t = Instant::now();
        let out = child.wait_with_output().unwrap();
        assert!(t.elapsed() < Duration::from_secs(15), "slow to stop");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("(interrupted)"), "{stdout}");
        let last = stdout.lines().last().unwrap();
        assert!(
            last.starts_with("PASS: ") || last.starts_with("FAIL: "),
            "{last}"
        );
        assert!(
            leftovers(tmp.path(), pid).is_empty(),
            "{:?}",
            leftovers(tmp.path(), pid)
        );
    }

    /// No nats-server on the PATH and no --nats-url: one line says so and how to install it,
    /// and the demo runs on the in-process event plane.
    #[test]
    fn without_nats_server_the_in_process_plane_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let out = demo(tmp.path())
            .env("PATH", empty.path())
            .args(["--duration", "2s", "--workers", "1"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        let notice: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("nats-server is not installed"))
            .collect();
        assert_eq!(notice.len(), 1, "{stdout}");
        assert!(
            notice[0].contains("apt-get install nats-server"),
            "{stdout}"
        );
        assert!(stdout.contains("in-process event plane"), "{stdout}");
        assert!(
            stdout.lines().last().unwrap().starts_with("PASS: "),
            "{stdout}"
        );
    }

    #[test]
    fn an_external_nats_is_used() {
        let nats = fpm_testkit::NatsServer::start();
        let tmp = tempfile::tempdir().unwrap();
        let out = demo(tmp.path())
            .args(["--duration", "2s", "--workers", "1", "--dp-size", "1"])
            .args(["--nats-url", &nats.url()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(stdout.contains(&nats.url()), "{stdout}");
        assert!(stdout.lines().last().unwrap().starts_with("PASS: "));
    }
}

/// `fpm bench` drives the real pipeline and reports what it measured.
mod bench {
    use std::process::Command;

    /// `fpm -q bench <args>`, which must succeed; its standard output.
    fn bench_ok(args: &[&str]) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(["-q", "bench"])
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        stdout
    }

    #[test]
    fn a_short_bench_delivers_everything_and_writes_markdown() {
        let out_dir = tempfile::tempdir().unwrap();
        let stdout = bench_ok(&[
            "--rates",
            "2000",
            "--duration",
            "1s",
            "--output-dir",
            out_dir.path().to_str().unwrap(),
        ]);
        let row = stdout
            .lines()
            .find(|l| l.starts_with("| fpm |"))
            .unwrap_or_else(|| panic!("no row: {stdout}"));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | fpm | sent | delivered | lost emitter | lost after | relay's | p50 | p99 | p99.9 | cpu | rss | sub cpu |
        let sent: u64 = cells[2].parse().unwrap();
        let delivered: u64 = cells[3].parse().unwrap();
        assert!(sent >= 1900, "{row}");
        assert_eq!(delivered, sent, "{row}");
        assert_eq!((cells[4], cells[5], cells[6]), ("0", "0", "0"), "{row}");
        let p50: f64 = cells[7].parse().unwrap();
        let p999: f64 = cells[9].parse().unwrap();
        assert!(p50 > 0.0 && p999 >= p50, "{row}");
        let rss: f64 = cells[11].parse().unwrap();
        assert!(rss > 1.0, "{row}");
        // The subscriber thread's CPU, read from outside it: measured, and plausible.
        let sub_cpu: f64 = cells[12].parse().unwrap();
        assert!(sub_cpu > 0.0 && sub_cpu < 1000.0, "{row}");
        let files: Vec<_> = std::fs::read_dir(out_dir.path())
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(files.len(), 1);
        let md = std::fs::read_to_string(files[0].path()).unwrap();
        assert!(md.starts_with("# fpm bench") && md.contains("Machine: ") && md.contains(row));
    }

    /// `--peer floor`: the yardstick relay (a thread of the bench) delivers everything, its CPU
    /// is measured, it has no RSS of its own, and ours is divided by it.
    #[test]
    fn the_floor_peer_delivers_everything_and_ours_is_divided_by_it() {
        let stdout = bench_ok(&[
            "--rates",
            "2000",
            "--duration",
            "1s",
            "--peer",
            "floor",
            "--repeat",
            "2",
            "--output-dir",
            "off",
        ]);
        let rows = |prefix: &str| -> Vec<Vec<String>> {
            stdout
                .lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.split('|').map(|c| c.trim().to_owned()).collect())
                .collect()
        };
        let (ours, floor) = (rows("| fpm |"), rows("| floor |"));
        assert_eq!((ours.len(), floor.len()), (2, 2), "{stdout}");
        for cells in ours.iter().chain(&floor) {
            let sent: u64 = cells[2].parse().unwrap();
            assert!(sent >= 1900, "{cells:?}");
            assert_eq!(cells[3], cells[2], "delivered all: {cells:?}");
            assert_eq!((&*cells[4], &*cells[5]), ("0", "0"), "{cells:?}");
            let cpu: f64 = cells[10].parse().unwrap();
            assert!(cpu > 0.0, "{cells:?}");
        }
        assert!(floor.iter().all(|c| c[11] == "-"), "no RSS of its own");
        // One per round, and the summary's.
        assert_eq!(rows("| fpm / floor |").len(), 3, "{stdout}");
        assert!(stdout.contains("ratios to floor over 2 rounds"), "{stdout}");
    }

    #[test]
    fn bad_bench_flags_are_one_line_exit_1() {
        // A list with an unknown relay in it (or an empty item) is refused before anything
        // starts, like a bad rate or repeat count.
        for (flag, bad) in [
            ("--rates", "0,fast"),
            ("--repeat", "0"),
            ("--repeat", "101"),
            ("--repeat", "x"),
            ("--peer", "nosuch"),
            ("--peer", "floor,nosuch"),
            ("--peer", "dynamo,"),
        ] {
            let o = Command::new(env!("CARGO_BIN_EXE_fpm"))
                .args(["bench", flag, bad])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{bad}: {err}");
            assert_eq!(err.lines().count(), 1, "{bad}: {err}");
            assert!(err.contains(flag), "{bad}: {err}");
        }
    }
}

/// `fpm bench --peer dynamo`: Dynamo's own relay in the same run, and the same-run
/// comparisons with SGLang's publisher and msgspec.
mod bench_peer {
    use std::process::Command;

    #[test]
    fn side_by_side_with_dynamos_relay() {
        if fpm_testkit::python().is_none() {
            return;
        }
        let out_dir = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .current_dir(fpm_testkit::repo_root())
            .args([
                "-q",
                "bench",
                "--rates",
                "1000",
                "--duration",
                "1s",
                "--peer",
                "dynamo",
            ])
            .arg("--output-dir")
            .arg(out_dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let cells = |prefix: &str| -> Vec<String> {
            stdout
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} row: {stdout}"))
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        };
        let ours = cells("| fpm |");
        let dynamo = cells("| dynamo |");
        for row in [&ours, &dynamo] {
            assert_eq!(row[2], row[3], "sent != delivered: {row:?}");
        }
        assert_eq!(dynamo[6], "-"); // no relay counters from Dynamo's relay
        let ratio = cells("| fpm / dynamo |");
        assert_eq!(ratio[3], "1.00", "{ratio:?}");
        let submit = cells("| per-iteration hand-over");
        assert!(
            submit[2].ends_with(" ns") && submit[3].ends_with(" ns"),
            "{submit:?}"
        );
        let codec = cells("| decode to a new struct");
        assert!(codec[4].ends_with('x'), "{codec:?}");
    }
}

/// Faults end to end with real processes (issue 12): every message the emitter submitted is
/// delivered or visible as a counted loss downstream.
mod e2e_faults {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::procs::*;

    /// The relay is killed (SIGKILL: its buffer is lost) and restarted while the engine keeps
    /// running. Every submitted message is either recorded or inside a counter gap the
    /// subscriber reports; the counter never goes back (no false "restart").
    #[test]
    fn relay_killed_and_restarted() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let out = dir.path().join("rec.jsonl");
        let rec = record(&out, &nats.url(), "fault1");
        std::thread::sleep(Duration::from_millis(700)); // subscribed
        let stop = Arc::new(AtomicBool::new(false));
        let eng = engine(ep.clone(), 2000.0, stop.clone());
        let mut first = relay(&ep, &nats.url(), "fault1");
        std::thread::sleep(Duration::from_millis(1500));
        let _ = first.0.kill(); // SIGKILL
        let _ = first.0.wait();
        std::thread::sleep(Duration::from_millis(1000));
        let _second = relay(&ep, &nats.url(), "fault1");
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let stats = eng.join().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let summary = stop_record(rec);
        let got = records(&out);
        let counters: Vec<i64> = got.iter().map(|r| r.metrics.counter_id).collect();
        assert!(
            counters.windows(2).all(|w| w[1] > w[0]),
            "counter went back"
        );
        let last = *counters.last().unwrap() as u64;
        let gap = last + 1 - got.len() as u64;
        // Everything up to the last counter was delivered or is a reported gap; after it,
        // only what the engine counted as dropped.
        assert!(gap > 0, "the outage lost nothing?");
        // "lost: G in N counter gaps, B before start": every missing counter is reported.
        let lost = summary_count(&summary, "lost");
        assert_eq!(
            lost + summary_count(&summary, " before start"),
            gap,
            "{summary}"
        );
        assert!(summary.contains(" 0 restarts"), "{summary}");
        assert_eq!(
            stats.submitted,
            stats.published + stats.dropped.total(),
            "{stats:?}"
        );
        assert!(last < stats.submitted);
        let publishers: std::collections::BTreeSet<u64> =
            got.iter().map(|r| r.publisher_id).collect();
        assert_eq!(publishers.len(), 2, "two relay instances");
    }

    /// NATS is killed for 5 s mid-stream (the engine at up to 10,000 messages/s) and
    /// restarted on the same port: the relay buffers
    /// and reconnects, the subscriber reconnects, both without a restart; every counter up to
    /// the last one recorded is recorded or reported lost (messages the relay flushed before
    /// the subscriber had resubscribed are gaps, not silence).
    #[test]
    fn nats_killed_and_restarted() {
        let mut nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let out = dir.path().join("rec.jsonl");
        let rec = record(&out, &nats.url(), "fault3");
        std::thread::sleep(Duration::from_millis(700));
        let stop = Arc::new(AtomicBool::new(false));
        let eng = engine(ep.clone(), 10_000.0, stop.clone());
        let _relay = relay(&ep, &nats.url(), "fault3");
        std::thread::sleep(Duration::from_millis(1500));
        nats.stop();
        std::thread::sleep(Duration::from_secs(5));
        nats.restart();
        // Messages after the restart, then until the recorder has caught up (the relay
        // flushes what it buffered first; on a loaded machine that takes a while): its file,
        // flushed every second, stops growing.
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        let stats = eng.join().unwrap();
        wait_for_quiet_file(&out, Duration::from_millis(2500), Duration::from_secs(30));
        let summary = stop_record(rec);
        let got = records(&out);
        let last = got.last().unwrap().metrics.counter_id as u64;
        // Messages after the outage arrived: the recorder reconnected.
        assert!(last + 1 >= stats.published * 9 / 10, "{summary} {stats:?}");
        let gap = last + 1 - got.len() as u64;
        assert_eq!(
            summary_count(&summary, "lost") + summary_count(&summary, " before start"),
            gap,
            "{summary}"
        );
        assert_eq!(summary_count(&summary, " restarts"), 0, "{summary}");
        assert_eq!(stats.submitted, stats.published + stats.dropped.total());
    }

    /// The subscriber process is paused (SIGSTOP) for 3 s, then resumed: what queued for it
    /// meanwhile (at the server) arrives; nothing is lost or, if something were, it would be
    /// reported (counter gaps, relay envelope gaps, slow-consumer drops).
    #[cfg(unix)]
    #[test]
    fn subscriber_paused_then_resumed() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let out = dir.path().join("rec.jsonl");
        let rec = record(&out, &nats.url(), "fault4");
        std::thread::sleep(Duration::from_millis(700));
        let stop = Arc::new(AtomicBool::new(false));
        let eng = engine(ep.clone(), 3000.0, stop.clone());
        let relay4 = relay(&ep, &nats.url(), "fault4");
        let relay_pid = relay4.0.id();
        std::thread::sleep(Duration::from_millis(1000));
        let pid = rec.id().to_string();
        Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        let stats = eng.join().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let relay_peak_kib = std::fs::read_to_string(format!("/proc/{}/status", relay_pid))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let summary = stop_record(rec);
        let got = records(&out);
        assert!(
            relay_peak_kib < 64 * 1024,
            "relay peak RSS {relay_peak_kib} KiB"
        );
        assert_eq!(got.len() as u64, stats.published, "{summary} {stats:?}");
        assert_eq!(summary_count(&summary, "lost"), 0, "{summary}");
        assert_eq!(summary_count(&summary, " relay envelopes"), 0, "{summary}");
        assert_eq!(
            summary_count(&summary, " slow-consumer drops"),
            0,
            "{summary}"
        );
    }

    /// The engine restarts (a new process would start its counter at 0 again): the subscriber
    /// reports one restart, not a huge gap, and every message of both runs is recorded or
    /// counted.
    #[test]
    fn engine_restart_is_a_restart() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let out = dir.path().join("rec.jsonl");
        let rec = record(&out, &nats.url(), "fault5");
        std::thread::sleep(Duration::from_millis(700));
        let _relay = relay(&ep, &nats.url(), "fault5");
        let mut published = 0;
        for _ in 0..2 {
            let stop = Arc::new(AtomicBool::new(false));
            let eng = engine(ep.clone(), 2000.0, stop.clone());
            std::thread::sleep(Duration::from_millis(1500));
            stop.store(true, Ordering::Relaxed);
            let stats = eng.join().unwrap();
            assert_eq!(stats.dropped.total(), 0, "{stats:?}");
            published += stats.published;
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_millis(500));
        let summary = stop_record(rec);
        let got = records(&out);
        assert_eq!(summary_count(&summary, " restarts"), 1, "{summary}");
        assert_eq!(summary_count(&summary, "lost"), 0, "{summary}");
        assert_eq!(got.len() as u64, published, "{summary}");
    }

    /// NATS requiring a password: the right one works end to end; a wrong one fails
    /// `fpm relay` and `fpm record` at start-up in one line with exit 1.
    #[test]
    fn wrong_nats_credentials_fail_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let port = fpm_testkit::free_port();
        let _nats = Kill(
            Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["--user", "fpm", "--pass", "s3cret", "-l"])
                .arg(dir.path().join("n.log"))
                .spawn()
                .unwrap(),
        );
        let url = format!("nats://127.0.0.1:{port}");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(50));
        }
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        for args in [
            vec![
                "relay",
                "--zmq-endpoint",
                ep.as_str(),
                "--metrics-addr",
                "off",
            ],
            vec!["record", "--count", "1", "--output", "/dev/null/x"],
        ] {
            let o = fpm()
                .args(&args)
                .args([
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "fpm",
                    "--nats-password",
                    "wrong",
                ])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            let lines: Vec<&str> = err
                .lines()
                .filter(|l| l.starts_with("fpm: error"))
                .collect();
            assert_eq!(lines.len(), 1, "{err}");
            assert!(lines[0].contains("refused the credentials"), "{err}");
        }
        // The right password: messages flow.
        let out = dir.path().join("rec.jsonl");
        let rec = fpm()
            .args(["-q", "record", "--nats-url", &url, "--nats-user", "fpm"])
            .args([
                "--nats-password",
                "s3cret",
                "--namespace",
                "auth",
                "--count",
                "50",
                "--output",
            ])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let _relay = Kill(
            fpm()
                .args(["-q", "relay", "--zmq-endpoint", &ep, "--namespace", "auth"])
                .args([
                    "--nats-url",
                    &url,
                    "--nats-user",
                    "fpm",
                    "--nats-password",
                    "s3cret",
                ])
                .args(["--metrics-addr", "off"])
                .spawn()
                .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let eng = engine(ep.clone(), 500.0, stop.clone());
        let o = rec.wait_with_output().unwrap();
        stop.store(true, Ordering::Relaxed);
        eng.join().unwrap();
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(records(&out).len(), 50);
    }

    /// Two relays on one engine by mistake: every message arrives twice; the subscriber
    /// counts each second copy (duplicate, or reordered when it comes after a newer one),
    /// never as loss.
    #[test]
    fn two_relays_for_one_engine() {
        let nats = fpm_testkit::NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let out = dir.path().join("rec.jsonl");
        let rec = record(&out, &nats.url(), "fault2");
        let _a = relay(&ep, &nats.url(), "fault2");
        let _b = relay(&ep, &nats.url(), "fault2");
        std::thread::sleep(Duration::from_millis(800));
        let stop = Arc::new(AtomicBool::new(false));
        let eng = engine(ep.clone(), 1000.0, stop.clone());
        // Both relays must be connected before counting: wait until the engine has published.
        std::thread::sleep(Duration::from_millis(2000));
        stop.store(true, Ordering::Relaxed);
        let stats = eng.join().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let summary = stop_record(rec);
        let got = records(&out);
        let n = stats.published;
        let counters: std::collections::BTreeSet<i64> =
            got.iter().map(|r| r.metrics.counter_id).collect();
        assert_eq!(counters.len() as u64, n, "{summary}");
        let copies = got.len() as u64 - n;
        // Relay B may have joined a moment after A: the copies are at most n, and every copy
        // is counted as a duplicate or reordered.
        assert!(copies > n / 2, "{copies} of {n}: {summary}");
        assert_eq!(
            summary_count(&summary, " duplicates") + summary_count(&summary, " reordered"),
            copies,
            "every second copy counted: {summary}"
        );
        // Nothing lost in the end (a gap opened by one relay running ahead is filled by the
        // other's late copies; the gap event itself stays counted).
        assert!(summary.contains("lost: 0 in "), "{summary}");
        assert!(
            summary.contains(" 0 restarts"),
            "a late copy of counter 0 is no restart: {summary}"
        );
    }
}

/// A 3-node NATS cluster on localhost; the node the relay is connected to is killed: the relay
/// and the recorder (given every node's URL) carry on through the others, and every counter
/// is recorded or reported lost.
mod nats_cluster {
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::procs::{engine, records, stop_record, summary_count, Kill};

    #[test]
    fn a_node_dies_and_the_pipeline_carries_on() {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| {
                (
                    fpm_testkit::free_port(),
                    fpm_testkit::free_port(),
                    fpm_testkit::free_port(),
                )
            })
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{}", p.1))
            .collect();
        let mut nodes: Vec<Option<Kill>> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, cluster, monitor))| {
                Some(Kill(
                    Command::new("nats-server")
                        .args(["-a", "127.0.0.1", "-p", &client.to_string()])
                        .args(["-m", &monitor.to_string(), "-n", &format!("node{i}")])
                        .args(["--cluster_name", "fpm", "--cluster"])
                        .arg(format!("nats://127.0.0.1:{cluster}"))
                        .args(["--routes", &routes.join(",")])
                        .arg("-l")
                        .arg(dir.path().join(format!("node{i}.log")))
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("nats-server"),
                ))
            })
            .collect();
        // Until every node sees the two others.
        let t = Instant::now();
        loop {
            let routed = ports.iter().all(|p| {
                fpm_testkit::http_get(&format!("127.0.0.1:{}", p.2), "/routez")
                    .map(|(_, b)| b.contains("\"num_routes\": 2"))
                    .unwrap_or(false)
            });
            if routed {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "cluster did not form"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{}", p.0))
            .collect();
        let all = urls.join(",");
        let out = dir.path().join("rec.jsonl");
        let rec = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args([
                "-q",
                "record",
                "--namespace",
                "cluster",
                "--nats-url",
                &all,
                "--output",
            ])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let ep = format!("ipc://{}", dir.path().join("eng.0").display());
        let _relay = Kill(
            Command::new(env!("CARGO_BIN_EXE_fpm"))
                .args([
                    "-q",
                    "relay",
                    "--zmq-endpoint",
                    &ep,
                    "--namespace",
                    "cluster",
                ])
                .args(["--nats-url", &all, "--metrics-addr", "off"])
                .spawn()
                .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine(ep.clone(), 2000.0, stop.clone());
        std::thread::sleep(Duration::from_millis(1500));
        // Kill the node the relay is connected to.
        let relay_node = (0..3)
            .find(|&i| {
                fpm_testkit::http_get(&format!("127.0.0.1:{}", ports[i].2), "/connz")
                    .map(|(_, b)| b.contains("\"name\": \"fpm-relay\""))
                    .unwrap_or(false)
            })
            .expect("the relay is connected to some node");
        nodes[relay_node] = None;
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let stats = engine.join().unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let summary = stop_record(rec);
        let got = records(&out);
        let last = got.last().unwrap().metrics.counter_id as u64;
        // The pipeline carried on after the node died: most of what was published arrived.
        assert!(last + 1 >= stats.published * 9 / 10, "{summary} {stats:?}");
        let lost = summary_count(&summary, "lost");
        let before = summary_count(&summary, " before start");
        assert_eq!(lost + before + got.len() as u64, last + 1, "{summary}");
        eprintln!("cluster: node {relay_node} killed; {summary}");
    }
}
