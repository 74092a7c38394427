//! The sync engine against loopback fakes (relay, PDS, PLC from `tap-testkit`): backfill,
//! live commits, resync deletes, hostile peers, and repo discovery.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use std::time::Duration;

use common::{Backend, TestDb, TestTap};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tap::Config;
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::{FakePds, RepoReply};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};
use tokio_tungstenite::tungstenite::Message;

use sync_support::{
    Consumer, Net, WAIT, add, did, expected, info, paths_and_cids, wait_for, wait_state,
};

async fn backfill_then_live(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(1), TestKey::k256(1), 11, 40);
    net.publish(&repo, "alice.test");
    // The reference PDS does not write CARs in tree order; neither does this one.
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_shuffled(3)));
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;

    let n = repo.records().len();
    let historical = consumer.wait_records(n).await;
    assert!(historical.iter().all(|r| r["live"] == false));
    assert_eq!(
        paths_and_cids(&historical),
        expected(&repo),
        "backfill equals the repo"
    );
    // The handle is checked apart from the fetch: its event comes when it is known.
    let identity = wait_for("the identity event", || async {
        consumer
            .events()
            .into_iter()
            .find(|e| e["type"] == "identity")
    })
    .await;
    assert_eq!(identity["identity"]["handle"], "alice.test");
    let i = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(i["records"], n);

    // Live: create, update and delete in one commit, then another create.
    let mut paths = repo.records().keys().cloned();
    let upd = paths.next().unwrap();
    let del = paths.next().unwrap();
    let (new_path, new_rec) = repo.generator().next_record();
    let (_, upd_rec) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[
            WriteOp::Create {
                path: new_path.clone(),
                record: new_rec,
            },
            WriteOp::Update {
                path: upd.clone(),
                record: upd_rec,
            },
            WriteOp::Delete { path: del.clone() },
        ])
        .unwrap();
    net.relay.push_frame(1, frame);
    let all = consumer.wait_records(n + 3).await;
    let live: Vec<&Value> = all[n..].iter().collect();
    assert!(live.iter().all(|r| r["live"] == true), "{live:?}");
    let actions: Vec<(&str, String)> = live
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                format!(
                    "{}/{}",
                    r["collection"].as_str().unwrap(),
                    r["rkey"].as_str().unwrap()
                ),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![("create", new_path), ("update", upd), ("delete", del)],
        "live events in commit order"
    );
    assert!(live[2].get("cid").is_none() && live[2].get("record").is_none());
    let i = wait_for("record count after the live commit", || async {
        let i = info(&tap, repo.did()).await;
        (i["records"] == n + 1 - 1).then_some(i)
    })
    .await;
    assert_eq!(i["state"], "active");
    // The cursor advanced past the commit.
    wait_for("cursor saved", || async {
        let c: Value = reqwest::get(tap.url("/stats/cursors"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (c["firehose"] == 1).then_some(())
    })
    .await;
    tap.stop().await;
}
on_both_backends!(
    backfill_equals_the_repo_then_live_commits_arrive_in_order,
    backfill_then_live
);

async fn resync_deletes(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(2), TestKey::p256(2), 12, 30);
    net.publish(&repo, "bob.test");
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let n = repo.records().len();
    consumer.wait_records(n).await;
    wait_state(&tap, repo.did(), "active").await;

    // While tap is not watching (the relay never carries it), three records are deleted.
    let gone: Vec<String> = repo.records().keys().skip(5).take(3).cloned().collect();
    let ops: Vec<WriteOp> = gone
        .iter()
        .map(|p| WriteOp::Delete { path: p.clone() })
        .collect();
    repo.commit(&ops).unwrap();
    // The next commit does not chain onto what tap has: it must resync.
    let (p, r) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[WriteOp::Create { path: p, record: r }])
        .unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_shuffled(9)));
    net.relay.push_frame(1, frame);

    let records = consumer.wait_records(n + 4).await;
    let after: Vec<&Value> = records[n..].iter().collect();
    let deletes: Vec<String> = after
        .iter()
        .filter(|r| r["action"] == "delete")
        .map(|r| sync_support::record_path(r))
        .collect();
    assert_eq!(deletes, gone, "every vanished record is deleted");
    assert!(
        after.iter().all(|r| r["live"] == false),
        "resync output is historical"
    );
    let i = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        i["records"],
        repo.records().len(),
        "the index matches the repo"
    );
    assert_eq!(i["error"], "");
    tap.stop().await;
}
on_both_backends!(
    resync_after_a_broken_chain_emits_deletes_for_vanished_records,
    resync_deletes
);

