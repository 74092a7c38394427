//! Steering a running tap (issue 14) against loopback fakes: a forced resync re-downloads a
//! repo whole and catches up what the firehose never said; the status document adds up;
//! collection filters and signal collections change at runtime and survive restarts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use std::collections::BTreeMap;

use common::{TestDb, TestTap};
use serde_json::{Value, json};
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::{Endpoint, RepoReply};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, did, expected, get_json, paths_and_cids, wait_for};

async fn a_forced_resync(db: TestDb) {
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
    sync_support::post_did(&tap, "/repos/resync", repo.did()).await;

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
        let deletes: Vec<String> = deletes.iter().map(sync_support::record_path).collect();
        (writes.len() + deletes.len() == changed.len() + gone.len()).then_some((writes, deletes))
    })
    .await;
    assert_eq!(paths_and_cids(&writes), changed);
    assert_eq!(deletes.iter().collect::<Vec<_>>(), gone);
    tap.stop().await;
}
on_both_backends!(
    a_forced_resync_fetches_the_whole_repo_and_delivers_what_the_firehose_missed,
    a_forced_resync
);

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
    sync_support::post_did(&tap, "/repos/remove", &ghost).await;
    let doc = wait_for("tap healthy again", || async {
        let doc = status(&tap).await;
        (doc["healthy"] == true).then_some(doc)
    })
    .await;
    assert_eq!(doc["diagnoses"], json!([]));
    tap.stop().await;
}

const FOLLOWS: &str = "app.bsky.graph.follow";
const LIKES: &str = "app.bsky.feed.like";

/// The repo's records in `collection`, as `path → cid`.
fn expected_in(repo: &RepoBuilder, collection: &str) -> BTreeMap<String, String> {
    expected(repo)
        .into_iter()
        .filter(|(path, _)| path.starts_with(&format!("{collection}/")))
        .collect()
}

fn in_collection(records: &[Value], collection: &str) -> BTreeMap<String, String> {
    paths_and_cids(records)
        .into_iter()
        .filter(|(p, _)| p.starts_with(&format!("{collection}/")))
        .collect()
}

