//! `getRecord` proofs: a present record proves with its bytes, an absent key proves
//! absent, and a proof missing a node or the record, signed by another key or for
//! another repo is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]

use bytes::Bytes;
use tap_atproto::Cid;
use tap_atproto::car::Car;
use tap_atproto::proof::{ProofError, record_proof_blocks, verify_record_proof};
use tap_atproto::syntax::Did;

use tap_atproto::car::{CarLimits, read_car, write_car_block, write_car_header};
use tap_atproto::writer::RepoWriter;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

/// A repo of 300 generated records and the paths it holds.
fn repo() -> (RepoBuilder, Vec<String>) {
    let did = Did::new("did:plc:proofproofproof").unwrap();
    let builder = RepoBuilder::with_records(did, TestKey::k256(7), 3, 300);
    let paths = builder.records().keys().cloned().collect();
    (builder, paths)
}

fn proof_car(writer: &RepoWriter, cids: &[Cid], skip: Option<&Cid>) -> Car {
    let (head, _) = writer.head().unwrap();
    let mut out = Vec::new();
    write_car_header(&mut out, &[*head]);
    for cid in cids.iter().filter(|c| Some(*c) != skip) {
        write_car_block(&mut out, cid, writer.blocks().get(cid).unwrap());
    }
    read_car(Bytes::from(out), CarLimits::default()).unwrap()
}

#[test]
fn a_present_record_proves_with_its_bytes_and_an_absent_one_proves_absent() {
    let (builder, paths) = repo();
    let writer = builder.writer();
    let (head, _) = writer.head().unwrap().clone();
    let did = writer.did().clone();
    let public = builder.key().public_key();
    for path in [&paths[0], &paths[150], &paths[299]] {
        let cids = record_proof_blocks(&head, writer.blocks(), path).unwrap();
        let proven =
            verify_record_proof(&proof_car(writer, &cids, None), &did, path, &public).unwrap();
        let (cid, bytes) = proven.record.expect("present");
        assert_eq!(tap_atproto::hash::cid_for_cbor(&bytes), cid);
    }
    let absent = "app.bsky.feed.like/3zzzzzzzzzzzz";
    let cids = record_proof_blocks(&head, writer.blocks(), absent).unwrap();
    let proven =
        verify_record_proof(&proof_car(writer, &cids, None), &did, absent, &public).unwrap();
    assert!(proven.record.is_none());
}

#[test]
fn proofs_missing_a_block_or_signed_by_another_key_are_refused() {
    let (builder, paths) = repo();
    let writer = builder.writer();
    let (head, _) = writer.head().unwrap().clone();
    let did = writer.did().clone();
    let public = builder.key().public_key();
    let path = &paths[42];
    let cids = record_proof_blocks(&head, writer.blocks(), path).unwrap();
    assert!(cids.len() >= 3, "commit, some nodes, the record: {cids:?}");
    // Without a path node the lookup cannot finish: never read as "absent".
    let node = cids[cids.len() - 2];
    let error = verify_record_proof(&proof_car(writer, &cids, Some(&node)), &did, path, &public)
        .unwrap_err();
    assert!(matches!(error, ProofError::Mst(_)), "{error}");
    let record = cids[cids.len() - 1];
    let error = verify_record_proof(
        &proof_car(writer, &cids, Some(&record)),
        &did,
        path,
        &public,
    )
    .unwrap_err();
    assert!(matches!(error, ProofError::MissingRecord(_)), "{error}");
    let other = TestKey::k256(8).public_key();
    let error =
        verify_record_proof(&proof_car(writer, &cids, None), &did, path, &other).unwrap_err();
    assert!(error.is_signature(), "{error}");
    let stranger = Did::new("did:plc:someoneelse").unwrap();
    let error =
        verify_record_proof(&proof_car(writer, &cids, None), &stranger, path, &public).unwrap_err();
    assert!(matches!(error, ProofError::WrongRepo { .. }), "{error}");
}
