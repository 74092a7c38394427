//! The sync engine end to end against a real PLC directory and the reference PDS
//! (`tests/localnet/network.mjs`, loopback only): backfill after `/repos/add` equals the
//! PDS's repo exactly, live writes follow in order, a record deleted while tap was stopped
//! is deleted by the resync, account lifecycle events become identity events, and the
//! collection filters drop exactly what they should.
//!
//! Events are consumed by an in-process `/channel` client that acks everything. Without the
//! kit (`bash tests/localnet/setup.sh`) the tests print a skip notice; under `CI=true` a
//! missing kit fails them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod localnet;

use std::collections::BTreeMap;

use common::{TestDb, TestTap};
use localnet::{Channel, Event, LocalNet, add_repos, info, replay, wait_info};
use serde_json::{Value, json};

/// A record of an unvalidated collection (the PDS stores those as given).
fn note(collection: &str, text: &str) -> Value {
    json!({"$type": collection, "text": text})
}

fn post(text: &str) -> Value {
    json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-01-01T00:00:00.000Z"})
}

/// `count` notes written through `applyWrites` in commits of 50, rkeys `n000`, `n001`, ….
async fn write_notes(net: &mut LocalNet, did: &str, collection: &str, count: usize) {
    let writes: Vec<Value> = (0..count)
        .map(|i| {
            json!({"action": "create", "collection": collection, "rkey": format!("n{i:03}"),
                   "value": note(collection, &format!("note {i}"))})
        })
        .collect();
    for chunk in writes.chunks(50) {
        net.command(json!({"cmd": "applyWrites", "did": did, "writes": chunk}))
            .await;
    }
}

/// Waits for the backfill of `did`: an identity event (checked apart from the fetch, so in
/// any position) and one historical event per PDS record, and `/info` showing it active
/// with that many records. Returns the events.
async fn await_backfill(
    tap: &TestTap,
    channel: &mut Channel,
    did: &str,
    expected: &BTreeMap<String, String>,
) -> Vec<Event> {
    channel
        .until("the backfill", |seen| {
            seen.iter()
                .filter(|e| e.did() == did && e.is_record())
                .count()
                >= expected.len()
                && seen.iter().any(|e| e.did() == did && e.is_identity())
        })
        .await;
    let url = tap.url("");
    let n = expected.len() as u64;
    wait_info(&url, did, "active with every record", |i| {
        i.is_some_and(|i| i["state"] == "active" && i["records"] == n)
    })
    .await;
    channel.drain_ready();
    channel.of(did)
}

