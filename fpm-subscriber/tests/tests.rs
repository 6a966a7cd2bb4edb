//! The subscriber against real parts: our emitter and relay, a private nats-server, and
//! Dynamo 1.6.1's own `FpmEventRelay` (from the contract venv).

use std::time::{Duration, Instant};

use fpm_emitter::{ClockChoice, Emitter, EmitterConfig, Endpoint, StreamHandle};
use fpm_relay::{Relay, RelayConfig};
use fpm_schema::{Envelope, QueuedRequestMetrics, ScheduledRequestMetrics};
use fpm_subscriber::{ScopeFilter, SubjectFilter, Subscriber, SubscriberConfig, TrackerConfig};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

fn emitter(base: &str, worker: &str, rank: u32) -> Emitter {
    let cfg = EmitterConfig::new(Endpoint::IpcBase(base.into()), worker, rank)
        .with_clock(ClockChoice::Cpu)
        .with_heartbeat_interval(Duration::from_millis(100));
    Emitter::start(cfg).unwrap()
}

fn iterate(e: &mut Emitter, n: usize) {
    for i in 0..n {
        e.begin_iteration();
        e.time_segment(StreamHandle::DEFAULT, || {
            std::thread::sleep(Duration::from_micros(50))
        });
        let s = ScheduledRequestMetrics {
            num_decode_requests: (i % 7 + 1) as i64,
            sum_decode_kv_tokens: 1000 + i as i64,
            ..Default::default()
        };
        e.submit(s, QueuedRequestMetrics::default());
    }
}

async fn take(sub: &mut Subscriber, n: usize) -> Vec<fpm_subscriber::Sample> {
    let mut v = Vec::new();
    while v.len() < n {
        match timeout(T, sub.next()).await {
            Ok(Some(s)) => v.push(s),
            Ok(None) => panic!("subscription ended after {} samples", v.len()),
            Err(_) => panic!("timed out after {} of {n} samples", v.len()),
        }
    }
    v
}

fn filter(ns: &str) -> SubjectFilter {
    SubjectFilter::parse(ns, "*", "*", ScopeFilter::Any).unwrap()
}

/// Two ranks through our relay: every iteration arrives, counters contiguous from 0 per
/// stream, envelope sequence gap-free; a rank's restart is seen as a restart; garbage on the
/// subject is counted by reason and the subscription carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_our_relay_with_restart_and_garbage() {
    let nats = fpm_testkit::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let base = fpm_testkit::ipc_base(dir.path(), "eng");
    let client = timeout(T, async_nats::connect(nats.url()))
        .await
        .unwrap()
        .unwrap();
    let mut sub = Subscriber::subscribe(&client, SubscriberConfig::new(filter("subtest")))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let mut e0 = emitter(&base, "w", 0);
    let mut e1 = emitter(&base, "w", 1);
    let mut cfg = RelayConfig::new(fpm_relay::ipc_endpoints(&base, &[0, 1]));
    cfg.namespace = "subtest".into();
    cfg.nats.url = nats.url();
    let stop = CancellationToken::new();
    let relay = timeout(T, Relay::start(cfg, stop.clone()))
        .await
        .unwrap()
        .unwrap();

    iterate(&mut e0, 200);
    iterate(&mut e1, 150);
    let got = take(&mut sub, 350).await;
    for rank in [0, 1] {
        let counters: Vec<i64> = got
            .iter()
            .filter(|s| s.metrics.dp_rank == rank)
            .map(|s| s.metrics.counter_id)
            .collect();
        let n = if rank == 0 { 200 } else { 150 };
        assert_eq!(counters, (0..n).collect::<Vec<_>>(), "rank {rank}");
    }
    assert!(got.iter().all(|s| s.publisher_id == relay.publisher_id()));
    assert_eq!(got[0].source.to_string(), "subtest/backend/generate");
    let st = sub.tracker().get("w", 0).unwrap();
    assert_eq!(st.latest.counter_id, 199);
    assert_eq!(st.counts.gaps + st.counts.missed_before_start, 0);

    // Garbage and a foreign topic on the same subject.
    let subj = relay.subject().to_owned();
    client
        .publish(subj.clone(), b"\x00\x01garbage".to_vec().into())
        .await
        .unwrap();
    let foreign = Envelope {
        publisher_id: 1,
        sequence: 0,
        published_at: 0,
        topic: "kv-events",
        payload: b"x",
    }
    .encode();
    client.publish(subj, foreign.into()).await.unwrap();
    client.flush().await.unwrap();

    // Rank 1 restarts (a new emitter on the same path: counters from 0 again).
    e1.shutdown(Duration::from_secs(1));
    let mut e1 = emitter(&base, "w", 1);
    iterate(&mut e1, 20);
    let more = take(&mut sub, 20).await;
    assert!(more.iter().all(|s| s.metrics.dp_rank == 1));
    let st = sub.tracker().get("w", 1).unwrap();
    assert_eq!(st.counts.restarts, 1, "{:?}", st.counts);
    assert_eq!(st.latest.counter_id, 19);

    let stats = sub.stats();
    assert_eq!(stats.rejected.total(), 2, "{stats:?}");
    assert_eq!(stats.received, stats.samples + stats.rejected.total());
    assert_eq!(stats.sequence.gap_messages, 0);
    assert_eq!(stats.sequence.publishers, 1);
    assert_eq!(stats.streams.received, 370);

    stop.cancel();
    timeout(T, relay.wait()).await.unwrap();
    e0.shutdown(Duration::from_secs(1));
    e1.shutdown(Duration::from_secs(1));
}

