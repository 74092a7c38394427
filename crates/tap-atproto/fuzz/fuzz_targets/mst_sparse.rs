//! Sparse MST walk over untrusted blocks (what a PDS returns to `getBlocks`): never panics;
//! what it finds lies in the wanted ranges, in increasing key order; and whenever the full
//! walk accepts the same tree, the sparse walk finds exactly its keys in the ranges. The
//! input is split into blocks at 0xff bytes; any link resolves to block `digest[0] % n`, so
//! multi-node trees (and every lie about them) are reachable. A walk that reuses known keys
//! instead of blocks (an incremental resync) never finds other keys than the full walk.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::Cid;
use tap_atproto::hash::{BlockSource, cid_for_cbor};
use tap_atproto::hash::BlockMap;
use tap_atproto::mst::{
    KeyRange, KnownKeys, SparseWalk, walk_ranges, walk_ranges_reusing, walk_tree_collect,
};

struct Parts<'a>(Vec<&'a [u8]>);

impl BlockSource for Parts<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        let first = *cid.hash().digest().first()?;
        self.0.get(usize::from(first) % self.0.len()).copied()
    }
}

fuzz_target!(|data: &[u8]| {
    let parts = Parts(data.split(|b| *b == 0xff).collect());
    let root = cid_for_cbor(parts.0[0]);
    // Every key of a tree the full walk accepts, known: with no block at hand, the reusing
    // walk proves the tree from them (only if they hash to its root) or asks for the root.
    if let Ok(all) = walk_tree_collect(&root, &parts) {
        let everything = [KeyRange::prefix(b"")];
        let known = all.iter().map(|(k, v)| (k.clone().into_bytes(), *v)).collect();
        if let Ok(known) = KnownKeys::new(known)
            && let Ok(w) = walk_ranges_reusing(&root, &everything, &BlockMap::default(), &known)
            && let SparseWalk::Complete(proven) = w.walk
        {
            assert_eq!(proven, all);
        }
    }
    let ranges = [KeyRange::collection("a.b.c"), KeyRange::prefix(b"x.")];
    let Ok(SparseWalk::Complete(found)) = walk_ranges(&root, &ranges, &parts) else {
        return;
    };
    assert!(found.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(found
        .iter()
        .all(|(k, _)| ranges.iter().any(|r| r.contains(k.as_bytes()))));
    if let Ok(all) = walk_tree_collect(&root, &parts) {
        let expected: Vec<_> = all
            .into_iter()
            .filter(|(k, _)| ranges.iter().any(|r| r.contains(k.as_bytes())))
            .collect();
        assert_eq!(found, expected);
    }
});