/// Historical events equal the PDS's repo (every path and CID, compared with the PDS's
/// own record index), after an identity event with the real handle; then creates,
/// updates and deletes arrive live and in order, with the PDS's CIDs and revs.
async fn backfill_equals_the_pds_and_live_writes_follow_in_order(db: TestDb) {
    let Some(mut net) = LocalNet::start(2, 3).await else {
        return;
    };
    let did = net.did(0);
    let other = net.did(1);
    // More than one 100-event batch, in a second collection.
    write_notes(&mut net, &did, "com.example.note", 130).await;
    let expected = net.records(&did).await;
    assert_eq!(expected.len(), 1 + 3 + 130);
    let pds_rev = net.command(json!({"cmd": "listRecords", "did": did})).await["rev"]
        .as_str()
        .unwrap()
        .to_owned();

    let tap = TestTap::start(net.tap_config(&db)).await;
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&tap.url(""), &[&did]).await;
    let events = await_backfill(&tap, &mut channel, &did, &expected).await;

    // 1. One identity event with the real handle, and exactly the PDS's records.
    let first = events.iter().find(|e| e.is_identity()).unwrap();
    assert_eq!(first.ident("handle"), net.handle(0).as_str());
    assert_eq!(first.ident("status"), "active");
    assert_eq!(first.ident("is_active"), true);
    assert_eq!(events.iter().filter(|e| e.is_identity()).count(), 1);
    let records: Vec<&Event> = events.iter().filter(|e| e.is_record()).collect();
    assert!(records.iter().all(|e| !e.live() && e.action() == "create"));
    assert!(records.iter().all(|e| e.rec("rev") == pds_rev.as_str()));
    let historical: BTreeMap<String, String> = records
        .iter()
        .map(|e| (e.path(), e.cid().unwrap().to_owned()))
        .collect();
    assert_eq!(records.len(), historical.len(), "no path twice");
    assert_eq!(historical, expected);
    // Record bodies are the PDS's records in atproto JSON.
    let some_post = expected
        .keys()
        .find(|p| p.starts_with("app.bsky.feed.post/"))
        .unwrap();
    let (collection, rkey) = some_post.split_once('/').unwrap();
    let stored = net
        .command(json!({"cmd": "getRecord", "did": did, "collection": collection, "rkey": rkey}))
        .await;
    let event = records.iter().find(|e| e.path() == *some_post).unwrap();
    assert_eq!(event.rec("record"), &stored["value"]);
    let profile = records
        .iter()
        .find(|e| e.path() == "app.bsky.actor.profile/self")
        .unwrap();
    assert_eq!(profile.rec("record")["$type"], "app.bsky.actor.profile");
    // The other account was never added.
    assert!(channel.of(&other).is_empty());

    // 2. Live writes, in order.
    let created = net
        .command(
            json!({"cmd": "createRecord", "did": did, "collection": "app.bsky.feed.post",
                        "record": post("live one")}),
        )
        .await;
    let rkey = created["rkey"].as_str().unwrap().to_owned();
    let updated = net
        .command(
            json!({"cmd": "putRecord", "did": did, "collection": "app.bsky.feed.post",
                        "rkey": rkey, "record": post("live one, edited")}),
        )
        .await;
    let deleted = net
        .command(
            json!({"cmd": "deleteRecord", "did": did, "collection": "app.bsky.feed.post",
                        "rkey": rkey}),
        )
        .await;
    let multi = net
        .command(json!({"cmd": "applyWrites", "did": did, "writes": [
            {"action": "create", "collection": "com.example.note", "rkey": "z1", "value": note("com.example.note", "z1")},
            {"action": "update", "collection": "com.example.note", "rkey": "n005", "value": note("com.example.note", "n5 v2")},
            {"action": "delete", "collection": "com.example.note", "rkey": "n000"},
        ]}))
        .await;
    let before = events.len();
    channel
        .until("the live writes", |seen| {
            seen.iter().filter(|e| e.did() == did).count() >= before + 6
        })
        .await;
    let live: Vec<Event> = channel.of(&did)[before..].to_vec();
    assert!(live.iter().all(|e| e.is_record() && e.live()), "{live:?}");
    let path = format!("app.bsky.feed.post/{rkey}");
    let steps: Vec<(String, String, Option<&str>, &str)> = live
        .iter()
        .map(|e| {
            (
                e.action().to_owned(),
                e.path(),
                e.cid(),
                e.rec("rev").as_str().unwrap(),
            )
        })
        .collect();
    let rev = |v: &Value| v["commit"]["rev"].as_str().unwrap().to_owned();
    assert_eq!(
        steps[..3],
        [
            (
                "create".to_owned(),
                path.clone(),
                created["cid"].as_str(),
                rev(&created).as_str()
            ),
            (
                "update".to_owned(),
                path.clone(),
                updated["cid"].as_str(),
                rev(&updated).as_str()
            ),
            (
                "delete".to_owned(),
                path.clone(),
                None,
                rev(&deleted).as_str()
            ),
        ]
    );
    // One commit of three ops: all with its rev, after the single writes.
    let multi_rev = rev(&multi);
    assert!(steps[3..].iter().all(|s| s.3 == multi_rev));
    let mut ops: Vec<(String, String)> = steps[3..]
        .iter()
        .map(|s| (s.0.clone(), s.1.clone()))
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        [
            ("create".into(), "com.example.note/z1".into()),
            ("delete".into(), "com.example.note/n000".into()),
            ("update".into(), "com.example.note/n005".into()),
        ]
    );

    // Replaying everything gives the PDS's repo, and the record index agrees.
    let now = net.records(&did).await;
    assert_eq!(replay(&channel.of(&did)), now);
    let n = now.len() as u64;
    wait_info(&tap.url(""), &did, "the new record count", |i| {
        i.is_some_and(|i| i["records"] == n && i["rev"] == multi_rev.as_str())
    })
    .await;
    assert!(channel.of(&other).is_empty());
    assert!(info(&tap.url(""), &other).await.is_none());

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    backfill_equals_the_pds_and_live_writes_follow_in_order,
    backfill_equals_the_pds_and_live_writes_follow_in_order
);

/// Writes trigger records into `collection` until an event reaches `channel`: after a
/// restart with `--no-replay` the first commit tap sees does not chain onto what it holds,
/// so the repo resyncs. The firehose may not be connected yet when a trigger is written,
/// hence the repetition.
async fn trigger_resync(net: &mut LocalNet, channel: &mut Channel, did: &str, collection: &str) {
    let before = channel.seen.len();
    for i in 0..30 {
        net.command(
            json!({"cmd": "createRecord", "did": did, "collection": collection,
                           "rkey": format!("t{i}"), "record": note(collection, "trigger")}),
        )
        .await;
        if channel
            .until_within(std::time::Duration::from_secs(3), |seen| {
                seen.len() > before
            })
            .await
        {
            return;
        }
    }
    panic!("no commit after the restart reached tap");
}

