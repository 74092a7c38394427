//! Handle resolution answers (well-known bodies, `_atproto` TXT texts): any bytes give a
//! DID or a refusal, never a panic; a DID found is valid syntax and names what the input
//! says.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::resolution::{did_from_txt, did_from_well_known};

fuzz_target!(|data: &[u8]| {
    if let Ok(did) = did_from_well_known(data) {
        assert!(std::str::from_utf8(data).is_ok_and(|s| s.trim() == did.as_str()));
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(Some(did)) = did_from_txt(text.split('\n')) {
        assert!(text.contains(did.as_str()));
    }
});
