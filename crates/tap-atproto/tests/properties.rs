//! Property tests: inversion returns the previous root, the root does not depend on
//! insertion order, and parsers never panic on arbitrary or mutated bytes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use bytes::Bytes;
use proptest::prelude::*;
use tap_atproto::hash::{self, BlockMap};
use tap_atproto::mst::{Mst, OpAction, TreeOp, invert_ops};
use tap_atproto::syntax::{Did, Tid};
use tap_atproto::writer::{RepoWriter, WriteOp};
use tap_atproto::{Cid, car, cbor, commit, firehose, mst, stream};

fn key(n: u16) -> String {
    format!(
        "app.bsky.feed.post/{}",
        Tid::from_parts(1_700_000_000_000_000 + u64::from(n) * 7919, 0)
    )
}

fn val(n: u32) -> Cid {
    hash::cid_for_cbor(&n.to_be_bytes())
}

#[derive(Debug, Clone)]
enum Op {
    Create(u16, u32),
    Update(usize, u32),
    Delete(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u16>(), any::<u32>()).prop_map(|(k, v)| Op::Create(k, v)),
        (any::<usize>(), any::<u32>()).prop_map(|(i, v)| Op::Update(i, v)),
        any::<usize>().prop_map(Op::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn inverting_random_commits_over_their_proofs_returns_the_previous_root(
        initial in proptest::collection::btree_set(any::<u16>(), 0..200),
        commits in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..8), 1..6),
    ) {
        let sign = |_: &[u8]| vec![0u8; 64];
        let did = Did::new("did:plc:prop").unwrap();
        let recs: Vec<(String, Vec<u8>)> = initial.iter().map(|k| (key(*k), u32::from(*k).to_be_bytes().to_vec())).collect();
        let mut sorted = recs.clone();
        sorted.sort();
        let mut w = RepoWriter::with_records(did, sorted, Tid::from_parts(1, 0), &sign).unwrap();
        let mut present: Vec<String> = initial.iter().map(|k| key(*k)).collect();
        present.sort();
        for (i, ops) in commits.into_iter().enumerate() {
            let mut write = Vec::new();
            let mut touched = std::collections::BTreeSet::new();
            for op in ops {
                match op {
                    Op::Create(k, v) => {
                        let p = key(k);
                        if present.binary_search(&p).is_err() && touched.insert(p.clone()) {
                            write.push(WriteOp::Create { path: p, record: v.to_be_bytes().to_vec() });
                        }
                    }
                    Op::Update(idx, v) if !present.is_empty() => {
                        let p = present[idx % present.len()].clone();
                        if touched.insert(p.clone()) {
                            write.push(WriteOp::Update { path: p, record: [v.to_be_bytes(), [1, 2, 3, 4]].concat() });
                        }
                    }
                    Op::Delete(idx) if !present.is_empty() => {
                        let p = present[idx % present.len()].clone();
                        if touched.insert(p.clone()) {
                            write.push(WriteOp::Delete { path: p });
                        }
                    }
                    _ => {}
                }
            }
            if write.is_empty() {
                continue;
            }
            let out = w.apply(&write, Tid::from_parts(2 + i as u64, 0), &sign).unwrap();
            for op in &write {
                match op {
                    WriteOp::Create { path, .. } => { let at = present.binary_search(path).unwrap_err(); present.insert(at, path.clone()); }
                    WriteOp::Delete { path } => { let at = present.binary_search(path).unwrap(); present.remove(at); }
                    WriteOp::Update { .. } => {}
                }
            }
            let proof = car::read_car(Bytes::from(out.car.clone()), car::CarLimits::default()).unwrap();
            let tree_ops: Vec<TreeOp> = out.ops.iter().map(|(p, a)| TreeOp { path: p.clone(), action: *a }).collect();
            let mut partial = Mst::load(out.commit.data);
            prop_assert_eq!(invert_ops(&mut partial, &tree_ops, &proof.blocks).unwrap(), out.prev_data);
        }
    }

    #[test]
    fn the_root_does_not_depend_on_insertion_order(
        keys in proptest::collection::btree_set(any::<u16>(), 0..300),
        seed in any::<u64>(),
    ) {
        let empty = BlockMap::default();
        let mut ordered: Vec<u16> = keys.iter().copied().collect();
        let mut a = Mst::new();
        for k in &ordered {
            a.insert(key(*k).as_bytes(), val(u32::from(*k)), &empty).unwrap();
        }
        let mut s = seed | 1;
        for i in (1..ordered.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            ordered.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let mut b = Mst::new();
        for k in &ordered {
            b.insert(key(*k).as_bytes(), val(u32::from(*k)), &empty).unwrap();
        }
        let mut sorted: Vec<(Vec<u8>, Cid)> = keys.iter().map(|k| (key(*k).into_bytes(), val(u32::from(*k)))).collect();
        sorted.sort();
        let root = a.root_cid();
        prop_assert_eq!(root, b.root_cid());
        prop_assert_eq!(root, Mst::from_sorted(sorted).unwrap().root_cid());
        // Removing everything again gives the empty tree.
        for k in &ordered {
            b.remove(key(*k).as_bytes(), &empty).unwrap();
        }
        prop_assert_eq!(b.root_cid(), mst::empty_root());
    }

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let b = Bytes::from(data.clone());
        let _ = firehose::decode_frame(&b, &firehose::FrameLimits::default());
        let _ = car::read_car(b.clone(), car::CarLimits::default());
        let _ = mst::decode_node(&data);
        let _ = commit::Commit::decode(&data);
        let _ = tap_atproto::record_to_json(&data, &mut Vec::new());
        let _ = cbor::Reader::new(&data).skip_value(0);
        let _ = stream::walk_car_bytes(&data, None, None, stream::WalkLimits::default());
    }

    #[test]
    fn parsers_never_panic_on_mutated_valid_input(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let (w, frame) = sample();
        let mut car_bytes = w.export_preorder().unwrap();
        let mut frame = frame;
        for (i, x) in &flips {
            let n = car_bytes.len();
            car_bytes[i % n] ^= x | 1;
            let n = frame.len();
            frame[i % n] ^= x | 1;
        }
        let _ = stream::walk_car_bytes(&car_bytes, None, None, stream::WalkLimits { memory_budget: 4096, ..Default::default() });
        let _ = car::read_car(Bytes::from(car_bytes), car::CarLimits::default());
        if let Ok(firehose::Frame::Commit(c)) = firehose::decode_frame(&Bytes::from(frame), &firehose::FrameLimits::default()) {
            let (pk, _) = common::k256_signer(1);
            let _ = firehose::verify_commit_frame(&c, &pk);
        }
    }
}

