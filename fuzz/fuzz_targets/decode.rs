//! Any bytes into the FPM decoder: must return, never panic; what decodes must re-encode to
//! something that decodes to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = fpm_schema::decode(data) {
        let again =
            fpm_schema::decode(&fpm_schema::encode(&m)).expect("re-encoded message decodes");
        assert_eq!(fpm_schema::encode(&again), fpm_schema::encode(&m));
    }
});
