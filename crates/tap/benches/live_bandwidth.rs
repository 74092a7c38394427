//! Bytes of the live stream for a narrow app: the relay firehose versus Jetstream plus
//! `getRecord` proofs, for the starter-pack workload of the seed blog post
//! (`--signal-collection app.bsky.graph.starterpack`, `--collection-filters
//! app.bsky.graph.starterpack,app.bsky.actor.profile`), in one process.
//!
//! A population of repos with the realistic record mix is generated; a fifth of them hold a
//! starter pack and are tracked (found through `listReposByCollection`) and backfilled
//! first. Then one generated stream of commits, each from a random repo of the population:
//! the realistic mix (single-operation likes, reposts, follows, posts, …), profile updates
//! at `PROFILE_PPM` per million commits and starter-pack creations at `PACK_PPM`. The same
//! stream is sent once as `#commit` frames through a fake relay and once as Jetstream
//! events through a fake Jetstream (which filters by `wantedCollections`, as Jetstream
//! does); tap's ledger (`/stats/bandwidth`) is read before and after the stream, and the
//! difference per source is printed, with the ratio and the bytes per hour at
//! `COMMITS_PER_SECOND` (the network's typical rate is 300–1,000 commits a second,
//! research/performance-limits.md).
//!
//! Parameters (environment): `LIVE_REPOS` (population, default 200), `LIVE_RECORDS` per
//! repo (default 2,000), `LIVE_COMMITS` (default 20,000), `PROFILE_PPM` (default 3,000:
//! 0.3 % of commits), `PACK_PPM` (default 200: 0.02 %), `COMMITS_PER_SECOND` (default
//! 500). Run: `cargo bench -p tap --bench live_bandwidth`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tap::config::{JetstreamConfig, JetstreamVerify, LiveSource, TrackingScope};
use tap::store::DatabaseUrl;
use tap_atproto::syntax::Did;
use tap_atproto::writer::{WriteOp, encode_commit_frame};
use tap_testkit::fake_jetstream::{FakeJetstream, commit_events};
use tap_testkit::fake_pds::{FakePds, RepoReply};
use tap_testkit::fake_plc::FakePlc;
use tap_testkit::fake_relay::FakeRelay;
use tap_testkit::repo_builder::{RepoBuilder, Rng, TestKey};
use tokio_tungstenite::tungstenite::Message;

const STARTER_PACK: &str = "app.bsky.graph.starterpack";
const PROFILE: &str = "app.bsky.actor.profile";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn starter_pack(repo: &mut RepoBuilder) -> WriteOp {
    let rkey = repo.generator().next_tid();
    let record = tap_atproto::atjson::json_to_cbor(&json!({
        "$type": STARTER_PACK,
        "name": "Rust people",
        "list": format!("at://{}/app.bsky.graph.list/3kabc", repo.did()),
        "createdAt": "2026-12-01T00:00:00.000Z",
    }))
    .unwrap();
    WriteOp::Create {
        path: format!("{STARTER_PACK}/{rkey}"),
        record,
    }
}

/// One commit of the stream, in both forms.
struct Commit {
    did: String,
    seq: i64,
    frame: Vec<u8>,
    events: Vec<Value>,
    /// The repo after this commit, when it touched a wanted collection (the PDS serves it
    /// from then on: proofs and new backfills need it).
    snapshot: Option<Vec<u8>>,
}

/// The population at the start, and the stream.
struct Workload {
    initial: Vec<(RepoBuilder, Vec<u8>)>,
    tracked: Vec<String>,
    commits: Vec<Commit>,
}

