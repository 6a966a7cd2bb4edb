//! Integration tests of the relay: real ZeroMQ sockets, a private `nats-server`, and (where
//! the contract venv exists) Dynamo's own subscriber and SGLang's own publisher.

mod common;

mod relay {
    use std::time::Duration;

    use fpm_relay::{InvalidReason, RelayDropReason, Scope};
    use fpm_testkit::NatsServer;

    use crate::common::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn multi_rank_relaying_is_byte_exact_and_in_order() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "sgl");
        let tcp_port = free_port();
        let mut eps = fpm_relay::ipc_endpoints(&base, &[0, 1]);
        eps.push(format!("tcp://127.0.0.1:{tcp_port}"));
        let mut engines = [
            Engine::bind(&eps[0]),
            Engine::bind(&eps[1]),
            Engine::bind(&format!("tcp://127.0.0.1:{tcp_port}")),
        ];
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(eps.clone(), &nats.url(), |_| {}).await;
        for (i, e) in engines.iter_mut().enumerate() {
            e.warm_up(&relay, &format!("rank{i}")).await;
        }
        let before = relay.stats().published;
        let mut sent = Vec::new();
        for n in 0..100 {
            for (i, e) in engines.iter_mut().enumerate() {
                let p = fpm(&format!("rank{i}"), i as i64, n);
                e.send(&p);
                sent.push(p);
            }
        }
        let got = collect(
            &mut sub,
            before as usize + sent.len(),
            Duration::from_secs(10),
        )
        .await;
        let got: Vec<_> = got.into_iter().skip(before as usize).collect();
        assert_eq!(got.len(), sent.len());
        // Per rank, the payloads arrive unchanged and in order.
        for rank in 0..3 {
            let want: Vec<_> = sent.iter().skip(rank).step_by(3).cloned().collect();
            let have: Vec<_> = got
                .iter()
                .filter(|m| fpm_schema::peek_key(&m.payload).unwrap().dp_rank == rank as i64)
                .map(|m| m.payload.clone())
                .collect();
            assert_eq!(have, want, "rank {rank}");
        }
        // Envelope: one publisher id, sequence from 0 without holes, topic, ms timestamps.
        let all = collect_all_envelopes(&got);
        let now_ms = now_ms();
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.0, relay.publisher_id());
            assert_eq!(e.1, before + i as u64);
            assert!(e.2 <= now_ms && e.2 > now_ms - 60_000, "published_at in ms");
        }
        assert!(relay.publisher_id() < 1 << 53);
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(s.received, s.published, "{s:?}");
        assert_eq!(
            s.invalid.total() + s.dropped.total() + s.counter_gaps,
            0,
            "{s:?}"
        );
        assert_eq!(s.counter_resets, 0);
        assert_eq!(s.buffered, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_started_after_relay_and_restarted() {
        let dir = tempfile::tempdir().unwrap();
        started_late_and_restarted(fpm_testkit::ipc_base(dir.path(), "late") + ".0").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_started_after_relay_and_restarted_on_an_abstract_socket() {
        let name = format!("ipc://@fpm-test-{}-{}", std::process::id(), free_port());
        started_late_and_restarted(name).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_started_after_relay_and_restarted_over_tcp() {
        started_late_and_restarted(format!("tcp://127.0.0.1:{}", free_port())).await;
    }

    /// The engine binds after the relay started, then restarts on the same endpoint: the
    /// relay connects by itself both times, and counts the gap and the reset.
    async fn started_late_and_restarted(ep: String) {
        let nats = NatsServer::start();
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        // The engine binds after the relay connected: the SUB picks it up by itself.
        let mut engine = Engine::bind(&ep);
        engine.warm_up(&relay, "w").await;
        let n1 = relay.stats().received;
        for _ in 0..20 {
            engine.send_next("w");
        }
        engine.skip(5); // lost upstream: a gap of 5
        for _ in 0..10 {
            engine.send_next("w");
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().published == n1 + 30
        })
        .await;
        drop(engine);

        // The engine restarts on the same endpoint, counting from 0 again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut engine = Engine::bind(&ep);
        engine.warm_up(&relay, "w").await;
        engine.send_and_wait_published(&relay, "w", 20).await;
        let s = relay.stats();
        assert_eq!(s.counter_gaps, 5, "{s:?}");
        assert_eq!(s.counter_resets, 1, "{s:?}");
        let got = collect(&mut sub, s.published as usize, Duration::from_secs(5)).await;
        assert_eq!(got.len() as u64, s.published);
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(s.received, s.published, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_messages_are_counted_and_good_ones_delivered() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "bad") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| c.max_payload = 2048).await;
        engine.warm_up(&relay, "good").await;
        let before = relay.stats().published as usize;

        let v2 = fpm_schema::encode(&fpm_schema::ForwardPassMetrics {
            version: 2,
            ..Default::default()
        });
        // Over --max-payload-bytes, within the frame slack libzmq lets through.
        let big = fpm_schema::encode(&fpm_schema::ForwardPassMetrics {
            worker_id: "x".repeat(2000),
            ..Default::default()
        });
        assert!(big.len() > 2048 && big.len() < 3072);
        let ctr = 7u64.to_be_bytes().to_vec();
        let bad: Vec<(InvalidReason, Vec<Vec<u8>>)> = vec![
            (InvalidReason::FrameCount, vec![vec![], ctr.clone()]),
            (
                InvalidReason::FrameCount,
                vec![vec![], ctr.clone(), fpm("good", 0, 1), vec![]],
            ),
            (InvalidReason::FrameCount, vec![fpm("good", 0, 1)]),
            (
                InvalidReason::TopicFrame,
                vec![b"topic".to_vec(), ctr.clone(), fpm("good", 0, 1)],
            ),
            (
                InvalidReason::CounterFrame,
                vec![vec![], vec![0, 0, 0, 7], fpm("good", 0, 1)],
            ),
            (InvalidReason::TooLarge, vec![vec![], ctr.clone(), big]),
            (
                InvalidReason::Undecodable,
                vec![vec![], ctr.clone(), b"garbage-not-fpm".to_vec()],
            ),
            (
                InvalidReason::Undecodable,
                vec![vec![], ctr.clone(), vec![0xc1; 16]],
            ),
            (
                InvalidReason::Undecodable,
                vec![vec![], ctr.clone(), vec![]],
            ),
            (
                InvalidReason::UnsupportedVersion,
                vec![vec![], ctr.clone(), v2],
            ),
        ];
        let mut good = Vec::new();
        for round in 0..3 {
            for (i, (_, frames)) in bad.iter().enumerate() {
                engine.send_frames(frames);
                let p = fpm("good", 0, (round * 100 + i) as i64);
                engine.send(&p);
                good.push(p);
            }
        }
        let got = collect(&mut sub, before + good.len(), Duration::from_secs(10)).await;
        let got: Vec<_> = got.into_iter().skip(before).map(|m| m.payload).collect();
        assert!(got == good, "every good message, unchanged, in order");
        let text = relay.metrics_text();
        let s = shut_down(relay, &stop).await;
        for reason in InvalidReason::ALL {
            let want = 3 * bad.iter().filter(|(r, _)| *r == reason).count() as u64;
            assert_eq!(s.invalid_for(reason), want, "{reason:?}: {s:?}");
            // /metrics says the same, reason by reason.
            let name = format!(
                "fpm_relay_invalid_messages_total{{reason=\"{}\"}}",
                reason.as_str()
            );
            assert_eq!(sample(&text, &name), Some(want as f64), "{name} in\n{text}");
        }
        assert_eq!(s.received, s.invalid.total() + s.published, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_outage_buffers_delivers_and_counts_overflow() {
        let mut nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "outage") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
            c.buffer.max_messages = 50;
        })
        .await;
        engine.warm_up(&relay, "w").await;
        let pre = engine.send_and_wait_published(&relay, "w", 20).await;
        let pre_published = relay.stats().published;
        let got = collect(&mut sub, pre_published as usize, Duration::from_secs(5)).await;
        assert_eq!(got.len() as u64, pre_published);
        drop(sub);

        nats.stop();
        wait_for(Duration::from_secs(5), || !relay.stats().nats_connected).await;
        for _ in 0..120 {
            engine.send_next("w");
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().received == pre + 140
        })
        .await;
        let s = relay.stats();
        assert_eq!(s.buffered, 50, "{s:?}");
        assert_eq!(s.dropped_for(RelayDropReason::BufferFull), 70, "{s:?}");
        assert_eq!(s.published, pre_published);
        assert_eq!(
            s.received,
            s.published + s.dropped.total() + s.buffered,
            "while running"
        );

        nats.restart();
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        // If the relay reconnected before this subscription existed, what it published in
        // between is gone (core NATS); only count from what it had published by now.
        let published_when_subscribed = relay.stats().published;
        wait_for(Duration::from_secs(10), || {
            relay.stats().published == pre_published + 50
        })
        .await;
        let want = (pre_published + 50 - published_when_subscribed) as usize;
        let got = collect(&mut sub, want, Duration::from_secs(5)).await;
        assert_eq!(got.len(), want);
        let seqs: Vec<u64> = collect_all_envelopes(&got).iter().map(|e| e.1).collect();
        let first = published_when_subscribed;
        assert_eq!(seqs, (first..pre_published + 50).collect::<Vec<_>>());
        let s = relay.stats();
        assert!(s.nats_connected);
        assert_eq!(s.nats_reconnects, 1, "{s:?}");

        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(s.received, s.published + s.dropped.total(), "{s:?}");
        assert_eq!(s.dropped.total(), 70);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_down_at_start_is_waited_for() {
        let mut nats = NatsServer::start();
        nats.stop();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "early") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut c = fpm_relay::RelayConfig::new(vec![ep.clone()]);
        c.nats.url = nats.url();
        c.nats.reconnect_delay_max = Duration::from_millis(300);
        let token = tokio_util::sync::CancellationToken::new();
        let relay = tokio::time::timeout(
            Duration::from_secs(5),
            fpm_relay::Relay::start(c, token.clone()),
        )
        .await
        .expect("start does not wait for NATS")
        .expect("starts");
        engine.warm_up(&relay, "w").await;
        for _ in 0..10 {
            engine.send_next("w");
        }
        let s = relay.stats();
        assert!(!s.nats_connected);
        assert_eq!(s.published, 0);
        nats.restart();
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let published_when_subscribed = relay.stats().published;
        wait_for(Duration::from_secs(10), || {
            let s = relay.stats();
            s.buffered == 0 && s.published == s.received
        })
        .await;
        let s = relay.stats();
        let want = (s.published - published_when_subscribed) as usize;
        assert_eq!(
            collect(&mut sub, want, Duration::from_secs(5)).await.len(),
            want
        );
        assert!(s.received >= 11, "{s:?}");
        assert_eq!(
            s.nats_reconnects, 0,
            "the first connection is not a reconnect"
        );
        token.cancel();
        within(10, relay.wait()).await;
    }

    /// A relay stopped while messages pour in delivers or counts every one it received: after
    /// `wait`, `received == published + dropped + invalid`, and a NATS subscriber got exactly
    /// `published` (its buffer and the NATS client's outgoing buffer are flushed on the way
    /// out). Three rounds, to catch the race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopped_under_load_delivers_or_counts_everything() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        for round in 0..3 {
            let nats = NatsServer::start();
            let dir = tempfile::tempdir().unwrap();
            let ep = fpm_testkit::ipc_base(dir.path(), "load") + ".0";
            let mut engine = Engine::bind(&ep);
            let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
                c.shutdown_timeout = Duration::from_secs(3);
            })
            .await;
            let mut sub = subscribe(&nats.url(), SUBJECT).await;
            engine.warm_up(&relay, "w").await;
            let base = relay.stats().received;
            let pouring = Arc::new(AtomicBool::new(true));
            let p = pouring.clone();
            let pour = std::thread::spawn(move || {
                while p.load(Ordering::Relaxed) {
                    engine.send_next("w");
                }
                engine.counter
            });
            wait_for(Duration::from_secs(20), || {
                relay.stats().received > base + 20_000
            })
            .await;
            stop.cancel();
            let s = within(10, relay.wait()).await;
            pouring.store(false, Ordering::Relaxed);
            let sent = pour.join().unwrap();
            assert_eq!(
                s.received,
                s.published + s.dropped.total() + s.invalid.total(),
                "round {round}: {s:?}"
            );
            assert!(s.received <= sent, "round {round}: {s:?}");
            let got = collect(&mut sub, s.published as usize, Duration::from_secs(10)).await;
            assert_eq!(got.len() as u64, s.published, "round {round}: {s:?}");
            // And nothing more (no copies).
            let more = collect(&mut sub, 1, Duration::from_millis(300)).await;
            assert!(more.is_empty(), "round {round}: {s:?}");
            eprintln!(
                "round {round}: received {}, published {}, dropped {:?}",
                s.received, s.published, s.dropped
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_within_timeout_counts_unflushed_and_removes_record() {
        let mut nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let kv = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "shut") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
            c.namespace = "fpm-test".into();
            c.component = "wor_ker".into();
            c.discovery_dir = Some(kv.path().to_path_buf());
            c.shutdown_timeout = Duration::from_millis(700);
            c.publisher_id = Some(867563565198844);
            c.discovery_refresh = Duration::from_millis(50);
        })
        .await;
        let record = relay.discovery_record().unwrap().to_path_buf();
        assert_eq!(
            record,
            kv.path().join("v1/event_channels/namespace%2Ffpm%2Dtest%2Fcomponent%2Fwor%5Fker%2Fendpoint%2Fgenerate%2Ftopic%2Fforward%2Dpass%2Dmetrics%2F3150b621fadfc")
        );
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            r#"{"type":"EventChannel","scope":{"kind":"endpoint","endpoint":{"namespace":"fpm-test","component":"wor_ker","name":"generate"}},"topic":"forward-pass-metrics","instance_id":867563565198844,"transport":{"kind":"Nats","config":{"subject_prefix":"namespace.fpm-test.component.wor_ker.endpoint.generate"}}}"#
        );
        // Kept alive: the mtime is refreshed, and a record someone deleted is written again.
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&record)
            .unwrap();
        f.set_modified(old).unwrap();
        drop(f);
        wait_for(Duration::from_secs(5), || {
            std::fs::metadata(&record).unwrap().modified().unwrap() > old + Duration::from_secs(30)
        })
        .await;
        std::fs::remove_file(&record).unwrap();
        wait_for(Duration::from_secs(5), || record.exists()).await;
        engine
            .warm_up_with(
                &relay,
                "w",
                "namespace.fpm-test.component.wor_ker.endpoint.generate.forward-pass-metrics",
            )
            .await;
        nats.stop();
        wait_for(Duration::from_secs(5), || !relay.stats().nats_connected).await;
        for _ in 0..10 {
            engine.send_next("w");
        }
        wait_for(Duration::from_secs(5), || relay.stats().buffered == 10).await;
        let t = std::time::Instant::now();
        stop.cancel();
        let s = tokio::time::timeout(Duration::from_secs(5), relay.wait())
            .await
            .expect("stops in time");
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(s.dropped_for(RelayDropReason::Shutdown), 10, "{s:?}");
        assert_eq!(s.received, s.published + s.dropped.total());
        assert!(!record.exists(), "record removed on shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_health_and_live_endpoints() {
        let mut nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "m") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        let addr = relay.metrics_addr().unwrap();
        engine.warm_up(&relay, "w").await;
        engine.send_frames(&[vec![1]]);
        wait_for(Duration::from_secs(5), || {
            relay.stats().invalid.total() == 1
        })
        .await;

        let (code, body) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        for line in [
            "fpm_relay_received_messages_total ",
            "fpm_relay_published_messages_total ",
            "fpm_relay_dropped_messages_total{reason=\"buffer_full\"} 0",
            "fpm_relay_dropped_messages_total{reason=\"shutdown\"} 0",
            "fpm_relay_invalid_messages_total{reason=\"frame_count\"} 1",
            "fpm_relay_invalid_messages_total{reason=\"unsupported_version\"} 0",
            "fpm_relay_counter_gap_messages_total 0",
            "fpm_relay_counter_resets_total 0",
            "fpm_relay_buffered_messages 0",
            "fpm_relay_buffered_bytes 0",
            "fpm_relay_nats_connected 1",
            "fpm_relay_nats_reconnects_total 0",
            "fpm_relay_publish_latency_seconds_count ",
            "fpm_relay_publish_latency_seconds_bucket{le=",
            "# EOF",
        ] {
            assert!(body.contains(line), "missing {line:?} in\n{body}");
        }
        let s = relay.stats();
        assert!(body.contains(&format!(
            "fpm_relay_received_messages_total {}\n",
            s.received
        )));
        assert_eq!(http_get(addr, "/health").await.0, 200);
        assert_eq!(http_get(addr, "/live").await.0, 200);
        assert_eq!(http_get(addr, "/nope").await.0, 404);
        // HEAD: the headers (with the body's length) and no body; other methods: 405;
        // garbage: 400; the query string is ignored.
        let head = http_raw(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length:"),
            "{head}"
        );
        assert!(head.ends_with("\r\n\r\n"), "no body after HEAD: {head}");
        let post = http_raw(
            addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let junk = http_raw(addr, b"\x16\x03\x01garbage\r\n\r\n").await;
        assert!(
            junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
            "{junk}"
        );
        assert_eq!(http_get(addr, "/live?x=1").await.0, 200);
        nats.stop();
        wait_for(Duration::from_secs(5), || !relay.stats().nats_connected).await;
        let (code, body) = http_get(addr, "/health").await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(http_get(addr, "/live").await.0, 200);
        assert!(http_get(addr, "/metrics")
            .await
            .1
            .contains("fpm_relay_nats_connected 0"));
        stop.cancel();
        within(10, relay.wait()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn component_scope_and_startup_errors() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "c") + ".0";
        let mut engine = Engine::bind(&ep);
        let subj = "namespace.ns.component.comp.forward-pass-metrics";
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
            c.scope = Scope::Component;
            c.namespace = "ns".into();
            c.component = "comp".into();
        })
        .await;
        assert_eq!(relay.subject(), subj);
        engine.warm_up_with(&relay, "w", subj).await;
        stop.cancel();
        within(10, relay.wait()).await;

        let token = tokio_util::sync::CancellationToken::new();
        let cfg = |f: &dyn Fn(&mut fpm_relay::RelayConfig)| {
            let mut c = fpm_relay::RelayConfig::new(vec![ep.clone()]);
            c.nats.url = nats.url();
            f(&mut c);
            c
        };
        let err = |c| {
            let token = token.clone();
            async move {
                within(10, fpm_relay::Relay::start(c, token))
                    .await
                    .expect_err("must fail")
                    .to_string()
            }
        };
        assert!(err(cfg(&|c| c.zmq_endpoints.clear()))
            .await
            .contains("--zmq-endpoint"));
        assert!(err(cfg(&|c| c.zmq_endpoints = vec!["bogus".into()]))
            .await
            .contains("\"bogus\""));
        assert!(
            err(cfg(&|c| c.zmq_endpoints.push(c.zmq_endpoints[0].clone())))
                .await
                .contains("more than once")
        );
        assert!(err(cfg(&|c| c.nats.url = "nats://a b".into()))
            .await
            .contains("NATS URL"));
        assert!(err(cfg(&|c| c.component = "a.b".into()))
            .await
            .contains("component"));
        assert!(err(cfg(
            &|c| c.nats.auth = fpm_relay::NatsAuth::CredsFile("/nonexistent.creds".into())
        ))
        .await
        .contains("creds"));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = taken.local_addr().unwrap();
        assert!(err(cfg(&|c| c.metrics_addr = Some(a)))
            .await
            .contains("--metrics-addr"));
    }
}