/// Reads `n` event frames from `/channel` without acking any, then hangs up.
async fn read_without_acking(tap: &TestTap, n: usize) -> Vec<Value> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/channel", tap.addr))
        .await
        .unwrap();
    let mut events = Vec::new();
    while events.len() < n {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("events keep coming")
            .expect("the connection stays open")
            .unwrap();
        if let Message::Text(text) = msg {
            events.push(serde_json::from_str(&text).unwrap());
        }
    }
    events
}

async fn unacked_first_backfill_reruns(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(3), TestKey::k256(3), 13, 120);
    net.host(&repo, "carol.test", repo.car_shuffled(4));
    let n = repo.records().len();

    // First run: the backfill completes and is delivered, but nothing is acked.
    let tap = TestTap::start(net.config(&db)).await;
    add(&tap, repo.did()).await;
    let seen = read_without_acking(&tap, n + 1).await;
    assert_eq!(seen.iter().filter(|e| e["type"] == "record").count(), n);
    wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        tap.store.outbox_count().await.unwrap(),
        1,
        "only the identity event is an outbox row; the {n} records went out from memory"
    );
    assert!(
        tap.store
            .backfill_token(repo.did().as_str())
            .await
            .unwrap()
            .is_some(),
        "the repo is marked until its backfill is acked"
    );
    tap.stop().await;

    // Second run: the marked backfill runs again and every record arrives once more.
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    let records = consumer.wait_records(n).await;
    assert_eq!(paths_and_cids(&records), expected(&repo));
    assert!(
        records
            .iter()
            .all(|r| r["live"] == false && r["action"] == "create")
    );
    let i = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(i["records"], n);
    // Once all of it is acked, the mark goes and a restart has nothing to redo.
    wait_for("the backfill token to be cleared", || async {
        let token = tap.store.backfill_token(repo.did().as_str()).await.unwrap();
        token.is_none().then_some(())
    })
    .await;
    drop(consumer);
    tap.stop().await;
    let tap = TestTap::start(net.config(&db)).await;
    assert_eq!(
        info(&tap, repo.did()).await["state"],
        "active",
        "nothing to redo after a fully acked backfill"
    );
    tap.stop().await;
}
on_both_backends!(
    a_first_backfill_not_acked_before_shutdown_is_delivered_again_after_restart,
    unacked_first_backfill_reruns
);