/// A record deleted while tap was stopped: with the saved cursor the firehose replays the
/// delete (live); with `--no-replay` the delete is never seen, so the next commit's
/// `prevData` no longer chains onto the stored data root, the repo is desynchronized and
/// resynced (from `getRepo?since=` of the real PDS), and the resync emits the delete (and
/// the update made meanwhile, and a delete for each record of a collection that vanished
/// entirely) as historical events. The record index ends equal to the PDS either way.
async fn records_changed_while_tap_was_stopped_are_caught_up(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 3).await else {
        return;
    };
    let did = net.did(0);
    let expected = net.records(&did).await;
    let posts: Vec<String> = expected
        .keys()
        .filter(|p| p.starts_with("app.bsky.feed.post/"))
        .cloned()
        .collect();
    assert_eq!(posts.len(), 3);
    let config = net.tap_config(&db);

    let tap = TestTap::start(config.clone()).await;
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&tap.url(""), &[&did]).await;
    await_backfill(&tap, &mut channel, &did, &expected).await;
    // A collection that will vanish entirely while tap is stopped.
    write_notes(&mut net, &did, "com.example.gone", 2).await;
    // A live write proves the firehose is connected before tap stops.
    net.command(
        json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
                       "rkey": "live0", "record": note("com.example.note", "live0")}),
    )
    .await;
    channel
        .until("the first live write", |seen| {
            seen.iter()
                .any(|e| e.is_record() && e.path() == "com.example.note/live0")
        })
        .await;
    tap.stop().await;
    let seen = channel.seen.clone();
    drop(channel);

    // A. Deleted while stopped; the firehose replays from the saved cursor.
    let (collection, rkey) = posts[0].split_once('/').unwrap();
    net.command(json!({"cmd": "deleteRecord", "did": did, "collection": collection, "rkey": rkey}))
        .await;
    let seen = {
        let tap = TestTap::start(config.clone()).await;
        let mut channel = Channel::connect(tap.addr, &seen).await;
        channel
            .until("the replayed delete", |seen| {
                seen.iter()
                    .any(|e| e.is_record() && e.path() == posts[0] && e.action() == "delete")
            })
            .await;
        let delete = channel
            .seen
            .iter()
            .find(|e| e.is_record() && e.path() == posts[0] && e.action() == "delete")
            .unwrap();
        assert!(delete.live(), "a replayed firehose commit is live");
        let n = net.records(&did).await.len() as u64;
        wait_info(&tap.url(""), &did, "the replayed delete", |i| {
            i.is_some_and(|i| i["records"] == n && i["state"] == "active")
        })
        .await;
        tap.stop().await;
        channel.seen.clone()
    };

    // B. Deleted and updated while stopped, and tap restarts with --no-replay: the
    //    firehose never shows these commits.
    let (collection, rkey) = posts[1].split_once('/').unwrap();
    net.command(json!({"cmd": "deleteRecord", "did": did, "collection": collection, "rkey": rkey}))
        .await;
    let profile = net
        .command(json!({"cmd": "putRecord", "did": did, "collection": "app.bsky.actor.profile",
                        "rkey": "self", "record": {"$type": "app.bsky.actor.profile", "displayName": "renamed"}}))
        .await;
    for rkey in ["n000", "n001"] {
        net.command(
            json!({"cmd": "deleteRecord", "did": did, "collection": "com.example.gone", "rkey": rkey}),
        )
        .await;
    }
    // The PDS broadcasts writes on its sequencer's next poll; until it has, a subscriber
    // without a cursor would still receive them live and nothing would need a resync.
    net.command(json!({"cmd": "awaitSequenced"})).await;
    let mut no_replay = config.clone();
    no_replay.no_replay = true;
    let tap = TestTap::start(no_replay).await;
    let mut channel = Channel::connect(tap.addr, &seen).await;
    let before = seen.len();
    trigger_resync(&mut net, &mut channel, &did, "com.example.note").await;
    channel
        .until("the resync's delete and update", |seen| {
            let has = |path: &str, action: &str| {
                seen.iter()
                    .any(|e| e.is_record() && e.path() == path && e.action() == action)
            };
            has(&posts[1], "delete")
                && has("app.bsky.actor.profile/self", "update")
                && has("com.example.gone/n000", "delete")
                && has("com.example.gone/n001", "delete")
        })
        .await;
    let resynced = &channel.seen[before..];
    for e in resynced.iter().filter(|e| {
        e.is_record()
            && (e.path() == posts[1]
                || e.path() == "app.bsky.actor.profile/self"
                || e.path().starts_with("com.example.gone/"))
    }) {
        assert!(!e.live(), "the resync's events are historical: {:?}", e.0);
    }
    let update = resynced
        .iter()
        .find(|e| e.is_record() && e.path() == "app.bsky.actor.profile/self")
        .unwrap();
    assert_eq!(update.action(), "update");
    assert_eq!(update.cid(), profile["cid"].as_str());
    assert!(
        !resynced
            .iter()
            .any(|e| e.is_record() && e.path() == posts[2]),
        "an unchanged record is not re-sent"
    );

    // The record index and a consumer replaying every event both equal the PDS.
    let now = net.records(&did).await;
    let pds_rev = net.command(json!({"cmd": "listRecords", "did": did})).await["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let n = now.len() as u64;
    let info = wait_info(&tap.url(""), &did, "the resynced repo", |i| {
        i.is_some_and(|i| {
            i["state"] == "active" && i["records"] == n && i["rev"] == pds_rev.as_str()
        })
    })
    .await
    .unwrap();
    assert_eq!(info["error"], "");
    // Fetched as what changed since the rev tap held, checked against the record index.
    assert_eq!(info["last_fetch"]["kind"], "since", "{info}");
    channel
        .until("every event, replayed, to equal the PDS's repo", |seen| {
            replay(seen) == now
        })
        .await;
    let count = reqwest::get(tap.url("/stats/record-count"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(count["record_count"], n, "{count}");

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    records_changed_while_tap_was_stopped_are_caught_up,
    records_changed_while_tap_was_stopped_are_caught_up
);

/// Handle change, deactivation, reactivation, takedown and its reversal, and deletion each
/// become one identity event with the right handle, status and `is_active`; the repo keeps
/// syncing through them and is gone after the deletion.
async fn account_lifecycle_becomes_identity_events(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 1).await else {
        return;
    };
    let did = net.did(0);
    let expected = net.records(&did).await;
    let tap = TestTap::start(net.tap_config(&db)).await;
    let url = tap.url("");
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&url, &[&did]).await;
    await_backfill(&tap, &mut channel, &did, &expected).await;

    let identities = |channel: &Channel| -> Vec<(String, String, bool)> {
        channel
            .of(&did)
            .iter()
            .filter(|e| e.is_identity())
            .map(|e| {
                (
                    e.ident("handle").as_str().unwrap().to_owned(),
                    e.ident("status").as_str().unwrap().to_owned(),
                    e.ident("is_active").as_bool().unwrap(),
                )
            })
            .collect()
    };
    let mut want = vec![(net.handle(0), "active".to_owned(), true)];
    assert_eq!(identities(&channel), want);

    // Each step: one PDS action, one identity event.
    let renamed = "renamed0.test".to_owned();
    // Order matters: reactivation also puts an #identity on the firehose, and tap resolves
    // the handle when it processes that event; were the account taken down by then, the
    // PDS would refuse to resolve its handle (handle.invalid). So the takedown comes first
    // and the live write below, later in the same repo's stream, fences the reactivation.
    let steps: Vec<(Value, (String, &str, bool))> = vec![
        (
            json!({"cmd": "updateHandle", "did": did, "handle": renamed}),
            (renamed.clone(), "active", true),
        ),
        (
            json!({"cmd": "takedownAccount", "did": did}),
            (renamed.clone(), "takendown", false),
        ),
        (
            json!({"cmd": "takedownAccount", "did": did, "applied": false}),
            (renamed.clone(), "active", true),
        ),
        (
            json!({"cmd": "deactivateAccount", "did": did}),
            (renamed.clone(), "deactivated", false),
        ),
        (
            json!({"cmd": "activateAccount", "did": did}),
            (renamed.clone(), "active", true),
        ),
    ];
    for (command, (handle, status, active)) in steps {
        net.command(command.clone()).await;
        want.push((handle, status.to_owned(), active));
        let n = want.len();
        channel
            .until(&format!("the identity event after {command}"), |seen| {
                seen.iter()
                    .filter(|e| e.did() == did && e.is_identity())
                    .count()
                    >= n
            })
            .await;
        assert_eq!(identities(&channel), want, "after {command}");
        let handle = want[n - 1].0.clone();
        // `/info` shows the account status too, while the repo stays synced.
        wait_info(&url, &did, "the new handle and status, still active", |i| {
            i.is_some_and(|i| {
                i["handle"] == handle.as_str() && i["state"] == "active" && i["status"] == status
            })
        })
        .await;
    }

    // Still syncing after all that (the #sync of the reactivation changed nothing).
    let created = net
        .command(
            json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
                        "rkey": "after", "record": note("com.example.note", "after")}),
        )
        .await;
    channel
        .until("a live write after reactivation", |seen| {
            seen.iter()
                .any(|e| e.is_record() && e.path() == "com.example.note/after")
        })
        .await;
    let after = channel
        .of(&did)
        .into_iter()
        .find(|e| e.is_record() && e.path() == "com.example.note/after")
        .unwrap();
    assert!(after.live());
    assert_eq!(after.cid(), created["cid"].as_str());

    // Deletion: the last identity event, and the repo is forgotten.
    net.command(json!({"cmd": "deleteAccount", "did": did}))
        .await;
    want.push((renamed.clone(), "deleted".to_owned(), false));
    let n = want.len();
    channel
        .until("the deletion's identity event", |seen| {
            seen.iter()
                .filter(|e| e.did() == did && e.is_identity())
                .count()
                >= n
        })
        .await;
    assert_eq!(identities(&channel), want);
    wait_info(&url, &did, "the repo removed", |i| i.is_none()).await;

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    account_lifecycle_becomes_identity_events,
    account_lifecycle_becomes_identity_events
);

