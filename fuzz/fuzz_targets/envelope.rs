//! Any bytes into the envelope decoder (and the payload inside): must return, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = fpm_schema::Envelope::decode(data) {
        let _ = fpm_schema::decode(env.payload);
        assert_eq!(fpm_schema::Envelope::decode(&env.encode()), Ok(env));
    }
});
