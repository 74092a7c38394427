//! A walk of only the parts of a tree that hold wanted keys: the basis of a sparse fetch,
//! where a client downloads the signed commit, then the nodes whose key intervals meet the
//! wanted ranges level by level, then the wanted records, instead of the whole repo.
//!
//! The walk runs over whatever blocks are at hand and reports the nodes it still needs;
//! the caller fetches them (every block hash-checked by the CAR reader) and walks again.
//! When nothing is missing, the keys it returns are every key of the tree inside the
//! ranges: a subtree is skipped only when its whole key interval lies outside them, so an
//! absent key is proven absent by the same nodes that would have held it.
//!
//! Every node visited is checked as a full walk checks it (key syntax, one layer per node,
//! keys strictly increasing across everything visited, no empty or non-canonical nodes).

use cid::Cid;

use super::node::decode_node;
use super::walk::check_node;
use super::{MstError, key_string};
use crate::hash::BlockSource;

/// A half-open interval of keys, `start ≤ key < end` in byte order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl KeyRange {
    /// Every key beginning with `prefix`; the empty prefix is every key.
    #[must_use]
    pub fn prefix(prefix: &[u8]) -> Self {
        let start = prefix.to_vec();
        // The smallest byte string greater than every string with this prefix: the prefix
        // with its last byte below 0xff incremented (MST keys are ASCII, so that byte
        // exists whenever the prefix is non-empty).
        let mut end = prefix.to_vec();
        while let Some(last) = end.pop() {
            if last < u8::MAX {
                end.push(last + 1);
                break;
            }
        }
        Self { start, end }
    }

    /// Every record of one collection: keys `"<nsid>/…"`.
    #[must_use]
    pub fn collection(nsid: &str) -> Self {
        Self::prefix(format!("{nsid}/").as_bytes())
    }

    /// Whether `key` lies in the range.
    #[must_use]
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Whether every key strictly between `lo` and `hi` (`None`: unbounded) lies in the
    /// range. Errs towards `false`: a gap it cannot vouch for is walked, not assumed.
    fn covers(&self, lo: Option<&[u8]>, hi: Option<&[u8]>) -> bool {
        let from_start = self.start.is_empty() || lo.is_some_and(|lo| lo >= self.start.as_slice());
        let to_end = self.end.is_empty() || hi.is_some_and(|hi| hi <= self.end.as_slice());
        from_start && to_end
    }

    /// Whether some key strictly between `lo` and `hi` (`None`: unbounded) lies in the range.
    fn meets(&self, lo: Option<&[u8]>, hi: Option<&[u8]>) -> bool {
        // The open interval (lo, hi) meets [start, end) unless it ends at or before start or
        // begins at or after end.
        let ends_before = hi.is_some_and(|hi| hi <= self.start.as_slice());
        let starts_after = !self.end.is_empty() && lo.is_some_and(|lo| lo >= self.end.as_slice());
        !ends_before && !starts_after
    }
}

/// Where a sparse walk stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SparseWalk {
    /// Every node that may hold a wanted key was at hand: the wanted keys and values, in
    /// key order.
    Complete(Vec<(String, Cid)>),
    /// These nodes (each on a path to wanted keys) must be fetched before the walk can
    /// finish.
    Missing(Vec<Cid>),
}

/// The keys and values, inside the walk's ranges, of a tree verified earlier: what a client
/// that synced the repo before holds in its record index. With them a walk of a newer tree
/// needs no block of a subtree that did not change.
#[derive(Debug, Clone, Default)]
pub struct KnownKeys {
    entries: Vec<(Vec<u8>, Cid)>,
}

