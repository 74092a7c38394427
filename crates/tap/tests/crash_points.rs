//! The crash-point suite (issue 10): the real `tap` binary, built with the `failpoints`
//! feature, is killed with SIGKILL at named points (`TAP_FAILPOINTS`, src/failpoint.rs)
//! while real traffic flows from the loopback relay, PDS and PLC, then restarted on the same
//! database. After each crash, on both backends:
//! - every record the repos' final state implies reached the consumer at least once,
//! - live events came in rev order per repo within each run,
//! - the record index equals the PDS,
//! - no repo is stuck: all are `active`, and a new live commit of each is delivered.
//!
//! One case runs against the real reference PDS and PLC from npm (`tests/localnet`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod delivery_support;
mod localnet;
mod sync_support;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestDb;
use delivery_support::TapProcess;
use serde_json::{Value, json};
use tap::store::{Store, StoreOptions};
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::RepoReply;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use localnet::EFFECT_TIMEOUT as EFFECT;
use sync_support::{Net, did, expected, wait_for};
use tap_testkit::wait::poll_until;

/// Events as received: (run, event).
type Seen = Arc<Mutex<Vec<(u32, Value)>>>;

/// An acking `/channel` consumer that tags what it receives with the run it belongs to.
struct Recorder {
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn connect(addr: std::net::SocketAddr, run: u32, seen: &Seen) -> Self {
        let seen = Arc::clone(seen);
        let task = sync_support::ack_all(addr, move |v| seen.lock().unwrap().push((run, v))).await;
        Self { task }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn records_of(seen: &Seen) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| e["type"] == "record")
        .map(|(_, e)| e["record"].clone())
        .collect()
}

/// Whether every record of `repo`'s current state was delivered (create or update with
/// its CID) at least once.
fn all_delivered(seen: &Seen, repo: &RepoBuilder) -> bool {
    let records = records_of(seen);
    expected(repo).iter().all(|(path, cid)| {
        let (collection, rkey) = path.split_once('/').unwrap();
        records.iter().any(|r| {
            r["did"] == repo.did().as_str()
                && r["collection"] == collection
                && r["rkey"] == rkey
                && r["cid"] == cid.as_str()
        })
    })
}

/// Live events of each repo come in rev order within a run.
fn assert_live_order(seen: &Seen) {
    let mut last: HashMap<(u32, String), String> = HashMap::new();
    for (run, e) in seen.lock().unwrap().iter() {
        let r = &e["record"];
        if e["type"] != "record" || r["live"] != true {
            continue;
        }
        let key = (*run, r["did"].as_str().unwrap().to_owned());
        let rev = r["rev"].as_str().unwrap().to_owned();
        if let Some(prev) = last.get(&key) {
            assert!(
                *prev <= rev,
                "run {run}: live rev {rev} after {prev} for {}",
                key.1
            );
        }
        last.insert(key, rev);
    }
}

/// The flags that point a tap process at `net`.
fn net_args(net: &Net) -> Vec<String> {
    vec![
        format!("--relay-url={}", net.relay.url()),
        format!("--plc-url={}", net.plc.url()),
        format!("--handle-resolver-url={}", net.plc.url()),
        "--cursor-save-interval=50ms".to_owned(),
    ]
}

async fn start(db: &TestDb, net: &Net, failpoints: Option<&str>, extra: &[&str]) -> TapProcess {
    let mut args = net_args(net);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = failpoints
        .map(|f| vec![("TAP_FAILPOINTS", f)])
        .unwrap_or_default();
    TapProcess::spawn_with(&db.url, "127.0.0.1:0", &args, &env).await
}

