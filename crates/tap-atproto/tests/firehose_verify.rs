//! Frame decoding and `verify_commit_frame` over commits built with `writer::RepoWriter`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benches fail loudly on broken fixtures"
)]
mod common;

use bytes::Bytes;
use tap_atproto::firehose::{
    Frame, FrameError, FrameLimits, VerifyError, decode_frame, verify_commit_frame,
};
use tap_atproto::mst::{MstError, OpAction};
use tap_atproto::syntax::{Did, Tid};
use tap_atproto::writer::{self, RepoWriter, WriteOp};
use tap_atproto::{car, hash};

fn rev(n: u64) -> Tid {
    Tid::from_parts(1_800_000_000_000_000 + n, 0)
}

fn did() -> Did {
    Did::new("did:plc:testrepo").unwrap()
}

fn commit_frame(f: &Bytes) -> Box<tap_atproto::firehose::CommitFrame> {
    match decode_frame(f, &FrameLimits::default()).unwrap() {
        Frame::Commit(c) => c,
        other => panic!("not a commit: {other:?}"),
    }
}

/// A repo with 300 likes and a writer positioned after its first commit.
fn seeded() -> RepoWriter {
    let (_, sign) = common::k256_signer(1);
    let mut recs: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (common::like_path(i), common::like_record(i)))
        .collect();
    recs.sort();
    RepoWriter::with_records(did(), recs, rev(0), &sign).unwrap()
}

#[test]
fn create_update_delete_sequences_verify_and_return_records() {
    let (pk, sign) = common::k256_signer(1);
    let mut w = seeded();
    for (seq, step) in (1..).zip(0..20u64) {
        let ops = vec![
            WriteOp::Create {
                path: common::like_path(1000 + step),
                record: common::like_record(1000 + step),
            },
            WriteOp::Update {
                path: common::like_path(step * 7),
                record: common::like_record(5000 + step),
            },
            WriteOp::Delete {
                path: common::like_path(step * 7 + 3),
            },
        ];
        let out = w.apply(&ops, rev(step + 1), &sign).unwrap();
        let bytes = Bytes::from(writer::encode_commit_frame(
            &did(),
            seq,
            &out,
            "2024-01-01T00:00:00Z",
        ));
        let frame = commit_frame(&bytes);
        let v = verify_commit_frame(&frame, &pk).unwrap();
        assert_eq!(v.data, out.commit.data);
        assert_eq!(v.prev_data, out.prev_data);
        assert_eq!(v.ops.len(), 3);
        assert!(matches!(v.ops[0].action, OpAction::Create { .. }));
        assert_eq!(
            v.ops[0].record.as_deref(),
            Some(common::like_record(1000 + step).as_slice())
        );
        assert!(matches!(v.ops[1].action, OpAction::Update { .. }));
        assert!(v.ops[2].record.is_none());
        assert_eq!(v.ops[0].collection.as_str(), "app.bsky.feed.like");
    }
}

#[test]
fn a_forged_signature_is_rejected() {
    let (pk, _) = common::k256_signer(1);
    let (_, other) = common::k256_signer(2);
    let mut w = seeded();
    let out = w
        .apply(
            &[WriteOp::Delete {
                path: common::like_path(5),
            }],
            rev(1),
            &other,
        )
        .unwrap();
    let frame = commit_frame(&Bytes::from(writer::encode_commit_frame(
        &did(),
        1,
        &out,
        "t",
    )));
    assert!(matches!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::Commit(_))
    ));
}

#[test]
fn a_lying_block_is_rejected_by_hash() {
    let (pk, sign) = common::k256_signer(1);
    let mut w = seeded();
    let out = w
        .apply(
            &[WriteOp::Create {
                path: common::like_path(9999),
                record: common::like_record(9999),
            }],
            rev(1),
            &sign,
        )
        .unwrap();
    let mut frame = *commit_frame(&Bytes::from(writer::encode_commit_frame(
        &did(),
        1,
        &out,
        "t",
    )));
    let mut car = frame.blocks.to_vec();
    let last = car.len() - 2;
    car[last] ^= 0x01;
    frame.blocks = Bytes::from(car);
    assert!(matches!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::Car(car::CarError::HashMismatch(_)))
    ));
}

#[test]
fn a_missing_mst_node_or_record_is_rejected() {
    let (pk, sign) = common::k256_signer(1);
    let mut w = seeded();
    let out = w
        .apply(
            &[WriteOp::Create {
                path: common::like_path(7777),
                record: common::like_record(7777),
            }],
            rev(1),
            &sign,
        )
        .unwrap();
    let parsed = car::read_car(Bytes::from(out.car.clone()), car::CarLimits::default()).unwrap();
    let record_cid = hash::cid_for_cbor(&common::like_record(7777));
    for drop in parsed.blocks.keys().filter(|c| **c != out.commit_cid) {
        let kept: Vec<_> = parsed
            .blocks
            .iter()
            .filter(|(c, _)| *c != drop)
            .map(|(c, b)| (c, b.as_ref()))
            .collect();
        let mut frame = *commit_frame(&Bytes::from(writer::encode_commit_frame(
            &did(),
            1,
            &out,
            "t",
        )));
        frame.blocks = Bytes::from(car::write_car(&[out.commit_cid], kept));
        let err = verify_commit_frame(&frame, &pk).unwrap_err();
        if *drop == record_cid {
            assert!(matches!(err, VerifyError::MissingRecord(_)), "{err}");
        } else {
            assert!(
                matches!(err, VerifyError::Mst(MstError::MissingBlock(_))),
                "{err}"
            );
        }
    }
}