/// `--collection-filters app.bsky.feed.post,com.example.keep.*`: history and live events
/// carry exactly the matching collections (`com.example.keepx` does not match the
/// whole-segment wildcard), the record index holds only those, and commits whose ops are
/// all filtered out still advance the chain, so later commits apply live.
async fn collection_filters_drop_exactly_the_unwanted_collections(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 3).await else {
        return;
    };
    let did = net.did(0);
    for collection in [
        "com.example.keep.a",
        "com.example.keep.b",
        "com.example.keepx",
        "com.example.drop",
    ] {
        write_notes(&mut net, &did, collection, 3).await;
    }
    let wanted = |path: &str| {
        path.starts_with("app.bsky.feed.post/") || path.starts_with("com.example.keep.")
    };
    let all = net.records(&did).await;
    assert_eq!(all.len(), 1 + 3 + 4 * 3);
    let expected: BTreeMap<String, String> = all
        .iter()
        .filter(|(p, _)| wanted(p))
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    assert_eq!(expected.len(), 3 + 2 * 3);

    let mut config = net.tap_config(&db);
    config.collection_filters = ["app.bsky.feed.post", "com.example.keep.*"]
        .iter()
        .map(|f| f.parse().unwrap())
        .collect();
    let tap = TestTap::start(config).await;
    let url = tap.url("");
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&url, &[&did]).await;
    let events = await_backfill(&tap, &mut channel, &did, &expected).await;
    assert!(
        events.iter().any(Event::is_identity),
        "identity events are never filtered"
    );
    let historical: BTreeMap<String, String> = events
        .iter()
        .filter(|e| e.is_record())
        .map(|e| (e.path(), e.cid().unwrap().to_owned()))
        .collect();
    assert_eq!(historical, expected);

    // Live: one mixed commit, one commit with only unwanted ops, then a wanted sentinel.
    net.command(json!({"cmd": "applyWrites", "did": did, "writes": [
        {"action": "create", "collection": "com.example.keep.a", "rkey": "l1", "value": note("com.example.keep.a", "kept")},
        {"action": "create", "collection": "com.example.keepx", "rkey": "l1", "value": note("com.example.keepx", "dropped")},
        {"action": "create", "collection": "com.example.drop", "rkey": "l1", "value": note("com.example.drop", "dropped")},
        {"action": "delete", "collection": "com.example.keep.b", "rkey": "n000"},
        {"action": "delete", "collection": "com.example.keepx", "rkey": "n000"},
    ]}))
    .await;
    net.command(json!({"cmd": "applyWrites", "did": did, "writes": [
        {"action": "update", "collection": "com.example.drop", "rkey": "n001", "value": note("com.example.drop", "dropped v2")},
        {"action": "delete", "collection": "com.example.keepx", "rkey": "n001"},
    ]}))
    .await;
    net.command(json!({"cmd": "putRecord", "did": did, "collection": "app.bsky.actor.profile",
                       "rkey": "self", "record": {"$type": "app.bsky.actor.profile", "displayName": "x"}}))
        .await;
    let sentinel = net
        .command(
            json!({"cmd": "createRecord", "did": did, "collection": "app.bsky.feed.post",
                        "record": post("sentinel")}),
        )
        .await;
    let sentinel_path = format!("app.bsky.feed.post/{}", sentinel["rkey"].as_str().unwrap());
    channel
        .until("the sentinel post", |seen| {
            seen.iter()
                .any(|e| e.is_record() && e.path() == sentinel_path)
        })
        .await;
    let live: Vec<(String, String)> = channel.of(&did)[events.len()..]
        .iter()
        .map(|e| {
            assert!(e.is_record() && e.live(), "{:?}", e.0);
            (e.action().to_owned(), e.path())
        })
        .collect();
    let mut mixed = live[..2].to_vec();
    mixed.sort();
    assert_eq!(
        mixed,
        [
            ("create".to_owned(), "com.example.keep.a/l1".to_owned()),
            ("delete".to_owned(), "com.example.keep.b/n000".to_owned()),
        ]
    );
    assert_eq!(live[2..], [("create".to_owned(), sentinel_path.clone())]);

    let now: BTreeMap<String, String> = net
        .records(&did)
        .await
        .into_iter()
        .filter(|(p, _)| wanted(p))
        .collect();
    assert_eq!(replay(&channel.of(&did)), now);
    let n = now.len() as u64;
    wait_info(&url, &did, "only the wanted records indexed", |i| {
        i.is_some_and(|i| i["records"] == n && i["state"] == "active")
    })
    .await;

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    collection_filters_drop_exactly_the_unwanted_collections,
    collection_filters_drop_exactly_the_unwanted_collections
);

