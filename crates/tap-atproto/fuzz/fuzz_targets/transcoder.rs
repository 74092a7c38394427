//! CBOR → JSON transcoder: never panics, and whatever it accepts is valid JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    if tap_atproto::record_to_json(data, &mut out).is_ok() {
        serde_json::from_slice::<serde_json::Value>(&out).expect("transcoder output is JSON");
    }
});
