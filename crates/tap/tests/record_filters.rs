//! Record-content rules (`--record-filters`) end to end on the fakes: the starter-pack
//! slice of the seed blog — starter packs, the lists they name, those lists' members and
//! the owner's profile, and nothing of the moderation or curation lists beside them — in
//! backfill and live; updates that cross a rule; a referenced record vanishing; a rule
//! changed at runtime.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;
mod sync_support;

use std::collections::BTreeSet;

use common::{TestDb, TestTap};
use serde_json::{Value, json};
use tap_atproto::atjson::json_to_cbor;
use tap_atproto::record_filter::{RuleSet, split_rules};
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::RepoReply;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, did, get_json, wait_for};

const PROFILE: &str = "app.bsky.actor.profile";
const LIST: &str = "app.bsky.graph.list";
const ITEM: &str = "app.bsky.graph.listitem";
const PACK: &str = "app.bsky.graph.starterpack";
const POST: &str = "app.bsky.feed.post";

/// The seed blog's wish, as rules: lists a starter pack names, items of those lists, and
/// the profile of an account with a starter pack (starter packs themselves: no rule).
const STARTER_PACK_RULES: &str = "app.bsky.graph.list: $uri in refs(app.bsky.graph.starterpack, $.list); \
     app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list); \
     app.bsky.actor.profile: kept(app.bsky.graph.starterpack)";

fn cbor(v: &Value) -> Vec<u8> {
    json_to_cbor(v).unwrap()
}

fn uri(repo: &RepoBuilder, path: &str) -> String {
    format!("at://{}/{path}", repo.did())
}

fn list(purpose: &str, name: &str) -> Value {
    json!({"$type": LIST, "purpose": format!("app.bsky.graph.defs#{purpose}"), "name": name,
           "createdAt": "2026-12-07T00:00:00Z"})
}

fn item(list_uri: &str, member: u32) -> Value {
    json!({"$type": ITEM, "list": list_uri, "subject": did(900 + member).as_str(),
           "createdAt": "2026-12-07T00:00:00Z"})
}

fn create(path: &str, v: &Value) -> WriteOp {
    WriteOp::Create {
        path: path.to_owned(),
        record: cbor(v),
    }
}

/// The consumer's view: the paths of records created and not deleted since, by the
/// events in delivery order.
fn view(records: &[Value]) -> BTreeSet<String> {
    let mut view = BTreeSet::new();
    for r in records {
        let path = format!(
            "{}/{}",
            r["collection"].as_str().unwrap(),
            r["rkey"].as_str().unwrap()
        );
        match r["action"].as_str().unwrap() {
            "delete" => view.remove(&path),
            _ => view.insert(path),
        };
    }
    view
}

fn paths(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|p| (*p).to_owned()).collect()
}

async fn wait_view(consumer: &Consumer, want: &BTreeSet<String>, what: &str) {
    wait_for(what, || async {
        (view(&consumer.records()) == *want).then_some(())
    })
    .await;
}

/// Commits `ops` live (relay frame at `seq`) and serves the new repo to resyncs.
fn commit_live(net: &Net, repo: &mut RepoBuilder, seq: i64, ops: &[WriteOp]) {
    let frame = repo.commit_frame(ops).unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    net.relay.push_frame(seq, frame);
}

