//! End-to-end tests of the `fpm` binary.

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