/// Writes made while a large repo is being backfilled (pending: covered by the snapshot;
/// resyncing: buffered, then dropped if the snapshot has them or applied at the cutover;
/// active: live) leave no gap and no duplicate: every live event comes after the history,
/// replaying everything gives the PDS's repo, and the resync buffer ends empty.
async fn writes_during_the_backfill_leave_no_gap(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 0).await else {
        return;
    };
    let did = net.did(0);
    write_notes(&mut net, &did, "com.example.bulk", 1500).await;
    let mut config = net.tap_config(&db);
    config.firehose_parallelism = 4;
    let tap = TestTap::start(config).await;
    let url = tap.url("");
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&url, &[&did]).await;
    let mut states = Vec::new();
    let mut i = 0;
    loop {
        let state = info(&url, &did).await.unwrap()["state"]
            .as_str()
            .unwrap()
            .to_owned();
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        net.command(json!({"cmd": "applyWrites", "did": did, "writes": [
            {"action": "create", "collection": "com.example.during", "rkey": format!("w{i:03}"),
             "value": note("com.example.during", "during")},
            {"action": "update", "collection": "com.example.bulk", "rkey": format!("n{:03}", i % 1000),
             "value": note("com.example.bulk", &format!("updated {i}"))},
        ]}))
        .await;
        i += 1;
        // Keep writing a little past the cutover so the last writes are live.
        if states.last().is_some_and(|s| s == "active") && i >= 5 {
            break;
        }
        assert!(i < 2000, "the backfill never finished: {states:?}");
    }
    eprintln!("repo states seen while writing: {states:?}; {i} commits");
    let now = net.records(&did).await;
    channel
        .until("every event, replayed, to equal the PDS's repo", |seen| {
            replay(seen) == now
        })
        .await;
    let records: Vec<Event> = channel
        .of(&did)
        .into_iter()
        .filter(Event::is_record)
        .collect();
    let first_live = records.iter().position(Event::live).unwrap();
    assert!(
        records[first_live..].iter().all(Event::live),
        "no historical event after a live one"
    );
    // Live revs strictly increase (each commit once, in order).
    let mut revs: Vec<&str> = records[first_live..]
        .iter()
        .map(|e| e.rec("rev").as_str().unwrap())
        .collect();
    revs.dedup();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    let n = now.len() as u64;
    wait_info(&url, &did, "active with every record", |i| {
        i.is_some_and(|i| i["state"] == "active" && i["records"] == n)
    })
    .await;
    let buffer = reqwest::get(tap.url("/stats/resync-buffer"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(buffer["resync_buffer"], 0, "{buffer}");

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    writes_during_the_backfill_leave_no_gap,
    writes_during_the_backfill_leave_no_gap
);

/// A backfill interrupted by shutdown (here: stuck on a full outbox with no consumer)
/// resumes after a restart: the batches it committed are delivered once, the new resync
/// skips the records already indexed, and every record arrives exactly once.
async fn interrupted_backfill_resumes_after_restart(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 0).await else {
        return;
    };
    let did = net.did(0);
    let batch = tap::resync::BATCH;
    write_notes(&mut net, &did, "com.example.bulk", batch + batch / 2).await;
    let expected = net.records(&did).await;
    let config = net.tap_config(&db);

    let mut small = config.clone();
    small.outbox_capacity = batch + batch / 4;
    let tap = TestTap::start(small).await;
    add_repos(&tap.url(""), &[&did]).await;
    // The first batch fits; the second waits for acks that never come.
    wait_info(
        &tap.url(""),
        &did,
        "a resync stuck on the full outbox",
        |i| i.is_some_and(|i| i["state"] == "resyncing" && i["records"] == batch),
    )
    .await;
    tap.stop().await;

    let tap = TestTap::start(config).await;
    let mut channel = Channel::connect(tap.addr, &[]).await;
    let events = await_backfill(&tap, &mut channel, &did, &expected).await;
    channel
        .until("every record", |seen| replay(seen) == expected)
        .await;
    assert_eq!(events.iter().filter(|e| e.is_identity()).count(), 1);
    let mut paths: Vec<String> = channel
        .of(&did)
        .iter()
        .filter(|e| e.is_record())
        .map(|e| {
            assert!(!e.live() && e.action() == "create", "{:?}", e.0);
            e.path()
        })
        .collect();
    let total = paths.len();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), total, "no record sent twice");
    assert_eq!(total, expected.len());

    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    interrupted_backfill_resumes_after_restart,
    interrupted_backfill_resumes_after_restart
);

