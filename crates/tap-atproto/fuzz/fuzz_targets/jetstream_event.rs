//! Jetstream text frames: any string reads as an event or is refused, never a panic, and
//! an event's claimed record path is always a valid MST key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::jetstream::{Event, parse_event};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(positioned) = parse_event(text) {
        assert!(positioned.time_us > 0);
        if let Event::Commit(op) = positioned.event {
            assert!(tap_atproto::mst::is_valid_mst_key(op.path().as_bytes()));
        }
    }
});
