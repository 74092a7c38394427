//! NATS JetStream delivery against a real `nats-server -js` (Debian's package):
//! `TAP_TEST_NATS_URL` (default nats://127.0.0.1:4222, which `./scripts/test` starts) for
//! the stream contents, and a server of the test's own for a restart mid-run. Every test
//! uses its own stream and subject prefix and deletes the stream at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;
mod sync_support;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use common::{Backend, TestDb, TestTap};
use futures_util::StreamExt;
use serde_json::Value;
use tap::config::{DeliveryMode, NatsTarget};
use tap_atproto::writer::WriteOp;
use tap_testkit::nats::NatsServer;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Net, add, did, wait_state};

fn nats_url() -> String {
    std::env::var("TAP_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A name no other test (or run) uses, for the stream and the subject prefix.
fn unique(tag: &str) -> String {
    format!(
        "t{}_{tag}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

fn target(url: &str, name: &str) -> NatsTarget {
    NatsTarget {
        url: url.to_owned(),
        stream: name.to_owned(),
        subject_prefix: name.to_owned(),
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(600),
    }
}

async fn jetstream_at(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.unwrap())
}

/// One message as a test reads it.
#[derive(Debug, Clone)]
struct Msg {
    subject: String,
    msg_id: String,
    event: Value,
}

/// Reads the whole stream from the start through a durable consumer named `durable`, until
/// `n` messages came (and no more within a short grace), acking each.
async fn read_all(js: &jetstream::Context, stream: &str, durable: &str, n: usize) -> Vec<Msg> {
    let stream = js.get_stream(stream).await.unwrap();
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            let msg = msg.unwrap();
            got += 1;
            out.push(Msg {
                subject: msg.subject.to_string(),
                msg_id: msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
                event: serde_json::from_slice(&msg.payload).unwrap(),
            });
            msg.ack().await.unwrap();
        }
        if got == 0 && out.len() >= n {
            break;
        }
    }
    out
}

fn did_of(event: &Value) -> String {
    event["record"]["did"]
        .as_str()
        .or_else(|| event["identity"]["did"].as_str())
        .unwrap()
        .to_owned()
}

/// Tap's per-repo order, as the stream holds it: a repo's historical events may be
/// published side by side, but a live event comes after every event of its repo with a
/// smaller id.
fn assert_repo_order(msgs: &[Msg]) {
    let id = |m: &Msg| m.event["id"].as_u64().unwrap();
    for (at, m) in msgs.iter().enumerate() {
        if m.event["record"]["live"] != true {
            continue;
        }
        let late = msgs[at + 1..]
            .iter()
            .find(|o| did_of(&o.event) == did_of(&m.event) && id(o) < id(m));
        assert!(
            late.is_none(),
            "live event {} published before {late:?}",
            id(m)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backfilled_and_live_event_lands_in_the_stream_once_in_repo_order() {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repos: Vec<RepoBuilder> = (0..3u32)
        .map(|i| {
            RepoBuilder::with_records(
                did(300 + i),
                TestKey::k256(300 + u64::from(i)),
                300 + u64::from(i),
                25,
            )
        })
        .collect();
    for (i, repo) in repos.iter().enumerate() {
        net.host(repo, &format!("n{i}.test"), repo.car_tree_order());
    }
    let name = unique("once");
    let mut cfg = net.config(&db);
    cfg.delivery = DeliveryMode::Nats(target(&nats_url(), &name));
    let tap = TestTap::start(cfg).await;
    for repo in &repos {
        add(&tap, repo.did()).await;
    }
    for repo in &repos {
        wait_state(&tap, repo.did(), "active").await;
    }
    // Two live commits per repo, through the relay.
    let mut seq = 1;
    for repo in &mut repos {
        for _ in 0..2 {
            let (path, record) = repo.generator().next_record();
            let frame = repo
                .commit_frame(&[WriteOp::Create { path, record }])
                .unwrap();
            net.relay.push_frame(seq, frame);
            seq += 1;
        }
    }
    let records: usize = repos.iter().map(|r| r.records().len()).sum();
    let js = jetstream_at(&nats_url()).await;
    let msgs = read_all(&js, &name, "first", records + repos.len()).await;
    let record_msgs: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.event["type"] == "record")
        .collect();
    assert_eq!(record_msgs.len(), records, "every record once");
    assert_eq!(
        msgs.iter()
            .filter(|m| m.event["type"] == "identity")
            .count(),
        repos.len()
    );
    let ids: HashSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), msgs.len(), "no event twice");
    for m in &msgs {
        assert_eq!(
            m.msg_id,
            m.event["id"].to_string(),
            "Nats-Msg-Id is the event id"
        );
        let expected = match m.event["type"].as_str().unwrap() {
            "record" => format!(
                "{name}.record.{}",
                m.event["record"]["collection"].as_str().unwrap()
            ),
            kind => format!("{name}.{kind}"),
        };
        assert_eq!(m.subject, expected);
    }
    assert_eq!(
        record_msgs
            .iter()
            .filter(|m| m.event["record"]["live"] == true)
            .count(),
        2 * repos.len(),
        "the live commits"
    );
    assert_repo_order(&msgs);
    sync_support::wait_for("every event done", || async {
        (tap.store.outbox_count().await.ok()? == 0).then_some(())
    })
    .await;

    // More consumers read the same events independently, from the start.
    for durable in ["second", "third"] {
        let again = read_all(&js, &name, durable, msgs.len()).await;
        let first: Vec<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
        let other: Vec<&str> = again.iter().map(|m| m.msg_id.as_str()).collect();
        assert_eq!(first, other, "{durable} replays the same stream");
    }
    tap.stop().await;
    js.delete_stream(&name).await.unwrap();
}

/// NATS killed while tap publishes a backfill, and started again: tap waits (each event
/// held and retried), then resumes, and the stream holds every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_run_loses_nothing() {
    let mut server = NatsServer::start().await.unwrap();
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let first = RepoBuilder::with_records(did(320), TestKey::k256(320), 320, 25);
    let second = RepoBuilder::with_records(did(321), TestKey::k256(321), 321, 40);
    net.host(&first, "before.test", first.car_tree_order());
    net.host(&second, "during.test", second.car_tree_order());
    let name = unique("restart");
    let mut cfg = net.config(&db);
    cfg.delivery = DeliveryMode::Nats(target(&server.url(), &name));
    let tap = TestTap::start(cfg).await;
    add(&tap, first.did()).await;
    wait_state(&tap, first.did(), "active").await;

    server.kill().await;
    add(&tap, second.did()).await;
    // The second repo is synced and its events are waiting in the outbox for NATS.
    wait_state(&tap, second.did(), "active").await;
    assert!(
        tap.store.outbox_count().await.unwrap() > 0,
        "events held while NATS is down"
    );
    server.start_again().await.unwrap();

    sync_support::wait_for("every event published after the restart", || async {
        (tap.store.outbox_count().await.ok()? == 0).then_some(())
    })
    .await;
    let js = jetstream_at(&server.url()).await;
    let total = first.records().len() + second.records().len();
    let msgs = read_all(&js, &name, "after", total + 2).await;
    let mut paths: HashSet<(String, String)> = HashSet::new();
    for m in msgs.iter().filter(|m| m.event["type"] == "record") {
        paths.insert((
            did_of(&m.event),
            sync_support::record_path(&m.event["record"]),
        ));
    }
    let expected: HashSet<(String, String)> = [&first, &second]
        .iter()
        .flat_map(|r| r.records().keys().map(|p| (r.did().to_string(), p.clone())))
        .collect();
    assert_eq!(paths, expected, "every record of both repos");
    let ids: HashSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        msgs.len(),
        "a republished event is not stored twice"
    );
    tap.stop().await;
}