/// A stream that goes silent (no heartbeats: the engine is gone) is reported stale, then
/// removed, with its counts kept in the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_go_stale_then_away() {
    let nats = fpm_testkit::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let base = fpm_testkit::ipc_base(dir.path(), "eng");
    let client = timeout(T, async_nats::connect(nats.url()))
        .await
        .unwrap()
        .unwrap();
    let mut config = SubscriberConfig::new(filter("stale"));
    config.tracker = TrackerConfig {
        stale_after: Duration::from_millis(400),
        remove_after: Duration::from_millis(1500),
        ..TrackerConfig::default()
    };
    let mut sub = Subscriber::subscribe(&client, config).await.unwrap();
    client.flush().await.unwrap();
    let mut e = emitter(&base, "gone", 0);
    let mut cfg = RelayConfig::new(fpm_relay::ipc_endpoints(&base, &[0]));
    cfg.namespace = "stale".into();
    cfg.nats.url = nats.url();
    let stop = CancellationToken::new();
    let relay = timeout(T, Relay::start(cfg, stop.clone()))
        .await
        .unwrap()
        .unwrap();
    iterate(&mut e, 10);
    take(&mut sub, 10).await;
    e.shutdown(Duration::from_secs(1));
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sw = sub.sweep(fpm_subscriber::unix_now_ns());
    assert_eq!(sw.stale.len(), 1, "{sw:?} after {:?}", t0.elapsed());
    assert!(sub.tracker().get("gone", 0).unwrap().stale);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sw = sub.sweep(fpm_subscriber::unix_now_ns());
    assert_eq!(sw.removed.len(), 1);
    assert!(sub.tracker().get("gone", 0).is_none());
    assert_eq!(sub.stats().streams.received, 10);
    stop.cancel();
    timeout(T, relay.wait()).await.unwrap();
}

/// Dynamo 1.6.1's own relay (`FpmEventRelay`, ai-dynamo-runtime) publishing: our subscriber
/// reads its envelopes and tracks the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_dynamos_relay() {
    use std::io::{BufRead, BufReader};
    let Some(py) = fpm_testkit::python() else {
        return;
    };
    let nats = fpm_testkit::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kv = tempfile::tempdir().unwrap();
    let base = fpm_testkit::ipc_base(dir.path(), "eng");
    let client = timeout(T, async_nats::connect(nats.url()))
        .await
        .unwrap()
        .unwrap();
    let mut sub = Subscriber::subscribe(&client, SubscriberConfig::new(filter("fromdynamo")))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut e = emitter(&base, "dyn-worker", 0);
    let mut child = fpm_testkit::dynamo_relay(
        &py,
        "fromdynamo",
        &format!("{base}.0"),
        kv.path(),
        &nats.url(),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("Dynamo's relay never became ready");
        if line.contains("\"ready\"") {
            break;
        }
    }
    // Dynamo's relay subscribes to the engine a moment later; the emitter holds its first
    // messages until a subscriber is there, so nothing is lost either way.
    iterate(&mut e, 100);
    let got = take(&mut sub, 100).await;
    let counters: Vec<i64> = got.iter().map(|s| s.metrics.counter_id).collect();
    assert_eq!(counters, (0..100).collect::<Vec<_>>());
    assert!(got.iter().all(|s| s.metrics.worker_id == "dyn-worker"));
    let stats = sub.stats();
    // The helper's readiness probe (a NATS request with a non-envelope body on the subject)
    // is the one rejected message, counted as such.
    assert_eq!(
        stats.rejected.get(fpm_subscriber::RejectReason::Envelope),
        stats.rejected.total(),
        "{stats:?}"
    );
    assert!(stats.rejected.total() <= 1, "{stats:?}");
    assert_eq!(stats.received, stats.samples + stats.rejected.total());
    assert_eq!(stats.sequence.gap_messages, 0);
    let st = sub.tracker().get("dyn-worker", 0).unwrap();
    assert_eq!(st.counts.gaps + st.counts.missed_before_start, 0);
    assert_eq!(got[0].source.endpoint.as_deref(), Some("generate"));
    let _ = child.kill();
    let _ = child.wait();
    e.shutdown(Duration::from_secs(1));
}

