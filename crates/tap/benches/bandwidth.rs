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
//! Then a resync of a repo tap holds after a few new records (unfiltered), with `full` and
//! with `auto` (`getRepo?since=`): the PDS bytes of each.
//!
//! Last, the record-content rules on the same slice, with the graph records beside each
//! starter pack: the list it names with 30 members, and in some repos a moderation list (500
//! members, one repo in four) and a curation list (40 members, every other repo). Synced with
//! `--collection-filters` for profiles, lists, list items and starter packs, once alone and
//! once with the starter-pack rules: records delivered, record bytes delivered and discarded.
//!
//! Parameters (environment): `BANDWIDTH_REPOS` (tracked repos, default 200),
//! `BANDWIDTH_RECORDS` per repo (default 2000), `RESYNC_RECORDS` (default 10,000) and
//! `RESYNC_NEW` (default 10). Run: `cargo bench -p tap --bench bandwidth`.
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

const LIST: &str = "app.bsky.graph.list";
const ITEM: &str = "app.bsky.graph.listitem";
const PROFILE: &str = "app.bsky.actor.profile";
/// The seed blog's slice as rules: see the README's "Record-content filters".
const RULES: &str = "app.bsky.graph.list: $uri in refs(app.bsky.graph.starterpack, $.list); \
     app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list); \
     app.bsky.actor.profile: kept(app.bsky.graph.starterpack)";

/// A repo of the realistic mix plus a starter pack, the list it names (30 members), and
/// per `n` a moderation list (500 members) and a curation list (40 members). Returns it,
/// the records the collection filters alone deliver, and those the rules deliver.
fn build_graph_repo(n: usize, records: usize) -> (RepoBuilder, usize, usize) {
    let did: Did = format!("did:plc:{:0>24}", format!("gr{n}"))
        .parse()
        .unwrap();
    let mut repo = RepoBuilder::with_records(did, TestKey::k256(n as u64 + 1), n as u64, records);
    let at = "2026-12-01T00:00:00.000Z";
    let mut ops = Vec::new();
    let mut create = |repo: &mut RepoBuilder, collection: &str, value: Value| {
        let rkey = repo.generator().next_tid();
        ops.push(WriteOp::Create {
            path: format!("{collection}/{rkey}"),
            record: tap_atproto::atjson::json_to_cbor(&value).unwrap(),
        });
        format!("at://{}/{collection}/{rkey}", repo.did())
    };
    let mut lists = vec![("referencelist", 30)];
    if n.is_multiple_of(4) {
        lists.push(("modlist", 500));
    }
    if n.is_multiple_of(2) {
        lists.push(("curatelist", 40));
    }
    let mut pack_list = String::new();
    for (purpose, members) in &lists {
        let list = create(
            &mut repo,
            LIST,
            json!({"$type": LIST, "purpose": format!("app.bsky.graph.defs#{purpose}"),
                   "name": purpose, "createdAt": at}),
        );
        for m in 0..*members {
            create(
                &mut repo,
                ITEM,
                json!({"$type": ITEM, "list": list, "createdAt": at,
                       "subject": format!("did:plc:{:0>24}", format!("member{m}"))}),
            );
        }
        if pack_list.is_empty() {
            pack_list = list;
        }
    }
    create(
        &mut repo,
        STARTER_PACK,
        json!({"$type": STARTER_PACK, "name": "Rust people", "list": pack_list, "createdAt": at}),
    );
    repo.commit(&ops).unwrap();
    // The filters alone deliver every record of the four collections (the realistic mix
    // holds list items of its own); the rules, the profile, the pack, its list and items.
    let by_filters = repo
        .records()
        .keys()
        .filter(|p| {
            [STARTER_PACK, PROFILE, LIST, ITEM]
                .iter()
                .any(|c| p.starts_with(&format!("{c}/")))
        })
        .count();
    (repo, by_filters, 2 + 1 + lists[0].1)
}

/// Syncs `repos` with the graph collection filters, with the rules or without. Returns
/// the records delivered and the ledger's record bytes (delivered, discarded).
async fn run_graph(
    repos: &[RepoBuilder],
    cars: &[Vec<u8>],
    wanted: usize,
    rules: bool,
) -> (usize, u64, u64, f64) {
    let fakes = Fakes::starter_packs(repos, cars).await;
    let started = Instant::now();
    let mut tap = Running::start(&fakes, |cfg| {
        cfg.scope = TrackingScope::SignalCollections(vec![STARTER_PACK.parse().unwrap()]);
        cfg.collection_filters = [STARTER_PACK, PROFILE, LIST, ITEM]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        if rules {
            cfg.record_filters = tap_atproto::record_filter::RuleSet::parse(
                &tap_atproto::record_filter::split_rules(RULES),
            )
            .unwrap();
        }
    })
    .await;
    tap.records(wanted).await;
    let seconds = started.elapsed().as_secs_f64();
    // Nothing beyond the wanted records: every repo active, with that many indexed.
    let count = tap.get("/stats/record-count").await["record_count"]
        .as_u64()
        .unwrap();
    let bw = tap.get("/stats/bandwidth").await;
    tap.stop().await;
    (
        usize::try_from(count).unwrap(),
        bw["records"]["delivered"].as_u64().unwrap(),
        bw["records"]["discarded"].as_u64().unwrap(),
        seconds,
    )
}

