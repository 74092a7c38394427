//! MST key heights, common prefixes and Sync 1.1 commit proofs against the interop vectors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;

use tap_atproto::Cid;
use tap_atproto::hash::{BlockMap, BlockSource};
use tap_atproto::mst::{self, Mst, OpAction, TreeOp, invert_ops, walk_tree_collect};

#[test]
fn interop_mst_key_heights_and_common_prefixes() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let mut checked = 0;
    for v in common::json(&dir, "mst/key_heights.json")
        .as_array()
        .unwrap()
    {
        let key = v["key"].as_str().unwrap();
        assert_eq!(
            u64::from(mst::key_height(key.as_bytes())),
            v["height"].as_u64().unwrap(),
            "{key}"
        );
        checked += 1;
    }
    for v in common::json(&dir, "mst/common_prefix.json")
        .as_array()
        .unwrap()
    {
        let (l, r) = (v["left"].as_str().unwrap(), v["right"].as_str().unwrap());
        assert_eq!(
            mst::common_prefix_len(l.as_bytes(), r.as_bytes()) as u64,
            v["len"].as_u64().unwrap()
        );
        checked += 1;
    }
    println!("interop mst: {checked} vectors checked");
}

/// Records which blocks were read, to compare with the fixture's proof set.
struct Recording<'a> {
    inner: &'a BlockMap,
    seen: RefCell<BTreeSet<Cid>>,
}

impl BlockSource for Recording<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.seen.borrow_mut().insert(*cid);
        self.inner.get_block(cid)
    }
}

fn store(blocks: Vec<(Cid, Vec<u8>)>, map: &mut BlockMap) {
    for (c, b) in blocks {
        map.insert(c, b.into());
    }
}

#[test]
fn interop_firehose_commit_proofs_invert_to_the_previous_root() {
    let Some(dir) = common::interop_dir() else {
        return;
    };
    let mut checked = 0;
    for case in common::json(&dir, "firehose/commit-proof-fixtures.json")
        .as_array()
        .unwrap()
    {
        let comment = case["comment"].as_str().unwrap();
        let leaf: Cid = case["leafValue"].as_str().unwrap().parse().unwrap();
        let strs = |k: &str| -> Vec<String> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        let (keys, adds, dels) = (strs("keys"), strs("adds"), strs("dels"));
        let before_root: Cid = case["rootBeforeCommit"].as_str().unwrap().parse().unwrap();
        let after_root: Cid = case["rootAfterCommit"].as_str().unwrap().parse().unwrap();

        // Build the tree before the commit two ways: inserting and bottom-up.
        let mut all = BlockMap::default();
        let empty = BlockMap::default();
        let mut tree = Mst::new();
        for k in &keys {
            tree.insert(k.as_bytes(), leaf, &empty).unwrap();
        }
        let mut blocks = Vec::new();
        assert_eq!(
            tree.root_cid_with_blocks(&mut blocks),
            before_root,
            "{comment}: before"
        );
        store(blocks, &mut all);
        let mut sorted: Vec<_> = keys.iter().map(|k| (k.as_bytes().to_vec(), leaf)).collect();
        sorted.sort();
        assert_eq!(
            Mst::from_sorted(sorted).unwrap().root_cid(),
            before_root,
            "{comment}: bottom-up"
        );

        // Apply the commit forward.
        let mut ops = Vec::new();
        for k in &adds {
            tree.insert(k.as_bytes(), leaf, &all).unwrap();
            ops.push(TreeOp {
                path: k.clone(),
                action: OpAction::Create { cid: leaf },
            });
        }
        for k in &dels {
            tree.remove(k.as_bytes(), &all).unwrap();
            ops.push(TreeOp {
                path: k.clone(),
                action: OpAction::Delete { prev: leaf },
            });
        }
        let mut blocks = Vec::new();
        assert_eq!(
            tree.root_cid_with_blocks(&mut blocks),
            after_root,
            "{comment}: after"
        );
        store(blocks, &mut all);

        // The full walk agrees with the key set.
        let walked: Vec<String> = walk_tree_collect(&after_root, &all)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut expect: Vec<String> = keys
            .iter()
            .chain(&adds)
            .filter(|k| !dels.contains(k))
            .cloned()
            .collect();
        expect.sort();
        expect.dedup();
        assert_eq!(walked, expect, "{comment}: walk");

        // Invert over the full store, recording which nodes were needed.
        let rec = Recording {
            inner: &all,
            seen: RefCell::new(BTreeSet::new()),
        };
        let mut partial = Mst::load(after_root);
        assert_eq!(
            invert_ops(&mut partial, &ops, &rec).unwrap(),
            before_root,
            "{comment}: invert"
        );
        let proof: BTreeSet<Cid> = case["blocksInProof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            rec.seen.borrow().is_subset(&proof),
            "{comment}: inversion read blocks outside the proof"
        );

        // The proof rule used by builders reproduces the fixture's proof exactly.
        let rec = Recording {
            inner: &all,
            seen: RefCell::new(BTreeSet::new()),
        };
        let mut after = Mst::load(after_root);
        for op in &ops {
            after.load_proof_path(op.path.as_bytes(), &rec).unwrap();
        }
        assert_eq!(*rec.seen.borrow(), proof, "{comment}: proof blocks");

        // Invert again with ONLY the proof blocks available.
        let only: BlockMap = proof.iter().map(|c| (*c, all[c].clone())).collect();
        let mut partial = Mst::load(after_root);
        assert_eq!(
            invert_ops(&mut partial, &ops, &only).unwrap(),
            before_root,
            "{comment}: proof-only"
        );

        // Dropping any block inversion needs makes it fail with a typed error.
        let needed = {
            let rec = Recording {
                inner: &all,
                seen: RefCell::new(BTreeSet::new()),
            };
            invert_ops(&mut Mst::load(after_root), &ops, &rec).unwrap();
            rec.seen.into_inner()
        };
        for missing in &needed {
            let fewer: BlockMap = proof
                .iter()
                .filter(|c| *c != missing)
                .map(|c| (*c, all[c].clone()))
                .collect();
            let mut partial = Mst::load(after_root);
            assert!(
                invert_ops(&mut partial, &ops, &fewer).is_err(),
                "{comment}: missing {missing}"
            );
        }
        checked += 1;
    }
    println!("interop commit proofs: {checked} vectors checked");
}