/// Issue 12: every fetch strategy against the reference PDS (which implements
/// `getLatestCommit` and `getBlocks`) syncs exactly the PDS's wanted records, as its own
/// `listRecords` reports them, and `/info` says how the repo was fetched.
async fn every_fetch_strategy_syncs_what_the_pds_lists(db: TestDb) {
    use tap::config::FetchStrategy;
    let Some(mut net) = LocalNet::start(1, 20).await else {
        return;
    };
    let did = net.did(0);
    write_notes(&mut net, &did, "com.example.keep.a", 120).await;
    write_notes(&mut net, &did, "com.example.drop", 120).await;
    let everything = net.records(&did).await;
    let kept = |p: &str| p.starts_with("com.example.keep.");
    for (strategy, filtered, kind) in [
        (FetchStrategy::Full, true, "full"),
        (FetchStrategy::Auto, true, "sparse"),
        (FetchStrategy::Auto, false, "full"),
        (FetchStrategy::Sparse, false, "sparse"),
    ] {
        let expected: BTreeMap<String, String> = everything
            .iter()
            .filter(|(p, _)| !filtered || kept(p))
            .map(|(p, c)| (p.clone(), c.clone()))
            .collect();
        // A fresh database per run: each strategy backfills from nothing.
        let run_db = TestDb::new(db.backend()).await.unwrap();
        let mut config = net.tap_config(&run_db);
        config.fetch_strategy = strategy;
        if filtered {
            config.collection_filters = vec!["com.example.keep.*".parse().unwrap()];
        }
        let tap = TestTap::start(config).await;
        let url = tap.url("");
        let mut channel = Channel::connect(tap.addr, &[]).await;
        add_repos(&url, &[&did]).await;
        let events = await_backfill(&tap, &mut channel, &did, &expected).await;
        let historical: BTreeMap<String, String> = events
            .iter()
            .filter(|e| e.is_record())
            .map(|e| (e.path(), e.cid().unwrap().to_owned()))
            .collect();
        assert_eq!(historical, expected, "{strategy:?}, filtered: {filtered}");
        let i = info(&url, &did).await.unwrap();
        assert_eq!(
            i["last_fetch"]["kind"], kind,
            "{strategy:?}, filtered: {filtered}"
        );
        assert!(i["last_fetch"]["bytes"].as_u64().unwrap() > 0);
        tap.stop().await;
    }
    net.stop().await;
}