async fn durable_backfill_events(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(4), TestKey::k256(4), 14, 60);
    net.host(&repo, "dave.test", repo.car_tree_order());
    let n = repo.records().len();
    let mut cfg = net.config(&db);
    cfg.durable_backfill_events = true;
    let tap = TestTap::start(cfg).await;
    add(&tap, repo.did()).await;
    let seen = read_without_acking(&tap, n + 1).await;
    assert_eq!(seen.iter().filter(|e| e["type"] == "record").count(), n);
    wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        tap.store.outbox_count().await.unwrap(),
        n as u64 + 1,
        "every historical event is an outbox row"
    );
    assert_eq!(
        tap.store.backfill_token(repo.did().as_str()).await.unwrap(),
        None
    );
    tap.stop().await;
}
on_both_backends!(
    with_durable_backfill_events_every_historical_event_is_stored,
    durable_backfill_events
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_commit_desynchronizes_and_nothing_forged_is_delivered() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(3), TestKey::k256(3), 13, 10);
    net.publish(&repo, "carol.test");
    let honest_car = repo.car_tree_order();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(honest_car));
    let mut cfg = net.config(&db);
    cfg.resync_parallelism = 1;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let n = repo.records().len();
    consumer.wait_records(n).await;
    wait_state(&tap, repo.did(), "active").await;

    // A commit signed by another key. The PDS then fails (500), so the repo waits for its
    // next try, desynchronized with the reason, instead of healing at once.
    let (p, r) = repo.generator().next_record();
    let forged = repo
        .forged_signature_frame(
            &[WriteOp::Create {
                path: p.clone(),
                record: r,
            }],
            &TestKey::k256(99),
        )
        .unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Status(500));
    net.relay.push_frame(1, forged);
    let i = wait_for("the repo to fail its resync", || async {
        let i = info(&tap, repo.did()).await;
        (i["state"] == "desynchronized" && i["retries"].as_u64() >= Some(1)).then_some(i)
    })
    .await;
    assert!(i["error"].as_str().unwrap().contains("500"), "{i}");
    assert!(i["retries"].as_u64().unwrap() >= 1);
    let forged_rkey = p.split('/').nth(1).unwrap();
    assert!(
        consumer.records().iter().all(|r| r["rkey"] != forged_rkey),
        "the forged record was never delivered"
    );
    let health = reqwest::get(tap.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    tap.stop().await;
}