fn generate() -> Workload {
    let population = env_u64("LIVE_REPOS", 200);
    let records = env_u64("LIVE_RECORDS", 2000) as usize;
    let n = env_u64("LIVE_COMMITS", 20_000);
    let profile_ppm = env_u64("PROFILE_PPM", 3000);
    let pack_ppm = env_u64("PACK_PPM", 200);
    let mut repos: Vec<RepoBuilder> = (0..population)
        .map(|i| {
            let did: Did = format!("did:plc:{:0>24}", format!("live{i}"))
                .parse()
                .unwrap();
            RepoBuilder::with_records(did, TestKey::k256(i + 1), i, records)
        })
        .collect();
    let mut tracked = Vec::new();
    for repo in repos.iter_mut().step_by(5) {
        let op = starter_pack(repo);
        repo.commit(&[op]).unwrap();
        tracked.push(repo.did().to_string());
    }
    let initial = repos
        .iter()
        .map(|r| (r.clone(), r.car_tree_order()))
        .collect();
    let mut rng = Rng::new(42);
    let mut commits = Vec::with_capacity(n as usize);
    for seq in 1..=n as i64 {
        let repo = &mut repos[rng.below(population) as usize];
        let roll = rng.below(1_000_000);
        let (ops, wanted) = if roll < profile_ppm {
            let profile = repo.generator().profile_json();
            let record = tap_atproto::atjson::json_to_cbor(&profile).unwrap();
            let path = format!("{PROFILE}/self");
            (vec![WriteOp::Update { path, record }], true)
        } else if roll < profile_ppm + pack_ppm {
            (vec![starter_pack(repo)], true)
        } else {
            (repo.random_ops(1), false)
        };
        let out = repo.commit(&ops).unwrap();
        commits.push(Commit {
            did: repo.did().to_string(),
            seq,
            frame: encode_commit_frame(repo.did(), seq, &out, "2026-12-07T00:00:00.000Z"),
            events: commit_events(repo, &out),
            snapshot: wanted.then(|| repo.car_tree_order()),
        });
    }
    Workload {
        initial,
        tracked,
        commits,
    }
}

struct Fakes {
    relay: FakeRelay,
    jetstream: FakeJetstream,
    pds: FakePds,
    plc: FakePlc,
}

impl Fakes {
    async fn start(work: &Workload) -> Self {
        let fakes = Self {
            relay: FakeRelay::start().await,
            jetstream: FakeJetstream::start().await,
            pds: FakePds::start().await,
            plc: FakePlc::start().await,
        };
        for (i, (repo, car)) in work.initial.iter().enumerate() {
            fakes
                .plc
                .publish(repo, &format!("u{i}.test"), &fakes.pds.url());
            fakes
                .pds
                .set_repo(repo.did().as_str(), RepoReply::Car(car.clone()));
        }
        let listed = work.tracked.iter().map(|d| json!({"did": d})).collect();
        fakes.relay.set_pages(Some(STARTER_PACK), vec![listed]);
        fakes
    }
}

