//! Jetstream with proofs against the real local network: a test adapter turns the
//! reference PDS's firehose into Jetstream events (one per operation, records as JSON,
//! as Jetstream does), and tap with `--jetstream-url` and `--jetstream-verify proof`
//! proves every record against that PDS's own `com.atproto.sync.getRecord`. What tap
//! delivers, replayed, equals the PDS's `listRecords`; multi-operation commits arrive whole.
//!
//! Without the kit (`bash tests/localnet/setup.sh`) the test prints a skip notice; under
//! `CI=true` a missing kit fails it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod localnet;

use common::{Backend, TestDb, TestTap};
use localnet::{Channel, LocalNet, add_repos, replay, wait_info};
use serde_json::{Value, json};
use tap::config::{JetstreamConfig, JetstreamVerify, LiveSource};
use tap_testkit::fake_jetstream::FakeJetstream;

fn note(text: &str) -> Value {
    json!({"$type": "com.example.note", "text": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_proven_against_the_real_pds_equal_what_it_lists() {
    let Some(mut net) = LocalNet::start(1, 3).await else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let did = net.did(0);
    let jet = FakeJetstream::start().await;
    let pds = net.str("/pdsUrl");
    let firehose = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos",
        pds.replacen("http", "ws", 1).trim_end_matches('/')
    );
    let adapter = jet.follow_firehose(firehose);

    let mut cfg = net.tap_config(&db);
    cfg.live_source = LiveSource::Jetstream(JetstreamConfig {
        url: tap::config::jetstream_subscribe_url(&jet.url()).unwrap(),
        verify: JetstreamVerify::Proof,
        proof_rate: 1000,
        watchdog: tap::jetstream::reader::WATCHDOG,
    });
    let tap = TestTap::start(cfg).await;
    let url = tap.url("");
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&url, &[&did]).await;
    let expected = net.records(&did).await;
    let n = expected.len() as u64;
    wait_info(&url, &did, "active with every record", |i| {
        i.is_some_and(|i| i["state"] == "active" && i["records"] == n)
    })
    .await;
    // The identity event is announced apart from the fetch, so it may come after the
    // records: wait for both, or a late one would pass for a live event below.
    channel
        .until("the backfill", |seen| {
            seen.iter().filter(|e| e.is_record()).count() >= expected.len()
                && seen.iter().any(|e| e.is_identity())
        })
        .await;
    let backfilled = channel.of(&did).len();

    // 1. Live writes, each seen before the next: single writes, then one commit of three
    // operations.
    let mut seen = backfilled;
    let mut write = async |net: &mut LocalNet, channel: &mut Channel, command: Value, n: usize| {
        let answer = net.command(command).await;
        seen += n;
        channel
            .until("a live write", |events| {
                events.iter().filter(|e| e.did() == did).count() >= seen
            })
            .await;
        answer
    };
    let created = write(
        &mut net,
        &mut channel,
        json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
               "record": note("one")}),
        1,
    )
    .await;
    let rkey = created["rkey"].as_str().unwrap().to_owned();
    write(
        &mut net,
        &mut channel,
        json!({"cmd": "putRecord", "did": did, "collection": "com.example.note",
               "rkey": rkey, "record": note("one, edited")}),
        1,
    )
    .await;
    let multi = write(
        &mut net,
        &mut channel,
        json!({"cmd": "applyWrites", "did": did, "writes": [
            {"action": "create", "collection": "com.example.note", "rkey": "m1", "value": note("m1")},
            {"action": "create", "collection": "com.example.note", "rkey": "m2", "value": note("m2")},
            {"action": "delete", "collection": "com.example.note", "rkey": rkey},
        ]}),
        3,
    )
    .await;
    let events = channel.of(&did);
    let live = &events[backfilled..];
    assert!(live.iter().all(|e| e.is_record() && e.live()), "{live:?}");
    let multi_rev = multi["commit"]["rev"].as_str().unwrap();
    let from_multi: Vec<String> = live
        .iter()
        .filter(|e| e.rec("rev") == multi_rev)
        .map(|e| format!("{} {}", e.action(), e.path()))
        .collect();
    assert_eq!(
        from_multi,
        [
            "create com.example.note/m1".to_owned(),
            "create com.example.note/m2".to_owned(),
            format!("delete com.example.note/{rkey}")
        ],
        "every operation of the commit"
    );
    // Proven records are the PDS's records.
    let m1 = live
        .iter()
        .find(|e| e.path() == "com.example.note/m1")
        .unwrap();
    assert_eq!(m1.rec("record"), &note("m1"));
    assert_eq!(replay(&events), net.records(&did).await);

    // 2. Writes faster than the proofs: a proof then shows a newer state than its event
    // claims, the repo is resynced, and what tap delivered still replays to the PDS's repo.
    for (i, command) in [
        json!({"cmd": "createRecord", "did": did, "collection": "com.example.note", "record": note("fast a")}),
        json!({"cmd": "putRecord", "did": did, "collection": "com.example.note", "rkey": "m1", "record": note("m1 v2")}),
        json!({"cmd": "deleteRecord", "did": did, "collection": "com.example.note", "rkey": "m2"}),
        json!({"cmd": "putRecord", "did": did, "collection": "com.example.note", "rkey": "m1", "record": note("m1 v3")}),
    ]
    .into_iter()
    .enumerate()
    {
        let answer = net.command(command).await;
        assert_eq!(answer["ok"], true, "write {i}");
    }
    let listed = net.records(&did).await;
    channel
        .until("tap's events to replay to the PDS's repo", |events| {
            let mine: Vec<_> = events.iter().filter(|e| e.did() == did).cloned().collect();
            replay(&mine) == listed
        })
        .await;
    let bandwidth: Value = reqwest::get(format!("{url}/stats/bandwidth"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        bandwidth["by_source"]["pds.getRecord"].as_u64().unwrap() > 0,
        "{bandwidth}"
    );
    assert_eq!(bandwidth["by_source"]["relay.firehose"], 0);
    adapter.abort();
    tap.stop().await;
    net.stop().await;
}