/// Sets up one repo whose PDS misbehaves as `reply`, adds it, and returns its /info once
/// it leaves `resyncing` for `state`.
async fn hostile_pds(
    reply: impl FnOnce(&RepoBuilder) -> RepoReply,
    tweak: impl FnOnce(&mut Config),
    state: &str,
) -> (Value, u64) {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(4), TestKey::k256(4), 14, 20);
    net.publish(&repo, "dave.test");
    net.pds.set_repo(repo.did().as_str(), reply(&repo));
    let mut cfg = net.config(&db);
    tweak(&mut cfg);
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let i = wait_state(&tap, repo.did(), state).await;
    assert!(
        consumer.records().is_empty(),
        "nothing delivered from a hostile PDS"
    );
    assert_eq!(
        reqwest::get(tap.url("/health")).await.unwrap().status(),
        200
    );
    let downloaded = sync_support::bandwidth_total(&tap).await.as_u64().unwrap();
    tap.stop().await;
    (i, downloaded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_block_puts_the_repo_in_error_with_a_reason() {
    let (i, _) = hostile_pds(|r| RepoReply::Car(r.car_lying_block()), |_| {}, "error").await;
    assert!(
        i["error"].as_str().unwrap().contains("verification failed"),
        "{i}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_mst_node_puts_the_repo_in_error_with_a_reason() {
    let (i, _) = hostile_pds(|r| RepoReply::Car(r.car_missing_node()), |_| {}, "error").await;
    assert!(
        i["error"].as_str().unwrap().contains("verification failed"),
        "{i}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limiting_pds_leaves_the_repo_desynchronized_not_in_error() {
    let (i, _) = hostile_pds(|_| RepoReply::Status(429), |_| {}, "desynchronized").await;
    assert_eq!(i["error"], "");
    assert!(i["retries"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_hits_the_fetch_timeout() {
    let (i, _) = hostile_pds(
        |r| RepoReply::Trickle(r.car_tree_order(), Duration::from_millis(200)),
        |cfg| cfg.repo_fetch_timeout = Duration::from_secs(2),
        "desynchronized",
    )
    .await;
    // A timeout is no verdict on the repo: it is tried again soon.
    assert!(
        i["error"].as_str().unwrap().contains("timeout ran out"),
        "{i}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends_is_cut_at_the_size_cap() {
    let (i, _) = hostile_pds(
        |r| {
            let car = r.car_tree_order();
            RepoReply::Endless {
                status: 200,
                prefix: car.clone(),
                chunk: car[car.len() - 200..].to_vec(),
            }
        },
        |cfg| cfg.max_repo_bytes = 1 << 20,
        "error",
    )
    .await;
    assert!(
        i["error"].as_str().unwrap().contains("verification failed"),
        "{i}"
    );
}

/// A PDS answering 500 with a body that never ends: tap reads at most 4 KiB of an error
/// body (looking for the XRPC error name), so the answer costs kilobytes, the repo is
/// retried later, and tap stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_with_an_endless_body_is_read_no_further_than_4_kib() {
    let (i, downloaded) = hostile_pds(
        |_| RepoReply::Endless {
            status: 500,
            prefix: br#"{"error":"InternalServerError","message":""#.to_vec(),
            chunk: vec![b'x'; 64 << 10],
        },
        |_| {},
        "desynchronized",
    )
    .await;
    assert!(i["error"].as_str().unwrap().contains("answered 500"), "{i}");
    // The 4 KiB read, plus what one chunk brings and what PLC served.
    assert!(downloaded < 256 << 10, "{downloaded} bytes downloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_relay_is_skipped_and_a_dropped_connection_is_resumed() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let tap = TestTap::start(net.config(&db)).await;
    wait_for("first connection", || async {
        (net.relay.connections() >= 1).then_some(())
    })
    .await;
    net.relay.push_raw(b"\xff\x00 definitely not cbor".to_vec());
    // Garbage is skipped on the same connection: the next frame still moves the cursor.
    net.relay
        .push_frame(1, sync_support::identity_frame(1, &did(9)));
    let key = url::Url::parse(&net.relay.url()).unwrap().to_string();
    wait_for("the frame after the garbage", || async {
        (tap.store.firehose_cursor(&key).await.unwrap() == Some(1)).then_some(())
    })
    .await;
    assert_eq!(
        net.relay.connections(),
        1,
        "garbage does not cost the connection"
    );
    net.relay.drop_connections();
    wait_for("reconnect after a drop", || async {
        (net.relay.connections() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        reqwest::get(tap.url("/health")).await.unwrap().status(),
        200
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_collection_mode_enumerates_every_page_then_clears_its_cursor() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    net.relay.set_pages(
        Some("com.example.signal"),
        vec![
            vec![
                json!({"did": did(10).as_str()}),
                json!({"did": did(11).as_str()}),
            ],
            vec![
                json!({"did": did(12).as_str()}),
                json!({"did": "not a did"}),
            ],
        ],
    );
    let mut cfg = net.config(&db);
    cfg.scope =
        tap::config::TrackingScope::SignalCollections(vec!["com.example.signal".parse().unwrap()]);
    let tap = TestTap::start(cfg).await;
    wait_for("three repos discovered", || async {
        (tap.store.repo_count().await.ok()? == 3).then_some(())
    })
    .await;
    let requests = net.relay.list_requests();
    assert!(
        requests
            .iter()
            .all(|q| q.contains("collection=com.example.signal") && q.contains("limit=1000"))
    );
    assert!(
        requests.iter().any(|q| q.contains("cursor=1")),
        "{requests:?}"
    );
    // The pass records its end after its last page of repos.
    wait_for("a finished pass to start over next time", || async {
        let cursor = tap
            .store
            .collection_cursor(net.config(&db).relay_url.as_ref(), "com.example.signal")
            .await
            .unwrap();
        (cursor.as_deref() == Some("")).then_some(())
    })
    .await;
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lightrail_lists_every_signal_collection_in_one_call_per_page() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    // A second fake relay plays Lightrail; the relay itself is never asked.
    let lightrail = tap_testkit::fake_relay::FakeRelay::start().await;
    lightrail.set_pages(
        Some("app.bsky.graph.starterpack,app.bsky.graph.list"),
        vec![
            vec![
                json!({"did": did(30).as_str()}),
                json!({"did": did(31).as_str()}),
            ],
            vec![json!({"did": did(32).as_str()})],
        ],
    );
    let mut cfg = net.config(&db);
    cfg.light_rail_url = Some(url::Url::parse(&lightrail.url()).unwrap());
    cfg.scope = tap::config::TrackingScope::SignalCollections(vec![
        "app.bsky.graph.starterpack".parse().unwrap(),
        "app.bsky.graph.list".parse().unwrap(),
    ]);
    let tap = TestTap::start(cfg).await;
    wait_for("three repos discovered", || async {
        (tap.store.repo_count().await.ok()? == 3).then_some(())
    })
    .await;
    let requests = lightrail.list_requests();
    assert_eq!(requests.len(), 2, "one call per page: {requests:?}");
    assert!(
        requests
            .iter()
            .all(|q| q.contains("collection=app.bsky.graph.starterpack,app.bsky.graph.list")),
        "{requests:?}"
    );
    assert!(net.relay.list_requests().is_empty());
    let cursors: Value = reqwest::get(tap.url("/stats/cursors"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        cursors["list_repos"], "",
        "the finished pass cleared its cursor"
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_network_mode_skips_inactive_accounts() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    net.relay.set_pages(
        None,
        vec![vec![
            json!({"did": did(20).as_str(), "active": true}),
            json!({"did": did(21).as_str(), "active": false}),
            json!({"did": did(22).as_str()}),
        ]],
    );
    let mut cfg = net.config(&db);
    cfg.scope = tap::config::TrackingScope::FullNetwork;
    let tap = TestTap::start(cfg).await;
    wait_for("two repos discovered", || async {
        (tap.store.repo_count().await.ok()? == 2).then_some(())
    })
    .await;
    assert!(
        tap.store
            .get_repo(did(21).as_str())
            .await
            .unwrap()
            .is_none()
    );
    tap.stop().await;
}

/// Five PDS answers trickling a hundred bytes a second would hold every worker for the whole
/// fetch timeout (300 s); the minimum rate cuts them after one 30 s window, so a repo added
/// behind them is synced within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_pdses_do_not_hold_every_worker() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let slow: Vec<RepoBuilder> = (0..5u32)
        .map(|i| {
            RepoBuilder::with_records(
                did(100 + i),
                TestKey::k256(100 + u64::from(i)),
                100 + u64::from(i),
                20,
            )
        })
        .collect();
    // Five hosts: one host alone could hold only its share of the workers.
    let mut hosts = Vec::new();
    for (i, repo) in slow.iter().enumerate() {
        let host = FakePds::start().await;
        net.plc.publish(repo, &format!("slow{i}.test"), &host.url());
        host.set_repo(
            repo.did().as_str(),
            RepoReply::Trickle(repo.car_tree_order(), Duration::from_millis(10)),
        );
        hosts.push(host);
    }
    let normal = RepoBuilder::with_records(did(110), TestKey::k256(110), 110, 20);
    net.host(&normal, "normal.test", normal.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.resync_parallelism = 5;
    let tap = TestTap::start(cfg).await;
    for repo in &slow {
        add(&tap, repo.did()).await;
    }
    for repo in &slow {
        wait_state(&tap, repo.did(), "resyncing").await;
    }
    add(&tap, normal.did()).await;
    tap_testkit::wait::poll_until(
        "the normal repo synced",
        Duration::from_secs(60),
        || async {
            (sync_support::info(&tap, normal.did()).await["state"] == "active").then_some(())
        },
    )
    .await;
    let cut = sync_support::info(&tap, slow[0].did()).await;
    assert!(
        cut["error"]
            .as_str()
            .unwrap()
            .contains("--repo-fetch-min-rate"),
        "{cut}"
    );
    tap.stop().await;
}

/// One PDS host trickling six repos (each slowly but above any minimum rate) may hold only
/// `--resync-parallelism-per-host` workers: a repo on another host is synced at once
/// instead of waiting the whole fetch timeout for a free worker, and the slow host's
/// repos wait their turn without a failure counted against them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_host_holds_only_its_share_of_the_workers() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let slow: Vec<RepoBuilder> = (0..6u32)
        .map(|i| {
            RepoBuilder::with_records(
                did(120 + i),
                TestKey::k256(120 + u64::from(i)),
                120 + u64::from(i),
                20,
            )
        })
        .collect();
    for (i, repo) in slow.iter().enumerate() {
        net.publish(repo, &format!("slow{i}.test"));
        net.pds.set_repo(
            repo.did().as_str(),
            RepoReply::Trickle(repo.car_tree_order(), Duration::from_millis(10)),
        );
    }
    // The normal repo lives on its own PDS host.
    let other = FakePds::start().await;
    let normal = RepoBuilder::with_records(did(130), TestKey::k256(130), 130, 20);
    net.plc.publish(&normal, "normal.test", &other.url());
    other.set_repo(
        normal.did().as_str(),
        RepoReply::Car(normal.car_tree_order()),
    );
    let mut cfg = net.config(&db);
    cfg.resync_parallelism = 3;
    cfg.resync_parallelism_per_host = 2;
    // Only the per-host share protects the other host here.
    cfg.repo_fetch_min_rate = 0;
    let tap = TestTap::start(cfg).await;
    for repo in &slow {
        add(&tap, repo.did()).await;
    }
    tap_testkit::wait::poll_until(
        "the slow host at its share",
        Duration::from_secs(20),
        || async {
            let mut resyncing = 0;
            for repo in &slow {
                resyncing +=
                    usize::from(sync_support::info(&tap, repo.did()).await["state"] == "resyncing");
            }
            (resyncing == 2).then_some(())
        },
    )
    .await;
    add(&tap, normal.did()).await;
    tap_testkit::wait::poll_until(
        "the other host's repo synced",
        Duration::from_secs(20),
        || async {
            (sync_support::info(&tap, normal.did()).await["state"] == "active").then_some(())
        },
    )
    .await;
    let mut resyncing = 0;
    for repo in &slow {
        let info = sync_support::info(&tap, repo.did()).await;
        assert_ne!(info["state"], "error", "{info}");
        assert_eq!(
            info["retries"], 0,
            "waiting for a host is no failure: {info}"
        );
        resyncing += usize::from(info["state"] == "resyncing");
    }
    assert!(resyncing <= 2, "{resyncing} resyncs on one host");
    tap.stop().await;
}

/// A 1 GiB CAR whose unreferenced blocks all come ahead of the tree: the walk must hold
/// them somewhere until it knows they are junk. It spills at most the shared budget to
/// disk (measured on the spill files themselves), stops there (this machine's limit, not
/// a verdict: retried later), gives the disk back, and downloads little beyond the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_of_junk_ahead_of_the_tree_spills_no_more_than_the_budget() {
    const BUDGET: u64 = 32 << 20;
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(4), TestKey::k256(4), 14, 20);
    net.publish(&repo, "dave.test");
    net.pds.set_repo(
        repo.did().as_str(),
        RepoReply::JunkAhead {
            car: repo.car_tree_order(),
            junk: 1 << 30,
        },
    );
    let mut cfg = net.config(&db);
    cfg.max_spill_bytes = BUDGET;
    let tap = TestTap::start(cfg).await;
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::task::spawn_blocking({
        let sampling = std::sync::Arc::clone(&sampling);
        move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(deleted_file_bytes());
                std::thread::yield_now();
            }
            peak
        }
    });
    add(&tap, repo.did()).await;
    let info = wait_state(&tap, repo.did(), "desynchronized").await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    assert!(
        info["error"]
            .as_str()
            .unwrap()
            .contains("spill disk budget of 33554432 bytes"),
        "{info}"
    );
    assert!(peak > 0, "the walk spilled");
    assert!(peak <= BUDGET, "spill files reached {peak} bytes");
    let downloaded = sync_support::bandwidth_total(&tap).await.as_u64().unwrap();
    assert!(
        downloaded < BUDGET + (32 << 20),
        "{downloaded} bytes downloaded of a 1 GiB answer"
    );
    tap_testkit::wait::poll_until("the spill disk given back", WAIT, || async {
        (deleted_file_bytes() == 0).then_some(())
    })
    .await;
    tap.stop().await;
}

/// Bytes held by files this process has open but which have no name any more: the walk's
/// spill files (unlinked as soon as they are made).
fn deleted_file_bytes() -> u64 {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().ends_with(" (deleted)"))
        })
        .filter_map(|fd| std::fs::metadata(fd.path()).ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum()
}
