//! Shared by the sync-engine scenarios: the loopback network (fake relay, PDS, PLC), a
//! consumer that acks everything, and condition waits over tap's HTTP API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tap::Config;
use tap_atproto::syntax::Did;
use tap_testkit::fake_pds::{FakePds, RepoReply};
use tap_testkit::fake_plc::FakePlc;
use tap_testkit::fake_relay::FakeRelay;
use tap_testkit::repo_builder::RepoBuilder;
use tap_testkit::wait::poll_until;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{TestDb, TestTap, test_config};

pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Some`, or panics after `WAIT` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until(what, WAIT, check).await
}

pub struct Net {
    pub relay: FakeRelay,
    pub pds: FakePds,
    pub plc: FakePlc,
}

impl Net {
    pub async fn start() -> Self {
        Self {
            relay: FakeRelay::start().await,
            pds: FakePds::start().await,
            plc: FakePlc::start().await,
        }
    }

    pub fn config(&self, db: &TestDb) -> Config {
        let mut cfg = test_config(db);
        cfg.relay_url = url::Url::parse(&self.relay.url()).unwrap();
        cfg.plc_url = url::Url::parse(&self.plc.url()).unwrap();
        cfg.handle_resolver_url = Some(url::Url::parse(&self.plc.url()).unwrap());
        cfg.cursor_save_interval = Duration::from_millis(50);
        cfg
    }

    /// Publishes `repo`'s identity and serves `car` as its `getRepo` answer.
    pub fn host(&self, repo: &RepoBuilder, handle: &str, car: Vec<u8>) {
        self.publish(repo, handle);
        self.pds.set_repo(repo.did().as_str(), RepoReply::Car(car));
    }

    /// Publishes `repo`'s DID document (Multikey form) and handle.
    pub fn publish(&self, repo: &RepoBuilder, handle: &str) {
        self.plc.publish(repo, handle, &self.pds.url());
    }
}

pub fn did(n: u32) -> Did {
    format!("did:plc:{:0>24}", format!("test{n}"))
        .parse()
        .unwrap()
}

/// A `/channel` consumer that acks everything and keeps what it received.
pub struct Consumer {
    events: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    pub async fn connect(tap: &TestTap) -> Self {
        Self::connect_addr(tap.addr).await
    }

    pub async fn connect_addr(addr: std::net::SocketAddr) -> Self {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink_events = Arc::clone(&events);
        let task = ack_all(addr, move |v| sink_events.lock().unwrap().push(v)).await;
        Self { events, task }
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    pub fn records(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["type"] == "record")
            .map(|e| e["record"].clone())
            .collect()
    }

    pub async fn wait_records(&self, n: usize) -> Vec<Value> {
        wait_for(&format!("{n} record events"), || async {
            let r = self.records();
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

/// Reads `/channel` at `addr`, hands each event to `keep`, then acks it; until the
/// connection ends or the task is aborted.
pub async fn ack_all(
    addr: std::net::SocketAddr,
    mut keep: impl FnMut(Value) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/channel"))
        .await
        .unwrap();
    tokio::spawn(async move {
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if let Message::Text(text) = msg {
                let v: Value = serde_json::from_str(&text).unwrap();
                let id = v["id"].as_u64().unwrap();
                keep(v);
                let ack = json!({"type": "ack", "id": id}).to_string();
                if tx.send(Message::Text(ack.into())).await.is_err() {
                    return;
                }
            }
        }
    })
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// POSTs `{"dids": [did]}` to `path` (`/repos/add`, `/repos/remove`, `/repos/resync`),
/// expecting a 200; the answer's body.
pub async fn post_did(tap: &TestTap, path: &str, did: &Did) -> String {
    let resp = reqwest::Client::new()
        .post(tap.url(path))
        .json(&json!({"dids": [did.as_str()]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.text().await.unwrap()
}

pub async fn add(tap: &TestTap, did: &Did) {
    post_did(tap, "/repos/add", did).await;
}

/// A record event's `collection/rkey`.
pub fn record_path(record: &Value) -> String {
    format!(
        "{}/{}",
        record["collection"].as_str().unwrap(),
        record["rkey"].as_str().unwrap()
    )
}

/// Adds `repo` and waits until `consumer` has every record of it and the repo is active.
pub async fn backfill(tap: &TestTap, consumer: &Consumer, repo: &RepoBuilder) {
    add(tap, repo.did()).await;
    consumer.wait_records(repo.records().len()).await;
    wait_state(tap, repo.did(), "active").await;
}

pub async fn info(tap: &TestTap, did: &Did) -> Value {
    reqwest::get(tap.url(&format!("/info/{did}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A JSON answer of tap's API.
pub async fn get_json(tap: &TestTap, path: &str) -> Value {
    reqwest::get(tap.url(path))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The byte ledger's total (`/stats/bandwidth`).
pub async fn bandwidth_total(tap: &TestTap) -> Value {
    let bw: Value = reqwest::get(tap.url("/stats/bandwidth"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    bw["total"].clone()
}

pub async fn wait_state(tap: &TestTap, did: &Did, state: &str) -> Value {
    wait_for(&format!("{did} to be {state}"), || async {
        let i = info(tap, did).await;
        (i["state"] == state).then_some(i)
    })
    .await
}

pub fn paths_and_cids(records: &[Value]) -> BTreeMap<String, String> {
    records
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r["collection"].as_str().unwrap(),
                    r["rkey"].as_str().unwrap()
                ),
                r["cid"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

pub fn expected(repo: &RepoBuilder) -> BTreeMap<String, String> {
    repo.records()
        .iter()
        .map(|(p, c)| (p.clone(), c.to_string()))
        .collect()
}

/// An `#identity` frame for `did` at `seq`.
pub fn identity_frame(seq: i64, did: &Did) -> Vec<u8> {
    tap_atproto::writer::encode_frame(
        "#identity",
        &json!({"seq": seq, "did": did.as_str(), "time": "2024-06-01T00:00:00.000Z"}),
    )
}