impl KnownKeys {
    /// From `(key, value)` pairs in any order.
    ///
    /// # Errors
    /// [`MstError::KeyOrder`] when a key appears twice.
    pub fn new(mut entries: Vec<(Vec<u8>, Cid)>) -> Result<Self, MstError> {
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(MstError::KeyOrder(key_string(&w[0].0)));
        }
        Ok(Self { entries })
    }

    /// The value held for `key`.
    #[must_use]
    pub fn get(&self, key: &[u8]) -> Option<&Cid> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }

    /// How many keys are held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The keys strictly between `lo` and `hi`.
    fn between(&self, lo: Option<&[u8]>, hi: Option<&[u8]>) -> &[(Vec<u8>, Cid)] {
        let from = lo.map_or(0, |lo| {
            self.entries.partition_point(|(k, _)| k.as_slice() <= lo)
        });
        let to = hi.map_or(self.entries.len(), |hi| {
            self.entries.partition_point(|(k, _)| k.as_slice() < hi)
        });
        self.entries.get(from..to.max(from)).unwrap_or_default()
    }
}

/// A walk that reused what it knew: the walk itself, and how its absent subtrees fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReusingWalk {
    /// The walk's outcome, as [`walk_ranges`] gives it.
    pub walk: SparseWalk,
    /// Absent subtrees proven unchanged from the known keys (their keys are in the result).
    pub reused: usize,
    /// Absent subtrees that lie wholly inside the ranges but are not the subtree the known
    /// keys make: they changed (they are also among the missing nodes).
    pub changed: Vec<Cid>,
}

/// Walks the tree rooted at `root` through the blocks of `src`, descending only into
/// subtrees whose key interval meets one of `ranges`.
///
/// # Errors
/// [`MstError`] on any structural problem in the nodes visited.
pub fn walk_ranges(
    root: &Cid,
    ranges: &[KeyRange],
    src: &dyn BlockSource,
) -> Result<SparseWalk, MstError> {
    Ok(walk(root, ranges, src, None)?.walk)
}

/// [`walk_ranges`] for a client that verified an earlier tree of the same repo and holds its
/// keys inside `ranges` (`known`). A subtree absent from `src` whose key interval lies
/// wholly inside one range is rebuilt from the known keys of that interval
/// ([`subtree_root`](super::subtree_root)); when that gives the CID the newer tree links to,
/// the subtree is unchanged and its keys are the known ones, proven by the hash, without
/// its blocks. Otherwise it is missing, as in a plain walk.
///
/// # Errors
/// [`MstError`] on any structural problem in the nodes visited.
pub fn walk_ranges_reusing(
    root: &Cid,
    ranges: &[KeyRange],
    src: &dyn BlockSource,
    known: &KnownKeys,
) -> Result<ReusingWalk, MstError> {
    walk(root, ranges, src, Some(known))
}

fn walk(
    root: &Cid,
    ranges: &[KeyRange],
    src: &dyn BlockSource,
    known: Option<&KnownKeys>,
) -> Result<ReusingWalk, MstError> {
    let mut walk = Walk {
        ranges,
        src,
        known,
        last: None,
        found: Vec::new(),
        missing: Vec::new(),
        reused: 0,
        changed: Vec::new(),
    };
    walk.node(root, None, true, None, None)?;
    let outcome = if walk.missing.is_empty() {
        SparseWalk::Complete(walk.found)
    } else {
        SparseWalk::Missing(walk.missing)
    };
    Ok(ReusingWalk {
        walk: outcome,
        reused: walk.reused,
        changed: walk.changed,
    })
}

struct Walk<'a> {
    ranges: &'a [KeyRange],
    src: &'a dyn BlockSource,
    known: Option<&'a KnownKeys>,
    /// The greatest key visited so far (keys must increase across the whole walk).
    last: Option<Vec<u8>>,
    found: Vec<(String, Cid)>,
    missing: Vec<Cid>,
    reused: usize,
    changed: Vec<Cid>,
}

