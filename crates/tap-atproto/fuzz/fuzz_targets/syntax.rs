//! The string formats tap reads from the network and from operators (DIDs, handles, NSIDs,
//! record keys, TIDs, AT-URIs, datetimes, collection filters): validation must never
//! panic, and whatever validates must round-trip through its string form unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::syntax::{
    AtUri, CollectionFilter, Datetime, Did, Handle, Nsid, RecordKey, Tid,
};

fn round_trip<T: std::str::FromStr + AsRef<str>>(text: &str) {
    if let Ok(v) = text.parse::<T>() {
        assert_eq!(v.as_ref(), text);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    round_trip::<Did>(text);
    round_trip::<Handle>(&text.to_ascii_lowercase());
    round_trip::<Nsid>(text);
    round_trip::<RecordKey>(text);
    round_trip::<AtUri>(text);
    round_trip::<Datetime>(text);
    round_trip::<CollectionFilter>(text);
    if let Ok(tid) = text.parse::<Tid>() {
        assert_eq!(tid.as_str(), text);
    }
});
