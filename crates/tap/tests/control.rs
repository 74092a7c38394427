//! Steering a running tap (issue 14) against loopback fakes: a forced resync re-downloads a
//! repo whole and catches up what the firehose never said.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use common::{TestDb, TestTap};
use serde_json::{Value, json};
use tap_testkit::fake_pds::{Endpoint, RepoReply};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, did, expected, paths_and_cids, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_resync_fetches_the_whole_repo_and_delivers_what_the_firehose_missed() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(40), TestKey::k256(40), 40, 200);
    net.host(&repo, "forced.test", repo.car_tree_order());
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::backfill(&tap, &consumer, &repo).await;
    let before = expected(&repo);

    // The PDS moves on, but the firehose never tells: only a forced resync can notice.
    let ops = repo.random_ops(5);
    repo.commit(&ops).unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    let resp = reqwest::Client::new()
        .post(tap.url("/repos/resync"))
        .json(&json!({"dids": [repo.did().as_str()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let rev = repo.writer().head().unwrap().1.rev.as_str().to_owned();
    let info = wait_for("the forced resync", || async {
        let i = sync_support::info(&tap, repo.did()).await;
        (i["state"] == "active" && i["rev"] == rev.as_str()).then_some(i)
    })
    .await;
    assert_eq!(info["last_fetch"]["kind"], "full", "{info}");
    assert_eq!(info["error"], "", "{info}");
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 2);
    assert_eq!(info["records"], repo.records().len());

    // What changed arrives as events: a create or update for every record now on the PDS
    // that tap did not hold, a delete for every one it held that is gone.
    let now = expected(&repo);
    let mut changed = now.clone();
    changed.retain(|path, cid| before.get(path) != Some(cid));
    let gone: Vec<&String> = before.keys().filter(|p| !now.contains_key(*p)).collect();
    assert!(
        !changed.is_empty() || !gone.is_empty(),
        "the ops changed nothing"
    );
    let (writes, deletes) = wait_for("the resync's events", || async {
        let later = consumer.records().split_off(before.len());
        let (deletes, writes): (Vec<_>, Vec<_>) =
            later.into_iter().partition(|r| r["action"] == "delete");
        let deletes: Vec<String> = deletes
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["collection"].as_str().unwrap(),
                    r["rkey"].as_str().unwrap()
                )
            })
            .collect();
        (writes.len() + deletes.len() == changed.len() + gone.len()).then_some((writes, deletes))
    })
    .await;
    assert_eq!(paths_and_cids(&writes), changed);
    assert_eq!(deletes.iter().collect::<Vec<_>>(), gone);
    tap.stop().await;
}

async fn status(tap: &TestTap) -> Value {
    let resp = reqwest::get(tap.url("/status.json")).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_document_adds_up_and_names_why_repos_fail() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repos: Vec<RepoBuilder> = (0..3)
        .map(|i| {
            RepoBuilder::with_records(
                did(50 + i),
                TestKey::k256(50 + u64::from(i)),
                50 + u64::from(i),
                40,
            )
        })
        .collect();
    for (i, repo) in repos.iter().enumerate() {
        net.host(repo, &format!("s{i}.test"), repo.car_tree_order());
    }
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    for repo in &repos {
        sync_support::add(&tap, repo.did()).await;
    }
    // A DID nobody published: its resync fails, and the document says why.
    let ghost = did(59);
    sync_support::add(&tap, &ghost).await;
    let records: usize = repos.iter().map(|r| r.records().len()).sum();
    consumer.wait_records(records).await;
    let doc = wait_for("every repo settled and the firehose up", || async {
        let doc = status(&tap).await;
        (doc["repos"]["by_state"]["active"] == 3
            && doc["repos"]["by_state"]["error"] == 1
            && doc["firehose"]["connected"] == true
            && doc["outbox"]["unacked"] == 0)
            .then_some(doc)
    })
    .await;
    assert_eq!(doc["repos"]["total"], 4, "{doc}");
    assert_eq!(doc["repos"]["records"], records);
    assert_eq!(doc["backfill"]["repos_done"], 4);
    assert_eq!(doc["backfill"]["repos_remaining"], 0);
    assert_eq!(doc["backfill"]["percent"], 100);
    assert_eq!(doc["backfill"]["records_synced"], records);
    assert_eq!(doc["outbox"]["consumers"], 1);
    assert_eq!(doc["outbox"]["mode"], "websocket-ack");
    assert!(doc["outbox"]["delivered"].as_u64().unwrap() >= records as u64);
    assert_eq!(doc["resync"]["busy"], 0);
    assert_eq!(
        doc["firehose"]["upstream"]
            .as_str()
            .unwrap()
            .trim_end_matches('/'),
        net.relay.url()
    );
    assert_eq!(
        doc["bandwidth"]["ledger"]["total"],
        sync_support::bandwidth_total(&tap).await
    );
    let info = sync_support::info(&tap, &ghost).await;
    assert_eq!(doc["errors"][0]["reason"], info["error"], "{doc}");
    assert_eq!(doc["errors"][0]["repos"], 1);
    assert_eq!(doc["healthy"], false);
    assert_eq!(doc["diagnoses"][0]["code"], "repos_failing");
    assert_eq!(doc["diagnoses"][0]["level"], "warn");
    let message = doc["diagnoses"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("1 repo in error; most common: "),
        "{message}"
    );

    // Removing the failing repo makes tap healthy again.
    let resp = reqwest::Client::new()
        .post(tap.url("/repos/remove"))
        .json(&json!({"dids": [ghost.as_str()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let doc = status(&tap).await;
    assert_eq!(doc["healthy"], true, "{doc}");
    assert_eq!(doc["diagnoses"], json!([]));
    tap.stop().await;
}
