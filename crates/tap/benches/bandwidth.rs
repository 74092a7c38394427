//! Bytes downloaded for a narrow slice of the network: the starter-pack workload of the
//! seed blog post. Repos with the realistic record mix, each holding a profile and one to
//! three `app.bsky.graph.starterpack` records, are found through the relay's
//! `listReposByCollection` (`--signal-collection app.bsky.graph.starterpack`) and synced with
//! `--collection-filters app.bsky.graph.starterpack,app.bsky.actor.profile`, once with
//! `--fetch-strategy full` and once with `auto`, in one process. Prints the bytes tap
//! counted (`/stats/bandwidth`), the bytes the fake PDS served, and the ratio.
//!
//! Repos without a starter pack (95 % of a real population) are not listed by the relay for
//! that collection, so neither strategy downloads anything of theirs; they are left out.
//!
//! Parameters (environment): `BANDWIDTH_REPOS` (tracked repos, default 200),
//! `BANDWIDTH_RECORDS` per repo (default 2000). Run: `cargo bench -p tap --bench bandwidth`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tap::config::{FetchStrategy, TrackingScope};
use tap::store::DatabaseUrl;
use tap_atproto::syntax::Did;
use tap_atproto::writer::WriteOp;
use tap_testkit::fake_pds::{Endpoint, FakePds, RepoReply};
use tap_testkit::fake_plc::FakePlc;
use tap_testkit::fake_relay::FakeRelay;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};
use tokio_tungstenite::tungstenite::Message;

const STARTER_PACK: &str = "app.bsky.graph.starterpack";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A repo of `records` generated records plus a profile, then a commit adding one to three
/// starter packs. Returns the repo and how many wanted records it holds.
fn build_repo(n: usize, records: usize) -> (RepoBuilder, usize) {
    let did: Did = format!("did:plc:{:0>24}", format!("bw{n}"))
        .parse()
        .unwrap();
    let mut repo = RepoBuilder::with_records(did, TestKey::k256(n as u64 + 1), n as u64, records);
    let packs = 1 + n % 3;
    let ops: Vec<WriteOp> = (0..packs)
        .map(|_| {
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
        })
        .collect();
    repo.commit(&ops).unwrap();
    (repo, packs + 1)
}

struct Outcome {
    counted: u64,
    served: u64,
    get_repo: u64,
    seconds: f64,
}

async fn run(
    strategy: FetchStrategy,
    repos: &[RepoBuilder],
    cars: &[Vec<u8>],
    wanted: usize,
) -> Outcome {
    let relay = FakeRelay::start().await;
    let pds = FakePds::start().await;
    let plc = FakePlc::start().await;
    let mut listed = Vec::new();
    for (i, repo) in repos.iter().enumerate() {
        plc.publish(repo, &format!("u{i}.test"), &pds.url());
        let did = repo.did().as_str();
        pds.set_repo(did, RepoReply::Car(cars[i].clone()));
        listed.push(json!({"did": did}));
    }
    relay.set_pages(Some(STARTER_PACK), vec![listed]);

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tap::Config::defaults();
    cfg.bind = "127.0.0.1:0".into();
    cfg.database = DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
    cfg.relay_url = url::Url::parse(&relay.url()).unwrap();
    cfg.plc_url = url::Url::parse(&plc.url()).unwrap();
    cfg.handle_resolver_url = Some(url::Url::parse(&plc.url()).unwrap());
    cfg.allow_private_network = true; // the fake PDS is on loopback
    cfg.scope = TrackingScope::SignalCollections(vec![STARTER_PACK.parse().unwrap()]);
    cfg.collection_filters = vec![
        STARTER_PACK.parse().unwrap(),
        "app.bsky.actor.profile".parse().unwrap(),
    ];
    cfg.fetch_strategy = strategy;
    let started = Instant::now();
    let app = tap::App::bind(cfg).await.unwrap();
    let addr = app.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stop_rx.await;
    }));

    // Ack everything; count record events until every wanted record is in.
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let mut records = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while records < wanted {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, rx.next())
            .await
            .expect("every wanted record within 10 minutes")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] == "record" {
                records += 1;
            }
            let ack = json!({"type": "ack", "id": v["id"]}).to_string();
            tx.send(Message::Text(ack.into())).await.unwrap();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let bw: Value = reqwest::get(format!("http://{addr}/stats/bandwidth"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
    let served = [
        Endpoint::GetRepo,
        Endpoint::GetLatestCommit,
        Endpoint::GetBlocks,
    ]
    .into_iter()
    .map(|e| pds.served(e).bytes)
    .sum::<u64>()
        + relay.listing_bytes()
        + plc.bytes_served();
    Outcome {
        counted: bw["total"].as_u64().unwrap(),
        served,
        get_repo: pds.served(Endpoint::GetRepo).bytes,
        seconds,
    }
}

fn main() {
    // `cargo test --benches` passes no `--bench`: one tiny run then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick {
        3
    } else {
        env_usize("BANDWIDTH_REPOS", 200)
    };
    let per_repo = if quick {
        50
    } else {
        env_usize("BANDWIDTH_RECORDS", 2000)
    };
    let built: Vec<(RepoBuilder, usize)> = (0..n).map(|i| build_repo(i, per_repo)).collect();
    let wanted: usize = built.iter().map(|(_, w)| w).sum();
    let repos: Vec<RepoBuilder> = built.into_iter().map(|(r, _)| r).collect();
    let cars: Vec<Vec<u8>> = repos.iter().map(|r| r.car_shuffled(1)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let full = rt.block_on(run(FetchStrategy::Full, &repos, &cars, wanted));
    let auto = rt.block_on(run(FetchStrategy::Auto, &repos, &cars, wanted));
    let repo_bytes: usize = cars.iter().map(Vec::len).sum();
    println!(
        "starter packs: {n} repos x {per_repo} records ({repo_bytes} bytes of repos), {wanted} wanted records"
    );
    for (name, o) in [("full", &full), ("auto", &auto)] {
        println!(
            "{name}: tap counted {} bytes, servers sent {} bytes (getRepo {}), {:.1} s",
            o.counted, o.served, o.get_repo, o.seconds
        );
    }
    println!(
        "auto/full bytes: {:.4}",
        auto.counted as f64 / full.counted as f64
    );
}