struct Outcome {
    counted: u64,
    served: u64,
    get_repo: u64,
    seconds: f64,
}

/// The fake network a run syncs from.
struct Fakes {
    relay: FakeRelay,
    pds: FakePds,
    plc: FakePlc,
}

impl Fakes {
    async fn start() -> Self {
        Self {
            relay: FakeRelay::start().await,
            pds: FakePds::start().await,
            plc: FakePlc::start().await,
        }
    }

    /// Fakes hosting `repos` (as `cars`), all listed by the relay as holding starter packs.
    async fn starter_packs(repos: &[RepoBuilder], cars: &[Vec<u8>]) -> Self {
        let fakes = Self::start().await;
        let mut listed = Vec::new();
        for (i, repo) in repos.iter().enumerate() {
            fakes.host(i, repo, cars[i].clone());
            listed.push(json!({"did": repo.did().as_str()}));
        }
        fakes.relay.set_pages(Some(STARTER_PACK), vec![listed]);
        fakes
    }

    fn host(&self, i: usize, repo: &RepoBuilder, car: Vec<u8>) {
        self.plc
            .publish(repo, &format!("u{i}.test"), &self.pds.url());
        self.pds.set_repo(repo.did().as_str(), RepoReply::Car(car));
    }

    /// Bytes the PDS served over every endpoint.
    fn pds_bytes(&self) -> u64 {
        [
            Endpoint::GetRepo,
            Endpoint::GetLatestCommit,
            Endpoint::GetBlocks,
        ]
        .into_iter()
        .map(|e| self.pds.served(e).bytes)
        .sum()
    }
}

/// A running tap and a consumer connected to it that acks everything.
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tap::error::AppError>>,
    tx: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    rx: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Starts tap against `fakes` with `configure` applied to its configuration.
    async fn start(fakes: &Fakes, configure: impl FnOnce(&mut tap::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tap::Config::defaults();
        cfg.bind = "127.0.0.1:0".into();
        cfg.database =
            DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
        cfg.relay_url = url::Url::parse(&fakes.relay.url()).unwrap();
        cfg.plc_url = url::Url::parse(&fakes.plc.url()).unwrap();
        cfg.handle_resolver_url = Some(url::Url::parse(&fakes.plc.url()).unwrap());
        cfg.allow_private_network = true; // the fake PDS is on loopback
        configure(&mut cfg);
        let app = tap::App::bind(cfg).await.unwrap();
        let addr = app.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stop_rx.await;
        }));
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
            .await
            .unwrap();
        let (tx, rx) = ws.split();
        Self {
            addr,
            stop,
            task,
            tx,
            rx,
            _dir: dir,
        }
    }

    /// Acks events until `n` record events came.
    async fn records(&mut self, n: usize) {
        let mut records = 0;
        let deadline = Instant::now() + Duration::from_secs(600);
        while records < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.rx.next())
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
                self.tx.send(Message::Text(ack.into())).await.unwrap();
            }
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

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn run(
    strategy: FetchStrategy,
    repos: &[RepoBuilder],
    cars: &[Vec<u8>],
    wanted: usize,
) -> Outcome {
    let fakes = Fakes::starter_packs(repos, cars).await;
    let started = Instant::now();
    let mut tap = Running::start(&fakes, |cfg| {
        cfg.scope = TrackingScope::SignalCollections(vec![STARTER_PACK.parse().unwrap()]);
        cfg.collection_filters = vec![
            STARTER_PACK.parse().unwrap(),
            "app.bsky.actor.profile".parse().unwrap(),
        ];
        cfg.fetch_strategy = strategy;
    })
    .await;
    tap.records(wanted).await;
    let seconds = started.elapsed().as_secs_f64();
    let bw = tap.get("/stats/bandwidth").await;
    tap.stop().await;
    Outcome {
        counted: bw["total"].as_u64().unwrap(),
        served: fakes.pds_bytes() + fakes.relay.listing_bytes() + fakes.plc.bytes_served(),
        get_repo: fakes.pds.served(Endpoint::GetRepo).bytes,
        seconds,
    }
}

