//! The streaming repo walker: tree-order and shuffled CARs, spilling, and every failure mode.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use tap_atproto::Cid;
use tap_atproto::car;
use tap_atproto::mst::MstError;
use tap_atproto::stream::{WalkError, WalkLimits, walk_car_bytes};
use tap_atproto::syntax::{Did, Tid};
use tap_atproto::writer::RepoWriter;

fn did() -> Did {
    Did::new("did:plc:walker").unwrap()
}

fn repo(n: u64, dup_every: u64) -> (RepoWriter, Vec<(String, Vec<u8>)>) {
    let (_, sign) = common::k256_signer(3);
    let mut recs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            (
                common::like_path(i),
                common::like_record(if dup_every > 0 && i % dup_every == 1 {
                    i - 1
                } else {
                    i
                }),
            )
        })
        .collect();
    recs.sort();
    let w = RepoWriter::with_records(
        did(),
        recs.clone(),
        Tid::from_parts(1_900_000_000_000_000, 0),
        &sign,
    )
    .unwrap();
    (w, recs)
}

/// A deterministic shuffle (xorshift) that keeps the commit block first or not.
fn shuffled(order: &[Cid], seed: u64) -> Vec<Cid> {
    let mut v = order.to_vec();
    let mut s = seed | 1;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

fn check(records: &[tap_atproto::WalkedRecord], expected: &[(String, Vec<u8>)]) {
    assert_eq!(records.len(), expected.len());
    for (r, (p, b)) in records.iter().zip(expected) {
        assert_eq!(&r.path, p);
        assert_eq!(r.bytes.as_ref(), b.as_slice());
    }
}

#[test]
fn tree_order_car_walks_in_key_order_without_spilling() {
    let (pk, _) = common::k256_signer(3);
    let (w, recs) = repo(2000, 0);
    let car = w.export_preorder().unwrap();
    let limits = WalkLimits {
        memory_budget: 0,
        ..WalkLimits::default()
    };
    let (commit, out) = walk_car_bytes(&car, Some(did()), Some(pk), limits).unwrap();
    assert_eq!(commit.did, did());
    check(&out, &recs);
}

#[test]
fn shuffled_car_walks_with_memory_and_with_spill() {
    let (pk, _) = common::k256_signer(3);
    let (w, recs) = repo(1500, 0);
    let mut order = Vec::new();
    w.preorder_cids(&mut order).unwrap();
    for seed in [1, 2, 3] {
        let car = w.export_in_order(&shuffled(&order, seed)).unwrap();
        for budget in [0usize, 64 << 10, 64 << 20] {
            let limits = WalkLimits {
                memory_budget: budget,
                ..WalkLimits::default()
            };
            let (_, out) = walk_car_bytes(&car, Some(did()), Some(pk.clone()), limits).unwrap();
            check(&out, &recs);
        }
    }
}

#[test]
fn duplicate_record_blocks_are_served_to_every_path() {
    let (w, recs) = repo(500, 10);
    let car = w.export_preorder().unwrap();
    let (_, out) = walk_car_bytes(&car, None, None, WalkLimits::default()).unwrap();
    check(&out, &recs);
}

#[test]
fn empty_repo_walks_to_nothing() {
    let (w, recs) = repo(0, 0);
    let car = w.export_preorder().unwrap();
    let (_, out) = walk_car_bytes(&car, None, None, WalkLimits::default()).unwrap();
    check(&out, &recs);
}

#[test]
fn a_missing_node_is_an_error_never_a_skip() {
    let (w, _) = repo(800, 0);
    let mut order = Vec::new();
    w.preorder_cids(&mut order).unwrap();
    // Drop the second MST node in preorder (a subtree).
    let node = order[2..]
        .iter()
        .find(|c| tap_atproto::mst::decode_node(&w.blocks()[*c]).is_ok())
        .copied()
        .unwrap();
    let kept: Vec<Cid> = order.iter().filter(|c| **c != node).copied().collect();
    let car = w.export_in_order(&kept).unwrap();
    let err = walk_car_bytes(&car, None, None, WalkLimits::default()).unwrap_err();
    assert_eq!(err, WalkError::Mst(MstError::MissingBlock(node)));
}

#[test]
fn wrong_did_bad_signature_truncation_and_lies_are_errors() {
    let (w, _) = repo(300, 0);
    let car = w.export_preorder().unwrap();
    let other = Did::new("did:plc:other").unwrap();
    assert!(matches!(
        walk_car_bytes(&car, Some(other), None, WalkLimits::default()),
        Err(WalkError::DidMismatch { .. })
    ));
    let (wrong_key, _) = common::k256_signer(4);
    assert!(matches!(
        walk_car_bytes(&car, None, Some(wrong_key), WalkLimits::default()),
        Err(WalkError::Commit(_))
    ));
    let cut = &car[..car.len() - 10];
    assert!(matches!(
        walk_car_bytes(cut, None, None, WalkLimits::default()),
        Err(WalkError::Car(car::CarError::Truncated) | WalkError::Mst(_))
    ));
    let mut lie = car.clone();
    let i = lie.len() / 2;
    lie[i] ^= 0x40;
    assert!(walk_car_bytes(&lie, None, None, WalkLimits::default()).is_err());
}

#[test]
fn chunk_sizes_do_not_change_the_result() {
    let (w, recs) = repo(200, 0);
    let car = w.export_preorder().unwrap();
    for chunk in [1usize, 7, 100, 4096] {
        let mut walker = tap_atproto::RepoWalker::new(None, None, WalkLimits::default());
        let mut out = Vec::new();
        for c in car.chunks(chunk) {
            walker.push(c).unwrap();
            while let Some(r) = walker.next_record().unwrap() {
                out.push(r);
            }
        }
        walker.finish().unwrap();
        while let Some(r) = walker.next_record().unwrap() {
            out.push(r);
        }
        check(&out, &recs);
    }
}

#[test]
fn walks_spill_within_a_shared_disk_budget_and_give_it_back() {
    use tap_atproto::stream::SpillBudget;
    let (pk, _) = common::k256_signer(3);
    let (w, recs) = repo(1500, 0);
    let mut order = Vec::new();
    w.preorder_cids(&mut order).unwrap();
    let car = w.export_in_order(&shuffled(&order, 7)).unwrap();
    let limits = |budget: &SpillBudget| WalkLimits {
        memory_budget: 0,
        spill_budget: Some(budget.clone()),
        ..WalkLimits::default()
    };

    // Room enough: the walk succeeds and, once done, the budget is whole again.
    let roomy = SpillBudget::new(64 << 20);
    let (_, out) = walk_car_bytes(&car, Some(did()), Some(pk.clone()), limits(&roomy)).unwrap();
    check(&out, &recs);
    assert_eq!(roomy.available(), 64 << 20);

    // A budget smaller than what this order needs to spill: refused, and nothing kept.
    let tight = SpillBudget::new(4 << 10);
    let err = walk_car_bytes(&car, Some(did()), Some(pk), limits(&tight)).unwrap_err();
    assert!(
        matches!(err, WalkError::SpillBudget { limit } if limit == 4 << 10),
        "{err:?}"
    );
    assert_eq!(tight.available(), 4 << 10);
}