impl Walk<'_> {
    fn wanted_between(&self, lo: Option<&[u8]>, hi: Option<&[u8]>) -> bool {
        self.ranges.iter().any(|r| r.meets(lo, hi))
    }

    /// Visits a subtree covering the keys strictly between `lo` and `hi`, if it may hold a
    /// wanted key.
    fn child(
        &mut self,
        cid: &Cid,
        height: u8,
        lo: Option<&[u8]>,
        hi: Option<&[u8]>,
    ) -> Result<(), MstError> {
        if !self.wanted_between(lo, hi) {
            return Ok(());
        }
        self.node(cid, Some(height), false, lo, hi)
    }

    fn node(
        &mut self,
        cid: &Cid,
        height: Option<u8>,
        is_root: bool,
        lo: Option<&[u8]>,
        hi: Option<&[u8]>,
    ) -> Result<(), MstError> {
        let Some(bytes) = self.src.get_block(cid) else {
            if self.reuse(cid, height, lo, hi)? {
                self.reused += 1;
            } else {
                self.missing.push(*cid);
            }
            return Ok(());
        };
        let node = decode_node(bytes)?;
        let Some(h) = check_node(cid, &node, height, is_root)? else {
            return Ok(()); // the empty tree
        };
        // A node's keys must lie inside the interval its parent gave it.
        for e in &node.entries {
            let outside = lo.is_some_and(|lo| e.key.as_slice() <= lo)
                || hi.is_some_and(|hi| e.key.as_slice() >= hi);
            if outside {
                return Err(MstError::KeyOrder(key_string(&e.key)));
            }
        }
        if let Some(left) = &node.left {
            let first = node.entries.first().map(|e| e.key.as_slice()).or(hi);
            self.child(left, h - 1, lo, first)?;
        }
        for (i, e) in node.entries.iter().enumerate() {
            if self.last.as_ref().is_some_and(|p| *p >= e.key) {
                return Err(MstError::KeyOrder(key_string(&e.key)));
            }
            if self.ranges.iter().any(|r| r.contains(&e.key)) {
                self.found.push((key_string(&e.key), e.value));
            }
            self.last = Some(e.key.clone());
            if let Some(right) = &e.right {
                let next = node.entries.get(i + 1).map(|n| n.key.as_slice()).or(hi);
                self.child(right, h - 1, Some(&e.key), next)?;
            }
        }
        Ok(())
    }

    /// Whether the absent subtree `cid` (top layer `height`, `None` for the root) over the
    /// keys strictly between `lo` and `hi` is the one the known keys make; if so its keys
    /// are taken as found.
    fn reuse(
        &mut self,
        cid: &Cid,
        height: Option<u8>,
        lo: Option<&[u8]>,
        hi: Option<&[u8]>,
    ) -> Result<bool, MstError> {
        let Some(known) = self.known else {
            return Ok(false);
        };
        if !self.ranges.iter().any(|r| r.covers(lo, hi)) {
            return Ok(false);
        }
        let keys = known.between(lo, hi);
        let rebuilt = match height {
            Some(layer) => super::subtree_root(keys.iter().map(|(k, v)| (k, *v)), layer)?,
            None if keys.is_empty() => Some(super::empty_root()),
            None => {
                Some(super::Mst::from_sorted(keys.iter().map(|(k, v)| (k.clone(), *v)))?.root_cid())
            }
        };
        if rebuilt != Some(*cid) {
            self.changed.push(*cid);
            return Ok(false);
        }
        if let (Some(first), Some(last)) = (keys.first(), &self.last)
            && first.0 <= *last
        {
            return Err(MstError::KeyOrder(key_string(&first.0)));
        }
        for (k, v) in keys {
            self.found.push((key_string(k), *v));
        }
        if let Some((k, _)) = keys.last() {
            self.last = Some(k.clone());
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{self, BlockMap};
    use crate::mst::{Mst, walk_tree_collect};
    use bytes::Bytes;
    use proptest::prelude::*;

    const COLLECTIONS: [&str; 5] = [
        "app.bsky.actor.profile",
        "app.bsky.feed.like",
        "app.bsky.feed.post",
        "app.bsky.feed.postgate",
        "app.bsky.graph.starterpack",
    ];

    /// A tree of `keys` (collection index, rkey number) and every block of it.
    fn tree(keys: &std::collections::BTreeSet<(usize, u32)>) -> (Cid, BlockMap) {
        versioned_tree(&keys.iter().map(|k| (*k, 0)).collect())
    }

    /// A tree of `keys` whose values depend on a version per key (an update bumps it).
    fn versioned_tree(keys: &std::collections::BTreeMap<(usize, u32), u32>) -> (Cid, BlockMap) {
        let mut entries: Vec<(Vec<u8>, Cid)> = keys
            .iter()
            .map(|((c, n), version)| {
                let key = format!("{}/3k{n:011}", COLLECTIONS[*c]).into_bytes();
                let value = hash::cid_for_cbor(&[n.to_be_bytes(), version.to_be_bytes()].concat());
                (key, value)
            })
            .collect();
        entries.sort();
        let mut mst = Mst::from_sorted(entries).unwrap();
        let mut out = Vec::new();
        let root = mst.root_cid_with_blocks(&mut out);
        let mut blocks = BlockMap::default();
        for (cid, bytes) in out {
            blocks.insert(cid, Bytes::from(bytes));
        }
        (root, blocks)
    }

    /// Fetches what the walk asks for from `all`, level by level, until it completes;
    /// returns the result and how many node blocks were fetched.
    fn fetch_until_complete(
        root: &Cid,
        ranges: &[KeyRange],
        all: &BlockMap,
    ) -> (Vec<(String, Cid)>, usize) {
        let mut have = BlockMap::default();
        loop {
            match walk_ranges(root, ranges, &have).unwrap() {
                SparseWalk::Complete(found) => return (found, have.len()),
                SparseWalk::Missing(cids) => {
                    assert!(!cids.is_empty());
                    for cid in cids {
                        let block = all.get(&cid).expect("asks only for nodes of the tree");
                        assert!(have.insert(cid, block.clone()).is_none(), "asked twice");
                    }
                }
            }
        }
    }

    proptest! {
        /// Whatever the tree and the wanted collections, fetching what the walk asks for
        /// gives exactly the wanted keys of the full walk, and never more nodes than the
        /// tree has.
        #[test]
        fn a_sparse_walk_finds_exactly_the_wanted_keys_of_the_full_walk(
            keys in proptest::collection::btree_set((0usize..5, 0u32..100_000), 0..400),
            wanted in proptest::collection::btree_set(0usize..5, 0..3),
        ) {
            let (root, all) = tree(&keys);
            let ranges: Vec<KeyRange> =
                wanted.iter().map(|c| KeyRange::collection(COLLECTIONS[*c])).collect();
            let (found, fetched) = fetch_until_complete(&root, &ranges, &all);
            let expected = wanted_keys(&root, &all, &ranges);
            prop_assert_eq!(found, expected);
            prop_assert!(fetched <= all.len());
        }
    }

    /// Every key of the tree at `root` inside `ranges`, by a full walk.
    fn wanted_keys(root: &Cid, all: &BlockMap, ranges: &[KeyRange]) -> Vec<(String, Cid)> {
        walk_tree_collect(root, all)
            .unwrap()
            .into_iter()
            .filter(|(k, _)| ranges.iter().any(|r| r.contains(k.as_bytes())))
            .collect()
    }

    /// The keys of `keys` inside `ranges`, as a client that synced that tree holds them.
    fn known_of(keys: &std::collections::BTreeSet<(usize, u32)>, ranges: &[KeyRange]) -> KnownKeys {
        let (root, all) = tree(keys);
        let entries = wanted_keys(&root, &all, ranges)
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v))
            .collect();
        KnownKeys::new(entries).unwrap()
    }

    /// `keys` (all at version 0) after an edit history: an edit adds its key if absent;
    /// otherwise it removes it, or with `update` gives it a new value.
    fn edited(
        keys: &std::collections::BTreeSet<(usize, u32)>,
        edits: &[((usize, u32), bool)],
    ) -> std::collections::BTreeMap<(usize, u32), u32> {
        let mut out: std::collections::BTreeMap<_, _> = keys.iter().map(|k| (*k, 0)).collect();
        for (key, update) in edits {
            match out.get_mut(key) {
                None => {
                    out.insert(*key, 0);
                }
                Some(version) if *update => *version += 1,
                Some(_) => {
                    out.remove(key);
                }
            }
        }
        out
    }

    /// The blocks of `all` that `old` lacks: what `getRepo?since=` returns.
    fn new_blocks(all: &BlockMap, old: &BlockMap) -> BlockMap {
        all.iter()
            .filter(|(cid, _)| !old.contains_key(cid))
            .map(|(c, b)| (*c, b.clone()))
            .collect()
    }

    /// Walks `root` over `diff`, reusing `known`, fetching what it asks for from `all`;
    /// returns the result, the nodes fetched, and every subtree it found changed.
    fn reuse_until_complete(
        root: &Cid,
        ranges: &[KeyRange],
        diff: &BlockMap,
        all: &BlockMap,
        known: &KnownKeys,
    ) -> (Vec<(String, Cid)>, usize, Vec<Cid>) {
        let mut have = diff.clone();
        let mut fetched = 0;
        let mut changed = Vec::new();
        loop {
            let walk = walk_ranges_reusing(root, ranges, &have, known).unwrap();
            changed.extend(walk.changed);
            match walk.walk {
                SparseWalk::Complete(found) => return (found, fetched, changed),
                SparseWalk::Missing(cids) => {
                    for cid in cids {
                        let block = all.get(&cid).expect("asks only for nodes of the tree");
                        assert!(have.insert(cid, block.clone()).is_none(), "asked twice");
                        fetched += 1;
                    }
                }
            }
        }
    }

    proptest! {
        /// Over random edit histories, a walk of the new tree that reuses the old tree's
        /// keys and holds only the new tree's new nodes (what `getRepo?since` returns)
        /// finds exactly the full walk's keys, fetching only what it cannot prove.
        #[test]
        fn a_walk_reusing_the_old_keys_over_a_diff_finds_what_a_full_walk_finds(
            keys in proptest::collection::btree_set((0usize..5, 0u32..2_000), 0..300),
            edits in proptest::collection::vec(((0usize..5, 0u32..2_000), any::<bool>()), 0..20),
            wanted in proptest::collection::btree_set(0usize..5, 0..3),
        ) {
            let ranges: Vec<KeyRange> = if wanted.is_empty() {
                vec![KeyRange::prefix(b"")]
            } else {
                wanted.iter().map(|c| KeyRange::collection(COLLECTIONS[*c])).collect()
            };
            let (_, old_all) = tree(&keys);
            let (root, all) = versioned_tree(&edited(&keys, &edits));
            let diff = new_blocks(&all, &old_all);
            let known = known_of(&keys, &ranges);
            let (found, fetched, changed) = reuse_until_complete(&root, &ranges, &diff, &all, &known);
            let expected = wanted_keys(&root, &all, &ranges);
            prop_assert_eq!(found, expected);
            // A node an honest diff leaves out is one the old tree had too, somewhere (a
            // tree that shrank back to an old subtree); with every collection wanted those
            // are the only nodes fetched.
            for cid in &changed {
                prop_assert!(old_all.contains_key(cid));
            }
            if wanted.is_empty() {
                prop_assert_eq!(fetched, changed.len());
            }
        }
    }

    #[test]
    fn a_changed_node_left_out_of_a_diff_is_reported_changed_not_reused() {
        let keys: std::collections::BTreeSet<(usize, u32)> = (0..400).map(|n| (2, n)).collect();
        let (_, old_all) = tree(&keys);
        let (root, all) = versioned_tree(&edited(&keys, &[((2, 100_000), false)]));
        let mut diff = new_blocks(&all, &old_all);
        assert!(diff.len() >= 2, "the edit changes a path of several nodes");
        let everything = [KeyRange::prefix(b"")];
        let withheld = *diff.keys().find(|c| **c != root).unwrap();
        diff.remove(&withheld);
        let known = known_of(&keys, &everything);
        let walk = walk_ranges_reusing(&root, &everything, &diff, &known).unwrap();
        assert_eq!(walk.changed, vec![withheld]);
        assert_eq!(walk.walk, SparseWalk::Missing(vec![withheld]));
    }

    #[test]
    fn an_unchanged_tree_is_proven_from_the_known_keys_alone() {
        let keys: std::collections::BTreeSet<(usize, u32)> =
            (0..500).map(|n| (n as usize % 5, n)).collect();
        let (root, all) = tree(&keys);
        let everything = [KeyRange::prefix(b"")];
        let known = known_of(&keys, &everything);
        let walk = walk_ranges_reusing(&root, &everything, &BlockMap::default(), &known).unwrap();
        assert_eq!(walk.reused, 1);
        assert_eq!(
            walk.walk,
            SparseWalk::Complete(walk_tree_collect(&root, &all).unwrap())
        );
        // Known keys that differ by one value prove nothing.
        let mut other = keys.clone();
        other.remove(&(0, 0));
        let wrong = known_of(&other, &everything);
        let walk = walk_ranges_reusing(&root, &everything, &BlockMap::default(), &wrong).unwrap();
        assert_eq!(walk.walk, SparseWalk::Missing(vec![root]));
    }

    #[test]
    fn one_small_collection_of_a_large_tree_costs_a_few_nodes() {
        // 5000 posts and 10 starter packs.
        let mut keys = std::collections::BTreeSet::new();
        for n in 0..5000 {
            keys.insert((2, n * 13));
        }
        for n in 0..10 {
            keys.insert((4, n * 17));
        }
        let (root, all) = tree(&keys);
        let (found, fetched) =
            fetch_until_complete(&root, &[KeyRange::collection(COLLECTIONS[4])], &all);
        assert_eq!(found.len(), 10);
        assert!(
            fetched * 20 < all.len(),
            "{fetched} of {} nodes fetched",
            all.len()
        );
    }

    #[test]
    fn a_node_key_outside_its_parents_interval_is_refused() {
        let mut keys = std::collections::BTreeSet::new();
        for n in 0..300 {
            keys.insert((2, n));
        }
        let (root, all) = tree(&keys);
        // Swap a child's block for another node's: its keys then lie outside the interval
        // the parent gives it.
        let root_node = crate::mst::decode_node(&all[&root]).unwrap();
        let children: Vec<Cid> = root_node
            .left
            .iter()
            .copied()
            .chain(root_node.entries.iter().filter_map(|e| e.right))
            .collect();
        assert!(children.len() >= 2, "the fixture needs two subtrees");
        let mut lying = all.clone();
        let other = all[&children[1]].clone();
        lying.insert(children[0], other);
        let everything = [KeyRange::prefix(b"a")];
        assert!(walk_ranges(&root, &everything, &lying).is_err());
    }

    #[test]
    fn ranges_cover_exactly_their_prefix() {
        let posts = KeyRange::collection("app.bsky.feed.post");
        assert!(posts.contains(b"app.bsky.feed.post/3k2a"));
        assert!(!posts.contains(b"app.bsky.feed.postgate/3k2a"));
        assert!(!posts.contains(b"app.bsky.feed.like/3k2a"));
        let bsky = KeyRange::prefix(b"app.bsky.");
        assert!(bsky.contains(b"app.bsky.graph.follow/x"));
        assert!(!bsky.contains(b"app.bskyx/x"));
        assert!(posts.meets(Some(b"a"), None));
        assert!(!posts.meets(Some(b"b"), None));
        assert!(!posts.meets(None, Some(b"app.bsky.feed.post/")));
        assert!(posts.meets(None, Some(b"app.bsky.feed.post/0")));
        assert!(!posts.meets(Some(b"app.bsky.feed.post0"), None));
    }
}
