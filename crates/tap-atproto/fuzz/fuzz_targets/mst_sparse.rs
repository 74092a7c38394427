//! Sparse MST walk over untrusted blocks (what a PDS returns to `getBlocks`): never panics,
//! and what it finds always lies in the wanted ranges, in increasing key order. The input
//! is split into blocks at 0xff bytes; the first is the root.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::hash::{BlockMap, cid_for_cbor};
use tap_atproto::mst::{KeyRange, SparseWalk, walk_ranges};

fuzz_target!(|data: &[u8]| {
    let mut blocks = BlockMap::default();
    let mut root = None;
    for part in data.split(|b| *b == 0xff) {
        let cid = cid_for_cbor(part);
        root.get_or_insert(cid);
        blocks.insert(cid, bytes::Bytes::copy_from_slice(part));
    }
    let Some(root) = root else { return };
    let ranges = [KeyRange::collection("a.b.c"), KeyRange::prefix(b"x.")];
    if let Ok(SparseWalk::Complete(found)) = walk_ranges(&root, &ranges, &blocks) {
        assert!(found.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(found
            .iter()
            .all(|(k, _)| ranges.iter().any(|r| r.contains(k.as_bytes()))));
    }
});
