//! Nothing lost, nothing stuck (issue 10): the sync engine under shutdowns, poison frames and
//! store failures, against the loopback fakes, on both backends. Each scenario is named after
//! the behaviour it holds; the crash-point suite (SIGKILL of the real binary) is in
//! `crash_points.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use common::{TestDb, TestTap};
use serde_json::Value;
use tap::store::{NewEvent, RepoWrite, Store, StoreOptions};
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_plc::Route;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, WAIT, add, did, wait_for, wait_state};

/// Backfills `repo` through a first run, waits until every event is acked and deleted,
/// and stops it cleanly: the next run starts with `repo` active at its current rev.
async fn backfill_once(net: &Net, db: &TestDb, repo: &RepoBuilder) {
    let mut cfg = net.config(db);
    // Stored events: the repo is settled once the outbox is empty (no backfill token).
    cfg.durable_backfill_events = true;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    consumer.wait_records(repo.records().len()).await;
    wait_state(&tap, repo.did(), "active").await;
    wait_for("every backfill event acked and deleted", || async {
        (tap.store.outbox_count().await.unwrap() == 0).then_some(())
    })
    .await;
    tap.stop().await;
}

async fn stored_cursor(db: &TestDb, net: &Net) -> Option<i64> {
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let key = url::Url::parse(&net.relay.url()).unwrap().to_string();
    let cursor = store.firehose_cursor(&key).await.unwrap();
    store.close().await;
    cursor
}

/// Defect 1: a stop while the outbox backlog is still loading made the producers' appends
/// fail with "closed", which the firehose worker took for a permanent failure: it skipped
/// the commit and the final flush saved the cursor past it. A stop is never a skip.
async fn stop_while_backlog_loads(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(31), TestKey::k256(31), 31, 5);
    net.host(&repo, "carol.test", repo.car_tree_order());
    backfill_once(&net, &db, &repo).await;

    // A backlog bigger than the capacity of the next run, with nobody to ack it: the loader
    // waits for capacity, so producers wait for the loader.
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let mut write = RepoWrite::new("did:plc:backlogbacklogbacklogbac");
    write.events = (0..5)
        .map(|i| NewEvent {
            live: false,
            payload: format!(r#"{{"type":"identity","identity":{{"n":{i}}}}}"#),
        })
        .collect();
    store.apply(write).await.unwrap();
    store.close().await;

    let (path, record) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[WriteOp::Create {
            path: path.clone(),
            record,
        }])
        .unwrap();
    net.relay.push_frame(1, frame);
    let mut cfg = net.config(&db);
    cfg.outbox_capacity = 2;
    let resolved = net.plc.requests(&Route::Plc(repo.did().to_string()));
    let tap = TestTap::start(cfg).await;
    // The worker resolves the key to verify the commit, then appends (and waits).
    assert!(
        net.plc
            .wait_for_requests(&Route::Plc(repo.did().to_string()), resolved + 1, WAIT)
            .await,
        "the commit reached a firehose worker"
    );
    tap.stop().await;
    let cursor = stored_cursor(&db, &net).await;
    assert!(
        cursor.is_none_or(|c| c < 1),
        "the cursor passed an event that was never applied: {cursor:?}"
    );

    // The next run delivers the commit.
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    let live = wait_for("the live create", || async {
        consumer
            .records()
            .into_iter()
            .find(|r: &Value| r["live"] == true)
    })
    .await;
    let (collection, rkey) = path.split_once('/').unwrap();
    assert_eq!(live["collection"], collection);
    assert_eq!(live["rkey"], rkey);
    assert_eq!(live["action"], "create");
    tap.stop().await;
}
on_both_backends!(
    a_stop_while_the_backlog_loads_never_skips_a_firehose_event,
    stop_while_backlog_loads
);
