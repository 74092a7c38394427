//! End-to-end firehose throughput: repos backfilled first, then live `#commit` frames
//! (1–3 ops each, the realistic record mix, built and signed before timing) pushed through
//! the loopback relay stand-in, decoded, verified (signature, MST inversion), applied to
//! SQLite and delivered to one `/channel` consumer that acks everything. Measures commits/s
//! and the process's CPU seconds per 1,000 commits, from the first frame pushed until the
//! consumer has every live event.
//!
//! Parameters (environment): `FIREHOSE_REPOS` (default 50), `FIREHOSE_RECORDS` per repo
//! before the live commits (default 2,000: proofs then span a realistic tree depth and node
//! size), `FIREHOSE_COMMITS` (default 20,000). Run: `cargo bench -p tap --bench firehose`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tap::store::DatabaseUrl;
use tap_testkit::fake_pds::{FakePds, RepoReply};
use tap_testkit::fake_plc::FakePlc;
use tap_testkit::fake_relay::FakeRelay;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};
use tap_testkit::wait::poll_until;
use tokio_tungstenite::tungstenite::Message;

/// Frames pushed ahead of the consumer (the relay stand-in's broadcast holds 4,096).
const IN_FLIGHT: usize = 2_000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th, stime
    // the 15th field of the line, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n_repos = if quick {
        2
    } else {
        env_usize("FIREHOSE_REPOS", 50)
    };
    let n_records = if quick {
        20
    } else {
        env_usize("FIREHOSE_RECORDS", 2_000)
    };
    let n_commits = if quick {
        20
    } else {
        env_usize("FIREHOSE_COMMITS", 20_000)
    };
    let mut repos: Vec<RepoBuilder> = (0..n_repos)
        .map(|i| {
            let did = format!("did:plc:{:0>24}", format!("fh{i}"))
                .parse()
                .unwrap();
            RepoBuilder::with_records(did, TestKey::k256(i as u64 + 1), i as u64, n_records)
        })
        .collect();
    let cars: Vec<Vec<u8>> = repos.iter().map(RepoBuilder::car_tree_order).collect();
    let backfilled: usize = repos.iter().map(|r| r.records().len()).sum();
    // Live commits, round robin over the repos, seqs 1…n.
    let mut frames = Vec::with_capacity(n_commits);
    let mut live_events = 0;
    for seq in 1..=n_commits {
        let repo = &mut repos[seq % n_repos];
        let ops = repo.random_ops(1 + seq % 3);
        live_events += ops.len();
        repo.set_next_seq(seq as i64);
        frames.push((seq as i64, repo.commit_frame(&ops).unwrap()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
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
        cfg.database =
            DatabaseUrl::Sqlite(dir.path().join("tap.db").to_string_lossy().into_owned());
        cfg.relay_url = url::Url::parse(&relay.url()).unwrap();
        cfg.plc_url = url::Url::parse(&plc.url()).unwrap();
        cfg.handle_resolver_url = Some(url::Url::parse(&plc.url()).unwrap());
    cfg.allow_private_network = true; // the fake PDS is on loopback
        let app = tap::App::bind(cfg).await.unwrap();
        let addr = app.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stop_rx.await;
        }));

        let records = Arc::new(AtomicUsize::new(0));
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
            .await
            .unwrap();
        let counter = Arc::clone(&records);
        let consumer = tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            while let Some(Ok(msg)) = rx.next().await {
                if let Message::Text(text) = msg {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    if v["type"] == "record" {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    let ack = json!({"type": "ack", "id": v["id"]}).to_string();
                    if tx.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
            }
        });
        let dids: Vec<&str> = repos.iter().map(|r| r.did().as_str()).collect();
        reqwest::Client::new()
            .post(format!("http://{addr}/repos/add"))
            .json(&json!({ "dids": dids }))
            .send()
            .await
            .unwrap();
        poll_until("the backfill", Duration::from_secs(600), || {
            let done = records.load(Ordering::Relaxed) >= backfilled;
            async move { done.then_some(()) }
        })
        .await;

        let cpu_before = cpu_seconds();
        let start = Instant::now();
        let target = backfilled + live_events;
        let mut pushed_events = 0;
        for ((seq, frame), n_ops) in frames.into_iter().zip((1..=n_commits).map(|s| 1 + s % 3)) {
            // Stay within the relay stand-in's broadcast buffer.
            while pushed_events > records.load(Ordering::Relaxed) - backfilled + IN_FLIGHT {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            relay.push_frame(seq, frame);
            pushed_events += n_ops;
        }
        poll_until("every live event", Duration::from_secs(600), || {
            let done = records.load(Ordering::Relaxed) >= target;
            async move { done.then_some(()) }
        })
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        consumer.abort();
        let _ = stop_tx.send(());
        let _ = task.await;
        println!(
            "firehose: {n_commits} commits ({live_events} ops) over {n_repos} repos in {elapsed:.2} s = {:.0} commits/s; {:.3} cpu s per 1000 commits",
            n_commits as f64 / elapsed,
            cpu * 1000.0 / n_commits as f64
        );
    });
}