/// A running tap with a consumer that acks everything.
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tap::error::AppError>>,
    records: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _consumer: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(fakes: &Fakes, jetstream: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tap::Config::defaults();
        cfg.bind = "127.0.0.1:0".into();
        cfg.database =
            DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
        cfg.relay_url = url::Url::parse(&fakes.relay.url()).unwrap();
        cfg.plc_url = url::Url::parse(&fakes.plc.url()).unwrap();
        cfg.handle_resolver_url = Some(url::Url::parse(&fakes.plc.url()).unwrap());
        cfg.allow_private_network = true; // the fakes are on loopback
        cfg.scope = TrackingScope::SignalCollections(vec![STARTER_PACK.parse().unwrap()]);
        cfg.collection_filters = vec![STARTER_PACK.parse().unwrap(), PROFILE.parse().unwrap()];
        if jetstream {
            cfg.live_source = LiveSource::Jetstream(JetstreamConfig {
                url: tap::config::jetstream_subscribe_url(&fakes.jetstream.url()).unwrap(),
                verify: JetstreamVerify::Proof,
                proof_rate: 10_000,
                watchdog: tap::jetstream::reader::WATCHDOG,
            });
        }
        let app = tap::App::bind(cfg).await.unwrap();
        let addr = app.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stop_rx.await;
        }));
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
            .await
            .unwrap();
        let records = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = std::sync::Arc::clone(&records);
        let consumer = tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(text) = msg {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    if v["type"] == "record" {
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let ack = json!({"type": "ack", "id": v["id"]}).to_string();
                    if tx.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            addr,
            stop,
            task,
            records,
            _consumer: consumer,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `done` holds for `/stats/cursors` and the record count.
    async fn until(&self, what: &str, done: impl Fn(&Value, u64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let cursors = self.get("/stats/cursors").await;
            let records = self.records.load(std::sync::atomic::Ordering::Relaxed);
            if done(&cursors, records) {
                return;
            }
            assert!(Instant::now() < deadline, "{what} within 15 minutes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Ledger bytes per source.
fn sources(bandwidth: &Value) -> serde_json::Map<String, Value> {
    bandwidth["by_source"].as_object().unwrap().clone()
}

fn delta(after: &Value, before: &Value, source: &str) -> u64 {
    let get = |v: &Value| sources(v)[source].as_u64().unwrap_or(0);
    get(after) - get(before)
}

/// Runs the stream through one live source; returns the live bytes per source.
async fn run(work: &Workload, jetstream: bool) -> Vec<(String, u64)> {
    let fakes = Fakes::start(work).await;
    let tap = Running::start(&fakes, jetstream).await;
    // Each tracked repo holds a profile and a starter pack.
    let backfilled = 2 * work.tracked.len() as u64;
    tap.until("the backfill", |_, records| records >= backfilled)
        .await;
    // Let the backfill's stragglers (handle checks, the listing) settle.
    let mut before = tap.get("/stats/bandwidth").await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = tap.get("/stats/bandwidth").await;
        if now["total"] == before["total"] {
            break;
        }
        before = now;
    }
    let started = Instant::now();
    let mut last_wanted = 0;
    for commit in &work.commits {
        if let Some(car) = &commit.snapshot {
            fakes.pds.set_repo(&commit.did, RepoReply::Car(car.clone()));
        }
        if jetstream {
            for event in &commit.events {
                let collection = event["commit"]["collection"].as_str().unwrap_or_default();
                let time_us = fakes.jetstream.publish(event.clone());
                if collection == STARTER_PACK || collection == PROFILE {
                    last_wanted = time_us;
                }
            }
        } else {
            fakes.relay.push_frame(commit.seq, commit.frame.clone());
        }
    }
    let last_seq = work.commits.last().map_or(0, |c| c.seq);
    tap.until("the stream", |cursors, _| {
        if jetstream {
            cursors["jetstream"].as_i64().unwrap_or(0) >= last_wanted
        } else {
            cursors["firehose"].as_i64().unwrap_or(0) >= last_seq
        }
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let after = tap.get("/stats/bandwidth").await;
    tap.stop().await;
    let mut rows: Vec<(String, u64)> = sources(&after)
        .keys()
        .map(|s| (s.clone(), delta(&after, &before, s)))
        .filter(|(_, n)| *n > 0)
        .collect();
    rows.push(("(seconds)".into(), seconds as u64));
    rows
}

fn main() {
    let started = Instant::now();
    let work = generate();
    let n = work.commits.len() as u64;
    let rate = env_u64("COMMITS_PER_SECOND", 500);
    let wanted = work.commits.iter().filter(|c| c.snapshot.is_some()).count();
    println!(
        "{} repos ({} tracked), {n} commits ({wanted} touch the wanted collections), generated in {:.1} s",
        work.initial.len(),
        work.tracked.len(),
        started.elapsed().as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let firehose = runtime.block_on(run(&work, false));
    let jetstream = runtime.block_on(run(&work, true));
    let live = |rows: &[(String, u64)], sources: &[&str]| -> u64 {
        rows.iter()
            .filter(|(s, _)| sources.contains(&s.as_str()))
            .map(|(_, n)| n)
            .sum()
    };
    for (name, rows) in [
        ("relay firehose", &firehose),
        ("jetstream + proofs", &jetstream),
    ] {
        println!("{name}: live-phase bytes by source");
        for (source, bytes) in rows {
            println!("  {source:24} {bytes:>14}");
        }
    }
    let via_relay = live(&firehose, &["relay.firehose"]);
    let via_jetstream = live(&jetstream, &["jetstream", "pds.getRecord"]);
    let per_hour = |bytes: u64| bytes as f64 * (rate as f64 * 3600.0 / n as f64);
    println!(
        "live stream: relay firehose {via_relay} B, jetstream + proofs {via_jetstream} B, ratio 1/{:.0}",
        via_relay as f64 / via_jetstream.max(1) as f64
    );
    println!(
        "per hour at {rate} commits/s: relay firehose {:.2} GB, jetstream + proofs {:.3} GB",
        per_hour(via_relay) / 1e9,
        per_hour(via_jetstream) / 1e9
    );
}