/// `metrics` as relay `publisher_id` would publish it on the in-process plane, namespace "mem".
fn on_mem_plane(
    publisher_id: u64,
    sequence: u64,
    metrics: &fpm_schema::ForwardPassMetrics,
) -> (String, bytes::Bytes) {
    let env = fpm_schema::Envelope {
        publisher_id,
        sequence,
        published_at: 0,
        topic: fpm_schema::FPM_TOPIC,
        payload: &fpm_schema::encode(metrics),
    }
    .encode();
    (
        "namespace.mem.component.backend.endpoint.generate.forward-pass-metrics".into(),
        env.into(),
    )
}

/// The in-process event plane (no NATS server): every message arrives; a subscriber that
/// falls behind the channel's capacity counts what it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_event_plane() {
    let dir = tempfile::tempdir().unwrap();
    let base = fpm_testkit::ipc_base(dir.path(), "eng");
    let (tx, _) = tokio::sync::broadcast::channel(1 << 16);
    let mut sub = Subscriber::from_memory(tx.subscribe(), SubscriberConfig::new(filter("mem")));
    let mut e = emitter(&base, "w", 0);
    let mut cfg = RelayConfig::new(fpm_relay::ipc_endpoints(&base, &[0]));
    cfg.namespace = "mem".into();
    cfg.plane = fpm_relay::EventPlane::Memory(tx.clone());
    let stop = CancellationToken::new();
    let relay = timeout(T, Relay::start(cfg, stop.clone()))
        .await
        .unwrap()
        .unwrap();
    // Another namespace on the same plane is skipped, not counted as bad.
    tx.send((
        "namespace.other.component.c.endpoint.e.forward-pass-metrics".into(),
        bytes::Bytes::from_static(b"x"),
    ))
    .unwrap();
    iterate(&mut e, 300);
    let got = take(&mut sub, 300).await;
    let counters: Vec<i64> = got.iter().map(|s| s.metrics.counter_id).collect();
    assert_eq!(counters, (0..300).collect::<Vec<_>>());
    let stats = sub.stats();
    assert_eq!(
        (stats.received, stats.rejected.total()),
        (300, 0),
        "{stats:?}"
    );
    assert!(relay.stats().nats_connected);

    // A subscriber 8 messages deep that does not read: it lags, and counts exactly what it lost.
    let (tx2, _) = tokio::sync::broadcast::channel(8);
    let mut slow = Subscriber::from_memory(tx2.subscribe(), SubscriberConfig::new(filter("mem")));
    for s in &got[..50] {
        tx2.send(on_mem_plane(9, s.metrics.counter_id as u64, &s.metrics))
            .unwrap();
    }
    let kept = take(&mut slow, 8).await;
    let st = slow.stats();
    assert_eq!(st.slow_consumer_drops, 42, "{st:?}");
    assert_eq!(kept[0].metrics.counter_id, 42);
    assert_eq!(st.slow_consumer_drops + st.samples, 50);
    stop.cancel();
    timeout(T, relay.wait()).await.unwrap();
    e.shutdown(Duration::from_secs(1));
}

