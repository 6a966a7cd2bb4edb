//! Any bytes into the key peek: must return, never panic, succeed wherever a full decode
//! succeeds, and agree with it on canonical messages. (With duplicate keys the peek keeps the
//! first occurrence and msgspec's decode the last, so they are compared only when the input
//! is exactly what the encoder writes.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peeked = fpm_schema::peek_key(data);
    if let Ok(m) = fpm_schema::decode(data) {
        let k = peeked.expect("a decodable message has a peekable key");
        if fpm_schema::encode(&m) == data {
            assert_eq!(k.worker_id, m.worker_id);
            assert_eq!(
                (k.dp_rank, k.counter_id, k.version),
                (m.dp_rank, m.counter_id, m.version)
            );
        }
    }
});
