//! The relay's data path (input task, buffer, publisher, NATS client) makes no allocation per
//! message: payloads and envelopes share 64 KiB chunks, and the read buffer is reused. A
//! counting allocator, switched on for the relay's data thread only, checks it.

mod common;

use std::time::Duration;

use fpm_testkit::{CountingAlloc, NatsServer};

use crate::common::*;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_path_allocates_nothing_per_message() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ep = fpm_testkit::ipc_base(dir.path(), "alloc") + ".0";
    let mut engine = Engine::bind(&ep);
    let mut sub = subscribe(&nats.url(), SUBJECT).await;
    let (relay, token) = start(vec![ep], &nats.url(), |c| {
        c.on_data_thread_start = Some(|| CountingAlloc::count_this_thread(true));
    })
    .await;
    engine.warm_up(&relay, "w").await;
    assert!(
        CountingAlloc::allocations() > 0,
        "the data thread is counted"
    );
    let before = relay.stats();
    let allocations = CountingAlloc::allocations();
    // One at a time (a wake-up per message, as at low rates) and in bursts.
    let n = 20_000u64;
    for i in 0..n {
        engine.send_next("w");
        if i % 2_000 < 200 || i % 50 == 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    wait_for(Duration::from_secs(20), || {
        relay.stats().published == before.published + n
    })
    .await;
    let per_message = (CountingAlloc::allocations() - allocations) as f64 / n as f64;
    let got = collect(
        &mut sub,
        (before.published + n) as usize,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(got.len() as u64, before.published + n);
    let s = shut_down(relay, &token).await;
    assert_eq!(s.received, s.published, "{s:?}");
    eprintln!("allocations per message on the data thread: {per_message:.4}");
    // What remains is amortized: a new 64 KiB chunk every ~100 messages for payloads and
    // for envelopes.
    assert!(per_message < 0.05, "{per_message} allocations per message");
}
