//! Property tests: round trips for arbitrary messages, and no panic on arbitrary input.

use fpm_schema::serde_codec;
use fpm_schema::testing::fuzz_all_decoders;
use fpm_schema::{
    decode, encode, encode_into, envelope_overhead, peek_key, Envelope, ForwardPassMetrics,
    QueuedRequestMetrics, ScheduledRequestMetrics, DEFAULT_MAX_SIZE, FPM_TOPIC, MAX_TOPIC_LEN,
};
use proptest::prelude::*;

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        any::<f64>(),
        Just(0.0),
        Just(-0.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MIN_POSITIVE),
        Just(5e-324),
    ]
}

fn any_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        -300i64..70_000,
        prop::sample::select(fpm_schema::testing::INT_FORM_BOUNDARIES.to_vec()),
    ]
}

prop_compose! {
    fn any_scheduled()(a in any_i64(), b in any_i64(), c in any_f64(), d in any_i64(),
                       e in any_i64(), f in any_i64(), g in any_f64()) -> ScheduledRequestMetrics {
        ScheduledRequestMetrics {
            num_prefill_requests: a, sum_prefill_tokens: b, var_prefill_length: c,
            sum_prefill_kv_tokens: d, num_decode_requests: e, sum_decode_kv_tokens: f,
            var_decode_kv_tokens: g,
        }
    }
}

prop_compose! {
    fn any_queued()(a in any_i64(), b in any_i64(), c in any_f64(), d in any_i64(),
                    e in any_i64(), f in any_f64()) -> QueuedRequestMetrics {
        QueuedRequestMetrics {
            num_prefill_requests: a, sum_prefill_tokens: b, var_prefill_length: c,
            num_decode_requests: d, sum_decode_kv_tokens: e, var_decode_kv_tokens: f,
        }
    }
}

prop_compose! {
    fn any_message()(worker_id in "\\PC{0,300}", dp_rank in any_i64(), counter_id in any_i64(),
                     wall_time in any_f64(), s in any_scheduled(), q in any_queued())
                     -> ForwardPassMetrics {
        ForwardPassMetrics {
            version: 1, worker_id, dp_rank, counter_id, wall_time,
            scheduled_requests: s, queued_requests: q,
        }
    }
}

/// Every class of f64 bit pattern: any bits, normals, subnormals, zeros, the extremes, NaNs
/// with any sign and payload, and the infinities.
fn f64_bit_patterns() -> impl Strategy<Value = f64> {
    let sign = any::<bool>().prop_map(|s| (s as u64) << 63);
    let mantissa = 0u64..(1 << 52);
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        (sign.clone(), 1u64..2047, mantissa.clone())
            .prop_map(|(s, e, m)| f64::from_bits(s | e << 52 | m)),
        (sign.clone(), 1u64..(1 << 52)).prop_map(|(s, m)| f64::from_bits(s | m)),
        (sign, 1u64..(1 << 52)).prop_map(|(s, m)| f64::from_bits(s | 0x7ff << 52 | m)),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            -f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            f64::from_bits(0x000f_ffff_ffff_ffff),
            f64::NAN,
            -f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::EPSILON,
            9007199254740993.0,
            945193719.3038037,
            0.1,
        ]),
    ]
}

fn float_fields(m: &ForwardPassMetrics) -> [u64; 5] {
    [
        m.wall_time.to_bits(),
        m.scheduled_requests.var_prefill_length.to_bits(),
        m.scheduled_requests.var_decode_kv_tokens.to_bits(),
        m.queued_requests.var_prefill_length.to_bits(),
        m.queued_requests.var_decode_kv_tokens.to_bits(),
    ]
}

proptest! {
    // 20,000 messages x 5 float fields = 100,000 bit patterns.
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// The JSON form (`fpm decode` / `fpm encode`) keeps every float bit for bit: finite
    /// values as shortest round-trip numbers, the rest as strings.
    #[test]
    fn json_floats_round_trip_bit_exact(w in f64_bit_patterns(), a in f64_bit_patterns(),
                                        b in f64_bit_patterns(), c in f64_bit_patterns(),
                                        d in f64_bit_patterns()) {
        let m = ForwardPassMetrics {
            wall_time: w,
            scheduled_requests: ScheduledRequestMetrics {
                var_prefill_length: a, var_decode_kv_tokens: b, ..Default::default()
            },
            queued_requests: QueuedRequestMetrics {
                var_prefill_length: c, var_decode_kv_tokens: d, ..Default::default()
            },
            ..Default::default()
        };
        let text = serde_json::to_string(&m).unwrap();
        let back: ForwardPassMetrics = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(float_fields(&back), float_fields(&m), "{}", text);
        let pretty: ForwardPassMetrics =
            serde_json::from_slice(serde_json::to_string_pretty(&m).unwrap().as_bytes()).unwrap();
        prop_assert_eq!(float_fields(&pretty), float_fields(&m));
    }
}