/// Two relays deliver the same iterations, interleaved and out of order: every sample is
/// returned, and `last_observation` marks each iteration new exactly once, so histograms and
/// models fed by it count each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_iteration_is_new_once_across_two_relays() {
    use fpm_subscriber::Observation;
    let (tx, _) = tokio::sync::broadcast::channel(1 << 12);
    let mut sub = Subscriber::from_memory(tx.subscribe(), SubscriberConfig::new(filter("mem")));
    assert_eq!(sub.last_observation(), None);
    let send = |relay: u64, seq: u64, counter: i64| {
        let mut m = fpm_schema::ForwardPassMetrics::heartbeat("w", 0);
        m.counter_id = counter;
        m.wall_time = 0.01;
        tx.send(on_mem_plane(relay, seq, &m)).unwrap();
    };
    // Relay 1 in order but missing 5..10; relay 2 a bit behind and complete.
    let mut sent = 0;
    let (mut seq1, mut seq2) = (0, 0);
    for c in 0..40i64 {
        if !(5..10).contains(&c) {
            send(1, seq1, c);
            seq1 += 1;
            sent += 1;
        }
        if c >= 3 {
            send(2, seq2, c - 3);
            seq2 += 1;
            sent += 1;
        }
    }
    let mut new = Vec::new();
    let mut copies = 0;
    for _ in 0..sent {
        let s = timeout(T, sub.next()).await.unwrap().unwrap();
        let o = sub.last_observation().unwrap();
        if o.is_new_iteration() {
            new.push(s.metrics.counter_id);
        } else {
            assert!(
                matches!(o, Observation::Duplicate | Observation::Reordered),
                "{o:?}"
            );
            copies += 1;
        }
    }
    new.sort_unstable();
    assert_eq!(new, (0..40).collect::<Vec<_>>());
    assert_eq!(copies + 40, sent);
    let st = sub.stats().streams;
    assert_eq!(st.gap_messages, 0, "the late copies filled the gap: {st:?}");
}