async fn starter_packs(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::new(did(70), TestKey::k256(70), 70);
    let (pack_list, mod_list, other_list) = (
        format!("{LIST}/3kpack"),
        format!("{LIST}/3kmod"),
        format!("{LIST}/3kcurate"),
    );
    let pack_list_uri = uri(&repo, &pack_list);
    let mod_list_uri = uri(&repo, &mod_list);
    let other_list_uri = uri(&repo, &other_list);
    let mut ops = vec![
        create(
            &format!("{PROFILE}/self"),
            &json!({"$type": PROFILE, "displayName": "packer"}),
        ),
        create(&pack_list, &list("referencelist", "my pack")),
        create(&mod_list, &list("modlist", "blocked")),
        create(&other_list, &list("curatelist", "friends")),
        create(
            &format!("{PACK}/3kp"),
            &json!({"$type": PACK, "name": "pack", "list": pack_list_uri,
                    "createdAt": "2026-12-07T00:00:00Z"}),
        ),
        create(
            &format!("{POST}/3kpost"),
            &json!({"$type": POST, "text": "hi", "createdAt": "2026-12-07T00:00:00Z"}),
        ),
    ];
    for (n, list_uri) in [
        (1, &pack_list_uri),
        (2, &pack_list_uri),
        (3, &pack_list_uri),
        (4, &mod_list_uri),
        (5, &mod_list_uri),
        (6, &other_list_uri),
    ] {
        ops.push(create(&format!("{ITEM}/3ki{n}"), &item(list_uri, n)));
    }
    repo.commit(&ops).unwrap();
    net.host(&repo, "packer.test", repo.car_tree_order());

    let mut cfg = net.config(&db);
    cfg.collection_filters = [PROFILE, LIST, ITEM, PACK]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    cfg.record_filters = RuleSet::parse(&split_rules(STARTER_PACK_RULES)).unwrap();
    let tap = TestTap::start(cfg.clone()).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::add(&tap, repo.did()).await;

    // Backfill: the pack, its list, that list's three members, the profile. Items sort
    // before the starter pack that decides them.
    let mut want = paths(&[
        "app.bsky.actor.profile/self",
        "app.bsky.graph.list/3kpack",
        "app.bsky.graph.listitem/3ki1",
        "app.bsky.graph.listitem/3ki2",
        "app.bsky.graph.listitem/3ki3",
        "app.bsky.graph.starterpack/3kp",
    ]);
    wait_view(&consumer, &want, "the starter-pack slice").await;
    sync_support::wait_state(&tap, repo.did(), "active").await;
    assert_eq!(
        consumer.records().len(),
        want.len(),
        "nothing else was sent"
    );
    let info = sync_support::info(&tap, repo.did()).await;
    assert_eq!(info["records"], 6, "the index holds the view: {info}");
    let bandwidth = get_json(&tap, "/stats/bandwidth").await;
    assert!(
        bandwidth["by_collection"]["top"][ITEM]["discarded"]
            .as_u64()
            .unwrap()
            > 0,
        "the items of other lists count as discarded: {bandwidth}"
    );

    // Live: a member added to the pack's list arrives; one added to the moderation list
    // does not; an item moved from the pack's list to the moderation list leaves the view
    // as a delete, one moved the other way enters it as a create.
    commit_live(
        &net,
        &mut repo,
        1,
        &[
            create(&format!("{ITEM}/3ki7"), &item(&pack_list_uri, 7)),
            create(&format!("{ITEM}/3ki8"), &item(&mod_list_uri, 8)),
            WriteOp::Update {
                path: format!("{ITEM}/3ki1"),
                record: cbor(&item(&mod_list_uri, 1)),
            },
            WriteOp::Update {
                path: format!("{ITEM}/3ki4"),
                record: cbor(&item(&pack_list_uri, 4)),
            },
        ],
    );
    want.insert(format!("{ITEM}/3ki7"));
    want.remove(&format!("{ITEM}/3ki1"));
    want.insert(format!("{ITEM}/3ki4"));
    wait_view(&consumer, &want, "the live items judged by the rule").await;
    let live: Vec<Value> = consumer
        .records()
        .into_iter()
        .filter(|r| r["live"] == true)
        .collect();
    let actions: BTreeSet<(String, String)> = live
        .iter()
        .map(|r| {
            (
                r["rkey"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [("3ki7", "create"), ("3ki1", "delete"), ("3ki4", "create")]
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect(),
        "{live:?}"
    );

    // The starter pack is deleted: it goes, and with it the list it named, that list's
    // members and the profile, as deletes.
    commit_live(
        &net,
        &mut repo,
        2,
        &[WriteOp::Delete {
            path: format!("{PACK}/3kp"),
        }],
    );
    wait_view(
        &consumer,
        &BTreeSet::new(),
        "everything deleted with the pack",
    )
    .await;
    sync_support::wait_state(&tap, repo.did(), "active").await;

    // A rule change at runtime: refused whole when it does not parse, otherwise stored
    // and every repo judged again.
    let put = |body: Value| {
        let tap = &tap;
        async move {
            let resp = reqwest::Client::new()
                .put(tap.url("/record-filters"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = put(json!({"rules": ["app.bsky.graph.list: $.purpose =="]})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("column 34"),
        "{answer}"
    );
    let (status, answer) = put(json!({"rules": "not a list"})).await;
    assert_eq!(status, 400, "{answer}");
    let rules_now = get_json(&tap, "/record-filters").await;
    assert_eq!(
        rules_now["rules"].as_array().unwrap().len(),
        3,
        "{rules_now}"
    );

    let modlists = r#"app.bsky.graph.list: $.purpose == "app.bsky.graph.defs#modlist""#;
    let items = "app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list)";
    let (status, answer) = put(json!({"rules": [modlists, items]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["resyncing"], 1, "{answer}");
    let want = paths(&[
        "app.bsky.actor.profile/self",
        "app.bsky.graph.list/3kmod",
        "app.bsky.graph.listitem/3ki1",
        "app.bsky.graph.listitem/3ki5",
        "app.bsky.graph.listitem/3ki8",
    ]);
    wait_view(&consumer, &want, "the moderation list and its members").await;
    tap.stop().await;

    // The rules set through the API survive a restart with the same flag.
    let tap = TestTap::start(cfg).await;
    let rules_now = get_json(&tap, "/record-filters").await;
    assert_eq!(rules_now, json!({"rules": [modlists, items]}));
    tap.stop().await;
}
on_both_backends!(
    starter_pack_rules_deliver_the_pack_its_list_members_and_profile_and_follow_changes,
    starter_packs
);
