//! `getRecord` answers verified against a fixed repo, key and path (the seeds are real
//! proofs, present and absent, signed by tap-testkit's `TestKey::k256(1)`): whatever the bytes, a
//! proof is refused or verified, never a panic; a verified present record hashes to its
//! CID.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::PublicKey;
use tap_atproto::car::{CarLimits, read_car};
use tap_atproto::proof::verify_record_proof;
use tap_atproto::syntax::Did;

fuzz_target!(|data: &[u8]| {
    let Ok(car) = read_car(bytes::Bytes::copy_from_slice(data), CarLimits::default()) else {
        return;
    };
    let (Ok(did), Ok(key)) = (
        Did::new("did:plc:fuzzfuzzfuzzfuzz"),
        PublicKey::from_did_key("did:key:zQ3shhNJ4w2BdUSYJ37Mn1oTXDAgXbmYNRmRVMkYVKyhcvq1F"),
    ) else {
        return;
    };
    if let Ok(proven) = verify_record_proof(&car, &did, "app.bsky.feed.post/3k2aaaaaaaaaa", &key)
        && let Some((cid, bytes)) = proven.record
    {
        assert_eq!(tap_atproto::hash::cid_for_cbor(&bytes), cid);
    }
});