on_both_backends!(
    every_fetch_strategy_syncs_what_the_pds_lists,
    every_fetch_strategy_syncs_what_the_pds_lists
);

/// A filtered tap that holds a repo resyncs it incrementally from the real PDS (the sparse
/// walk reusing its record index, only changed records fetched): after creates, updates and
/// deletes in wanted and unwanted collections made while it was stopped, the events replay
/// to exactly the PDS's wanted records.
async fn an_incremental_filtered_resync_equals_what_the_pds_lists(db: TestDb) {
    let Some(mut net) = LocalNet::start(1, 3).await else {
        return;
    };
    let did = net.did(0);
    write_notes(&mut net, &did, "com.example.keep.a", 120).await;
    write_notes(&mut net, &did, "com.example.drop", 120).await;
    let kept = |p: &str| p.starts_with("com.example.keep.");
    let wanted = |all: BTreeMap<String, String>| -> BTreeMap<String, String> {
        all.into_iter().filter(|(p, _)| kept(p)).collect()
    };
    let expected = wanted(net.records(&did).await);
    let mut config = net.tap_config(&db);
    config.collection_filters = vec!["com.example.keep.*".parse().unwrap()];
    let tap = TestTap::start(config.clone()).await;
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&tap.url(""), &[&did]).await;
    await_backfill(&tap, &mut channel, &did, &expected).await;
    let backfill = info(&tap.url(""), &did).await.unwrap();
    let backfill_bytes = backfill["last_fetch"]["bytes"].as_u64().unwrap();
    tap.stop().await;
    let seen = channel.seen.clone();
    drop(channel);

    // While stopped: wanted records deleted, updated and created, unwanted ones too.
    for (collection, rkey) in [("com.example.keep.a", "n005"), ("com.example.drop", "n005")] {
        net.command(
            json!({"cmd": "deleteRecord", "did": did, "collection": collection, "rkey": rkey}),
        )
        .await;
    }
    for collection in ["com.example.keep.a", "com.example.drop"] {
        net.command(
            json!({"cmd": "putRecord", "did": did, "collection": collection,
                           "rkey": "n007", "record": note(collection, "edited")}),
        )
        .await;
        net.command(
            json!({"cmd": "createRecord", "did": did, "collection": collection,
                           "rkey": "zz0", "record": note(collection, "new")}),
        )
        .await;
    }
    net.command(json!({"cmd": "awaitSequenced"})).await;
    let mut no_replay = config;
    no_replay.no_replay = true;
    let tap = TestTap::start(no_replay).await;
    let mut channel = Channel::connect(tap.addr, &seen).await;
    trigger_resync(&mut net, &mut channel, &did, "com.example.keep.b").await;
    let pds_rev = net.command(json!({"cmd": "listRecords", "did": did})).await["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let now = wanted(net.records(&did).await);
    let info = wait_info(&tap.url(""), &did, "the resynced repo", |i| {
        i.is_some_and(|i| i["state"] == "active" && i["rev"] == pds_rev.as_str())
    })
    .await
    .unwrap();
    assert_eq!(info["last_fetch"]["kind"], "sparse", "{info}");
    assert_eq!(info["records"], now.len() as u64, "{info}");
    // Unchanged subtrees and records were proven from the index, not fetched again.
    let bytes = info["last_fetch"]["bytes"].as_u64().unwrap();
    assert!(
        bytes * 2 < backfill_bytes,
        "resync {bytes} bytes, backfill {backfill_bytes}"
    );
    channel
        .until(
            "every event, replayed, to equal the PDS's wanted records",
            |seen| replay(seen) == now,
        )
        .await;
    // Only what changed came again: 120 unchanged records are not re-sent.
    let resent = channel.seen[seen.len()..]
        .iter()
        .filter(|e| e.is_record() && e.path().starts_with("com.example.keep.a/n0"))
        .count();
    assert_eq!(resent, 2, "the delete of n005 and the update of n007");
    tap.stop().await;
    net.stop().await;
}

on_both_backends!(
    an_incremental_filtered_resync_equals_what_the_pds_lists,
    an_incremental_filtered_resync_equals_what_the_pds_lists
);