mod auth {
    //! Credentials and TLS against nats-servers configured for them.
    use std::time::Duration;

    use fpm_relay::{NatsAuth, Relay, RelayConfig};
    use tokio_util::sync::CancellationToken;

    use crate::common::*;

    async fn connects(port: u16, scheme: &str, f: impl FnOnce(&mut RelayConfig)) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let mut c = RelayConfig::new(vec![fpm_testkit::ipc_base(dir.path(), "a") + ".0"]);
        c.nats.url = format!("{scheme}://127.0.0.1:{port}");
        f(&mut c);
        let token = CancellationToken::new();
        let relay = match within(10, Relay::start(c, token.clone())).await {
            Ok(r) => r,
            // Refused credentials are a start-up error (see `wrong_credentials_fail_at_start`).
            Err(fpm_relay::Error::NatsRefused { .. }) => return false,
            Err(e) => panic!("{e}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        let mut ok = false;
        while std::time::Instant::now() < deadline && !ok {
            ok = relay.stats().nats_connected;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        token.cancel();
        within(10, relay.wait()).await;
        ok
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn user_password_and_token() {
        let s = CustomNats::start(&["--user", "relay", "--pass", "s3cret"]);
        let up = |user: &str, password: &str| NatsAuth::UserPassword {
            user: user.into(),
            password: password.into(),
        };
        assert!(connects(s.port, "nats", |c| c.nats.auth = up("relay", "s3cret")).await);
        assert!(!connects(s.port, "nats", |c| c.nats.auth = up("relay", "wrong")).await);
        let t = CustomNats::start(&["--auth", "tok123"]);
        assert!(
            connects(t.port, "nats", |c| c.nats.auth =
                NatsAuth::Token("tok123".into()))
            .await
        );
        assert!(!connects(t.port, "nats", |_| {}).await);
    }

    /// A server that is up and refuses the credentials fails the start, naming what to
    /// check (a server that is down is still waited for: `nats_down_at_start_is_waited_for`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_credentials_fail_at_start() {
        let s = CustomNats::start(&["--user", "relay", "--pass", "s3cret"]);
        let dir = tempfile::tempdir().unwrap();
        for auth in [
            NatsAuth::UserPassword {
                user: "relay".into(),
                password: "wrong".into(),
            },
            NatsAuth::None,
        ] {
            let mut c = RelayConfig::new(vec![fpm_testkit::ipc_base(dir.path(), "a") + ".0"]);
            c.nats.url = format!("nats://127.0.0.1:{}", s.port);
            c.nats.auth = auth;
            let Err(e) = within(10, Relay::start(c, CancellationToken::new())).await else {
                panic!("refused credentials must fail the start");
            };
            let text = e.to_string();
            assert!(
                text.contains("refused the credentials") && text.contains("--nats-user"),
                "{text}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls() {
        let certs = make_certs();
        let p = |f: &str| certs.path().join(f);
        let args = [
            "--tls".to_owned(),
            "--tlscert".to_owned(),
            p("server.pem").display().to_string(),
            "--tlskey".to_owned(),
            p("server.key").display().to_string(),
            "--tlsverify".to_owned(),
            "--tlscacert".to_owned(),
            p("ca.pem").display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = CustomNats::start(&args);
        assert!(
            connects(s.port, "tls", |c| {
                c.nats.tls_ca = Some(p("ca.pem"));
                c.nats.tls_client = Some((p("client.pem"), p("client.key")));
            })
            .await
        );
        assert!(
            !connects(s.port, "tls", |c| c.nats.tls_ca = Some(p("ca.pem"))).await,
            "no client certificate: refused"
        );
    }
}

mod dynamo {
    //! Drop-in checks against the real upstream packages (contract venv).
    use std::time::Duration;

    use fpm_testkit::NatsServer;

    use crate::common::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dynamo_subscriber_recv_mode_receives_everything() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let nats = NatsServer::start();
        let kv = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "recv") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |c| {
            c.discovery_dir = Some(kv.path().to_path_buf());
        })
        .await;
        engine.warm_up(&relay, "warm").await;
        let n = 200;
        let mut peer = Peer::spawn(
            &py,
            &["subscribe", "--count", &n.to_string(), "--timeout", "40"],
            &nats.url(),
            kv.path(),
        );
        peer.wait_for(Duration::from_secs(30), |v| v.get("ready").is_some());
        let mut sent = Vec::new();
        for i in 0..n {
            let p = fpm(&format!("worker-{}", i % 3), i % 2, i);
            engine.send(&p);
            sent.push(hex(&p));
        }
        let lines = peer.collect(n as usize, Duration::from_secs(30), |v| {
            v.get("hex").is_some()
        });
        let got: Vec<String> = lines
            .iter()
            .map(|v| v["hex"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            got, sent,
            "Dynamo's subscriber gets every payload, unchanged, in order"
        );
        let decoded = &lines[5]["decoded"];
        assert_eq!(decoded["worker_id"], "worker-2");
        assert_eq!(decoded["counter_id"], 5);
        assert!(relay.discovery_record().unwrap().exists());
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(s.received, s.published);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dynamo_subscriber_tracking_mode_tracks_each_rank() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let nats = NatsServer::start();
        let kv = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "track");
        let eps = fpm_relay::ipc_endpoints(&base, &[0, 1]);
        let mut engines = [Engine::bind(&eps[0]), Engine::bind(&eps[1])];
        let (relay, stop) = start(eps.clone(), &nats.url(), |c| {
            c.discovery_dir = Some(kv.path().to_path_buf());
        })
        .await;
        for e in engines.iter_mut() {
            e.warm_up(&relay, "warm").await;
        }
        let mut peer = Peer::spawn(
            &py,
            &[
                "track",
                "--count-workers",
                "2",
                "--until-counter",
                "30",
                "--timeout",
                "40",
            ],
            &nats.url(),
            kv.path(),
        );
        let wid = peer.wait_for(Duration::from_secs(30), |v| v.get("worker_id").is_some())
            ["worker_id"]
            .as_str()
            .unwrap()
            .to_owned();
        peer.wait_for(Duration::from_secs(30), |v| v.get("ready").is_some());
        for i in 0..=30 {
            for (rank, e) in engines.iter_mut().enumerate() {
                e.send(&fpm(&wid, rank as i64, i));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let summary = peer.wait_for(Duration::from_secs(30), |v| v.get("summary").is_some());
        assert_eq!(summary["summary"]["done"], true, "{summary}");
        let last = peer
            .seen()
            .iter()
            .rev()
            .find(|v| v.get("stats").is_some())
            .cloned()
            .expect("stats lines");
        let rows = last["stats"].as_array().unwrap();
        let keys: Vec<(String, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["worker_id"].as_str().unwrap().to_owned(),
                    r["dp_rank"].as_i64().unwrap(),
                    r["counter_id"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(keys, vec![(wid.clone(), 0, 30), (wid.clone(), 1, 30)]);
        assert_eq!(rows[1]["hex"].as_str().unwrap(), hex(&fpm(&wid, 1, 30)));
        stop.cancel();
        within(10, relay.wait()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sglang_publisher_through_relay_to_dynamo() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let nats = NatsServer::start();
        let kv = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = fpm_testkit::ipc_base(dir.path(), "sglang");
        let eps = fpm_relay::ipc_endpoints(&base, &[0]);
        // The relay starts first, as in a deployment; SGLang binds later.
        let (relay, stop) = start(eps.clone(), &nats.url(), |_| {}).await;
        let n = 50;
        let mut sub = Peer::spawn(
            &py,
            &["subscribe", "--count", &n.to_string(), "--timeout", "40"],
            &nats.url(),
            kv.path(),
        );
        sub.wait_for(Duration::from_secs(30), |v| v.get("ready").is_some());
        let mut publisher = Peer::spawn(
            &py,
            &[
                "sglang-publish",
                "--endpoint",
                &eps[0],
                "--worker-id",
                "sgl-0",
                "--dp-rank",
                "0",
                "--count",
                &n.to_string(),
                "--interval",
                "0.002",
            ],
            &nats.url(),
            kv.path(),
        );
        let lines = sub.collect(n as usize, Duration::from_secs(30), |v| {
            v.get("hex").is_some()
        });
        publisher.wait_for(Duration::from_secs(20), |v| v.get("summary").is_some());
        let counters: Vec<i64> = lines
            .iter()
            .map(|v| v["decoded"]["counter_id"].as_i64().unwrap())
            .collect();
        assert_eq!(
            counters,
            (0..n).collect::<Vec<_>>(),
            "SGLang counts from 0, none lost"
        );
        assert!(lines.iter().all(|v| v["decoded"]["worker_id"] == "sgl-0"));
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(
            (s.received, s.published, s.counter_gaps),
            (n as u64, n as u64, 0),
            "{s:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vllm_style_tcp_publishers_through_relay_to_dynamo() {
        let Some(py) = fpm_testkit::python() else {
            return;
        };
        let nats = NatsServer::start();
        let kv = tempfile::tempdir().unwrap();
        let port = free_port_pair();
        let eps = fpm_relay::tcp_endpoints("127.0.0.1", port, 2);
        let (relay, stop) = start(eps, &nats.url(), |_| {}).await;
        let n = 40;
        let mut sub = Peer::spawn(
            &py,
            &[
                "subscribe",
                "--count",
                &(2 * n).to_string(),
                "--timeout",
                "40",
            ],
            &nats.url(),
            kv.path(),
        );
        sub.wait_for(Duration::from_secs(30), |v| v.get("ready").is_some());
        let mut pubs: Vec<Peer> = (0..2)
            .map(|rank: i32| {
                Peer::spawn(
                    &py,
                    &[
                        "vllm-publish",
                        "--port-base",
                        &port.to_string(),
                        "--dp-rank",
                        &rank.to_string(),
                        "--worker-id",
                        "vllm-w",
                        "--count",
                        &n.to_string(),
                        "--interval",
                        "0.002",
                    ],
                    &nats.url(),
                    kv.path(),
                )
            })
            .collect();
        let lines = sub.collect(2 * n as usize, Duration::from_secs(30), |v| {
            v.get("hex").is_some()
        });
        for p in pubs.iter_mut() {
            p.wait_for(Duration::from_secs(20), |v| v.get("summary").is_some());
        }
        for rank in 0..2 {
            let counters: Vec<i64> = lines
                .iter()
                .filter(|v| v["decoded"]["dp_rank"] == rank)
                .map(|v| v["decoded"]["counter_id"].as_i64().unwrap())
                .collect();
            assert_eq!(
                counters,
                (1..=n).collect::<Vec<_>>(),
                "rank {rank}: Dynamo counts from 1"
            );
        }
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(
            (s.received, s.published, s.counter_gaps),
            (2 * n as u64, 2 * n as u64, 0),
            "{s:?}"
        );
    }
}

mod bench {
    //! A first throughput / latency figure (not a regression gate):
    //! `cargo test -p fpm-relay --release --test tests -- --ignored --nocapture bench`
    use std::time::{Duration, Instant};

    use fpm_testkit::NatsServer;

    use crate::common::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement, run by hand"]
    async fn bench_relay_throughput_and_latency() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "bench") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let before = relay.stats().published as usize;
        let _ = collect(&mut sub, before, Duration::from_secs(5)).await;
        let n = 100_000usize;
        let payload = fpm("worker-bench-0", 0, 12345);
        let t = Instant::now();
        for _ in 0..n {
            engine.send(&payload);
        }
        let send = t.elapsed();
        let got = collect(&mut sub, n, Duration::from_secs(60)).await;
        let total = t.elapsed();
        let text = relay.metrics_text();
        stop.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(got.len(), n, "{s:?}");
        println!(
            "relay bench: {n} x {} B payloads: sender {:.0} msg/s, end-to-end {:.0} msg/s ({:.2} s); received {} published {} dropped {}",
            payload.len(),
            n as f64 / send.as_secs_f64(),
            n as f64 / total.as_secs_f64(),
            total.as_secs_f64(),
            s.received,
            s.published,
            s.dropped.total()
        );
        // Paced run: added latency (ZeroMQ receive -> NATS publish handed to the client) and
        // ZeroMQ send -> NATS subscriber receive, at 1 kHz.
        let _ = text;
        println!("{}", latency_run().await);
    }

    async fn latency_run() -> String {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "lat") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, stop) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let before = relay.stats().published as usize;
        let _ = collect(&mut sub, before, Duration::from_secs(5)).await;
        let mut e2e = Vec::new();
        for i in 0..2000 {
            let t = Instant::now();
            engine.send(&fpm("w", 0, i));
            let m = collect(&mut sub, 1, Duration::from_secs(5)).await;
            assert_eq!(m.len(), 1);
            e2e.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        e2e.sort();
        let text = relay.metrics_text();
        stop.cancel();
        within(10, relay.wait()).await;
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("fpm_relay_publish_latency_seconds_sum "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        let count: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("fpm_relay_publish_latency_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        format!(
            "relay latency (2000 msgs, paced): ZMQ send -> NATS subscriber p50 {:?} p99 {:?} max {:?}; in-relay receive->publish mean {:.1} us",
            e2e[e2e.len() / 2],
            e2e[e2e.len() * 99 / 100],
            e2e[e2e.len() - 1],
            sum / count * 1e6
        )
    }
}

mod trust {
    //! Issue 7: only payloads that decode are forwarded, every loss is counted (by input),
    //! and `/health` covers every stage.
    use std::time::Duration;

    use fpm_relay::InvalidReason;
    use fpm_testkit::NatsServer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::common::*;

    /// A fake engine speaking ZMTP by hand: greets like a libzmq PUB, then sends `attack`.
    /// Each accepted connection gets the next attack; the last one is repeated.
    async fn hostile_pub(listener: tokio::net::UnixListener, attacks: Vec<Vec<u8>>) {
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[9] = 0x7f;
        greeting[10] = 3;
        greeting[12..16].copy_from_slice(b"NULL");
        let mut ready = vec![0x04, 25, 5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&3u32.to_be_bytes());
        ready.extend_from_slice(b"PUB");
        for i in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let attack = attacks[i.min(attacks.len() - 1)].clone();
            let (greeting, ready) = (greeting, ready.clone());
            tokio::spawn(async move {
                let mut peer = [0u8; 64];
                s.write_all(&greeting).await?;
                s.read_exact(&mut peer).await?;
                s.write_all(&ready).await?;
                // The relay's READY (27 bytes) and subscription (3 bytes).
                let mut theirs = [0u8; 30];
                s.read_exact(&mut theirs).await?;
                assert_eq!(&theirs[3..8], b"READY");
                assert_eq!(&theirs[27..], &[0, 1, 1], "subscribes to everything");
                s.write_all(&attack).await?;
                // Hold the connection until the relay drops it.
                let mut sink = [0u8; 64];
                while s.read(&mut sink).await? > 0 {}
                std::io::Result::Ok(())
            });
        }
    }

    fn frame(more: bool, body: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(more) | 0x02];
        f.extend_from_slice(&(body.len() as u64).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    /// A peer announcing a frame of 2^62 bytes, one sending an endless multipart message, and
    /// one breaking the framing: each is refused from the headers (nothing allocated for
    /// the announced size: the test process would abort), counted as one message by reason,
    /// and the relay connects again and relays what comes next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_zeromq_peers_are_refused_from_the_headers_and_counted() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "zmtp") + ".0";
        let listener = tokio::net::UnixListener::bind(ep.strip_prefix("ipc://").unwrap()).unwrap();
        let mut huge = vec![0x02];
        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
        let endless: Vec<u8> = std::iter::repeat_n([0x01u8, 0x00], 1 << 20)
            .flatten()
            .collect();
        let reserved_bits = vec![0x40, 0];
        let good = [
            frame(true, b""),
            frame(true, &0u64.to_be_bytes()),
            frame(false, &fpm("w", 0, 0)),
        ]
        .concat();
        tokio::spawn(hostile_pub(
            listener,
            vec![huge, endless, reserved_bits, good],
        ));
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, token) = start(vec![ep], &nats.url(), |c| c.max_payload = 4096).await;
        wait_for(Duration::from_secs(10), || relay.stats().published >= 1).await;
        let got = collect(&mut sub, 1, Duration::from_secs(5)).await;
        assert_eq!(got[0].payload, fpm("w", 0, 0));
        assert!(relay.healthy());
        let s = shut_down(relay, &token).await;
        assert_eq!(s.invalid_for(InvalidReason::OversizedFrame), 2, "{s:?}");
        assert_eq!(s.invalid_for(InvalidReason::Protocol), 1, "{s:?}");
        assert_eq!(s.received, s.invalid.total() + s.published, "{s:?}");
    }

    /// An endpoint where something other than a ZeroMQ PUB listens (an HTTP-ish server, a
    /// SUB): the relay keeps retrying without crashing, and relays once a real engine binds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn non_zeromq_and_wrong_socket_peers_are_retried() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "notzmq") + ".0";
        let path = ep.strip_prefix("ipc://").unwrap().to_owned();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let http = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                n += 1;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                if n == 3 {
                    return n;
                }
            }
            n
        });
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        assert_eq!(within(10, http).await.unwrap(), 3, "retried");
        std::fs::remove_file(&path).unwrap();
        // A ZeroMQ greeting, then broken framing where READY should be: a refused handshake
        // (not a message), retried with back-off rather than in a tight loop.
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let bad_ready = tokio::spawn(async move {
            let mut greeting = [0u8; 64];
            greeting[0] = 0xff;
            greeting[9] = 0x7f;
            greeting[10] = 3;
            greeting[12..16].copy_from_slice(b"NULL");
            let started = std::time::Instant::now();
            let mut n = 0u32;
            while started.elapsed() < Duration::from_millis(1500) {
                let Ok(Ok((mut s, _))) =
                    tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
                else {
                    continue;
                };
                n += 1;
                let _ = s.write_all(&greeting).await;
                let _ = s.write_all(&[0x40, 0]).await;
                let mut sink = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut sink)).await;
            }
            n
        });
        let attempts = within(10, bad_ready).await.unwrap();
        assert!(
            (1..=8).contains(&attempts),
            "{attempts} attempts in 1.5 s: no back-off?"
        );
        assert_eq!(
            relay.stats().invalid.total(),
            0,
            "a handshake is not a message"
        );
        std::fs::remove_file(&path).unwrap();
        // A SUB bound where a PUB should be: libzmq's own handshake, wrong socket type.
        let ctx = zmq::Context::new();
        let wrong = ctx.socket(zmq::SUB).unwrap();
        wrong.bind(&ep).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(wrong);
        let _ = std::fs::remove_file(&path);
        let mut engine = Engine::bind(&ep);
        engine.warm_up(&relay, "w").await;
        let s = shut_down(relay, &token).await;
        assert!(s.published >= 1, "{s:?}");
        assert_eq!(
            s.invalid.total(),
            0,
            "handshake failures are not messages: {s:?}"
        );
    }

    /// libzmq engines with ZMTP heartbeats on drop a peer that does not answer PING within
    /// the timeout: the relay answers, so a stream sent across many heartbeat periods
    /// arrives whole, with no gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn libzmq_heartbeats_are_answered() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "hb") + ".0";
        let mut engine = Engine::bind_with(&ep, |s| {
            s.set_heartbeat_ivl(20).unwrap();
            s.set_heartbeat_timeout(100).unwrap();
        });
        let (relay, token) = start(vec![ep], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let before = relay.stats();
        for _ in 0..60 {
            engine.send_next("w");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().published == before.published + 60
        })
        .await;
        let s = shut_down(relay, &token).await;
        assert_eq!(
            s.counter_gaps, 0,
            "the engine never dropped the relay: {s:?}"
        );
        assert_eq!(s.counter_resets, 0, "{s:?}");
    }

    /// Where the key (`version` … `counter_id`) of an encoded message ends.
    fn key_end(payload: &[u8]) -> usize {
        payload
            .windows(b"wall_time".len())
            .position(|w| w == b"wall_time")
            .expect("a wall_time key")
            - 1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn payloads_broken_after_the_key_are_counted_never_published() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "broken") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let before = relay.stats().published as usize;

        // Intact up to counter_id, broken after it: every truncation, trailing bytes, and an
        // invalid marker where wall_time's float marker is. The key still peeks for each.
        let whole = fpm("w", 0, 1);
        let end = key_end(&whole);
        let mut broken: Vec<Vec<u8>> = (end..whole.len()).map(|n| whole[..n].to_vec()).collect();
        let mut p = whole.clone();
        p.extend_from_slice(&[0xc0, 0xc0]);
        broken.push(p);
        let mut p = whole.clone();
        let marker = end + 1 + "wall_time".len();
        assert_eq!(p[marker], 0xcb);
        p[marker] = 0xc1;
        broken.push(p);
        for b in &broken {
            assert!(fpm_schema::peek_key(b).is_ok());
        }
        let mut good = Vec::new();
        for (i, b) in broken.iter().enumerate() {
            engine.send_frames(&[vec![], 7u64.to_be_bytes().to_vec(), b.clone()]);
            let p = fpm("w", 0, engine.counter as i64 + i as i64);
            engine.send(&p);
            good.push(p);
        }
        let got = collect(&mut sub, before + good.len(), Duration::from_secs(10)).await;
        let got: Vec<_> = got.into_iter().skip(before).map(|m| m.payload).collect();
        assert!(got == good, "only the good ones, unchanged, in order");
        assert!(
            collect(&mut sub, 1, Duration::from_millis(300))
                .await
                .is_empty(),
            "nothing else is published"
        );
        let s = shut_down(relay, &token).await;
        assert_eq!(
            s.invalid_for(InvalidReason::Undecodable),
            broken.len() as u64,
            "{s:?}"
        );
        assert_eq!(s.invalid.total(), broken.len() as u64, "{s:?}");
        assert_eq!(s.received, s.invalid.total() + s.published, "{s:?}");
    }

    /// Hostile but valid payloads on the engine socket (50,000-deep nesting under an unknown
    /// key, a 60 KB worker id, NaN and infinities) are relayed unchanged; garbage and a wrong
    /// version interleaved with them are counted by reason; good traffic all arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_payloads_on_the_socket() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "hostile") + ".0";
        let mut engine = Engine::bind(&ep);
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let before = relay.stats().published as usize;
        let mut nested = vec![0x82u8, 0xa7];
        nested.extend_from_slice(b"version");
        nested.push(1);
        nested.extend_from_slice(&[0xa3, b'z', b'z', b'z']);
        nested.extend(std::iter::repeat_n(0x91, 50_000));
        nested.push(0xc0);
        let mut m = fpm_schema::ForwardPassMetrics::heartbeat("w".repeat(60_000), 0);
        m.wall_time = f64::NAN;
        m.scheduled_requests.var_prefill_length = f64::INFINITY;
        m.queued_requests.var_decode_kv_tokens = f64::NEG_INFINITY;
        let special = fpm_schema::encode(&m);
        let mut v2 = fpm("w", 0, 5);
        v2[1 + 1 + 7] = 2;
        let valid = [nested, special];
        let invalid = [
            (b"\xc1\xc1garbage".to_vec(), InvalidReason::Undecodable),
            (v2, InvalidReason::UnsupportedVersion),
        ];
        let mut good = Vec::new();
        for round in 0..10 {
            for (b, _) in &invalid {
                engine.send_frames(&[vec![], 7u64.to_be_bytes().to_vec(), b.clone()]);
            }
            let v = valid[round % 2].clone();
            engine.send_frames(&[vec![], 7u64.to_be_bytes().to_vec(), v.clone()]);
            good.push(v);
        }
        let got = collect(&mut sub, before + good.len(), Duration::from_secs(10)).await;
        let got: Vec<_> = got.into_iter().skip(before).map(|m| m.payload).collect();
        assert!(got == good, "the valid ones, unchanged, in order");
        let s = shut_down(relay, &token).await;
        for (_, reason) in &invalid {
            assert_eq!(s.invalid_for(*reason), 10, "{reason:?}: {s:?}");
        }
        assert_eq!(s.received, s.invalid.total() + s.published, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loss_before_the_first_message_is_counted_at_start_and_after_a_restart() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "early") + ".0";
        // The engine runs before the relay: what it sends meanwhile is lost.
        let mut engine = Engine::bind(&ep);
        for _ in 0..50 {
            engine.send_next("w");
        }
        let mut sub = subscribe(&nats.url(), SUBJECT).await;
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |_| {}).await;
        engine.warm_up(&relay, "w").await;
        let s = relay.stats();
        let got = collect(&mut sub, s.published as usize, Duration::from_secs(5)).await;
        let counters: Vec<i64> = got
            .iter()
            .map(|g| fpm_schema::peek_key(&g.payload).unwrap().counter_id)
            .collect();
        let first = counters[0] as u64;
        assert!(first >= 50, "{counters:?}");
        assert_eq!(s.missed_before_start, first, "{s:?}");
        assert_eq!(s.counter_gaps, 0, "missed before start is not a gap: {s:?}");

        // The engine restarts; its first three messages never reach the relay.
        drop(engine);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut engine = Engine::bind(&ep);
        engine.skip(3);
        engine.warm_up(&relay, "w").await;
        let s2 = relay.stats();
        let got = collect(
            &mut sub,
            (s2.published - s.published) as usize,
            Duration::from_secs(5),
        )
        .await;
        let after = fpm_schema::peek_key(&got[0].payload).unwrap().counter_id as u64;
        assert!(after >= 3, "{after}");
        assert_eq!(s2.counter_resets, 1, "{s2:?}");
        assert_eq!(s2.missed_before_start, first + after, "{s2:?}");
        let text = relay.metrics_text();
        assert_eq!(
            sample(&text, "fpm_relay_missed_before_start_total"),
            Some((first + after) as f64)
        );
        let s = shut_down(relay, &token).await;
        assert_eq!(s.counter_gaps, 0, "{s:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_per_input_with_two_workers_and_a_restart() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let eps = fpm_relay::ipc_endpoints(&fpm_testkit::ipc_base(dir.path(), "lab"), &[0, 1]);
        let mut a = Engine::bind(&eps[0]);
        let mut b = Engine::bind(&eps[1]);
        let (relay, token) = start(eps.clone(), &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        let addr = relay.metrics_addr().unwrap();
        let warm = |e: &mut Engine, worker: &str, rank: i64| {
            let p = fpm(worker, rank, e.counter as i64);
            e.send(&p);
        };
        // Warm up both (sends until the SUB has joined).
        for (e, w, r) in [(&mut a, "wa", 0), (&mut b, "wb", 1)] {
            let start_received = relay.stats().received;
            wait_for(Duration::from_secs(10), || {
                warm(e, w, r);
                std::thread::sleep(Duration::from_millis(10));
                relay.stats().received > start_received
            })
            .await;
        }
        for _ in 0..20 {
            warm(&mut a, "wa", 0);
        }
        a.skip(5);
        for _ in 0..10 {
            warm(&mut a, "wa", 0);
            warm(&mut b, "wb", 1);
        }
        // b's engine restarts, counting from 0 (its first two messages lost).
        drop(b);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut b = Engine::bind(&eps[1]);
        b.skip(2);
        // Let the SUB reconnect first (libzmq retries every 100-500 ms), so the restarted
        // stream is seen from a counter below the old one.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let resets = relay.stats().counter_resets;
        wait_for(Duration::from_secs(10), || {
            warm(&mut b, "wb", 1);
            std::thread::sleep(Duration::from_millis(10));
            relay.stats().counter_resets > resets
        })
        .await;
        wait_for(Duration::from_secs(5), || {
            let s = relay.stats();
            s.published == s.received
        })
        .await;
        let s = relay.stats();
        let (code, text) = http_get(addr, "/metrics").await;
        assert_eq!(code, 200);
        let get = |family: &str, ep: &str, w: &str, r: &str| {
            sample(
                &text,
                &format!("{family}{{endpoint=\"{ep}\",worker_id=\"{w}\",dp_rank=\"{r}\"}}"),
            )
            .unwrap_or_else(|| panic!("{family} {ep} {w} {r} in\n{text}"))
        };
        let recv = "fpm_relay_input_received_messages_total";
        let (ra, rb) = (get(recv, &eps[0], "wa", "0"), get(recv, &eps[1], "wb", "1"));
        assert_eq!(ra + rb, s.received as f64, "labelled received add up");
        assert!(ra >= 30.0 && rb >= 11.0, "{ra} {rb}");
        let gaps = "fpm_relay_input_counter_gap_messages_total";
        assert_eq!(get(gaps, &eps[0], "wa", "0"), 5.0);
        assert_eq!(get(gaps, &eps[1], "wb", "1"), 0.0);
        let resets = "fpm_relay_input_counter_resets_total";
        assert_eq!(get(resets, &eps[0], "wa", "0"), 0.0);
        assert_eq!(get(resets, &eps[1], "wb", "1"), 1.0);
        let missed = "fpm_relay_input_missed_before_start_total";
        let (ma, mb) = (
            get(missed, &eps[0], "wa", "0"),
            get(missed, &eps[1], "wb", "1"),
        );
        assert!(mb >= 2.0, "the restart's lost messages: {mb}");
        assert_eq!(ma + mb, s.missed_before_start as f64);
        // Totals are still there and agree.
        assert_eq!(
            sample(&text, "fpm_relay_counter_gap_messages_total"),
            Some(5.0)
        );
        assert_eq!(sample(&text, "fpm_relay_counter_resets_total"), Some(1.0));
        assert_eq!(
            sample(&text, "fpm_relay_received_messages_total"),
            Some(s.received as f64)
        );
        for ep in &eps {
            let age = sample(
                &text,
                &format!("fpm_relay_input_last_message_age_seconds{{endpoint=\"{ep}\"}}"),
            )
            .unwrap();
            assert!((0.0..5.0).contains(&age), "{age}");
        }
        assert_eq!(
            sample(
                &text,
                &format!(
                    "fpm_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
        assert!(sample(&text, "process_cpu_seconds_total").unwrap() >= 0.0);
        assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
        assert_eq!(sample(&text, "fpm_relay_label_overflow_total"), Some(0.0));
        assert!(text.ends_with("# EOF\n"));
        shut_down(relay, &token).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn label_sets_are_capped_with_overflow_counted() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "cap") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |c| c.max_label_sets = 2).await;
        engine.warm_up(&relay, "w0").await;
        let before = relay.stats().received;
        for round in 0..3 {
            for w in ["w0", "w1", "w2", "w3", "w4"] {
                let p = fpm(w, 0, engine.counter as i64);
                engine.send(&p);
                let _ = round;
            }
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().published == before + 15
        })
        .await;
        let text = relay.metrics_text();
        let s = relay.stats();
        let label = |w: &str, r: &str| {
            sample(
                &text,
                &format!("fpm_relay_input_received_messages_total{{endpoint=\"{ep}\",worker_id=\"{w}\",dp_rank=\"{r}\"}}"),
            )
        };
        assert_eq!(label("w1", "0"), Some(3.0));
        assert_eq!(label("w2", "0"), None, "over the cap: no own series");
        assert_eq!(label("other", "other"), Some(9.0), "w2..w4 under other");
        assert_eq!(s.label_overflow, 9);
        assert_eq!(sample(&text, "fpm_relay_label_overflow_total"), Some(9.0));
        let w0 = label("w0", "0").unwrap();
        assert_eq!(w0 + 3.0 + 9.0, s.received as f64, "still adds up");
        shut_down(relay, &token).await;
    }

    /// A publisher that dies: `/health` turns 503 and the owner is told, reading goes on, and
    /// at shutdown what waited in the buffer is counted, so every message is accounted for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_publisher_fails_health_and_everything_is_counted() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "deadpub") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.fault_panic_publisher_after = Some(5);
        })
        .await;
        let addr = relay.metrics_addr().unwrap();
        send_until_failed(&relay, &mut engine).await;
        assert!(!relay.healthy());
        let (code, body) = http_get(addr, "/health").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("publisher panicked"), "{body}");
        // Reading goes on into the buffer.
        let before = relay.stats().received;
        for _ in 0..20 {
            engine.send_next("w");
        }
        wait_for(Duration::from_secs(5), || {
            relay.stats().received >= before + 20
        })
        .await;
        token.cancel();
        let s = within(10, relay.wait()).await;
        assert_eq!(s.published, 5, "{s:?}");
        assert!(
            s.dropped_for(fpm_relay::RelayDropReason::Shutdown) >= 20,
            "{s:?}"
        );
        assert_eq!(s.buffered, 0, "{s:?}");
        assert_eq!(
            s.received,
            s.invalid.total() + s.published + s.dropped.total(),
            "{s:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_reader_fails_health_and_the_relay() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "dead") + ".0";
        let mut engine = Engine::bind(&ep);
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.fault_panic_reader_after = Some(5);
        })
        .await;
        let addr = relay.metrics_addr().unwrap();
        let (code, body) = http_get(addr, "/health").await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("zmq_reader: ok") && body.contains("nats: connected"),
            "{body}"
        );
        assert!(relay.healthy());
        send_until_failed(&relay, &mut engine).await;
        assert!(!relay.healthy());
        let (code, body) = http_get(addr, "/health").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("zmq_reader: dead (fault injection"), "{body}");
        assert!(body.contains("nats: connected"), "{body}");
        token.cancel();
        let err = within(10, relay.finish())
            .await
            .expect_err("the reader died");
        assert!(matches!(err, fpm_relay::Error::ReaderDied(_)), "{err}");
        assert!(err.to_string().contains("ZeroMQ reader died"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_connections_are_capped_and_idle_ones_time_out() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "http") + ".0";
        let (relay, token) = start(vec![ep], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.http_max_connections = 4;
            c.http_read_timeout = Duration::from_millis(800);
        })
        .await;
        let addr = relay.metrics_addr().unwrap();
        // Four idle connections take every slot.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(
                within(5, tokio::net::TcpStream::connect(addr))
                    .await
                    .unwrap(),
            );
        }
        // Once the server has accepted all four (on a loaded machine that can take a moment),
        // more are answered 503 at once and closed, and counted.
        let mut busy = 0;
        for _ in 0..250 {
            let (code, body) = http_get(addr, "/health").await;
            if code == 503 {
                assert_eq!(body, "busy\n");
                busy += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(busy, 1, "the four idle connections never filled the slots");
        for _ in 0..5 {
            let (code, body) = http_get(addr, "/health").await;
            assert_eq!((code, body.as_str()), (503, "busy\n"));
        }
        assert_eq!(relay.stats().http_rejected, 6);
        // An idle connection is closed by the server after the read timeout.
        let t = std::time::Instant::now();
        let mut buf = Vec::new();
        within(5, idle[0].read_to_end(&mut buf)).await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Once the idle clients are gone, /health answers again.
        drop(idle);
        wait_for(Duration::from_secs(5), || true).await;
        let mut code = 0;
        for _ in 0..50 {
            code = http_get(addr, "/health").await.0;
            if code == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(code, 200);
        // A client that does send its request is served normally.
        let mut s = within(5, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap();
        within(5, s.write_all(b"GET /live HTTP/1.1\r\n\r\n"))
            .await
            .unwrap();
        let mut buf = Vec::new();
        within(5, s.read_to_end(&mut buf)).await.unwrap();
        assert!(
            buf.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
        let s = shut_down(relay, &token).await;
        assert_eq!(s.http_rejected, 6, "{s:?}");
    }
}

mod engine_metrics {
    //! Issue 14: the relay's `/metrics` carries the engine's own Prometheus families.
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use fpm_testkit::{NatsServer, Prometheus};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::common::*;

    /// `interop/engine_metrics.py`: prometheus_client in multiprocess mode, as SGLang runs it.
    struct PyEngine {
        child: Child,
        url: String,
    }

    impl PyEngine {
        fn start() -> Option<Self> {
            let py = fpm_testkit::python()?;
            let mut child = Command::new(py)
                .arg(fpm_testkit::repo_root().join("interop/engine_metrics.py"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn python");
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).expect("port line");
            let url = format!("http://127.0.0.1:{}/metrics", v["port"]);
            Some(PyEngine { child, url })
        }
    }

    impl Drop for PyEngine {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A server that accepts and never answers.
    async fn slow_engine() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", l.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        url
    }

    /// A server that answers 200 with `body` (and `ctype`) to every request.
    async fn fixed_engine(ctype: &'static str, body: Vec<u8>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        url
    }

    fn errors(text: &str, url: &str, reason: &str) -> f64 {
        sample(
            text,
            &format!("fpm_relay_engine_scrape_errors_total{{url=\"{url}\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(-1.0)
    }

    /// Python prometheus_client (multiprocess, `sglang:` families and one unrelated family),
    /// an engine that is down, one that never answers, one that answers garbage and one that
    /// answers OpenMetrics regardless: one scrape of the relay returns its own metrics and
    /// the engines' `sglang:` families, within the timeout, valid for a real Prometheus,
    /// which then answers PromQL for both; every failure is counted by URL and reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_families_pass_through_to_a_real_prometheus() {
        let Some(engine) = PyEngine::start() else {
            return;
        };
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "pt") + ".0";
        let down = format!("http://127.0.0.1:{}/metrics", free_port());
        let slow = slow_engine().await;
        let garbage = fixed_engine(
            "text/plain",
            b"<html>\x00\x01 not metrics {{{</html>".to_vec(),
        )
        .await;
        let om = fixed_engine(
            "application/openmetrics-text; version=1.0.0",
            b"# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"v\"} 2.0\n# HELP vllm:generation_tokens Tokens.\n# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{model_name=\"v\"} 7.0\nvllm:generation_tokens_created{model_name=\"v\"} 1.7e9\n# EOF\n".to_vec(),
        )
        .await;
        let urls = vec![
            engine.url.clone(),
            down.clone(),
            slow.clone(),
            garbage.clone(),
            om.clone(),
        ];
        let mut engine_zmq = Engine::bind(&ep);
        let (relay, token) = start(vec![ep], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.engine_metrics = urls.clone();
            c.engine_metrics_timeout = Duration::from_millis(300);
        })
        .await;
        engine_zmq.warm_up(&relay, "w").await;
        let addr = relay.metrics_addr().unwrap();

        let t = Instant::now();
        let text = http_raw(
            addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
        )
        .await;
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "a slow engine delayed the scrape by {took:?}"
        );
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("text/plain; version=0.0.4"), "{text}");
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        // The relay's own, in the text format.
        assert!(
            body.contains("# TYPE fpm_relay_received_messages_total counter"),
            "{body}"
        );
        assert!(sample(body, "fpm_relay_received_messages_total").unwrap() >= 1.0);
        assert!(!body.contains("# EOF"), "{body}");
        // The engines' families, unchanged; the unrelated one filtered out.
        assert!(
            body.contains("# TYPE sglang:num_running_reqs gauge"),
            "{body}"
        );
        assert_eq!(
            sample(body, "sglang:num_running_reqs{model_name=\"m\"}"),
            Some(3.0)
        );
        assert!(sample(body, "sglang:prompt_tokens_total{model_name=\"m\"}").unwrap() >= 42.0);
        assert!(body.contains(
            "sglang:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"m\"} 1.0"
        ));
        assert!(!body.contains("unrelated_requests"), "{body}");
        // The OpenMetrics engine, rewritten to the text format.
        assert!(
            body.contains("# TYPE vllm:generation_tokens_total counter"),
            "{body}"
        );
        assert_eq!(
            sample(body, "vllm:generation_tokens_total{model_name=\"v\"}"),
            Some(7.0)
        );
        assert!(!body.contains("_created"), "{body}");
        // Every family once.
        for l in body.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert_eq!(body.matches(&format!("{l}\n")).count(), 1, "{l}");
        }
        // Failures by URL and reason; the engine that works has none.
        let after = http_get(addr, "/metrics").await.1;
        assert!(errors(&after, &down, "connect") >= 1.0, "{after}");
        assert!(errors(&after, &slow, "timeout") >= 1.0, "{after}");
        assert!(errors(&after, &garbage, "malformed") >= 1.0, "{after}");
        for r in [
            "connect",
            "timeout",
            "status",
            "too_large",
            "malformed",
            "duplicate",
        ] {
            assert_eq!(errors(&after, &engine.url, r), 0.0, "{r}: {after}");
        }
        let slow_took = sample(
            &after,
            &format!("fpm_relay_engine_scrape_duration_seconds{{url=\"{slow}\"}}"),
        )
        .unwrap();
        assert!((0.25..1.5).contains(&slow_took), "{slow_took}");

        // A real Prometheus scraping the relay: the engine's series and the relay's.
        if let Some(prom) = Prometheus::start(&addr.to_string()) {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let a = prom.query("sglang:prompt_tokens_total");
                let b = prom.query("fpm_relay_received_messages_total");
                let c = prom.query("vllm:num_requests_running");
                if [&a, &b, &c].iter().all(|r| r.contains("\"value\"")) {
                    assert!(a.contains("\"model_name\":\"m\""), "{a}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no series in Prometheus: {a} {b} {c}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let up = prom.query("up");
            assert!(up.contains("\"1\"]"), "the scrape failed: {up}");
            let none = prom.query("unrelated_requests_total");
            assert!(!none.contains("\"value\""), "{none}");
        }
        let s = shut_down(relay, &token).await;
        assert_eq!(s.received, s.published, "{s:?}");
    }

    /// An engine timeout longer than the HTTP read and write budget: the scrape still gets an
    /// answer (the relay's own metrics) once the timeout passes, rather than a closed
    /// connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_engine_timeout_still_answers() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "pt3") + ".0";
        let slow = slow_engine().await;
        let (relay, token) = start(vec![ep], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
            c.http_read_timeout = Duration::from_millis(500);
            c.engine_metrics = vec![slow.clone()];
            c.engine_metrics_timeout = Duration::from_secs(6);
        })
        .await;
        let text = http_raw_within(
            relay.metrics_addr().unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(15),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("fpm_relay_received_messages_total"), "{text}");
        let after = relay.metrics_text();
        assert_eq!(errors(&after, &slow, "timeout"), 1.0, "{after}");
        shut_down(relay, &token).await;
    }

    /// Without engines, `/metrics` stays OpenMetrics; a bad engine URL is a start-up error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_engines_openmetrics_and_bad_urls_fail_at_start() {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let ep = fpm_testkit::ipc_base(dir.path(), "pt2") + ".0";
        let (relay, token) = start(vec![ep.clone()], &nats.url(), |c| {
            c.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        })
        .await;
        let text = http_raw(
            relay.metrics_addr().unwrap(),
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        assert!(text.contains("application/openmetrics-text"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        shut_down(relay, &token).await;
        for bad in ["https://127.0.0.1:1/metrics", "127.0.0.1:30000/metrics"] {
            let mut c = fpm_relay::RelayConfig::new(vec![ep.clone()]);
            c.nats.url = nats.url();
            c.engine_metrics = vec![bad.into()];
            let e = fpm_relay::Relay::start(c, tokio_util::sync::CancellationToken::new())
                .await
                .unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        // Limits that cannot work are refused at start, each saying why.
        let refused = |tweak: &dyn Fn(&mut fpm_relay::RelayConfig)| {
            let mut c = fpm_relay::RelayConfig::new(vec![ep.clone()]);
            c.nats.url = nats.url();
            tweak(&mut c);
            async move {
                fpm_relay::Relay::start(c, tokio_util::sync::CancellationToken::new())
                    .await
                    .unwrap_err()
                    .to_string()
            }
        };
        let e = refused(&|c| c.max_payload = 0).await;
        assert!(e.contains("payload limit"), "{e}");
        let e = refused(&|c| c.max_payload = usize::MAX).await;
        assert!(e.contains("payload limit"), "{e}");
        let e = refused(&|c| {
            c.max_payload = 1 << 20;
            c.buffer.max_bytes = 1000;
        })
        .await;
        assert!(e.contains("buffer's byte limit"), "{e}");
        let e = refused(&|c| {
            c.engine_metrics = vec!["http://127.0.0.1:1/metrics".into()];
            c.engine_metrics_prefixes.clear();
        })
        .await;
        assert!(e.contains("prefix"), "{e}");
    }
}
