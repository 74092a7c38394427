//! The repo walker with every check on (expected DID, signature with a given key), over
//! any bytes and with a tiny memory budget so spilling is exercised: it must refuse, never
//! panic, and never yield a record out of key order.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::PublicKey;
use tap_atproto::stream::{WalkLimits, walk_car_bytes};
use tap_atproto::syntax::Did;

fuzz_target!(|data: &[u8]| {
    let (Ok(did), Ok(key)) = (
        Did::new("did:plc:ewvi7nxzyoun6zhxrhs64oiz"),
        PublicKey::from_did_key("did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"),
    ) else {
        return;
    };
    let limits = WalkLimits {
        memory_budget: 512,
        ..WalkLimits::default()
    };
    if let Ok((_, records)) = walk_car_bytes(data, Some(did), Some(key), limits) {
        assert!(records.windows(2).all(|w| w[0].path < w[1].path));
    }
});