async fn put(tap: &TestTap, path: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .put(tap.url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A fresh record of `collection` from the builder's generator.
fn create_in(repo: &mut RepoBuilder, collection: &str) -> WriteOp {
    loop {
        let (path, record) = repo.generator().next_record();
        if path.starts_with(&format!("{collection}/")) {
            return WriteOp::Create { path, record };
        }
    }
}

async fn runtime_filters(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(60), TestKey::k256(60), 60, 300);
    net.host(&repo, "filters.test", repo.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.collection_filters = vec![FOLLOWS.parse().unwrap()];
    let tap = TestTap::start(cfg.clone()).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::add(&tap, repo.did()).await;
    let follows = expected_in(&repo, FOLLOWS);
    consumer.wait_records(follows.len()).await;
    sync_support::wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        get_json(&tap, "/collection-filters").await,
        json!({"collections": [FOLLOWS]})
    );

    // Bad bodies: refused whole, nothing changed.
    for (body, status) in [
        (r#"{"collections": ["not an nsid"]}"#, 400),
        (r#"{"collections": ["app.bsky.*.post"]}"#, 400),
        (r#"{"collections": "app.bsky.feed.like"}"#, 400),
        (r#"{}"#, 400),
        (r#"{"collections": [], "extra": 1}"#, 400),
        ("{not json", 400),
    ] {
        let (got, answer) = put(&tap, "/collection-filters", body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["message"].is_string(), "{body}: {answer}");
    }
    let resp = reqwest::Client::new()
        .put(tap.url("/collection-filters"))
        .header("content-type", "text/plain")
        .body(r#"{"collections": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert_eq!(
        get_json(&tap, "/collection-filters").await,
        json!({"collections": [FOLLOWS]})
    );

    // Widening: the repo tap holds is fetched again for the likes, sparsely.
    let (status, answer) = put(
        &tap,
        "/collection-filters",
        &json!({"collections": [FOLLOWS, LIKES]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"collections": [FOLLOWS, LIKES], "resyncing": 1})
    );
    let likes = expected_in(&repo, LIKES);
    assert!(!likes.is_empty(), "the fixture has likes");
    let got = wait_for("the likes", || async {
        let got = in_collection(&consumer.records(), LIKES);
        (got.len() >= likes.len()).then_some(got)
    })
    .await;
    assert_eq!(got, likes);
    let info = sync_support::wait_state(&tap, repo.did(), "active").await;
    assert_eq!(info["last_fetch"]["kind"], "sparse", "{info}");

    // Narrowing: the next live commit's follow is not delivered, its like is.
    let (status, answer) = put(
        &tap,
        "/collection-filters",
        &json!({"collections": [LIKES]}).to_string(),
    )
    .await;
    assert_eq!((status, answer["resyncing"].clone()), (200, json!(0)));
    let seen = consumer.records().len();
    let ops = [create_in(&mut repo, FOLLOWS), create_in(&mut repo, LIKES)];
    net.relay.push_frame(1, repo.commit_frame(&ops).unwrap());
    let WriteOp::Create {
        path: like_path, ..
    } = &ops[1]
    else {
        unreachable!()
    };
    let later = wait_for("the live like", || async {
        let later = consumer.records().split_off(seen);
        in_collection(&later, LIKES)
            .contains_key(like_path)
            .then_some(later)
    })
    .await;
    assert!(in_collection(&later, FOLLOWS).is_empty(), "{later:?}");
    tap.stop().await;

    // A restart with the same flag keeps the runtime value; a changed flag replaces it.
    let tap = TestTap::start(cfg.clone()).await;
    assert_eq!(
        get_json(&tap, "/collection-filters").await,
        json!({"collections": [LIKES]})
    );
    tap.stop().await;
    cfg.collection_filters = vec!["app.bsky.graph.block".parse().unwrap()];
    let tap = TestTap::start(cfg).await;
    assert_eq!(
        get_json(&tap, "/collection-filters").await,
        json!({"collections": ["app.bsky.graph.block"]})
    );
    tap.stop().await;
}
on_both_backends!(runtime_collection_filters_apply_at_once_survive_restarts_and_a_widening_fetches_the_new_collection, runtime_filters);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_collections_set_at_runtime_are_enumerated_at_once_and_refused_for_the_full_network()
{
    const SIGNAL: &str = "com.example.signal";
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(61), TestKey::k256(61), 61, 20);
    net.host(&repo, "signal.test", repo.car_tree_order());
    net.relay.set_pages(
        Some(SIGNAL),
        vec![vec![json!({"did": repo.did().as_str()})]],
    );
    let tap = TestTap::start(net.config(&db)).await;
    assert_eq!(
        get_json(&tap, "/signal-collections").await,
        json!({"collections": []})
    );
    let (status, answer) = put(&tap, "/signal-collections", r#"{"collections": ["no"]}"#).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = put(
        &tap,
        "/signal-collections",
        &json!({"collections": [SIGNAL]}).to_string(),
    )
    .await;
    assert_eq!((status, answer), (200, json!({"collections": [SIGNAL]})));
    let info = sync_support::wait_state(&tap, repo.did(), "active").await;
    assert_eq!(info["records"], repo.records().len());
    assert!(
        net.relay
            .list_requests()
            .iter()
            .any(|q| q.contains(&format!("collection={SIGNAL}"))),
        "{:?}",
        net.relay.list_requests()
    );
    tap.stop().await;

    let full_db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let mut cfg = net.config(&full_db);
    cfg.scope = tap::config::TrackingScope::FullNetwork;
    let tap = TestTap::start(cfg).await;
    let (status, answer) = put(
        &tap,
        "/signal-collections",
        &json!({"collections": [SIGNAL]}).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("full network"));
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_go_taps_names_and_the_internal_channels_waits() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(70), TestKey::k256(70), 70, 30);
    net.host(&repo, "metrics.test", repo.car_tree_order());
    let mut stranger = RepoBuilder::with_records(did(71), TestKey::k256(71), 71, 3);
    let mut cfg = net.config(&db);
    cfg.metrics_listen = Some("127.0.0.1:0".into());
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::backfill(&tap, &consumer, &repo).await;
    // One live commit tap applies, one of a repo it does not track (skipped).
    let ops = [create_in(&mut repo, FOLLOWS)];
    net.relay.push_frame(1, repo.commit_frame(&ops).unwrap());
    let ops = [create_in(&mut stranger, FOLLOWS)];
    net.relay
        .push_frame(2, stranger.commit_frame(&ops).unwrap());
    consumer.wait_records(repo.records().len()).await;

    let url = format!("http://{}/metrics", tap.metrics_addr.unwrap());
    let want = [
        "tap_firehose_events_received_total 2",
        "tap_firehose_events_processed_total 1",
        "tap_firehose_events_skipped_total 1",
        "tap_firehose_last_seq",
        "tap_event_cache_size",
        "tap_resyncs_started_total 1",
        "tap_resyncs_completed_total 1",
        "tap_resync_duration_seconds_bucket",
        "tap_events_delivered_total",
        "tap_events_acked_total",
        "indigo_repo_stream_events_received_total 2",
        "indigo_repo_stream_bytes_total",
        "atproto_directory_identity_cache_hits",
        r#"tap_channel_send_wait_seconds_bucket{channel="firehose_dispatch""#,
        r#"tap_channel_send_wait_seconds_bucket{channel="outbox_appends""#,
        r#"tap_channel_depth{channel="sqlite_writes"}"#,
        r#"tap_channel_depth{channel="acks"}"#,
    ];
    let text = wait_for("every series", || async {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        want.iter().all(|w| text.contains(w)).then_some(text)
    })
    .await;
    assert!(
        text.contains("# HELP tap_firehose_events_skipped_total"),
        "{text}"
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_history_survives_a_restart_and_serves_each_span() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let cfg = common::test_config(&db);
    let tap = TestTap::start(cfg.clone()).await;
    let now_minute = tap::status::unix_ms() / 60_000;
    for (ago, events) in [(3, 600u64), (2, 1200), (90, 60)] {
        tap.store
            .save_minute(tap::store::MinuteRow {
                minute: now_minute - ago,
                span_ms: 60_000,
                events,
                bytes: events * 1000,
                lag_ms: 2500,
                ..tap::store::MinuteRow::default()
            })
            .await
            .unwrap();
    }
    tap.stop().await;

    let tap = TestTap::start(cfg).await;
    let hour = get_json(&tap, "/status/history?span=hour").await;
    assert_eq!(hour["step_seconds"], 60);
    let points = hour["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{hour}");
    assert_eq!(points[0]["t"], (now_minute - 3) * 60);
    assert_eq!(points[0]["events_per_second"], 10.0);
    assert_eq!(points[1]["bytes_per_second"], 20_000.0);
    assert_eq!(points[1]["lag_seconds"], 2.5);
    let day = get_json(&tap, "/status/history?span=day").await;
    assert_eq!(day["step_seconds"], 900);
    let total: f64 = day["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["events_per_second"].as_f64().unwrap())
        .sum();
    assert!(total > 0.0, "{day}");
    let status = reqwest::get(tap.url("/status/history?span=month"))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 400);
    tap.stop().await;
}

/// A tap whose only repo (some follows and likes) is being fetched slowly (full strategy,
/// one byte per millisecond) when the test acts; then the PDS speeds up.
async fn slow_first_fetch(net: &Net, db: &TestDb, n: u32) -> (TestTap, Consumer, RepoBuilder) {
    let repo = RepoBuilder::with_records(did(n), TestKey::k256(n.into()), n.into(), 12);
    net.host(&repo, &format!("slow{n}.test"), repo.car_tree_order());
    net.pds.set_repo(
        repo.did().as_str(),
        RepoReply::Trickle(repo.car_tree_order(), std::time::Duration::from_millis(1)),
    );
    let mut cfg = net.config(db);
    cfg.collection_filters = vec![FOLLOWS.parse().unwrap()];
    cfg.fetch_strategy = tap::config::FetchStrategy::Full;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::add(&tap, repo.did()).await;
    sync_support::wait_state(&tap, repo.did(), "resyncing").await;
    (tap, consumer, repo)
}

/// Waits until the PDS served `repo` twice and tap holds it active.
async fn fetched_twice(net: &Net, tap: &TestTap, repo: &RepoBuilder) {
    wait_for("the second fetch", || async {
        let i = sync_support::info(tap, repo.did()).await;
        (net.pds.served(Endpoint::GetRepo).requests == 2 && i["state"] == "active").then_some(())
    })
    .await;
}

async fn widened_mid_resync(db: TestDb) {
    let net = Net::start().await;
    let (tap, consumer, repo) = slow_first_fetch(&net, &db, 90).await;
    let (status, answer) = put(
        &tap,
        "/collection-filters",
        &json!({"collections": [FOLLOWS, LIKES]}).to_string(),
    )
    .await;
    assert_eq!(
        (status, answer["resyncing"].clone()),
        (200, json!(0)),
        "nothing at rest"
    );
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    let likes = expected_in(&repo, LIKES);
    assert!(!likes.is_empty(), "the fixture has likes");
    let got = wait_for("the likes of the repo that was mid-fetch", || async {
        let got = in_collection(&consumer.records(), LIKES);
        (got.len() >= likes.len()).then_some(got)
    })
    .await;
    assert_eq!(got, likes);
    // The fetch running at the widening may have seen the new filters for the records it
    // read after it, but not before: it is done again.
    fetched_twice(&net, &tap, &repo).await;
    tap.stop().await;
}
on_both_backends!(
    filters_widened_during_a_resync_fetch_that_repo_again,
    widened_mid_resync
);

async fn forced_mid_resync(db: TestDb) {
    let net = Net::start().await;
    let (tap, _consumer, repo) = slow_first_fetch(&net, &db, 91).await;
    let answer = sync_support::post_did(&tap, "/repos/resync", repo.did()).await;
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["resyncing"],
        json!([repo.did().as_str()]),
        "{answer}"
    );
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    fetched_twice(&net, &tap, &repo).await;
    tap.stop().await;
}
on_both_backends!(
    a_resync_forced_while_one_runs_is_done_again_when_it_ends,
    forced_mid_resync
);