/// Bytes a resync downloads from the PDS after `new` records were added to a repo tap
/// holds: the repo is backfilled, then a commit that does not chain sends it to a resync.
/// Returns the PDS bytes of the backfill and of the resync, and how the resync fetched.
async fn resync_after_new_records(
    strategy: FetchStrategy,
    mut repo: RepoBuilder,
    new: usize,
) -> (u64, u64, String) {
    let fakes = Fakes::start().await;
    fakes.host(0, &repo, repo.car_tree_order());
    let mut tap = Running::start(&fakes, |cfg| cfg.fetch_strategy = strategy).await;
    let client = reqwest::Client::new();
    client
        .post(format!("http://{}/repos/add", tap.addr))
        .json(&json!({"dids": [repo.did().as_str()]}))
        .send()
        .await
        .unwrap();
    tap.records(repo.records().len()).await;
    let backfill = fakes.pds_bytes();
    let ops: Vec<WriteOp> = (0..new)
        .map(|_| {
            let (path, record) = repo.generator().next_record();
            WriteOp::Create { path, record }
        })
        .collect();
    let frame = repo.wrong_prev_data_frame(&ops).unwrap();
    fakes
        .pds
        .set_repo(repo.did().as_str(), RepoReply::Car(repo.car_tree_order()));
    fakes.relay.push_frame(1, frame);
    tap.records(new).await;
    let info = tap.get(&format!("/info/{}", repo.did())).await;
    tap.stop().await;
    let kind = info["last_fetch"]["kind"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    (backfill, fakes.pds_bytes() - backfill, kind)
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // `BANDWIDTH_PART=rules`: only the record-filters part.
    if std::env::var("BANDWIDTH_PART").as_deref() != Ok("rules") {
        fetch_parts(&rt, quick, n, per_repo);
    }
    rules_part(&rt, n, per_repo);
}

fn fetch_parts(rt: &tokio::runtime::Runtime, quick: bool, n: usize, per_repo: usize) {
    let built: Vec<(RepoBuilder, usize)> = (0..n).map(|i| build_repo(i, per_repo)).collect();
    let wanted: usize = built.iter().map(|(_, w)| w).sum();
    let repos: Vec<RepoBuilder> = built.into_iter().map(|(r, _)| r).collect();
    let cars: Vec<Vec<u8>> = repos.iter().map(|r| r.car_shuffled(1)).collect();
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

    let (records, new) = if quick {
        (200, 2)
    } else {
        (
            env_usize("RESYNC_RECORDS", 10_000),
            env_usize("RESYNC_NEW", 10),
        )
    };
    let repo = RepoBuilder::with_records(
        "did:plc:000000000000000000resync".parse().unwrap(),
        TestKey::k256(7),
        7,
        records,
    );
    println!("resync of a {records}-record repo after {new} new records (PDS bytes):");
    let mut resync = Vec::new();
    for strategy in [FetchStrategy::Full, FetchStrategy::Auto] {
        let (backfill, bytes, kind) =
            rt.block_on(resync_after_new_records(strategy, repo.clone(), new));
        println!("{strategy:?}: backfill {backfill} bytes, resync {bytes} bytes ({kind})");
        resync.push(bytes);
    }
    println!(
        "auto/full resync bytes: {:.4}",
        resync[1] as f64 / resync[0] as f64
    );
}

fn rules_part(rt: &tokio::runtime::Runtime, n: usize, per_repo: usize) {
    let graph: Vec<(RepoBuilder, usize, usize)> =
        (0..n).map(|i| build_graph_repo(i, per_repo)).collect();
    let by_filters: usize = graph.iter().map(|(_, f, _)| f).sum();
    let by_rules: usize = graph.iter().map(|(_, _, r)| r).sum();
    let repos: Vec<RepoBuilder> = graph.into_iter().map(|(r, _, _)| r).collect();
    let cars: Vec<Vec<u8>> = repos.iter().map(|r| r.car_shuffled(1)).collect();
    println!("record filters: {n} repos x {per_repo} records + graph records");
    for (name, rules, wanted) in [
        ("collection filters alone", false, by_filters),
        ("with the rules", true, by_rules),
    ] {
        let (indexed, delivered, discarded, seconds) =
            rt.block_on(run_graph(&repos, &cars, wanted, rules));
        println!(
            "{name}: {wanted} records delivered ({indexed} indexed), record bytes delivered {delivered}, discarded {discarded}, {seconds:.1} s"
        );
    }
}
