//! `#sync` frames (and `#commit` with a commit CAR) verified against a fixed key: decoding
//! and verification must refuse, never panic, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::PublicKey;
use tap_atproto::firehose::{Frame, FrameLimits, decode_frame, verify_sync_frame};

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    if let Ok(Frame::Sync(s)) = decode_frame(&frame, &FrameLimits::default())
        && let Ok(key) = PublicKey::from_did_key(
            "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc",
        )
    {
        let _ = verify_sync_frame(&s, &key);
    }
});
