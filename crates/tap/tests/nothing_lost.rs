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
    sync_support::backfill(&tap, &consumer, repo).await;
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
    let mut write = RepoWrite::new("did:plc:backlogbacklogbacklogbac".parse().unwrap());
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

/// Replaces the first `create` op action of a `#commit` frame with `ignite` (same length,
/// so the CBOR stays well-formed): the decoder refuses the frame, the salvage reader can
/// still read its seq and repo.
fn with_unknown_op_action(mut frame: Vec<u8>) -> Vec<u8> {
    let needle = b"\x66create";
    let at = frame
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("a create op");
    frame[at + 1..at + needle.len()].copy_from_slice(b"ignite");
    frame
}

/// Defect 3: a frame that fails to decode ended the connection before its seq started, so
/// every reconnect resumed below it and the relay sent it again: the firehose stalled for
/// good. Now it is skipped (its repo resynced, which brings in what it carried) and the
/// stream goes on, on one connection.
async fn undecodable_frame_is_skipped(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(32), TestKey::k256(32), 32, 3);
    net.host(&repo, "dave.test", repo.car_tree_order());
    backfill_once(&net, &db, &repo).await;

    let (path, record) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[WriteOp::Create {
            path: path.clone(),
            record,
        }])
        .unwrap();
    // The PDS already has the commit the relay mangles.
    net.pds.set_repo(
        repo.did().as_str(),
        tap_testkit::fake_pds::RepoReply::Car(repo.car_tree_order()),
    );
    // The builder numbers its frames 1, 2; the garbage between them has no seq.
    net.relay.push_frame(1, with_unknown_op_action(frame));
    net.relay.push_frame(2, b"\xff\x00 not cbor".to_vec());
    let (path2, record2) = repo.generator().next_record();
    let frame2 = repo
        .commit_frame(&[WriteOp::Create {
            path: path2.clone(),
            record: record2,
        }])
        .unwrap();
    net.pds.set_repo(
        repo.did().as_str(),
        tap_testkit::fake_pds::RepoReply::Car(repo.car_tree_order()),
    );
    net.relay.push_frame(3, frame2);

    let connections = net.relay.connections();
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    let key = url::Url::parse(&net.relay.url()).unwrap().to_string();
    wait_for("the cursor to pass every frame", || async {
        let cursor = tap.store.firehose_cursor(&key).await.unwrap();
        (cursor >= Some(2)).then_some(())
    })
    .await;
    // Both new records reach the consumer: the refused one through the resync.
    let all = wait_for("both new records", || async {
        let records = consumer.records();
        let got = sync_support::paths_and_cids(&records);
        (got.contains_key(&path) && got.contains_key(&path2)).then_some(got)
    })
    .await;
    let want = sync_support::expected(&repo);
    assert_eq!(all.get(&path), want.get(&path));
    assert_eq!(all.get(&path2), want.get(&path2));
    wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        net.relay.connections(),
        connections + 1,
        "tap never reconnected"
    );
    tap.stop().await;
}
on_both_backends!(
    an_undecodable_frame_is_skipped_and_its_repo_resynced,
    undecodable_frame_is_skipped
);

/// Defect 5: with `--outbox-only` beside a writing tap on PostgreSQL, ids commit out of
/// order; the loader paged by id, so a row committed after a higher id had been read was
/// never delivered. SQLite has one writer, whose commits are in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_only_delivers_rows_whose_ids_commit_out_of_order() {
    let Some(db) = TestDb::new(common::Backend::Postgres).await else {
        return;
    };
    let tap = TestTap::start(common::api_only_config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    let tap::store::DatabaseUrl::Postgres(url) = &db.url else {
        unreachable!("a PostgreSQL database")
    };
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let insert = "INSERT INTO outbox (did, live, payload) \
                  VALUES ('did:plc:outoforderoutoforderoutoo', true, $1)";
    let payload = |n: u32| format!(r#"{{"type":"identity","identity":{{"n":{n}}}}}"#);
    // The first writer takes the lower id and commits last.
    let mut slow = connect().await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx.execute(insert, &[&payload(1)]).await.unwrap();
    let fast = connect().await;
    let fast_insert = {
        let p = payload(2);
        tokio::spawn(async move { fast.execute(insert, &[&p]).await.unwrap() })
    };
    let observer = connect().await;
    wait_for(
        "the fast row delivered, or tap waiting for the slow writer",
        || async {
            let waiting: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted \
                 AND relation = 'outbox'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let delivered = consumer.events().iter().any(|e| e["identity"]["n"] == 2);
            (waiting > 0 || delivered).then_some(())
        },
    )
    .await;
    slow_tx.commit().await.unwrap();
    fast_insert.await.unwrap();
    wait_for("both rows delivered", || async {
        let events = consumer.events();
        let got = |n: u32| events.iter().any(|e| e["identity"]["n"] == n);
        (got(1) && got(2)).then_some(())
    })
    .await;
    tap.stop().await;
}

/// Defect 6, live side: a PLC answering 503 while a commit is verified made tap mark the
/// repo desynchronized and download it whole (the resync then failed on PLC too, and the
/// repo sat in `error` for a minute). A failed lookup is not a verdict: the commit waits
/// for its key and is delivered live, with no getRepo.
async fn plc_blip_is_not_a_verdict(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(33), TestKey::k256(33), 33, 3);
    net.host(&repo, "erin.test", repo.car_tree_order());
    backfill_once(&net, &db, &repo).await;
    let fetches = net.pds.requests();

    // The next run starts with a cold identity cache, and PLC is failing.
    let plc = Route::Plc(repo.did().to_string());
    net.plc
        .set(plc.clone(), tap_testkit::fake_plc::Reply::Status(503));
    let (path, record) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[WriteOp::Create {
            path: path.clone(),
            record,
        }])
        .unwrap();
    net.relay.push_frame(1, frame);
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    let before = net.plc.requests(&plc);
    assert!(
        net.plc.wait_for_requests(&plc, before + 2, WAIT).await,
        "tap retried the lookup"
    );
    net.publish(&repo, "erin.test");
    let live = wait_for("the commit, delivered live", || async {
        consumer
            .records()
            .into_iter()
            .find(|r: &Value| r["rkey"] == path.split_once('/').unwrap().1)
    })
    .await;
    assert_eq!(
        live["live"], true,
        "applied as a live commit, not by a resync"
    );
    assert_eq!(net.pds.requests(), fetches, "no getRepo");
    let info = wait_state(&tap, repo.did(), "active").await;
    assert!(
        info["error"].as_str().unwrap_or_default().is_empty(),
        "{info}"
    );
    tap.stop().await;
}
on_both_backends!(
    a_plc_blip_while_verifying_a_commit_is_retried_not_a_resync,
    plc_blip_is_not_a_verdict
);

