//! A loopback stand-in for Jetstream v1 (research/sync-endpoints-as-served.md): `GET
//! /subscribe` over WebSocket with `wantedCollections` (NSIDs or `prefix.*`),
//! `wantedDids` and a `cursor` in unix microseconds (replay from it, then live), JSON text
//! events with strictly increasing `time_us`, and the client's `options_update` message.
//! It keeps a window of events (older ones are forgotten), and has knobs for hostile
//! behaviour: garbage frames, cut connections, and a stream that goes silent.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tap_atproto::mst::OpAction;
use tap_atproto::writer::CommitOutput;
use tokio::sync::broadcast;

use crate::lock;
use crate::repo_builder::RepoBuilder;

/// What one connection asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    /// `cursor`, in unix microseconds.
    pub cursor: Option<i64>,
    /// `wantedCollections`.
    pub collections: Vec<String>,
    /// `wantedDids`.
    pub dids: Vec<String>,
    /// Whether `compress=true` was asked.
    pub compress: bool,
}

impl Subscription {
    fn wants(&self, event: &Value) -> bool {
        let did = event["did"].as_str().unwrap_or_default();
        if !self.dids.is_empty() && !self.dids.iter().any(|d| d == did) {
            return false;
        }
        if event["kind"] != "commit" || self.collections.is_empty() {
            return true;
        }
        let collection = event["commit"]["collection"].as_str().unwrap_or_default();
        self.collections
            .iter()
            .any(|wanted| match wanted.strip_suffix('*') {
                Some(prefix) => collection.starts_with(prefix),
                None => wanted == collection,
            })
    }
}

#[derive(Debug, Clone)]
enum Push {
    Event(i64, Arc<String>),
    Raw(String),
    Drop,
}

#[derive(Default)]
struct Inner {
    log: Vec<(i64, Arc<String>)>,
    last_time_us: i64,
    subscriptions: Vec<Subscription>,
    options_updates: Vec<Value>,
}

struct Shared {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Push>,
    connections: AtomicUsize,
    silent: AtomicBool,
    bytes: AtomicU64,
}

