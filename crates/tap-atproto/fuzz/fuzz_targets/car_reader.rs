//! CAR reader: the slice and stream front-ends must agree and never panic; the streaming
//! repo walker must not panic on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::car::{CarLimits, CarStream, read_car};
use tap_atproto::stream::{WalkLimits, walk_car_bytes};

fuzz_target!(|data: &[u8]| {
    let limits = CarLimits { max_total_bytes: 1 << 20, ..CarLimits::default() };
    let whole = read_car(bytes::Bytes::copy_from_slice(data), limits);
    let chunk = 1 + data.first().copied().unwrap_or(0) as usize % 97;
    let mut s = CarStream::new(limits);
    let mut streamed = Vec::new();
    let mut err = false;
    for c in data.chunks(chunk) {
        if s.push(c).is_err() {
            err = true;
            break;
        }
        loop {
            match s.next_block() {
                Ok(Some((cid, _))) => streamed.push(cid),
                Ok(None) => break,
                Err(_) => {
                    err = true;
                    break;
                }
            }
        }
        if err {
            break;
        }
    }
    if !err {
        err = s.finish().is_err();
    }
    // Both front-ends accept exactly the same inputs.
    assert_eq!(whole.is_ok(), !err);
    let _ = walk_car_bytes(data, None, None, WalkLimits { memory_budget: 1024, ..WalkLimits::default() });
});