#[test]
fn a_wrong_prev_data_or_mismatched_frame_fields_are_rejected() {
    let (pk, sign) = common::k256_signer(1);
    let mut w = seeded();
    let out = w
        .apply(
            &[WriteOp::Delete {
                path: common::like_path(11),
            }],
            rev(1),
            &sign,
        )
        .unwrap();
    let bytes = Bytes::from(writer::encode_commit_frame(&did(), 1, &out, "t"));
    let mut frame = *commit_frame(&bytes);
    frame.prev_data = Some(out.commit.data);
    assert!(matches!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::PrevDataMismatch { .. })
    ));
    let mut frame = *commit_frame(&bytes);
    frame.repo = Did::new("did:plc:someoneelse").unwrap();
    assert!(matches!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::DidMismatch { .. })
    ));
    let mut frame = *commit_frame(&bytes);
    frame.rev = rev(99);
    assert!(matches!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::RevMismatch { .. })
    ));
    let mut frame = *commit_frame(&bytes);
    frame.ops[0].prev = Some(out.commit_cid);
    assert!(verify_commit_frame(&frame, &pk).is_err());
    let mut frame = *commit_frame(&bytes);
    frame.prev_data = None;
    assert_eq!(
        verify_commit_frame(&frame, &pk),
        Err(VerifyError::MissingPrevData)
    );
}

#[test]
fn frames_reject_trailing_bytes_and_report_unknown_types() {
    let (_, sign) = common::k256_signer(1);
    let mut w = seeded();
    let out = w
        .apply(
            &[WriteOp::Delete {
                path: common::like_path(1),
            }],
            rev(1),
            &sign,
        )
        .unwrap();
    let mut bytes = writer::encode_commit_frame(&did(), 1, &out, "t");
    bytes.push(0);
    assert!(matches!(
        decode_frame(&Bytes::from(bytes), &FrameLimits::default()),
        Err(FrameError::Body { .. })
    ));

    #[derive(serde::Serialize)]
    struct Ident<'a> {
        seq: i64,
        did: &'a str,
        time: &'a str,
        handle: &'a str,
    }
    let f = writer::encode_frame(
        "#identity",
        &Ident {
            seq: 5,
            did: "did:plc:x",
            time: "t",
            handle: "a.test",
        },
    );
    match decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap() {
        Frame::Identity(i) => {
            assert_eq!(i.seq, 5);
            assert_eq!(i.handle.as_deref(), Some("a.test"));
        }
        other => panic!("{other:?}"),
    }
    #[derive(serde::Serialize)]
    struct Acct<'a> {
        seq: i64,
        did: &'a str,
        time: &'a str,
        active: bool,
        status: &'a str,
    }
    let f = writer::encode_frame(
        "#account",
        &Acct {
            seq: 6,
            did: "did:plc:x",
            time: "t",
            active: false,
            status: "takendown",
        },
    );
    assert!(
        matches!(decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap(), Frame::Account(a) if !a.active && a.status.as_deref() == Some("takendown"))
    );
    #[derive(serde::Serialize)]
    struct Info<'a> {
        name: &'a str,
    }
    let f = writer::encode_frame(
        "#info",
        &Info {
            name: "OutdatedCursor",
        },
    );
    assert!(
        matches!(decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap(), Frame::Info(i) if i.name == "OutdatedCursor")
    );
    let f = writer::encode_frame("#labels", &Info { name: "x" });
    assert_eq!(
        decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap(),
        Frame::Unknown {
            t: "#labels".into()
        }
    );
    let f = writer::encode_error_frame("FutureCursor", Some("too far"));
    assert!(
        matches!(decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap(), Frame::Error(e) if e.error == "FutureCursor")
    );
}

#[test]
fn frame_limits_are_enforced() {
    let (_, sign) = common::k256_signer(1);
    let mut w = seeded();
    let ops: Vec<_> = (0..5)
        .map(|i| WriteOp::Delete {
            path: common::like_path(i),
        })
        .collect();
    let out = w.apply(&ops, rev(1), &sign).unwrap();
    let bytes = Bytes::from(writer::encode_commit_frame(&did(), 1, &out, "t"));
    let limits = FrameLimits {
        max_ops: 4,
        ..FrameLimits::default()
    };
    assert_eq!(
        decode_frame(&bytes, &limits),
        Err(FrameError::TooLarge("ops"))
    );
    let limits = FrameLimits {
        max_blocks_bytes: 10,
        ..FrameLimits::default()
    };
    assert_eq!(
        decode_frame(&bytes, &limits),
        Err(FrameError::TooLarge("blocks"))
    );
}

#[test]
fn sync_frames_verify_the_commit_they_carry() {
    let (pk, _) = common::k256_signer(1);
    let w = seeded();
    let (cid, commit) = w.head().unwrap().clone();
    let car_bytes = car::write_car(&[cid], [(&cid, w.blocks()[&cid].as_ref())]);
    #[derive(serde::Serialize)]
    struct SyncBody<'a> {
        seq: i64,
        did: &'a str,
        #[serde(with = "serde_bytes")]
        blocks: &'a [u8],
        rev: String,
        time: &'a str,
    }
    let body = SyncBody {
        seq: 9,
        did: "did:plc:testrepo",
        blocks: &car_bytes,
        rev: commit.rev.to_string(),
        time: "t",
    };
    let f = writer::encode_frame("#sync", &body);
    let Frame::Sync(s) = decode_frame(&Bytes::from(f), &FrameLimits::default()).unwrap() else {
        panic!("not sync")
    };
    let v = tap_atproto::firehose::verify_sync_frame(&s, &pk).unwrap();
    assert_eq!(v.data, commit.data);
    let (other, _) = common::k256_signer(2);
    assert!(tap_atproto::firehose::verify_sync_frame(&s, &other).is_err());
}
