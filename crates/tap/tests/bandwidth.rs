//! Issue 12 against loopback fakes: every downloaded byte is in the ledger and adds up to
//! what the servers sent; a filtered tap fetches only the wanted part of a repo (verified as
//! strictly as a whole one); an unchanged repo is not downloaded again; a changed one only
//! in what changed, with the same events as a full resync; a PDS that lacks the calls, or
//! lies in them, gets a full verified fetch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::TestDb;
use serde_json::Value;
use tap::config::FetchStrategy;
use tap_atproto::car::{CarLimits, read_car};
use tap_atproto::commit::Commit;
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::{Endpoint, RepoReply};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use common::TestTap;
use sync_support::{Consumer, Net, add, did, expected, paths_and_cids, wait_for, wait_state};

const BLOCKS: &str = "app.bsky.graph.block";

async fn bandwidth(tap: &TestTap) -> Value {
    reqwest::get(tap.url("/stats/bandwidth"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn source(bw: &Value, name: &str) -> u64 {
    bw["by_source"][name].as_u64().unwrap()
}

/// A tap that wants only `BLOCKS`.
fn filtered(net: &Net, db: &TestDb) -> tap::Config {
    let mut cfg = net.config(db);
    cfg.collection_filters = vec![BLOCKS.parse().unwrap()];
    cfg
}

/// The repo's records in `collection`, as `path → cid`.
fn expected_in(repo: &RepoBuilder, collection: &str) -> BTreeMap<String, String> {
    expected(repo)
        .into_iter()
        .filter(|(path, _)| path.starts_with(&format!("{collection}/")))
        .collect()
}

async fn the_ledger_adds_up_to_what_the_servers_sent(db: TestDb) {
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(1), TestKey::k256(1), 1, 300);
    net.host(&repo, "alice.test", repo.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.fetch_strategy = FetchStrategy::Full;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let n = repo.records().len();
    consumer.wait_records(n).await;
    wait_state(&tap, repo.did(), "active").await;
    let ops = repo.random_ops(3);
    net.relay.push_frame(1, repo.commit_frame(&ops).unwrap());
    consumer.wait_records(n + 3).await;

    let bw = wait_for("the ledger to have the live commit", || async {
        let bw = bandwidth(&tap).await;
        (source(&bw, "relay.firehose") == net.relay.firehose_bytes()).then_some(bw)
    })
    .await;
    let served = net.pds.served(Endpoint::GetRepo);
    assert_eq!(served.requests, 1);
    assert_eq!(source(&bw, "pds.getRepo"), served.bytes, "{bw}");
    assert_eq!(
        source(&bw, "plc") + source(&bw, "handle_resolution"),
        net.plc.bytes_served(),
        "{bw}"
    );
    let sum: u64 = bw["by_source"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(bw["total"], sum);
    assert_eq!(
        bw["total"],
        served.bytes + net.relay.firehose_bytes() + net.plc.bytes_served()
    );
    // No filters: every record byte was delivered, and records plus structure is the total.
    assert_eq!(bw["records"]["discarded"], 0);
    let records = bw["records"]["downloaded"].as_u64().unwrap();
    assert!(records > 0 && records < served.bytes, "{bw}");
    assert_eq!(bw["structure"].as_u64().unwrap() + records, sum);
    let host = net.pds.url().trim_start_matches("http://").to_owned();
    assert_eq!(bw["by_host"]["top"][&host], served.bytes, "{bw}");

    let info = sync_support::info(&tap, repo.did()).await;
    assert_eq!(info["last_fetch"]["kind"], "full");
    assert_eq!(info["last_fetch"]["bytes"], served.bytes);
    tap.stop().await;
}
on_both_backends!(
    the_ledger_adds_up_to_what_the_servers_sent_on,
    the_ledger_adds_up_to_what_the_servers_sent
);

async fn a_filtered_tap_fetches_only_the_wanted_collection(db: TestDb) {
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(2), TestKey::k256(2), 2, 3000);
    let car = repo.car_tree_order();
    net.host(&repo, "bob.test", car.clone());
    let cfg = filtered(&net, &db);
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let want = expected_in(&repo, BLOCKS);
    assert!(!want.is_empty(), "the fixture has blocks");
    let got = consumer.wait_records(want.len()).await;
    let info = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(paths_and_cids(&got), want, "exactly the wanted records");
    assert_eq!(info["last_fetch"]["kind"], "sparse");
    assert_eq!(
        net.pds.served(Endpoint::GetRepo).requests,
        0,
        "no whole repo"
    );
    let blocks = net.pds.served(Endpoint::GetBlocks);
    let head = net.pds.served(Endpoint::GetLatestCommit);
    let spent = blocks.bytes + head.bytes;
    assert_eq!(info["last_fetch"]["bytes"], spent);
    assert!(
        spent * 5 < car.len() as u64,
        "sparse cost {spent} bytes of a {} byte repo",
        car.len()
    );
    let bw = bandwidth(&tap).await;
    assert_eq!(source(&bw, "pds.getBlocks"), blocks.bytes);
    assert_eq!(source(&bw, "pds.getLatestCommit"), head.bytes);
    assert_eq!(
        bw["records"]["discarded"], 0,
        "nothing unwanted was downloaded"
    );
    tap.stop().await;
}
on_both_backends!(
    a_filtered_tap_fetches_only_the_wanted_collection_on,
    a_filtered_tap_fetches_only_the_wanted_collection
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_repo_is_not_downloaded_again() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(3), TestKey::k256(3), 3, 200);
    net.host(&repo, "carol.test", repo.car_tree_order());
    let tap = TestTap::start(net.config(&db)).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::backfill(&tap, &consumer, &repo).await;
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 1);

    // A commit that does not chain desynchronizes the repo; the PDS's head is still the
    // commit tap holds, so the resync downloads nothing.
    let ops = repo.random_ops(1);
    net.relay
        .push_frame(1, repo.wrong_prev_data_frame(&ops).unwrap());
    let info = wait_for("the resync to skip the download", || async {
        let i = sync_support::info(&tap, repo.did()).await;
        (i["state"] == "active" && i["last_fetch"]["kind"] == "skipped").then_some(i)
    })
    .await;
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 1, "not again");
    // The skip cost one head request (the first backfill, with nothing to compare, asked
    // for none).
    let heads = net.pds.served(Endpoint::GetLatestCommit);
    assert_eq!(heads.requests, 1);
    assert_eq!(info["last_fetch"]["bytes"], heads.bytes);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_without_the_sparse_calls_gets_whole_fetches_and_is_asked_once() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    net.pds.set_unsupported(Endpoint::GetLatestCommit);
    let repos: Vec<RepoBuilder> = (4..6)
        .map(|n| RepoBuilder::with_records(did(n), TestKey::k256(u64::from(n)), 4, 500))
        .collect();
    for (i, repo) in repos.iter().enumerate() {
        net.host(repo, &format!("p{i}.test"), repo.car_tree_order());
    }
    let mut cfg = filtered(&net, &db);
    cfg.resync_parallelism = 1;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    let mut want = BTreeMap::new();
    for repo in &repos {
        add(&tap, repo.did()).await;
        wait_state(&tap, repo.did(), "active").await;
        want.extend(expected_in(repo, BLOCKS));
    }
    let got = consumer.wait_records(want.len()).await;
    assert_eq!(paths_and_cids(&got), want);
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 2);
    assert_eq!(
        net.pds.served(Endpoint::GetLatestCommit).requests,
        1,
        "remembered for the host"
    );
    let bw = bandwidth(&tap).await;
    assert!(bw["records"]["discarded"].as_u64().unwrap() > 0, "{bw}");
    tap.stop().await;
}