fn sample() -> (RepoWriter, Vec<u8>) {
    let (_, sign) = common::k256_signer(1);
    let did = Did::new("did:plc:mut").unwrap();
    let mut recs: Vec<(String, Vec<u8>)> = (0..60)
        .map(|i| (common::like_path(i), common::like_record(i)))
        .collect();
    recs.sort();
    let mut w = RepoWriter::with_records(did.clone(), recs, Tid::from_parts(5, 0), &sign).unwrap();
    let out = w
        .apply(
            &[
                WriteOp::Create {
                    path: common::like_path(100),
                    record: common::like_record(100),
                },
                WriteOp::Delete {
                    path: common::like_path(3),
                },
            ],
            Tid::from_parts(6, 0),
            &sign,
        )
        .unwrap();
    let frame = tap_atproto::writer::encode_commit_frame(&did, 1, &out, "t");
    (w, frame)
}

#[test]
fn update_inversion_restores_the_old_value() {
    let empty = BlockMap::default();
    let mut t = Mst::new();
    for k in 0..50u16 {
        t.insert(key(k).as_bytes(), val(u32::from(k)), &empty)
            .unwrap();
    }
    let before = t.root_cid();
    t.update(key(7).as_bytes(), val(999), &empty).unwrap();
    let ops = [TreeOp {
        path: key(7),
        action: OpAction::Update {
            cid: val(999),
            prev: val(7),
        },
    }];
    assert_eq!(invert_ops(&mut t, &ops, &empty).unwrap(), before);
}