/// Hostile input on the NATS subject, interleaved with good traffic: nothing panics, every bad
/// message is counted by reason, every good one (NaN and infinite floats, a 60 KB worker id
/// included) is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_on_the_subject() {
    use fpm_schema::{Envelope, ForwardPassMetrics, FPM_TOPIC};
    use fpm_subscriber::RejectReason;
    let nats = fpm_testkit::NatsServer::start();
    let client = timeout(T, async_nats::connect(nats.url()))
        .await
        .unwrap()
        .unwrap();
    let mut sub = Subscriber::subscribe(&client, SubscriberConfig::new(filter("hostile")))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let subject = "namespace.hostile.component.c.endpoint.e.forward-pass-metrics";
    let wrap = |payload: &[u8], seq: u64| {
        Envelope {
            publisher_id: 77,
            sequence: seq,
            published_at: 0,
            topic: FPM_TOPIC,
            payload,
        }
        .encode()
    };
    let good = |c: i64, wall: f64, worker: &str| {
        let mut m = ForwardPassMetrics::heartbeat(worker, 0);
        m.counter_id = c;
        m.wall_time = wall;
        m.scheduled_requests.var_decode_kv_tokens = f64::NAN;
        m.queued_requests.var_prefill_length = f64::INFINITY;
        fpm_schema::encode(&m)
    };
    // Deeply nested msgpack under an unknown key (ignored values are skipped iteratively).
    let mut nested = vec![0x82u8, 0xa7];
    nested.extend_from_slice(b"version");
    nested.push(1);
    nested.extend_from_slice(&[0xa3, b'z', b'z', b'z']);
    nested.extend(std::iter::repeat_n(0x91, 50_000));
    nested.push(0xc0);
    let mut v2 = good(0, 0.1, "w");
    v2[1 + 1 + 7] = 2; // map header, key header, "version", then the value 1 -> 2
    let huge_worker = "w".repeat(60_000);
    let bad: Vec<(Vec<u8>, RejectReason)> = vec![
        (b"\x00garbage".to_vec(), RejectReason::Envelope),
        (
            wrap(&good(1, 0.1, "w"), 0)[..20].to_vec(),
            RejectReason::Envelope,
        ),
        (wrap(b"\xde\xad", 0), RejectReason::Payload),
        (wrap(&good(1, 0.1, "w")[..30], 0), RejectReason::Payload),
        (wrap(&v2, 0), RejectReason::Version),
        (wrap(&vec![0u8; 70_000], 0), RejectReason::TooLarge),
        (vec![0xc1; 900_000], RejectReason::TooLarge),
        (
            Envelope {
                publisher_id: 77,
                sequence: 0,
                published_at: 0,
                topic: "kv-events",
                payload: &good(1, 0.1, "w"),
            }
            .encode(),
            RejectReason::Topic,
        ),
    ];
    let mut sent_good = 0;
    for round in 0..20i64 {
        let seq = round as u64;
        for (b, _) in &bad {
            client.publish(subject, b.clone().into()).await.unwrap();
        }
        let worker = if round == 7 {
            huge_worker.as_str()
        } else {
            "w"
        };
        let payload = if round == 3 {
            nested.clone()
        } else {
            good(round, 0.01 + round as f64 * 1e-3, worker)
        };
        client
            .publish(subject, wrap(&payload, seq).into())
            .await
            .unwrap();
        sent_good += 1;
    }
    client.flush().await.unwrap();
    let got = take(&mut sub, sent_good).await;
    assert_eq!(got.len(), 20);
    assert!(got
        .iter()
        .filter(|s| s.metrics.counter_id > 0 || s.metrics.wall_time > 0.0)
        .all(
            |s| s.metrics.scheduled_requests.var_decode_kv_tokens.is_nan()
                && s.metrics.queued_requests.var_prefill_length == f64::INFINITY
        ));
    assert!(got.iter().any(|s| s.metrics.worker_id.len() == 60_000));
    // Every bad message reached the subscriber (NATS delivers in order) and was counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sub.stats().received < 20 * (bad.len() as u64 + 1) && std::time::Instant::now() < deadline
    {
        let _ = timeout(Duration::from_millis(100), sub.next()).await;
    }
    let st = sub.stats();
    assert_eq!(st.received, 20 * (bad.len() as u64 + 1), "{st:?}");
    for reason in RejectReason::ALL {
        let want = 20 * bad.iter().filter(|(_, r)| *r == reason).count() as u64;
        assert_eq!(st.rejected.get(reason), want, "{reason:?}: {st:?}");
    }
    assert_eq!(st.received, st.samples + st.rejected.total());
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// 1,000 engine streams (250 workers x 4 ranks) through one subscriber: all tracked, memory
/// per stream measured and bounded; with a cap of 600 streams the rest are counted as
/// untracked and their samples still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_and_the_cap() {
    use fpm_schema::{Envelope, ForwardPassMetrics, FPM_TOPIC};
    let nats = fpm_testkit::NatsServer::start();
    let client = timeout(T, async_nats::connect(nats.url()))
        .await
        .unwrap()
        .unwrap();
    let subject = "namespace.many.component.c.endpoint.e.forward-pass-metrics";
    let mut config = SubscriberConfig::new(filter("many"));
    let mut capped = SubscriberConfig::new(filter("many"));
    capped.tracker.max_streams = 600;
    config.tracker.max_streams = 4096;
    let mut sub = Subscriber::subscribe(&client, config).await.unwrap();
    let mut small = Subscriber::subscribe(&client, capped).await.unwrap();
    client.flush().await.unwrap();
    let before = rss_bytes();
    let mut seq = 0;
    for round in 0..5i64 {
        for w in 0..250 {
            for r in 0..4 {
                let mut m = ForwardPassMetrics::heartbeat(format!("worker-{w:04}-3f9c1b2e"), r);
                m.counter_id = round;
                m.wall_time = 0.01;
                let p = fpm_schema::encode(&m);
                let env = Envelope {
                    publisher_id: 5,
                    sequence: seq,
                    published_at: 0,
                    topic: FPM_TOPIC,
                    payload: &p,
                }
                .encode();
                seq += 1;
                client.publish(subject, env.into()).await.unwrap();
            }
        }
    }
    client.flush().await.unwrap();
    take(&mut sub, 5000).await;
    take(&mut small, 5000).await;
    let after = rss_bytes();
    let st = sub.stats();
    assert_eq!(st.tracked_streams, 1000, "{st:?}");
    assert_eq!(st.streams.gap_messages + st.streams.missed_before_start, 0);
    let per_stream = after.saturating_sub(before) / 1000;
    eprintln!(
        "1,000 streams: resident memory grew {} KiB, {} bytes per stream (two subscribers)",
        (after - before.min(after)) / 1024,
        per_stream
    );
    assert!(per_stream < 64 * 1024, "{per_stream} bytes per stream");
    let sm = small.stats();
    assert_eq!(sm.tracked_streams, 600, "{sm:?}");
    assert_eq!(sm.untracked, 400 * 5, "{sm:?}");
    assert_eq!(sm.samples, 5000);
}