/// A PDS that lies in its `getBlocks` answers (`lie` sets it up, given the repo and its CAR):
/// the sparse fetch refuses what it got and the same resync fetches the whole repo, verified,
/// so exactly the wanted records arrive.
async fn a_lying_pds_gets_a_whole_verified_fetch(
    n: u32,
    lie: impl FnOnce(&Net, &RepoBuilder, &tap_atproto::car::Car),
) {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(n), TestKey::k256(u64::from(n)), n.into(), 1000);
    let car = repo.car_tree_order();
    net.host(&repo, &format!("liar{n}.test"), car.clone());
    lie(
        &net,
        &repo,
        &read_car(Bytes::from(car), CarLimits::default()).unwrap(),
    );
    let cfg = filtered(&net, &db);
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let want = expected_in(&repo, BLOCKS);
    let got = consumer.wait_records(want.len()).await;
    let info = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(paths_and_cids(&got), want, "nothing wrong was delivered");
    assert_eq!(info["last_fetch"]["kind"], "full");
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 1);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_that_withholds_a_tree_node_gets_a_whole_verified_fetch() {
    // The MST root: every sparse walk needs it.
    a_lying_pds_gets_a_whole_verified_fetch(7, |net, _, car| {
        let commit = Commit::decode(&car.blocks[&car.roots[0]]).unwrap();
        net.pds.withhold_block(commit.data);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_that_withholds_a_wanted_record_gets_a_whole_verified_fetch() {
    a_lying_pds_gets_a_whole_verified_fetch(8, |net, repo, _| {
        let (_, cid) = repo
            .records()
            .iter()
            .find(|(path, _)| path.starts_with(&format!("{BLOCKS}/")))
            .expect("the fixture has blocks");
        net.pds.withhold_block(*cid);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_that_serves_a_block_that_does_not_hash_gets_a_whole_verified_fetch() {
    // The signed commit itself, altered: the first block of every sparse fetch.
    a_lying_pds_gets_a_whole_verified_fetch(10, |net, _, car| {
        net.pds.corrupt_block(car.roots[0]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_strategy_never_asks_for_the_head() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repo = RepoBuilder::with_records(did(9), TestKey::k256(9), 9, 100);
    net.host(&repo, "fay.test", repo.car_tree_order());
    let mut cfg = net.config(&db);
    cfg.fetch_strategy = FetchStrategy::Full;
    cfg.collection_filters = vec![BLOCKS.parse().unwrap()];
    let tap = TestTap::start(cfg).await;
    add(&tap, repo.did()).await;
    wait_state(&tap, repo.did(), "active").await;
    assert_eq!(net.pds.served(Endpoint::GetLatestCommit).requests, 0);
    assert_eq!(net.pds.served(Endpoint::GetBlocks).requests, 0);
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 1);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_without_get_blocks_gets_a_whole_fetch_in_the_same_resync() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    net.pds.set_unsupported(Endpoint::GetBlocks);
    let repo = RepoBuilder::with_records(did(11), TestKey::k256(11), 11, 300);
    net.host(&repo, "hal.test", repo.car_tree_order());
    let cfg = filtered(&net, &db);
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let want = expected_in(&repo, BLOCKS);
    let got = consumer.wait_records(want.len()).await;
    let info = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(paths_and_cids(&got), want);
    assert_eq!(info["last_fetch"]["kind"], "full");
    assert_eq!(info["retries"], 0, "no failed attempt first");
    assert_eq!(net.pds.served(Endpoint::GetRepo).requests, 1);
    tap.stop().await;
}

/// A sparse resync in which every wanted record vanished emits deletes at the snapshot's
/// rev (no wanted record set it), as a full resync does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_found_by_a_sparse_resync_carry_the_snapshots_rev() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(12), TestKey::k256(12), 12, 600);
    net.host(&repo, "ivy.test", repo.car_tree_order());
    let cfg = filtered(&net, &db);
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    let want = expected_in(&repo, BLOCKS);
    consumer.wait_records(want.len()).await;
    wait_state(&tap, repo.did(), "active").await;

    // Every block deleted in a commit whose frame does not chain: the repo resyncs
    // (sparsely) from a PDS that no longer has any.
    let deletes: Vec<_> = want
        .keys()
        .map(|path| tap_atproto::writer::WriteOp::Delete { path: path.clone() })
        .collect();
    let frame = repo.wrong_prev_data_frame(&deletes).unwrap();
    net.pds.set_repo(
        repo.did().as_str(),
        tap_testkit::fake_pds::RepoReply::Car(repo.car_tree_order()),
    );
    net.relay.push_frame(1, frame);
    let all = consumer.wait_records(want.len() * 2).await;
    let rev = repo.writer().head().unwrap().1.rev.as_str().to_owned();
    for event in &all[want.len()..] {
        assert_eq!(event["action"], "delete", "{event}");
        assert_eq!(event["rev"], rev.as_str(), "{event}");
    }
    tap.stop().await;
}

/// An unchanged head is no reason to skip when the filters widened since the last fetch:
/// the newly wanted records must come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_filters_fetch_again_though_the_head_did_not_move() {
    const FOLLOWS: &str = "app.bsky.graph.follow";
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(13), TestKey::k256(13), 13, 300);
    net.host(&repo, "jo.test", repo.car_tree_order());
    let mut cfg = filtered(&net, &db);
    // Stored events: a first backfill delivered from memory is run again at a restart unless
    // every event was acked in time, which would fetch whatever the filters.
    cfg.durable_backfill_events = true;
    let tap = TestTap::start(cfg.clone()).await;
    let consumer = Consumer::connect(&tap).await;
    add(&tap, repo.did()).await;
    consumer
        .wait_records(expected_in(&repo, BLOCKS).len())
        .await;
    wait_state(&tap, repo.did(), "active").await;
    tap.stop().await;

    // Restarted with follows wanted too; a commit that does not chain sends the repo to a
    // resync while the PDS still serves the same head.
    cfg.collection_filters.push(FOLLOWS.parse().unwrap());
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    // What the PDS serves (the builder moves on with the frame below).
    let follows = expected_in(&repo, FOLLOWS);
    let ops = repo.random_ops(1);
    let frame = repo.wrong_prev_data_frame(&ops).unwrap();
    net.relay.push_frame(1, frame);
    assert!(!follows.is_empty(), "the fixture has follows");
    let got = wait_for("the follows", || async {
        let got: BTreeMap<String, String> = paths_and_cids(&consumer.records())
            .into_iter()
            .filter(|(p, _)| p.starts_with(&format!("{FOLLOWS}/")))
            .collect();
        (got.len() >= follows.len()).then_some(got)
    })
    .await;
    assert_eq!(got, follows);
    let info = wait_state(&tap, repo.did(), "active").await;
    assert_eq!(info["last_fetch"]["kind"], "sparse");
    tap.stop().await;
}

/// Commits `ops` in a frame that does not chain, so the repo resyncs, and serves the repo as
/// it now is.
fn desync_with(net: &Net, repo: &mut RepoBuilder, ops: &[WriteOp], seq: i64) {
    let frame = repo.wrong_prev_data_frame(ops).unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    net.relay.push_frame(seq, frame);
}

/// `n` creates of fresh records.
fn creates(repo: &mut RepoBuilder, n: usize) -> Vec<WriteOp> {
    (0..n)
        .map(|_| {
            let (path, record) = repo.generator().next_record();
            WriteOp::Create { path, record }
        })
        .collect()
}

/// The builder's current commit.
fn head(repo: &RepoBuilder) -> Commit {
    repo.writer().head().unwrap().1.clone()
}

/// Waits until `tap` holds `repo` active at the builder's head rev.
async fn wait_synced(tap: &TestTap, repo: &RepoBuilder) -> Value {
    let rev = head(repo).rev.as_str().to_owned();
    wait_for("the repo to be resynced", || async {
        let i = sync_support::info(tap, repo.did()).await;
        (i["state"] == "active" && i["rev"] == rev.as_str()).then_some(i)
    })
    .await
}

/// A tap that already holds `repo` (2,000 records) and the consumer that saw it backfilled.
async fn synced_tap(net: &Net, db: &TestDb, repo: &RepoBuilder) -> (TestTap, Consumer) {
    let tap = TestTap::start(net.config(db)).await;
    let consumer = Consumer::connect(&tap).await;
    sync_support::backfill(&tap, &consumer, repo).await;
    (tap, consumer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_downloads_only_what_changed_since_the_rev_tap_holds() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(20), TestKey::k256(20), 20, 2000);
    net.host(&repo, "since.test", repo.car_tree_order());
    let (tap, consumer) = synced_tap(&net, &db, &repo).await;
    let full = net.pds.served(Endpoint::GetRepo).bytes;
    let before = expected(&repo);

    let ops = creates(&mut repo, 10);
    desync_with(&net, &mut repo, &ops, 1);
    let info = wait_synced(&tap, &repo).await;
    assert_eq!(info["last_fetch"]["kind"], "since", "{info}");
    let got = consumer.wait_records(before.len() + 10).await;
    let mut new = expected(&repo);
    new.retain(|path, _| !before.contains_key(path));
    assert_eq!(paths_and_cids(&got[before.len()..]), new);
    assert!(got[before.len()..].iter().all(|r| r["action"] == "create"));
    assert_eq!(info["records"], repo.records().len());

    let diff = net.pds.served(Endpoint::GetRepo).bytes - full;
    assert!(diff * 20 < full, "{diff} bytes of a {full}-byte repo");
    assert_eq!(net.pds.served(Endpoint::GetBlocks).requests, 0);
    // The fetch's cost: the head request and the diff.
    let heads = net.pds.served(Endpoint::GetLatestCommit);
    assert_eq!(
        info["last_fetch"]["bytes"],
        diff + heads.bytes / heads.requests
    );
    tap.stop().await;
}

/// Two taps follow the same repo through random edit histories, one fetching incrementally
/// (`auto`: `getRepo?since=` unfiltered, the reusing sparse walk under filters) and one
/// always in full; after every resync their events and record indexes must be equal.
async fn incremental_and_full_resyncs_agree(filters: &[&str], seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let net = Net::start().await;
        let n = u32::try_from(30 + seed).unwrap();
        let mut repo = RepoBuilder::with_records(did(n), TestKey::k256(seed), seed, 300);
        net.host(&repo, &format!("edits{seed}.test"), repo.car_tree_order());
        let wanted = |path: &str| {
            filters.is_empty() || filters.iter().any(|c| path.starts_with(&format!("{c}/")))
        };
        let dbs = [
            TestDb::new(common::Backend::Sqlite).await.unwrap(),
            TestDb::new(common::Backend::Sqlite).await.unwrap(),
        ];
        let mut taps = Vec::new();
        for (db, strategy) in dbs.iter().zip([FetchStrategy::Auto, FetchStrategy::Full]) {
            let mut cfg = net.config(db);
            cfg.fetch_strategy = strategy;
            cfg.collection_filters = filters.iter().map(|c| c.parse().unwrap()).collect();
            let tap = TestTap::start(cfg).await;
            let consumer = Consumer::connect(&tap).await;
            add(&tap, repo.did()).await;
            taps.push((tap, consumer));
        }
        let mut seen = expected(&repo).keys().filter(|p| wanted(p)).count();
        for (_, consumer) in &taps {
            consumer.wait_records(seen).await;
        }
        for round in 0..4 {
            let before = expected(&repo);
            let count = usize::try_from(1 + (seed * 7 + round * 13) % 40).unwrap();
            let ops = repo.random_ops(count);
            desync_with(&net, &mut repo, &ops, i64::try_from(round + 1).unwrap());
            let after = expected(&repo);
            let changes = after
                .iter()
                .filter(|(p, c)| before.get(*p) != Some(c))
                .map(|(p, _)| p)
                .chain(before.keys().filter(|p| !after.contains_key(*p)))
                .filter(|p| wanted(p))
                .count();
            seen += changes;
            let mut streams = Vec::new();
            for (tap, consumer) in &taps {
                let info = wait_synced(tap, &repo).await;
                assert_eq!(
                    info["records"],
                    after.keys().filter(|p| wanted(p)).count(),
                    "seed {seed} round {round}: {info}"
                );
                streams.push(consumer.wait_records(seen).await);
            }
            let incremental = sync_support::info(&taps[0].0, repo.did()).await;
            let kind = if filters.is_empty() {
                "since"
            } else {
                "sparse"
            };
            assert_eq!(incremental["last_fetch"]["kind"], kind, "{incremental}");
            assert_eq!(
                streams[0], streams[1],
                "seed {seed} round {round}: the incremental tap's events differ"
            );
            assert_eq!(streams[0].len(), seen, "seed {seed} round {round}");
        }
        let state: BTreeMap<String, String> = {
            let mut state = BTreeMap::new();
            for r in taps[0].1.records() {
                let path = format!(
                    "{}/{}",
                    r["collection"].as_str().unwrap(),
                    r["rkey"].as_str().unwrap()
                );
                if r["action"] == "delete" {
                    state.remove(&path);
                } else {
                    state.insert(path, r["cid"].as_str().unwrap().to_owned());
                }
            }
            state
        };
        let mut want = expected(&repo);
        want.retain(|p, _| wanted(p));
        assert_eq!(state, want, "seed {seed}: the events replay to the repo");
        for (tap, _) in taps {
            tap.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_resyncs_emit_what_full_resyncs_emit_over_random_edit_histories() {
    incremental_and_full_resyncs_agree(&[], 0..3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reusing_sparse_resyncs_emit_what_full_resyncs_emit_over_random_edit_histories() {
    incremental_and_full_resyncs_agree(&["app.bsky.feed.post", "app.bsky.feed.like"], 3..6).await;
}

/// Five creates in a commit that does not chain, so the repo resyncs from a PDS that
/// `prepare` sets up (given the net and the builder at the new head); the new records must
/// arrive exactly. Returns the repo's `/info` after the resync, and the net.
async fn resync_after_five_creates(
    n: u32,
    prepare: impl FnOnce(&Net, &RepoBuilder),
) -> (Value, Net) {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(n), TestKey::k256(u64::from(n)), n.into(), 500);
    net.host(&repo, &format!("diff{n}.test"), repo.car_tree_order());
    let (tap, consumer) = synced_tap(&net, &db, &repo).await;
    let before = expected(&repo);
    let ops = creates(&mut repo, 5);
    let frame = repo.wrong_prev_data_frame(&ops).unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    prepare(&net, &repo);
    net.relay.push_frame(1, frame);
    let info = wait_synced(&tap, &repo).await;
    let got = consumer.wait_records(before.len() + 5).await;
    let mut new = expected(&repo);
    new.retain(|path, _| !before.contains_key(path));
    assert_eq!(
        paths_and_cids(&got[before.len()..]),
        new,
        "exactly the new records"
    );
    tap.stop().await;
    (info, net)
}

/// A diff that lies (`lie` sets it up): the repo gets a whole verified fetch in the same
/// resync, and exactly the right events.
async fn a_lying_diff_gets_a_whole_verified_fetch(n: u32, lie: impl FnOnce(&Net, &RepoBuilder)) {
    let (info, _) = resync_after_five_creates(n, lie).await;
    assert_eq!(info["last_fetch"]["kind"], "full", "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_without_a_changed_node_gets_a_whole_verified_fetch() {
    // The new MST root, left out of the diff and refused by getBlocks too.
    a_lying_diff_gets_a_whole_verified_fetch(40, |net, repo| {
        net.pds.withhold_block(head(repo).data);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_with_a_block_that_does_not_hash_gets_a_whole_verified_fetch() {
    a_lying_diff_gets_a_whole_verified_fetch(41, |net, repo| {
        net.pds.corrupt_block(head(repo).data);
    })
    .await;
}

/// An honest PDS may leave out of a diff a node it wrote before `since` (a subtree that
/// came back to an earlier shape): tap does not assume it, it fetches it by `getBlocks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_left_out_of_a_diff_is_fetched_not_assumed() {
    let (info, net) = resync_after_five_creates(42, |net, repo| {
        net.pds.omit_from_diffs(head(repo).data);
    })
    .await;
    assert_eq!(info["last_fetch"]["kind"], "since", "{info}");
    assert_eq!(net.pds.served(Endpoint::GetBlocks).requests, 1);
}

/// A PDS that answers with a commit older than the one tap verified (its diff does not
/// chain onto tap's copy): refused, then the whole repo, which is just as old, is refused
/// too; the repo ends in `error` with the reason and nothing is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_whose_commit_is_older_than_taps_is_refused_and_delivers_nothing() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut repo = RepoBuilder::with_records(did(43), TestKey::k256(43), 43, 300);
    let old_car = repo.car_tree_order();
    net.host(&repo, "rollback.test", old_car.clone());
    let (tap, consumer) = synced_tap(&net, &db, &repo).await;
    let ops = creates(&mut repo, 3);
    desync_with(&net, &mut repo, &ops, 1);
    wait_synced(&tap, &repo).await;
    let delivered = consumer.wait_records(repo.records().len()).await.len();

    // The PDS rolls back to the first commit; a commit that does not chain sends tap to it.
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(old_car));
    let ops = creates(&mut repo, 1);
    net.relay
        .push_frame(2, repo.wrong_prev_data_frame(&ops).unwrap());
    let info = wait_state(&tap, repo.did(), "error").await;
    assert!(info["error"].as_str().unwrap().contains("older"), "{info}");
    assert_eq!(consumer.records().len(), delivered, "nothing delivered");
    assert_eq!(
        net.pds.served(Endpoint::GetRepo).requests,
        4,
        "full fallback too"
    );
    tap.stop().await;
}