/// The fake Jetstream. Dropping it stops the server.
pub struct FakeJetstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeJetstream {
    /// Starts on 127.0.0.1 on a free port.
    ///
    /// # Panics
    /// If binding loopback fails.
    pub async fn start() -> Self {
        let (live, _) = broadcast::channel(8192);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            live,
            connections: AtomicUsize::new(0),
            silent: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/subscribe", get(subscribe))
            .with_state(Arc::clone(&shared));
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:port` (what `--jetstream-url` takes).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes an event (its `time_us` is set here: now in microseconds, and always
    /// after the previous event's) and returns its `time_us`.
    pub fn publish(&self, event: Value) -> i64 {
        self.shared.publish(event)
    }

    /// Follows a real `subscribeRepos` firehose (a PDS's) and republishes it the way
    /// Jetstream does: one event per operation with the record as JSON, and `identity` and
    /// `account` events. Abort the task to stop it.
    #[must_use]
    pub fn follow_firehose(&self, subscribe_url: String) -> tokio::task::JoinHandle<()> {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(subscribe_url).await else {
                return;
            };
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut socket).await {
                let tokio_tungstenite::tungstenite::Message::Binary(data) = message else {
                    continue;
                };
                let limits = tap_atproto::firehose::FrameLimits::default();
                let Ok(frame) = tap_atproto::firehose::decode_frame(&data, &limits) else {
                    continue;
                };
                for event in jetstream_events(&frame) {
                    shared.publish(event);
                }
            }
        })
    }

    /// Publishes every operation of a commit the builder just made, one event each, all
    /// with the commit's rev (as Jetstream does); returns their `time_us`.
    pub fn publish_commit(&self, repo: &RepoBuilder, commit: &CommitOutput) -> Vec<i64> {
        commit_events(repo, commit)
            .into_iter()
            .map(|e| self.publish(e))
            .collect()
    }

    /// Sends a raw text frame (e.g. garbage) to connected subscribers, without logging it.
    pub fn push_raw(&self, text: &str) {
        let _ = self.shared.live.send(Push::Raw(text.to_owned()));
    }

    /// Cuts every connection (no close frame).
    pub fn drop_connections(&self) {
        let _ = self.shared.live.send(Push::Drop);
    }

    /// While silent, published events are logged (and replayed to a later connection) but
    /// not sent live: the connection stays open and says nothing.
    pub fn set_silent(&self, silent: bool) {
        self.shared.silent.store(silent, Ordering::SeqCst);
    }

    /// Forgets events older than `time_us`, as Jetstream does past its retention window.
    pub fn forget_before(&self, time_us: i64) {
        lock(&self.shared.inner).log.retain(|(t, _)| *t >= time_us);
    }

    /// WebSocket connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// What every connection asked for, in order.
    #[must_use]
    pub fn subscriptions(&self) -> Vec<Subscription> {
        lock(&self.shared.inner).subscriptions.clone()
    }

    /// The payloads of every `options_update` received, in order.
    #[must_use]
    pub fn options_updates(&self) -> Vec<Value> {
        lock(&self.shared.inner).options_updates.clone()
    }

    /// Text bytes written to subscribers so far.
    #[must_use]
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn publish(&self, mut event: Value) -> i64 {
        let mut inner = lock(&self.inner);
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros()),
        )
        .unwrap_or(i64::MAX);
        let time_us = now.max(inner.last_time_us + 1);
        inner.last_time_us = time_us;
        event["time_us"] = json!(time_us);
        let text = Arc::new(event.to_string());
        inner.log.push((time_us, Arc::clone(&text)));
        drop(inner);
        if !self.silent.load(Ordering::SeqCst) {
            let _ = self.live.send(Push::Event(time_us, text));
        }
        time_us
    }
}

/// What Jetstream makes of a firehose frame (without `time_us`).
fn jetstream_events(frame: &tap_atproto::firehose::Frame) -> Vec<Value> {
    use tap_atproto::firehose::{Frame, OpKind};
    match frame {
        Frame::Commit(c) => {
            let blocks = tap_atproto::car::read_car(
                c.blocks.clone(),
                tap_atproto::car::CarLimits::default(),
            )
            .map(|car| car.blocks)
            .unwrap_or_default();
            c.ops
                .iter()
                .map(|op| {
                    let (collection, rkey) = op.path.split_once('/').unwrap_or((&op.path, ""));
                    let operation = match op.action {
                        OpKind::Create => "create",
                        OpKind::Update => "update",
                        OpKind::Delete => "delete",
                    };
                    let mut body = json!({"rev": c.rev.as_str(), "operation": operation,
                        "collection": collection, "rkey": rkey});
                    if let Some(cid) = op.cid.filter(|_| op.action != OpKind::Delete) {
                        let mut text = Vec::new();
                        if let Some(bytes) = blocks.get(&cid)
                            && tap_atproto::record_to_json(bytes, &mut text).is_ok()
                        {
                            body["record"] = serde_json::from_slice(&text).unwrap_or_default();
                        }
                        body["cid"] = json!(cid.to_string());
                    }
                    json!({"did": c.repo.as_str(), "kind": "commit", "commit": body})
                })
                .collect()
        }
        Frame::Identity(i) => vec![identity_event(i.did.as_str(), "")],
        Frame::Account(a) => vec![account_event(a.did.as_str(), a.active, a.status.as_deref())],
        _ => Vec::new(),
    }
}

impl Drop for FakeJetstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Jetstream events (without `time_us`) of a commit the builder made: one per
/// operation, with the record as data-model JSON and its CID.
///
/// # Panics
/// If a created or updated record is not among the builder's blocks (it always is).
#[must_use]
#[expect(clippy::expect_used, reason = "test fixture")]
pub fn commit_events(repo: &RepoBuilder, commit: &CommitOutput) -> Vec<Value> {
    let did = repo.did().as_str();
    commit
        .ops
        .iter()
        .map(|(path, action)| {
            let (collection, rkey) = path.split_once('/').unwrap_or((path, ""));
            let (operation, cid) = match action {
                OpAction::Create { cid } => ("create", Some(cid)),
                OpAction::Update { cid, .. } => ("update", Some(cid)),
                OpAction::Delete { .. } => ("delete", None),
            };
            let mut body = json!({
                "rev": commit.commit.rev.as_str(),
                "operation": operation,
                "collection": collection,
                "rkey": rkey,
            });
            if let Some(cid) = cid {
                let bytes = repo.writer().blocks().get(cid).expect("record block");
                let mut text = Vec::new();
                tap_atproto::record_to_json(bytes, &mut text).expect("record JSON");
                body["record"] = serde_json::from_slice(&text).expect("record JSON");
                body["cid"] = json!(cid.to_string());
            }
            json!({"did": did, "kind": "commit", "commit": body})
        })
        .collect()
}

/// An `identity` event (without `time_us`).
#[must_use]
pub fn identity_event(did: &str, handle: &str) -> Value {
    json!({"did": did, "kind": "identity",
        "identity": {"did": did, "handle": handle, "seq": 1, "time": "2026-12-07T00:00:00.000Z"}})
}

/// An `account` event (without `time_us`).
#[must_use]
pub fn account_event(did: &str, active: bool, status: Option<&str>) -> Value {
    let mut account =
        json!({"did": did, "active": active, "seq": 1, "time": "2026-12-07T00:00:00.000Z"});
    if let Some(status) = status {
        account["status"] = json!(status);
    }
    json!({"did": did, "kind": "account", "account": account})
}

fn query_subscription(query: Option<&str>) -> Result<Subscription, String> {
    let mut sub = Subscription::default();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value.replace("%2A", "*").replace("%3A", ":");
        match key {
            "cursor" => {
                sub.cursor = Some(value.parse().map_err(|_| format!("bad cursor {value}"))?);
            }
            "wantedCollections" => sub.collections.push(value),
            "wantedDids" => sub.dids.push(value),
            "compress" => sub.compress = value == "true",
            "maxMessageSizeBytes" | "requireHello" => {}
            other => return Err(format!("unknown parameter {other}")),
        }
    }
    if sub.dids.len() > 10_000 || sub.collections.len() > 100 {
        return Err("too many wantedDids or wantedCollections".into());
    }
    Ok(sub)
}

async fn subscribe(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    // Invalid parameters are refused before the upgrade, as Jetstream does.
    let sub = match query_subscription(query.as_deref()) {
        Ok(sub) => sub,
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    shared.connections.fetch_add(1, Ordering::SeqCst);
    lock(&shared.inner).subscriptions.push(sub.clone());
    ws.on_upgrade(move |socket| serve_socket(socket, shared, sub))
}

async fn send(socket: &mut WebSocket, shared: &Shared, text: &str) -> bool {
    if socket.send(Message::Text(text.into())).await.is_err() {
        return false;
    }
    shared.bytes.fetch_add(text.len() as u64, Ordering::SeqCst);
    true
}

async fn serve_socket(mut socket: WebSocket, shared: Arc<Shared>, mut sub: Subscription) {
    let mut live = shared.live.subscribe();
    let backlog: Vec<(i64, Arc<String>)> = match sub.cursor {
        Some(cursor) => lock(&shared.inner)
            .log
            .iter()
            .filter(|(t, _)| *t >= cursor)
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    let mut last = 0;
    for (time_us, text) in backlog {
        let event: Value = serde_json::from_str(&text).unwrap_or_default();
        if sub.wants(&event) && !send(&mut socket, &shared, &text).await {
            return;
        }
        last = time_us;
    }
    loop {
        tokio::select! {
            push = live.recv() => match push {
                Ok(Push::Event(time_us, text)) if time_us > last => {
                    let event: Value = serde_json::from_str(&text).unwrap_or_default();
                    last = time_us;
                    if sub.wants(&event) && !send(&mut socket, &shared, &text).await {
                        return;
                    }
                }
                Ok(Push::Event(..)) => {}
                Ok(Push::Raw(text)) => if !send(&mut socket, &shared, &text).await { return },
                Ok(Push::Drop) | Err(_) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(text))) => match options_update(&text) {
                    Some(update) => {
                        lock(&shared.inner).options_updates.push(update.payload.clone());
                        sub.collections = update.collections;
                        sub.dids = update.dids;
                    }
                    // Jetstream closes the socket on a message it cannot read.
                    None => return,
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

struct OptionsUpdate {
    payload: Value,
    collections: Vec<String>,
    dids: Vec<String>,
}

fn options_update(text: &str) -> Option<OptionsUpdate> {
    let message: Value = serde_json::from_str(text).ok()?;
    if message["type"] != "options_update" {
        return None;
    }
    let payload = message.get("payload")?.clone();
    let strings = |name: &str| -> Option<Vec<String>> {
        match payload.get(name) {
            None | Some(Value::Null) => Some(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(_) => None,
        }
    };
    Some(OptionsUpdate {
        collections: strings("wantedCollections")?,
        dids: strings("wantedDids")?,
        payload,
    })
}
