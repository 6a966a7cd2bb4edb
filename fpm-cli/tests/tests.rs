//! End-to-end tests of the `fpm` binary.

mod codec {
    use std::io::Write;
    use std::process::{Command, Output, Stdio};

    fn fpm(args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fpm"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fpm");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    #[test]
    fn encode_then_decode_round_trips_in_field_order() {
        let json = r#"{"worker_id":"w-ü","dp_rank":2,"counter_id":9,"wall_time":"NaN",
                       "scheduled_requests":{"num_decode_requests":3,"var_decode_kv_tokens":2},
                       "timing_scope":"ignored"}"#;
        let enc = fpm(&["encode"], json.as_bytes());
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
        // --payload reads it as a bare FPM map: every envelope key is unknown to the FPM
        // schema, so (as with msgspec) it decodes to the default message, not worker "a".
        let dec = fpm(&["decode", "--payload", "--compact"], &enc.stdout);
        let text = String::from_utf8(dec.stdout).unwrap();
        assert!(text.contains(r#""worker_id":"""#), "{text}");
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
        for cmd in ["decode", "encode", "relay", "sim"] {
            assert!(text.contains(cmd), "{cmd} missing from: {text}");
        }
        for missing in ["record", "watch", "demo", "bench", "inspect"] {
            assert!(!text.contains(missing), "{missing} named in: {text}");
        }
        assert!(!env!("CARGO_PKG_DESCRIPTION").contains("watch"));
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
        assert_eq!((w, h), (800, 5 * 120));
        // Not a blank image: many distinct bytes in the compressed pixel data.
        let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(distinct > 200, "{distinct}");
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