/// The real binary killed with SIGKILL while it publishes 12,000 stored events: after a
/// restart on the same database the stream holds every event exactly once. Events that
/// were published but not yet marked done go out again with the same `Nats-Msg-Id`, and
/// JetStream's duplicate window drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_publish_leaves_every_event_in_the_stream_exactly_once() {
    const DIDS: usize = 40;
    const PER_DID: usize = 300;
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let store = tap::store::Store::open(&db.url, tap::store::StoreOptions::default())
        .await
        .unwrap();
    for d in 0..DIDS {
        let owner = delivery_support::did(1000 + d);
        let events = (0..PER_DID)
            .map(|i| delivery_support::record(&owner, &format!("r{i}"), false))
            .collect();
        delivery_support::store_events(&store, &owner, events).await;
    }
    store.close().await;
    let total = DIDS * PER_DID;

    let name = unique("kill");
    let url = nats_url();
    let flags = [
        format!("--nats-url={url}"),
        format!("--nats-stream={name}"),
        format!("--nats-subject-prefix={name}"),
        "--outbox-only".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let js = jetstream_at(&url).await;
    let mut tap = delivery_support::TapProcess::spawn(&db.url, "127.0.0.1:0", &flags).await;
    let messages = |js: jetstream::Context, name: String| async move {
        js.get_stream(&name)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .state
            .messages
            .try_into()
            .ok()
    };
    let published: usize = tap_testkit::wait::poll_until(
        "the first events published",
        Duration::from_secs(30),
        || async {
            messages(js.clone(), name.clone())
                .await
                .filter(|n: &usize| *n > 0)
        },
    )
    .await;
    tap.kill9();
    assert!(
        published < total,
        "killed mid-publish ({published} of {total})"
    );

    let tap = delivery_support::TapProcess::spawn(&db.url, "127.0.0.1:0", &flags).await;
    let store = tap::store::Store::open(&db.url, tap::store::StoreOptions::default())
        .await
        .unwrap();
    tap_testkit::wait::poll_until("every event done", Duration::from_secs(60), || async {
        (store.outbox_count().await.ok()? == 0).then_some(())
    })
    .await;
    let msgs = read_all(&js, &name, "check", total).await;
    let ids: HashSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), total, "every event");
    assert_eq!(msgs.len(), total, "none twice");
    drop(tap);
    js.delete_stream(&name).await.unwrap();
}
