//! Jetstream as the live source (`--jetstream-url`) against loopback fakes (Jetstream,
//! PDS with `getRecord` proofs, PLC): multi-operation commits delivered whole and proven,
//! the subscription's filters and their runtime updates, lies and garbage refused with a
//! resync, reconnects and a silent stream, a cursor older than Jetstream keeps, and
//! `--jetstream-verify none`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use std::time::Duration;

use common::{Backend, TestDb, TestTap};
use serde_json::{Value, json};
use tap::Config;
use tap::config::{JetstreamConfig, JetstreamVerify, LiveSource, TrackingScope};
use tap_atproto::writer::{CommitOutput, WriteOp};
use tap_testkit::fake_jetstream::{FakeJetstream, commit_events, identity_event};
use tap_testkit::fake_pds::{Endpoint, RepoReply};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, add, backfill, did, record_path, wait_for, wait_state};

/// The fakes: relay (unused but for discovery), PDS, PLC, and Jetstream.
struct JetNet {
    net: Net,
    jet: FakeJetstream,
}

impl JetNet {
    async fn start() -> Self {
        Self {
            net: Net::start().await,
            jet: FakeJetstream::start().await,
        }
    }

    fn config(&self, db: &TestDb, verify: JetstreamVerify) -> Config {
        let mut cfg = self.net.config(db);
        cfg.live_source = LiveSource::Jetstream(JetstreamConfig {
            url: tap::config::jetstream_subscribe_url(&self.jet.url()).unwrap(),
            verify,
            proof_rate: 1000,
            watchdog: Duration::from_secs(60),
        });
        cfg
    }

    /// [`JetNet::config`] with a watchdog of two seconds.
    fn impatient_config(&self, db: &TestDb) -> Config {
        let mut cfg = self.config(db, JetstreamVerify::Proof);
        if let LiveSource::Jetstream(js) = &mut cfg.live_source {
            js.watchdog = Duration::from_secs(2);
        }
        cfg
    }

    /// Commits `ops` to `repo`, serves the new repo from the PDS, and returns the commit.
    fn commit(&self, repo: &mut RepoBuilder, ops: &[WriteOp]) -> CommitOutput {
        let out = repo.commit(ops).unwrap();
        self.net
            .pds
            .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
        out
    }
}

fn hosted(net: &JetNet, n: u32, records: usize) -> RepoBuilder {
    let repo = RepoBuilder::with_records(did(n), TestKey::k256(n.into()), n.into(), records);
    net.net
        .host(&repo, &format!("user{n}.test"), repo.car_tree_order());
    repo
}