async fn add(tap: &TapProcess, repos: &[&RepoBuilder]) {
    let dids: Vec<&str> = repos.iter().map(|r| r.did().as_str()).collect();
    let resp = reqwest::Client::new()
        .post(tap.url("/repos/add"))
        .json(&json!({ "dids": dids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

async fn info_of(tap: &TapProcess, repo: &RepoBuilder) -> Value {
    reqwest::get(tap.url(&format!("/info/{}", repo.did())))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn state_of(tap: &TapProcess, repo: &RepoBuilder) -> String {
    info_of(tap, repo).await["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits for the failpoint to kill the process, and checks it died of SIGKILL.
async fn killed(tap: &mut TapProcess) {
    let Ok(status) = tokio::time::timeout(Duration::from_secs(45), tap.wait_exit()).await else {
        panic!(
            "the failpoint was never reached; tap logged:\n{}",
            tap.drain_logs().join("\n")
        );
    };
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
}

/// A live commit creating one record, on the relay with `seq`; the PDS then serves the
/// new state.
fn commit(net: &Net, repo: &mut RepoBuilder, seq: i64) {
    repo.set_next_seq(seq);
    let (path, record) = repo.generator().next_record();
    let frame = repo
        .commit_frame(&[WriteOp::Create { path, record }])
        .unwrap();
    net.relay.push_frame(seq, frame);
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
}

/// The second run after a crash: restarts without failpoints and checks every invariant.
async fn recover_and_check(db: &TestDb, net: &Net, repos: &mut [RepoBuilder], seen: &Seen) {
    let mut tap = start(db, net, None, &[]).await;
    let _consumer = Recorder::connect(tap.addr, 2, seen).await;
    for repo in repos.iter() {
        wait_for(&format!("{} active", repo.did()), || async {
            (state_of(&tap, repo).await == "active").then_some(())
        })
        .await;
    }
    for repo in repos.iter() {
        wait_for(
            &format!("every record of {} delivered", repo.did()),
            || async { all_delivered(seen, repo).then_some(()) },
        )
        .await;
    }
    // Nothing is stuck: a new commit of each repo is delivered live.
    let mut seq = 1000;
    for repo in repos.iter_mut() {
        seq += 1;
        commit(net, repo, seq);
    }
    for repo in repos.iter() {
        wait_for(&format!("a new live commit of {}", repo.did()), || async {
            all_delivered(seen, repo).then_some(())
        })
        .await;
    }
    assert_live_order(seen);
    tap.terminate().await;

    // The record index equals the PDS.
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    for repo in repos.iter() {
        let mut index = BTreeMap::new();
        let mut after = None;
        loop {
            let page = store
                .records_page(repo.did().as_str(), after.clone(), 1000)
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = Some((last.collection.clone(), last.rkey.clone()));
            for r in page {
                index.insert(format!("{}/{}", r.collection, r.rkey), r.cid);
            }
        }
        assert_eq!(index, expected(repo), "record index of {}", repo.did());
    }
    store.close().await;
}

fn repo(n: u32, records: usize) -> RepoBuilder {
    RepoBuilder::with_records(did(n), TestKey::k256(u64::from(n)), u64::from(n), records)
}

/// Backfills `repos` in a first run (no failpoint), so the crash hits live traffic.
async fn backfilled(db: &TestDb, net: &Net, repos: &[RepoBuilder], seen: &Seen) {
    let mut tap = start(db, net, None, &[]).await;
    let _consumer = Recorder::connect(tap.addr, 0, seen).await;
    add(&tap, &repos.iter().collect::<Vec<_>>()).await;
    for repo in repos {
        wait_for("backfilled", || async {
            (all_delivered(seen, repo) && state_of(&tap, repo).await == "active").then_some(())
        })
        .await;
    }
    tap.terminate().await;
}

fn hosted(net: &Net, repos: &[RepoBuilder]) {
    for (i, r) in repos.iter().enumerate() {
        net.host(r, &format!("crash{i}.test"), r.car_tree_order());
    }
}

/// Killed after a live commit is in the outbox and before the cursor passes it.
async fn after_outbox_commit_before_cursor_save(db: TestDb) {
    let net = Net::start().await;
    let mut repos = vec![repo(41, 5), repo(42, 5)];
    hosted(&net, &repos);
    let seen: Seen = Arc::default();
    backfilled(&db, &net, &repos, &seen).await;

    for seq in 1..=4 {
        commit(&net, &mut repos[usize::from(seq % 2 == 0)], seq);
    }
    let mut tap = start(&db, &net, Some("firehose-event-committed=kill@2"), &[]).await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    killed(&mut tap).await;
    recover_and_check(&db, &net, &mut repos, &seen).await;
}
on_both_backends!(
    a_crash_between_an_outbox_commit_and_the_cursor_save_loses_nothing,
    after_outbox_commit_before_cursor_save
);

/// The consumer's view of `did` from every record event received: paths created and not
/// deleted since, in delivery order.
fn view_of(seen: &Seen, did: &str) -> std::collections::BTreeSet<String> {
    let mut view = std::collections::BTreeSet::new();
    for r in records_of(seen).iter().filter(|r| r["did"] == did) {
        let path = format!(
            "{}/{}",
            r["collection"].as_str().unwrap(),
            r["rkey"].as_str().unwrap()
        );
        if r["action"] == "delete" {
            view.remove(&path);
        } else {
            view.insert(path);
        }
    }
    view
}

/// Killed right after the live commit that deletes a starter pack: the records that
/// depended on it (its list, the list's items, the profile) must still be deleted after the
/// restart, because the resync they need was recorded in the commit's own transaction.
async fn rules_refilter(db: TestDb) {
    const RULES: &str = "--record-filters=app.bsky.graph.list: $uri in refs(app.bsky.graph.starterpack, $.list); \
        app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list); \
        app.bsky.actor.profile: kept(app.bsky.graph.starterpack)";
    const FILTERS: &str = "--collection-filters=app.bsky.actor.profile,app.bsky.graph.list,app.bsky.graph.listitem,app.bsky.graph.starterpack";
    let net = Net::start().await;
    let mut repo = RepoBuilder::new(did(48), TestKey::k256(48), 48);
    let list_uri = format!("at://{}/app.bsky.graph.list/3kpack", repo.did());
    let cbor = |v: Value| tap_atproto::atjson::json_to_cbor(&v).unwrap();
    let at = "2026-12-07T00:00:00Z";
    let mut ops = vec![
        WriteOp::Create {
            path: "app.bsky.actor.profile/self".into(),
            record: cbor(json!({"$type": "app.bsky.actor.profile", "displayName": "p"})),
        },
        WriteOp::Create {
            path: "app.bsky.graph.list/3kpack".into(),
            record: cbor(json!({"$type": "app.bsky.graph.list", "name": "pack",
                "purpose": "app.bsky.graph.defs#referencelist", "createdAt": at})),
        },
        WriteOp::Create {
            path: "app.bsky.graph.starterpack/3kp".into(),
            record: cbor(json!({"$type": "app.bsky.graph.starterpack", "name": "p",
                "list": list_uri, "createdAt": at})),
        },
    ];
    for n in 0..3 {
        ops.push(WriteOp::Create {
            path: format!("app.bsky.graph.listitem/3ki{n}"),
            record: cbor(json!({"$type": "app.bsky.graph.listitem", "list": list_uri,
                "subject": did(900 + n).as_str(), "createdAt": at})),
        });
    }
    repo.commit(&ops).unwrap();
    hosted(&net, std::slice::from_ref(&repo));
    let seen: Seen = Arc::default();
    let mut tap = start(&db, &net, None, &[FILTERS, RULES]).await;
    let consumer = Recorder::connect(tap.addr, 0, &seen).await;
    add(&tap, &[&repo]).await;
    wait_for("the starter-pack slice backfilled", || async {
        (view_of(&seen, repo.did().as_str()).len() == 6 && state_of(&tap, &repo).await == "active")
            .then_some(())
    })
    .await;
    drop(consumer);
    tap.terminate().await;

    repo.set_next_seq(1);
    let frame = repo
        .commit_frame(&[WriteOp::Delete {
            path: "app.bsky.graph.starterpack/3kp".into(),
        }])
        .unwrap();
    net.pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    net.relay.push_frame(1, frame);
    let mut tap = start(&db, &net, Some("commit-applied=kill@1"), &[FILTERS, RULES]).await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    killed(&mut tap).await;

    let mut tap = start(&db, &net, None, &[FILTERS, RULES]).await;
    let _consumer = Recorder::connect(tap.addr, 2, &seen).await;
    wait_for("every dependent record deleted after the crash", || async {
        (view_of(&seen, repo.did().as_str()).is_empty() && state_of(&tap, &repo).await == "active")
            .then_some(())
    })
    .await;
    let info = info_of(&tap, &repo).await;
    assert_eq!(
        info["records"], 0,
        "the index holds the (empty) view: {info}"
    );
    tap.terminate().await;
}
on_both_backends!(
    a_crash_right_after_a_change_others_depend_on_still_recomputes_them,
    rules_refilter
);

/// Killed between two batches of a first backfill.
async fn mid_resync(db: TestDb) {
    let net = Net::start().await;
    let mut repos = vec![repo(43, 1000), repo(44, 3)];
    hosted(&net, &repos);
    let seen: Seen = Arc::default();
    let mut tap = start(&db, &net, Some("resync-batch-written=kill@2"), &[]).await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    add(&tap, &[&repos[0], &repos[1]]).await;
    killed(&mut tap).await;
    recover_and_check(&db, &net, &mut repos, &seen).await;
}
on_both_backends!(a_crash_between_resync_batches_loses_nothing, mid_resync);

/// Killed while a first backfill's in-memory events are partly acked.
async fn backfill_half_acked(db: TestDb) {
    let net = Net::start().await;
    let mut repos = vec![repo(45, 1200)];
    hosted(&net, &repos);
    let seen: Seen = Arc::default();
    let mut tap = start(&db, &net, Some("acks-received=kill@3"), &[]).await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    add(&tap, &[&repos[0]]).await;
    killed(&mut tap).await;
    let acked_before = records_of(&seen).len();
    assert!(
        acked_before > 0,
        "some events were delivered before the crash"
    );
    // While tap is down, a record the consumer saw is deleted: the rerun must say so.
    let gone = records_of(&seen)[0]["rkey"].as_str().unwrap().to_owned();
    let path = repos[0]
        .records()
        .keys()
        .find(|p| p.ends_with(&format!("/{gone}")))
        .unwrap()
        .clone();
    repos[0].set_next_seq(1);
    let frame = repos[0].commit_frame(&[WriteOp::Delete { path }]).unwrap();
    net.relay.push_frame(1, frame);
    net.pds.set_repo(
        repos[0].did().as_str(),
        RepoReply::Car(repos[0].car_tree_order()),
    );
    recover_and_check(&db, &net, &mut repos, &seen).await;
    assert!(
        records_of(&seen)
            .iter()
            .any(|r| r["rkey"] == gone.as_str() && r["action"] == "delete"),
        "the consumer learns that a record it saw was deleted"
    );
}
on_both_backends!(
    a_crash_with_a_first_backfill_half_acked_loses_nothing,
    backfill_half_acked
);

/// Killed after acks arrived and before their rows were deleted: they come again.
async fn acked_not_deleted(db: TestDb) {
    let net = Net::start().await;
    let mut repos = vec![repo(46, 20)];
    hosted(&net, &repos);
    let seen: Seen = Arc::default();
    let mut tap = start(
        &db,
        &net,
        Some("acks-before-delete=kill@1"),
        &["--durable-backfill-events=true"],
    )
    .await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    add(&tap, &[&repos[0]]).await;
    killed(&mut tap).await;
    assert!(
        !seen.lock().unwrap().is_empty(),
        "events were acked before the crash"
    );
    recover_and_check(&db, &net, &mut repos, &seen).await;
    let ids = |run: u32| -> Vec<u64> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| *r == run)
            .map(|(_, e)| e["id"].as_u64().unwrap())
            .collect()
    };
    let again = ids(2);
    assert!(
        ids(1).iter().any(|id| again.contains(id)),
        "acked events whose rows survived the crash are delivered again (at least once)"
    );
}
on_both_backends!(
    a_crash_between_acks_and_their_deletion_redelivers_them,
    acked_not_deleted
);

/// Killed in a cutover, after a buffered live commit was applied and before the repo
/// became active.
async fn during_cutover(db: TestDb) {
    let net = Net::start().await;
    let mut repos = vec![repo(47, 12)];
    let pre = repos[0].car_tree_order();
    net.publish(&repos[0], "cutover.test");
    // A slow body keeps the repo resyncing while live commits arrive and are buffered.
    net.pds.set_repo(
        repos[0].did().as_str(),
        RepoReply::Trickle(pre, Duration::from_millis(1)),
    );
    let seen: Seen = Arc::default();
    let mut tap = start(&db, &net, Some("cutover-buffered-applied=kill@1"), &[]).await;
    let _consumer = Recorder::connect(tap.addr, 1, &seen).await;
    add(&tap, &[&repos[0]]).await;
    wait_for("the trickled getRepo under way", || async {
        (net.pds.requests() >= 1 && state_of(&tap, &repos[0]).await == "resyncing").then_some(())
    })
    .await;
    // The trickled body is the state before these; `commit` makes the PDS serve the
    // newest one to the next attempt.
    commit(&net, &mut repos[0], 1);
    commit(&net, &mut repos[0], 2);
    wait_for("both commits buffered", || async {
        let stats: Value = reqwest::get(tap.url("/stats/resync-buffer"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["resync_buffer"].as_u64() >= Some(2)).then_some(())
    })
    .await;
    killed(&mut tap).await;
    recover_and_check(&db, &net, &mut repos, &seen).await;
}
on_both_backends!(a_crash_during_a_cutover_loses_nothing, during_cutover);

/// Supervision: a task that panics stops tap in order with a non-zero exit, instead of
/// leaving a stage dead behind a `/health` that says ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_stops_tap_with_a_failure_exit() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let mut tap = start(&db, &net, Some("cursor-saver-tick=panic@3"), &[]).await;
    let status = tap.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(1),
        "a failure exit, not a crash: {status:?}"
    );
    let logs = tap.drain_logs().join("\n");
    assert!(
        logs.contains("firehose cursor saver") && logs.contains("Tap stopped."),
        "names the task and shuts down in order: {logs}"
    );
}

/// The same promise against real peers: the reference PDS (as relay and PDS) and PLC from
/// npm. Killed after a live write is committed and before the cursor passes it; records
/// are written and deleted while tap is down; the restart catches up from the cursor.
async fn against_the_real_pds(db: TestDb) {
    let Some(mut net) = localnet::LocalNet::start(1, 20).await else {
        return;
    };
    let did = net.did(0);
    let pds = net.str("/pdsUrl");
    let args = [
        format!("--relay-url={pds}"),
        format!("--plc-url={}", net.str("/plcUrl")),
        format!("--handle-resolver-url={pds}"),
        "--cursor-save-interval=50ms".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let seen: Seen = Arc::default();
    let delivered = |want: &BTreeMap<String, String>| {
        let records = records_of(&seen);
        want.iter().all(|(path, cid)| {
            let (collection, rkey) = path.split_once('/').unwrap();
            records.iter().any(|r| {
                r["did"] == did.as_str()
                    && r["collection"] == collection
                    && r["rkey"] == rkey
                    && r["cid"] == cid.as_str()
            })
        })
    };

    let mut tap = TapProcess::spawn_with(
        &db.url,
        "127.0.0.1:0",
        &args,
        &[("TAP_FAILPOINTS", "firehose-event-committed=kill@2")],
    )
    .await;
    let consumer = Recorder::connect(tap.addr, 1, &seen).await;
    let resp = reqwest::Client::new()
        .post(tap.url("/repos/add"))
        .json(&json!({ "dids": [did] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let backfill = net.records(&did).await;
    poll_until("the backfill", EFFECT, || async {
        delivered(&backfill).then_some(())
    })
    .await;
    for i in 0..3 {
        net.command(
            json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
                           "rkey": format!("live{i}"),
                           "record": {"$type": "com.example.note", "text": format!("live {i}")}}),
        )
        .await;
    }
    killed(&mut tap).await;
    drop(consumer);
    // While tap is down.
    let victim = backfill
        .keys()
        .find(|p| p.starts_with("app.bsky.feed.post/"))
        .unwrap();
    let (collection, rkey) = victim.split_once('/').unwrap();
    net.command(json!({"cmd": "deleteRecord", "did": did, "collection": collection, "rkey": rkey}))
        .await;
    net.command(json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
                       "rkey": "while-down", "record": {"$type": "com.example.note", "text": "down"}}))
        .await;

    let mut tap = TapProcess::spawn_with(&db.url, "127.0.0.1:0", &args, &[]).await;
    let _consumer = Recorder::connect(tap.addr, 2, &seen).await;
    let want = net.records(&did).await;
    poll_until("every record of the final state", EFFECT, || async {
        delivered(&want).then_some(())
    })
    .await;
    poll_until("the delete while down", EFFECT, || async {
        records_of(&seen)
            .iter()
            .any(|r| r["rkey"] == rkey && r["action"] == "delete")
            .then_some(())
    })
    .await;
    // Not stuck: a new write arrives live.
    net.command(
        json!({"cmd": "createRecord", "did": did, "collection": "com.example.note",
                       "rkey": "after", "record": {"$type": "com.example.note", "text": "after"}}),
    )
    .await;
    let want = net.records(&did).await;
    poll_until("the write after the restart", EFFECT, || async {
        delivered(&want).then_some(())
    })
    .await;
    assert_live_order(&seen);
    tap.terminate().await;
    let store = Store::open(&db.url, StoreOptions::default()).await.unwrap();
    let mut index = BTreeMap::new();
    let page = store.records_page(&did, None, 10_000).await.unwrap();
    for r in page {
        index.insert(format!("{}/{}", r.collection, r.rkey), r.cid);
    }
    assert_eq!(index, want, "record index equals the PDS");
    store.close().await;
    net.stop().await;
}
on_both_backends!(
    a_crash_against_the_real_pds_loses_nothing_and_catches_up,
    against_the_real_pds
);
