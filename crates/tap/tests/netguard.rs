//! Issue 16, item 1: hosts learned from the network (a PDS endpoint in a DID document) are
//! fetched only at public addresses unless `--allow-private-network`; the refusal is the
//! repo's error and names the flag, and nothing is fetched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use common::{Backend, TestDb, TestTap};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, add, did, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_at_a_non_public_address_is_refused_without_the_flag() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repos = Vec::new();
    // Loopback (the fake PDS itself), a private range and the cloud metadata address.
    for (n, endpoint) in [
        (1, net.pds.url()),
        (2, "http://10.0.0.1:2583".to_owned()),
        (3, "http://169.254.169.254".to_owned()),
    ] {
        let repo = RepoBuilder::with_records(did(n), TestKey::k256(u64::from(n)), 1, 20);
        net.pds.set_repo(
            repo.did().as_str(),
            tap_testkit::fake_pds::RepoReply::Car(repo.car_tree_order()),
        );
        net.plc.publish(&repo, &format!("r{n}.test"), &endpoint);
        repos.push(repo);
    }
    let mut cfg = net.config(&db);
    cfg.allow_private_network = false;
    let tap = TestTap::start(cfg).await;
    for repo in &repos {
        add(&tap, repo.did()).await;
    }
    for repo in &repos {
        let info = wait_for("the refusal", || async {
            let i = sync_support::info(&tap, repo.did()).await;
            (i["state"] == "error").then_some(i)
        })
        .await;
        let error = info["error"].as_str().unwrap();
        assert!(
            error.contains("--allow-private-network"),
            "{}: {error}",
            repo.did()
        );
    }
    assert_eq!(net.pds.requests(), 0, "nothing was fetched from loopback");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_flag_a_loopback_pds_is_fetched() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(4), TestKey::k256(4), 4, 20);
    net.host(&repo, "lo.test", repo.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.allow_private_network = true;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::backfill(&tap, &consumer, &repo).await;
    tap.stop().await;
}