/// The seed blog's starter-pack slice from the reference PDS: with rules for lists,
/// list items and profiles, exactly the starter pack, the list it names, that list's
/// members and the owner's profile arrive — nothing of a moderation list or a curation
/// list with members of their own, nor their items — and deleting the starter pack
/// deletes the rest. Records are written through the PDS, so they pass its lexicon
/// validation: these are the shapes real accounts hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_filters_deliver_the_starter_pack_slice_from_the_real_pds() {
    const RULES: &str = "app.bsky.graph.list: $uri in refs(app.bsky.graph.starterpack, $.list); \
         app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list); \
         app.bsky.actor.profile: kept(app.bsky.graph.starterpack)";
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let Some(mut net) = LocalNet::start(3, 1).await else {
        return;
    };
    let did = net.did(0);
    // Graph record keys must be TIDs.
    let tid = |n: usize| {
        const B32: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
        format!("3lzzzzzzzzz{}{}", B32[n / 32] as char, B32[n % 32] as char)
    };
    let lists = [("pack", tid(0)), ("mod", tid(1)), ("curate", tid(2))];
    let members = [net.did(1), net.did(2)];
    let at = "2026-12-07T00:00:00.000Z";
    let list = |purpose: &str, name: &str| {
        json!({"$type": "app.bsky.graph.list", "purpose": format!("app.bsky.graph.defs#{purpose}"),
               "name": name, "createdAt": at})
    };
    let mut writes = Vec::new();
    for ((name, rkey), purpose) in lists.iter().zip(["referencelist", "modlist", "curatelist"]) {
        writes.push(
            json!({"action": "create", "collection": "app.bsky.graph.list",
                           "rkey": rkey, "value": list(purpose, name)}),
        );
    }
    let mut item_keys = Vec::new();
    for (l, (_, list_rkey)) in lists.iter().enumerate() {
        for (i, member) in members.iter().enumerate() {
            let rkey = tid(10 + 2 * l + i);
            item_keys.push(rkey.clone());
            writes.push(json!({"action": "create", "collection": "app.bsky.graph.listitem",
                "rkey": rkey,
                "value": {"$type": "app.bsky.graph.listitem", "subject": member,
                          "list": format!("at://{did}/app.bsky.graph.list/{list_rkey}"), "createdAt": at}}));
        }
    }
    let pack = tid(30);
    writes.push(json!({"action": "create", "collection": "app.bsky.graph.starterpack", "rkey": pack,
        "value": {"$type": "app.bsky.graph.starterpack", "name": "welcome",
                  "list": format!("at://{did}/app.bsky.graph.list/{}", lists[0].1), "createdAt": at}}));
    net.command(json!({"cmd": "applyWrites", "did": did, "writes": writes}))
        .await;
    let all = net.records(&did).await;
    let slice = [
        "app.bsky.actor.profile/self".to_owned(),
        format!("app.bsky.graph.starterpack/{pack}"),
        format!("app.bsky.graph.list/{}", lists[0].1),
        format!("app.bsky.graph.listitem/{}", item_keys[0]),
        format!("app.bsky.graph.listitem/{}", item_keys[1]),
    ];
    let expected: BTreeMap<String, String> = all
        .iter()
        .filter(|(p, _)| slice.contains(p))
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    assert_eq!(expected.len(), 5, "the PDS holds the fixture: {all:?}");

    let mut config = net.tap_config(&db);
    config.collection_filters = [
        "app.bsky.actor.profile",
        "app.bsky.graph.list",
        "app.bsky.graph.listitem",
        "app.bsky.graph.starterpack",
    ]
    .iter()
    .map(|f| f.parse().unwrap())
    .collect();
    config.record_filters =
        tap_atproto::record_filter::RuleSet::parse(&tap_atproto::record_filter::split_rules(RULES))
            .unwrap();
    let tap = TestTap::start(config).await;
    let url = tap.url("");
    let mut channel = Channel::connect(tap.addr, &[]).await;
    add_repos(&url, &[&did]).await;
    let events = await_backfill(&tap, &mut channel, &did, &expected).await;
    assert_eq!(replay(&events), expected);
    assert_eq!(
        events.iter().filter(|e| e.is_record()).count(),
        expected.len(),
        "nothing else was sent"
    );

    // The starter pack goes: the list, its members and the profile go with it.
    net.command(json!({"cmd": "deleteRecord", "did": did,
                       "collection": "app.bsky.graph.starterpack", "rkey": pack}))
        .await;
    channel
        .until("the slice deleted with the starter pack", |seen| {
            replay(
                &seen
                    .iter()
                    .filter(|e| e.did() == did)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
            .is_empty()
        })
        .await;
    let deletes: Vec<String> = channel.of(&did)[events.len()..]
        .iter()
        .filter(|e| e.is_record())
        .map(|e| {
            assert_eq!(e.action(), "delete", "{:?}", e.0);
            e.path()
        })
        .collect();
    let mut sorted = deletes.clone();
    sorted.sort();
    assert_eq!(sorted, expected.keys().cloned().collect::<Vec<_>>());
    assert_eq!(
        deletes[0], slice[1],
        "the pack's own delete comes first, live"
    );
    wait_info(&url, &did, "an empty view, active", |i| {
        i.is_some_and(|i| i["records"] == 0 && i["state"] == "active")
    })
    .await;
    tap.stop().await;
    net.stop().await;
}
