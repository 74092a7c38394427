//! Firehose frame decoder, the salvage reader of refused frames and commit verification
//! must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::firehose::{Frame, FrameLimits, decode_frame, salvage_frame, verify_commit_frame};

fuzz_target!(|data: &[u8]| {
    let frame = bytes::Bytes::copy_from_slice(data);
    let _ = salvage_frame(data);
    if let Ok(Frame::Commit(c)) = decode_frame(&frame, &FrameLimits::default()) {
        if let Ok(key) = tap_atproto::PublicKey::from_did_key("did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc") {
            let _ = verify_commit_frame(&c, &key);
        }
    }
});