async fn cursors(tap: &TestTap) -> Value {
    reqwest::get(tap.url("/stats/cursors"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn bandwidth(tap: &TestTap) -> Value {
    reqwest::get(tap.url("/stats/bandwidth"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The three ops of a typical multi-operation commit: a create, an update, a delete.
fn three_ops(repo: &mut RepoBuilder) -> (Vec<WriteOp>, [String; 3]) {
    let mut paths = repo.records().keys().cloned();
    let upd = paths.next().unwrap();
    let del = paths.nth(3).unwrap();
    let (new_path, new_rec) = repo.generator().next_record();
    let (_, upd_rec) = repo.generator().next_record();
    (
        vec![
            WriteOp::Create {
                path: new_path.clone(),
                record: new_rec,
            },
            WriteOp::Update {
                path: upd.clone(),
                record: upd_rec,
            },
            WriteOp::Delete { path: del.clone() },
        ],
        [new_path, upd, del],
    )
}

async fn proven_multi_operation_commits(db: TestDb) {
    let net = JetNet::start().await;
    let mut repo = hosted(&net, 1, 30);
    let tap = TestTap::start(net.config(&db, JetstreamVerify::Proof)).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let n = repo.records().len();
    // Dynamic mode with one repo: Jetstream is asked for that DID only.
    wait_for("the DID in an options_update", || async {
        net.jet
            .options_updates()
            .iter()
            .any(|u| u["wantedDids"] == json!([repo.did().as_str()]))
            .then_some(())
    })
    .await;

    let (ops, [created, updated, deleted]) = three_ops(&mut repo);
    let out = net.commit(&mut repo, &ops);
    let mut events = commit_events(&repo, &out);
    // Jetstream's copy of the new record is altered; its CID is right. What is delivered
    // is the record the PDS proves, not Jetstream's JSON.
    events[0]["commit"]["record"]["forged"] = json!(true);
    let times: Vec<i64> = events.into_iter().map(|e| net.jet.publish(e)).collect();

    let all = consumer.wait_records(n + 3).await;
    let live = &all[n..];
    assert!(live.iter().all(|r| r["live"] == true), "{live:?}");
    assert!(
        live.iter().all(|r| r["rev"] == out.commit.rev.as_str()),
        "{live:?}"
    );
    let actions: Vec<(&str, String)> = live
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), record_path(r)))
        .collect();
    assert_eq!(
        actions,
        [
            ("create", created.clone()),
            ("update", updated),
            ("delete", deleted)
        ],
        "every operation of the commit, in order"
    );
    assert!(live[0]["record"].get("forged").is_none(), "{}", live[0]);
    assert_eq!(live[0]["cid"], repo.records()[&created].to_string());
    assert!(live.iter().all(|r| r.get("unverified").is_none()));
    assert!(
        sync_support::info(&tap, repo.did())
            .await
            .get("unverified")
            .is_none()
    );

    // A second repo added at runtime joins the subscription.
    let other = hosted(&net, 2, 5);
    add(&tap, other.did()).await;
    wait_for("both DIDs in an options_update", || async {
        net.jet
            .options_updates()
            .iter()
            .any(|u| u["wantedDids"].as_array().is_some_and(|d| d.len() == 2))
            .then_some(())
    })
    .await;

    let last = *times.last().unwrap();
    wait_for("the jetstream cursor past the commit", || async {
        (cursors(&tap).await["jetstream"].as_i64()? >= last).then_some(())
    })
    .await;
    let bw = bandwidth(&tap).await;
    assert!(bw["by_source"]["jetstream"].as_u64().unwrap() > 0, "{bw}");
    assert_eq!(
        bw["by_source"]["pds.getRecord"].as_u64().unwrap(),
        net.net.pds.served(Endpoint::GetRecord).bytes,
        "every proof byte is counted"
    );
    assert_eq!(net.net.pds.served(Endpoint::GetRecord).requests, 3);
    tap.stop().await;
}
on_both_backends!(
    multi_operation_commits_from_jetstream_are_proven_and_every_operation_is_delivered,
    proven_multi_operation_commits
);

/// Waits until `repo` has been fetched again (a resync) and is active.
async fn wait_resynced(net: &JetNet, tap: &TestTap, repo: &RepoBuilder, before: u64) {
    wait_for("a resync of the repo", || async {
        let served = net.net.pds.served(Endpoint::GetRepo).requests
            + net.net.pds.served(Endpoint::GetLatestCommit).requests;
        (served > before).then_some(())
    })
    .await;
    wait_state(tap, repo.did(), "active").await;
}

fn fetches(net: &JetNet) -> u64 {
    net.net.pds.served(Endpoint::GetRepo).requests
        + net.net.pds.served(Endpoint::GetLatestCommit).requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_lies_and_garbage_are_not_delivered_and_the_repo_is_resynced() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let mut repo = hosted(&net, 3, 20);
    let tap = TestTap::start(net.config(&db, JetstreamVerify::Proof)).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let did_text = repo.did().to_string();

    // 1. A record the PDS does not have, claimed beside a real create in one commit.
    let (path, record) = repo.generator().next_record();
    let out = net.commit(
        &mut repo,
        &[WriteOp::Create {
            path: path.clone(),
            record,
        }],
    );
    let mut events = commit_events(&repo, &out);
    let mut invented = events[0].clone();
    let (invented_path, _) = repo.generator().next_record();
    let (collection, rkey) = invented_path.split_once('/').unwrap();
    invented["commit"]["collection"] = json!(collection);
    invented["commit"]["rkey"] = json!(rkey);
    events.push(invented);
    let before = fetches(&net);
    for e in events {
        net.jet.publish(e);
    }
    wait_resynced(&net, &tap, &repo, before).await;
    // The real record comes in through the resync.
    wait_for("the real record", || async {
        consumer
            .records()
            .iter()
            .any(|r| record_path(r) == path)
            .then_some(())
    })
    .await;

    // 2. An update claiming a CID the record does not have.
    let target = repo.records().keys().nth(2).unwrap().clone();
    let (_, record) = repo.generator().next_record();
    let out = net.commit(
        &mut repo,
        &[WriteOp::Update {
            path: target.clone(),
            record,
        }],
    );
    let mut events = commit_events(&repo, &out);
    let wrong = repo.records().values().next().unwrap().to_string();
    events[0]["commit"]["cid"] = json!(wrong);
    let before = fetches(&net);
    net.jet.publish(events.remove(0));
    wait_resynced(&net, &tap, &repo, before).await;

    // 3. Garbage: not JSON at all, and an event of a tracked repo that does not read.
    net.jet.push_raw("\u{1}not json");
    let before = fetches(&net);
    net.jet
        .publish(json!({"did": did_text, "kind": "commit", "commit": {"rev": "nope"}}));
    wait_resynced(&net, &tap, &repo, before).await;

    // 4. A handle change Jetstream reports but the DID document does not confirm.
    net.jet.publish(identity_event(&did_text, "evil.test"));
    // Then a real one.
    net.net.publish(&repo, "renamed3.test");
    net.jet.publish(identity_event(&did_text, "renamed3.test"));
    wait_for("the confirmed handle change", || async {
        consumer
            .events()
            .iter()
            .any(|e| e["identity"]["handle"] == "renamed3.test")
            .then_some(())
    })
    .await;

    // 5. An account event Jetstream reports but the PDS does not confirm, then a real one.
    net.jet.publish(tap_testkit::fake_jetstream::account_event(
        &did_text,
        false,
        Some("takendown"),
    ));
    net.net
        .pds
        .set_account_status(&did_text, Some("deactivated"));
    net.jet.publish(tap_testkit::fake_jetstream::account_event(
        &did_text,
        false,
        Some("suspended"),
    ));
    wait_for("the confirmed account status", || async {
        consumer
            .events()
            .iter()
            .any(|e| e["identity"]["status"] == "deactivated")
            .then_some(())
    })
    .await;
    net.net.pds.set_account_status(&did_text, None);
    net.jet.publish(tap_testkit::fake_jetstream::account_event(
        &did_text, true, None,
    ));
    wait_state(&tap, repo.did(), "active").await;
    wait_for("the account active again", || async {
        consumer
            .events()
            .iter()
            .rev()
            .find(|e| e["type"] == "identity")
            .filter(|e| e["identity"]["status"] == "active")
            .map(|_| ())
    })
    .await;

    // Still running and delivering: a later honest commit arrives live.
    let (path, record) = repo.generator().next_record();
    let out = net.commit(
        &mut repo,
        &[WriteOp::Create {
            path: path.clone(),
            record,
        }],
    );
    net.jet.publish_commit(&repo, &out);
    wait_for("the honest commit, live", || async {
        consumer
            .records()
            .iter()
            .any(|r| record_path(r) == path && r["live"] == true)
            .then_some(())
    })
    .await;

    let events = consumer.events();
    assert!(
        !events
            .iter()
            .any(|e| e["identity"]["handle"] == "evil.test"),
        "an unconfirmed handle is never delivered"
    );
    assert!(
        !events.iter().any(|e| {
            ["takendown", "suspended"].contains(&e["identity"]["status"].as_str().unwrap_or(""))
        }),
        "unconfirmed account statuses are never delivered"
    );
    let records = consumer.records();
    assert!(!records.iter().any(|r| record_path(r) == invented_path));
    assert!(
        !records
            .iter()
            .any(|r| r["cid"] == wrong && record_path(r) == target),
        "the lying CID is never delivered"
    );
    // The copy tap holds equals the repo.
    let info = sync_support::info(&tap, repo.did()).await;
    assert_eq!(info["records"], repo.records().len());
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_asks_only_for_wanted_collections_and_follows_runtime_filters() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let mut cfg = net.config(&db, JetstreamVerify::Proof);
    cfg.scope =
        TrackingScope::SignalCollections(vec!["app.bsky.graph.starterpack".parse().unwrap()]);
    cfg.collection_filters = vec![
        "app.bsky.graph.starterpack".parse().unwrap(),
        "app.bsky.actor.profile".parse().unwrap(),
    ];
    let tap = TestTap::start(cfg).await;
    wait_for("a subscription", || async {
        net.jet.subscriptions().first().cloned()
    })
    .await;
    let sub = &net.jet.subscriptions()[0];
    assert_eq!(
        sub.collections,
        ["app.bsky.actor.profile", "app.bsky.graph.starterpack"]
    );
    assert!(sub.dids.is_empty(), "signal mode follows every repo");
    assert!(!sub.compress, "compression is not asked for (README)");

    let resp = reqwest::Client::new()
        .put(tap.url("/collection-filters"))
        .json(&json!({"collections": ["app.bsky.actor.profile", "app.bsky.graph.*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_for("the new filters in an options_update", || async {
        net.jet
            .options_updates()
            .iter()
            .any(|u| {
                u["wantedCollections"]
                    == json!([
                        "app.bsky.actor.profile",
                        "app.bsky.graph.*",
                        "app.bsky.graph.starterpack"
                    ])
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        net.jet.connections(),
        1,
        "updated in place, not reconnected"
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_silent_connections_resume_from_the_cursor_without_loss_or_repeats() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let mut repo = hosted(&net, 4, 10);
    let tap = TestTap::start(net.impatient_config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let n = repo.records().len();

    let mut created = Vec::new();
    let mut create = |net: &JetNet, repo: &mut RepoBuilder| {
        let (path, record) = repo.generator().next_record();
        created.push(path.clone());
        let out = net.commit(repo, &[WriteOp::Create { path, record }]);
        net.jet.publish_commit(repo, &out);
    };
    create(&net, &mut repo);
    consumer.wait_records(n + 1).await;
    wait_for("the cursor saved", || async {
        cursors(&tap).await["jetstream"].as_i64().filter(|c| *c > 0)
    })
    .await;

    // Cut: events published while disconnected come with the replay.
    net.jet.drop_connections();
    create(&net, &mut repo);
    create(&net, &mut repo);
    consumer.wait_records(n + 3).await;
    // Silent: the stream stays open but says nothing; the watchdog replaces it.
    net.jet.set_silent(true);
    create(&net, &mut repo);
    net.jet.set_silent(false);
    consumer.wait_records(n + 4).await;
    assert!(
        net.jet.connections() >= 3,
        "one more after the cut and after the silence"
    );
    let resumed: Vec<Option<i64>> = net
        .jet
        .subscriptions()
        .iter()
        .skip(1)
        .map(|s| s.cursor)
        .collect();
    assert!(resumed.iter().all(Option::is_some), "{resumed:?}");

    let live: Vec<String> = consumer
        .records()
        .iter()
        .filter(|r| r["live"] == true)
        .map(record_path)
        .collect();
    assert_eq!(live, created, "each once, in order");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_jetstream_keeps_resyncs_every_syncing_repo() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let repo = hosted(&net, 5, 10);
    let cfg = net.config(&db, JetstreamVerify::Proof);
    let LiveSource::Jetstream(js) = &cfg.live_source else {
        unreachable!()
    };
    let key = js.url.to_string();
    let tap = TestTap::start(cfg.clone()).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let stale = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
        - (tap::jetstream::RETENTION + Duration::from_secs(3600)).as_micros() as i64;
    drop(consumer);
    tap.stop().await;
    let store = tap::store::Store::open(&cfg.database, tap::store::StoreOptions::default())
        .await
        .unwrap();
    store.save_firehose_cursor(&key, stale).await.unwrap();
    store.close().await;

    let before = fetches(&net);
    let tap = TestTap::start(cfg).await;
    wait_resynced(&net, &tap, &repo, before).await;
    let sub = wait_for("a subscription", || async {
        net.jet
            .subscriptions()
            .last()
            .cloned()
            .filter(|s| s.cursor.is_some())
    })
    .await;
    assert_eq!(
        sub.cursor,
        Some(stale + 1),
        "still replays what Jetstream has"
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_verification_records_arrive_as_jetstream_sends_them_marked_unverified() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let mut repo = hosted(&net, 6, 10);
    let tap = TestTap::start(net.config(&db, JetstreamVerify::None)).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let n = repo.records().len();
    let (ops, _) = three_ops(&mut repo);
    let out = net.commit(&mut repo, &ops);
    let mut events = commit_events(&repo, &out);
    events[0]["commit"]["record"]["jetstream"] = json!("said so");
    for e in events {
        net.jet.publish(e);
    }
    let live = consumer.wait_records(n + 3).await.split_off(n);
    assert!(live.iter().all(|r| r["unverified"] == true), "{live:?}");
    assert_eq!(live[0]["record"]["jetstream"], "said so");
    assert_eq!(net.net.pds.served(Endpoint::GetRecord).requests, 0);
    assert_eq!(
        sync_support::info(&tap, repo.did()).await["unverified"],
        true
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_published_while_tap_is_stopped_arrive_once_after_a_restart() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = JetNet::start().await;
    let mut repo = hosted(&net, 7, 10);
    let cfg = net.config(&db, JetstreamVerify::Proof);
    let tap = TestTap::start(cfg.clone()).await;
    let consumer = Consumer::connect(&tap).await;
    backfill(&tap, &consumer, &repo).await;
    let n = repo.records().len();
    let create = |repo: &mut RepoBuilder| {
        let (path, record) = repo.generator().next_record();
        let out = net.commit(
            repo,
            &[WriteOp::Create {
                path: path.clone(),
                record,
            }],
        );
        net.jet.publish_commit(repo, &out);
        path
    };
    let before = create(&mut repo);
    consumer.wait_records(n + 1).await;
    drop(consumer);
    tap.stop().await;

    let while_down = [create(&mut repo), create(&mut repo)];
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    let live = wait_for("the commits made while tap was down", || async {
        let live: Vec<String> = consumer
            .records()
            .iter()
            .filter(|r| r["live"] == true)
            .map(record_path)
            .collect();
        (live.len() >= 2).then_some(live)
    })
    .await;
    assert_eq!(live, while_down, "each once, in order");
    assert!(
        !live.contains(&before),
        "the commit delivered before the stop is not replayed"
    );
    tap.stop().await;
}
