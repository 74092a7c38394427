//! MST node decoder: never panics, and whatever decodes re-encodes to a node that decodes
//! to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::mst::{decode_node, encode_node};

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = decode_node(data) {
        let again = decode_node(&encode_node(&node)).expect("re-encoded node decodes");
        assert_eq!(again, node);
    }
});