/// Integers biased to the msgpack form boundaries, where the envelope grows.
fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        prop::sample::select(vec![
            0,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            1 << 32,
            u64::MAX
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every envelope of a payload up to the default limit and a topic up to the longest
    /// allowed decodes with the default decoder, and never exceeds the derived bound.
    #[test]
    fn envelope_within_limits_always_decodes(
        payload_len in prop_oneof![0..=DEFAULT_MAX_SIZE, (DEFAULT_MAX_SIZE - 300)..=DEFAULT_MAX_SIZE,
                                   Just(255usize), Just(256usize), Just(65_535usize)],
        topic in prop_oneof![Just(FPM_TOPIC.to_owned()), "[a-z-]{0,255}", "\\PC{0,63}"],
        pid in any_u64(), seq in any_u64(), at in any_u64(),
    ) {
        prop_assume!(topic.len() <= MAX_TOPIC_LEN);
        let payload = vec![0x5a; payload_len];
        let env = Envelope { publisher_id: pid, sequence: seq, published_at: at,
                             topic: &topic, payload: &payload };
        let bytes = env.encode();
        prop_assert!(bytes.len() <= payload_len + envelope_overhead(topic.len()));
        prop_assert_eq!(Envelope::decode(&bytes), Ok(env));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn encode_decode_round_trip(m in any_message()) {
        let bytes = encode(&m);
        let back = decode(&bytes).unwrap();
        // Compare through the encoding so NaN payloads count as equal bit for bit.
        prop_assert_eq!(encode(&back), bytes.clone());
        let key = peek_key(&bytes).unwrap();
        prop_assert_eq!(key.worker_id, m.worker_id.as_str());
        prop_assert_eq!((key.dp_rank, key.counter_id, key.version), (m.dp_rank, m.counter_id, 1));
        let mut reused = vec![0xff; 3];
        encode_into(&m, &mut reused);
        prop_assert_eq!(reused, bytes);
    }

    #[test]
    fn general_path_agrees_with_fast_path(m in any_message()) {
        // An extra key at the end takes the message off the canonical fast path, so the
        // general decoder must produce the same value.
        let canonical = encode(&m);
        let mut extended = canonical.clone();
        extended[0] = 0x88;
        extended.extend_from_slice(b"\xactiming_scope\xa9iteration");
        let a = decode(&canonical).unwrap();
        let b = decode(&extended).unwrap();
        prop_assert_eq!(encode(&a), encode(&b));
    }

    /// The `rmp-serde` codec writes the same bytes as the hand-written one and makes the same
    /// accept/reject decision, with the same value, on mutated and cut messages.
    #[test]
    fn serde_codec_agrees_with_hand_written(m in any_message(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>()) {
        let bytes = encode(&m);
        prop_assert_eq!(serde_codec::encode(&m), bytes.clone());
        let mut rmp_bytes = Vec::new();
        fpm_schema::testing::encode_with_rmp_primitives(&m, &mut rmp_bytes);
        prop_assert_eq!(rmp_bytes, bytes.clone());
        let mut mutated = bytes.clone();
        for (i, b) in flips {
            let i = i.index(mutated.len());
            mutated[i] = b;
        }
        let end = cut.index(mutated.len() + 1).max(mutated.len() * (cut.index(2)));
        let input = &mutated[..end];
        match (decode(input), serde_codec::decode(input)) {
            (Ok(a), Ok(b)) => prop_assert_eq!(encode(&a), encode(&b)),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "hand-written {:?} vs rmp-serde {:?} on {:x?}", a, b, input),
        }
    }

    #[test]
    fn envelope_round_trip(seq in any::<u64>(), pid in 0u64..(1 << 53), at in any::<u64>(),
                           m in any_message()) {
        let payload = encode(&m);
        let env = Envelope { publisher_id: pid, sequence: seq, published_at: at,
                             topic: FPM_TOPIC, payload: &payload };
        let bytes = env.encode();
        prop_assert_eq!(Envelope::decode(&bytes).unwrap(), env);
    }

}

// The fuzz targets' bodies (`fuzz_all_decoders`) as property tests with many cases, so CI
// runs them on every change (cargo-fuzz needs nightly; it runs by hand, see README).
proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        fuzz_all_decoders(&data);
    }

    #[test]
    fn mutated_messages_never_panic(m in any_message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                    cut in any::<prop::sample::Index>()) {
        let mut bytes = encode(&m);
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        fuzz_all_decoders(&bytes);
        let end = cut.index(bytes.len() + 1);
        fuzz_all_decoders(&bytes[..end]);
        let env = Envelope { publisher_id: 1, sequence: 2, published_at: 3, topic: FPM_TOPIC,
                             payload: &bytes }.encode();
        fuzz_all_decoders(&env);
    }
}
