//! End-to-end backfill throughput: N generated repos (the realistic record mix) served by a
//! loopback PDS stand-in, tap in-process on SQLite, and one `/channel` consumer that acks
//! everything. Measures records/s from `/repos/add` until the consumer has every record.
//!
//! Parameters (environment): `BACKFILL_REPOS` (default 20), `BACKFILL_RECORDS` per repo
//! (default 5000), `BACKFILL_RUNS` (default 3), `BACKFILL_RESYNC_PARALLELISM` (default:
//! tap's), `BACKFILL_DURABLE_EVENTS` (set: store
//! every historical event, `--durable-backfill-events`), `BACKFILL_RULES` (set: a
//! record-content rule on every collection, `<collection>: $["$type"] == "<collection>"`,
//! which every record passes: the cost of judging), `BACKFILL_NAIVE_CONSUMER` (set:
//! parse every event into a JSON tree and flush every ack alone), `BACKFILL_TRACE` (set: print
//! written/delivered counts every 100 ms). Run: `cargo bench -p tap --bench backfill`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tap::store::DatabaseUrl;
use tap_testkit::fake_pds::{FakePds, RepoReply};
use tap_testkit::fake_plc::FakePlc;
use tap_testkit::fake_relay::FakeRelay;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};
use tokio_tungstenite::tungstenite::Message;

/// The two fields of a `/channel` event the consumer needs.
#[derive(serde::Deserialize)]
struct Event<'a> {
    id: u64,
    #[serde(rename = "type", borrow)]
    kind: &'a str,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run_once(repos: &[RepoBuilder], cars: &[Vec<u8>]) -> (f64, usize) {
    let relay = FakeRelay::start().await;
    let pds = FakePds::start().await;
    let plc = FakePlc::start().await;
    for (i, repo) in repos.iter().enumerate() {
        plc.publish(repo, &format!("u{i}.test"), &pds.url());
        let did = repo.did().as_str();
        pds.set_repo(did, RepoReply::Car(cars[i].clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tap::Config::defaults();
    cfg.bind = "127.0.0.1:0".into();
    cfg.database = DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
    cfg.relay_url = url::Url::parse(&relay.url()).unwrap();
    cfg.plc_url = url::Url::parse(&plc.url()).unwrap();
    cfg.handle_resolver_url = Some(url::Url::parse(&plc.url()).unwrap());
    cfg.allow_private_network = true; // the fake PDS is on loopback
    cfg.resync_parallelism = env_usize("BACKFILL_RESYNC_PARALLELISM", cfg.resync_parallelism);
    // The other design, for comparison: every historical event stored as an outbox row.
    cfg.durable_backfill_events = std::env::var("BACKFILL_DURABLE_EVENTS").is_ok();
    if std::env::var_os("BACKFILL_RULES").is_some() {
        let rules: Vec<String> = [
            "app.bsky.feed.like",
            "app.bsky.feed.repost",
            "app.bsky.graph.follow",
            "app.bsky.graph.block",
            "app.bsky.feed.post",
            "app.bsky.graph.listitem",
            "app.bsky.actor.profile",
        ]
        .iter()
        .map(|c| format!(r#"{c}: $["$type"] == "{c}""#))
        .collect();
        cfg.record_filters = tap_atproto::record_filter::RuleSet::parse(&rules).unwrap();
    }
    let app = tap::App::bind(cfg).await.unwrap();
    let addr = app.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = stop_rx.await;
    }));

    let total: usize = repos.iter().map(|r| r.records().len()).sum();
    let seen = Arc::new(AtomicUsize::new(0));
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
        .await
        .unwrap();
    let counter = Arc::clone(&seen);
    let naive = std::env::var_os("BACKFILL_NAIVE_CONSUMER").is_some();
    let consumer = tokio::spawn(async move {
        let (mut tx, mut rx) = ws.split();
        // A consumer written for throughput: each event is parsed (typed, other fields
        // skipped but still syntax-checked) and acked one by one, and the acks are
        // written out together whenever no further event is already waiting, instead of
        // one socket write per ack.
        // `BACKFILL_NAIVE_CONSUMER`: the simplest client instead, for comparison: every
        // event parsed into a JSON tree and every ack written (flushed) on its own.
        if naive {
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(text) = msg {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if v["type"] == "record" {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    let ack = json!({"type": "ack", "id": v["id"]}).to_string();
                    if tx.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
            }
            return;
        }
        while let Some(Ok(first)) = rx.next().await {
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                if let Message::Text(text) = msg {
                    let event: Event<'_> = serde_json::from_str(&text).unwrap();
                    if event.kind == "record" {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    let ack = format!(r#"{{"type":"ack","id":{}}}"#, event.id);
                    if tx.feed(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
                next = match rx.next().now_or_never() {
                    Some(Some(Ok(msg))) => Some(msg),
                    Some(_) => return,
                    None => None,
                };
            }
            if tx.flush().await.is_err() {
                return;
            }
        }
    });

    let dids: Vec<&str> = repos.iter().map(|r| r.did().as_str()).collect();
    let start = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/repos/add"))
        .json(&json!({ "dids": dids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = start + Duration::from_secs(600);
    let trace = std::env::var("BACKFILL_TRACE").is_ok();
    let http = reqwest::Client::new();
    while seen.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "backfill did not finish");
        if trace {
            let rc: serde_json::Value = http
                .get(format!("http://{addr}/stats/record-count"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            eprintln!(
                "t={:.2} written={} delivered={}",
                start.elapsed().as_secs_f64(),
                rc["record_count"],
                seen.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    consumer.abort();
    let _ = stop_tx.send(());
    let _ = task.await;
    (elapsed, total)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick run, so do one tiny iteration then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n_repos = if quick {
        2
    } else {
        env_usize("BACKFILL_REPOS", 20)
    };
    let n_records = if quick {
        50
    } else {
        env_usize("BACKFILL_RECORDS", 5000)
    };
    let runs = if quick {
        1
    } else {
        env_usize("BACKFILL_RUNS", 3)
    };
    let repos: Vec<RepoBuilder> = (0..n_repos)
        .map(|i| {
            let did = format!("did:plc:{:0>24}", format!("bench{i}"))
                .parse()
                .unwrap();
            RepoBuilder::with_records(did, TestKey::k256(i as u64 + 1), i as u64, n_records)
        })
        // The reference PDS does not write tree order: shuffled CARs exercise the spill path.
        .collect();
    let cars: Vec<Vec<u8>> = repos
        .iter()
        .enumerate()
        .map(|(i, r)| r.car_shuffled(i as u64))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rates = Vec::new();
    // One uncounted warm-up run first (page cache, allocator arenas, lazy statics): the
    // first run in a process is consistently the slowest.
    for run in 0..=runs {
        let (secs, total) = rt.block_on(run_once(&repos, &cars));
        let rate = total as f64 / secs;
        let label = if run == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {run}")
        };
        println!(
            "backfill {label}: {total} records from {n_repos} repos in {secs:.2} s = {rate:.0} records/s"
        );
        if run > 0 || quick {
            rates.push(rate);
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "backfill median: {:.0} records/s ({} repos x {} records, SQLite, ack mode)",
        rates[rates.len() / 2],
        n_repos,
        n_records
    );
}