/// Defect 6, resync side: a PDS answering 503 put the repo in `error` with the long
/// backoff, exactly like a forged CAR. Now the repo goes back to `desynchronized` with the
/// reason and is tried again within seconds.
async fn pds_blip_is_not_a_verdict(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(34), TestKey::k256(34), 34, 4);
    net.publish(&repo, "frank.test");
    net.pds.set_repo(
        repo.did().as_str(),
        tap_testkit::fake_pds::RepoReply::Status(503),
    );
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let info = wait_for("the failed resync recorded", || async {
        let i = sync_support::info(&tap, repo.did()).await;
        (net.pds.requests() >= 1 && (i["state"] == "desynchronized" || i["state"] == "error"))
            .then_some(i)
    })
    .await;
    assert_eq!(info["state"], "desynchronized", "no verdict: {info}");
    assert!(
        info["error"].as_str().unwrap_or_default().contains("503"),
        "the reason is kept: {info}"
    );
    net.pds.set_repo(
        repo.did().as_str(),
        tap_testkit::fake_pds::RepoReply::Car(repo.car_tree_order()),
    );
    consumer.wait_records(repo.records().len()).await;
    wait_state(&tap, repo.did(), "active").await;
    tap.stop().await;
}
on_both_backends!(
    a_pds_blip_during_a_resync_is_retried_soon_not_an_error,
    pds_blip_is_not_a_verdict
);

/// Defect 8: while a resync waited for outbox capacity it did not read the getRepo body,
/// so the whole-request timeout ran on and failed the resync, and the next attempt
/// downloaded the whole repo again. A slow consumer must slow tap down, not make it
/// re-download: the timeouts count only the time spent waiting on the PDS.
async fn backpressure_never_refetches(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(35), TestKey::k256(35), 35, 2000);
    net.host(&repo, "gina.test", repo.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.repo_fetch_timeout = std::time::Duration::from_secs(2);
    cfg.outbox_capacity = 100;
    let tap = TestTap::start(cfg).await;
    add(&tap, repo.did()).await;
    // The stimulus is time itself: nobody consumes for longer than the fetch timeout,
    // with the resync blocked on the outbox for all of it.
    wait_for("the resync to start", || async {
        (net.pds.requests() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let consumer = Consumer::connect(&tap).await;
    let records = consumer.wait_records(repo.records().len()).await;
    assert_eq!(
        sync_support::paths_and_cids(&records),
        sync_support::expected(&repo)
    );
    wait_state(&tap, repo.did(), "active").await;
    assert_eq!(net.pds.requests(), 1, "the repo was downloaded once");
    tap.stop().await;
}
on_both_backends!(
    a_slow_consumer_slows_a_resync_down_without_a_second_download,
    backpressure_never_refetches
);

/// Defect 7: a resync fetched the repo only after verifying the handle (DNS TXT or HTTPS
/// look-ups of seconds each on the real network), which held its worker. Now the fetch
/// needs only the DID document; the handle is checked apart and its identity event comes
/// when it is known.
async fn slow_handle_does_not_hold_the_fetch(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(36), TestKey::k256(36), 36, 10);
    net.host(&repo, "slow.test", repo.car_tree_order());
    net.plc.set_delay(
        Route::ResolveHandle("slow.test".to_owned()),
        std::time::Duration::from_secs(5),
    );
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    consumer.wait_records(repo.records().len()).await;
    assert!(
        consumer.events().iter().all(|e| e["type"] != "identity"),
        "every record arrived while the handle was still being checked"
    );
    let identity = wait_for("the identity event", || async {
        consumer
            .events()
            .into_iter()
            .find(|e| e["type"] == "identity")
    })
    .await;
    assert_eq!(identity["identity"]["handle"], "slow.test");
    tap.stop().await;
}
on_both_backends!(
    a_slow_handle_check_does_not_hold_the_repo_fetch,
    slow_handle_does_not_hold_the_fetch
);
