//! A loopback stand-in for a relay: `subscribeRepos` over WebSocket (a replayable log of
//! frames, resumed by cursor, plus frames pushed live) and the `listRepos` /
//! `listReposByCollection` enumeration endpoints, with knobs for hostile behaviour
//! (garbage frames, connections cut mid-stream).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// What a connected subscriber receives.
#[derive(Debug, Clone)]
enum Push {
    Frame(i64, Bytes),
    Raw(Bytes),
    Drop,
}

#[derive(Default)]
struct Inner {
    log: Vec<(i64, Bytes)>,
    /// Pages served by the list endpoints: key = "" (listRepos) or the collection.
    pages: HashMap<String, Vec<Value>>,
    list_requests: Vec<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Push>,
    connections: AtomicUsize,
    cursors: Mutex<Vec<Option<i64>>>,
    /// WebSocket message bytes written to subscribers, and listing page bytes.
    firehose_bytes: AtomicU64,
    listing_bytes: AtomicU64,
}

/// The fake relay. Dropping it stops the server.
pub struct FakeRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRelay {
    /// Starts on 127.0.0.1 on a free port.
    ///
    /// # Panics
    /// If binding loopback fails.
    pub async fn start() -> Self {
        let (live, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            live,
            connections: AtomicUsize::new(0),
            firehose_bytes: AtomicU64::new(0),
            listing_bytes: AtomicU64::new(0),
            cursors: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/xrpc/com.atproto.sync.subscribeRepos", get(subscribe))
            .route("/xrpc/com.atproto.sync.listRepos", get(list_repos))
            .route(
                "/xrpc/com.atproto.sync.listReposByCollection",
                get(list_by_collection),
            )
            .with_state(Arc::clone(&shared));
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:port` (what `--relay-url` takes).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends a frame to the log and sends it to connected subscribers.
    pub fn push_frame(&self, seq: i64, frame: Vec<u8>) {
        let bytes = Bytes::from(frame);
        lock(&self.shared.inner).log.push((seq, bytes.clone()));
        let _ = self.shared.live.send(Push::Frame(seq, bytes));
    }

    /// Sends raw bytes (e.g. garbage) to connected subscribers, without logging them.
    pub fn push_raw(&self, bytes: Vec<u8>) {
        let _ = self.shared.live.send(Push::Raw(Bytes::from(bytes)));
    }

    /// Firehose message bytes written to subscribers so far (a message counts once written,
    /// whether or not the subscriber read it).
    #[must_use]
    pub fn firehose_bytes(&self) -> u64 {
        self.shared.firehose_bytes.load(Ordering::SeqCst)
    }

    /// Listing page bytes served so far.
    #[must_use]
    pub fn listing_bytes(&self) -> u64 {
        self.shared.listing_bytes.load(Ordering::SeqCst)
    }

    /// Cuts every connection (no close frame).
    pub fn drop_connections(&self) {
        let _ = self.shared.live.send(Push::Drop);
    }

    /// WebSocket connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The `cursor` parameter of every connection, in order.
    #[must_use]
    pub fn cursors(&self) -> Vec<Option<i64>> {
        lock(&self.shared.cursors).clone()
    }

    /// Sets the pages of `listRepos` (`collection = None`) or `listReposByCollection`
    /// (several collections asked at once: joined by commas): page `i` answers cursor
    /// `"i"` (no cursor = page 0); the last page has no cursor.
    pub fn set_pages(&self, collection: Option<&str>, pages: Vec<Vec<Value>>) {
        let n = pages.len();
        let bodies = pages
            .into_iter()
            .enumerate()
            .map(|(i, repos)| {
                if i + 1 < n {
                    json!({"cursor": (i + 1).to_string(), "repos": repos})
                } else {
                    json!({"repos": repos})
                }
            })
            .collect();
        lock(&self.shared.inner)
            .pages
            .insert(collection.unwrap_or("").to_owned(), bodies);
    }

    /// Query strings of list requests received so far.
    #[must_use]
    pub fn list_requests(&self) -> Vec<String> {
        lock(&self.shared.inner).list_requests.clone()
    }
}

impl Drop for FakeRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn subscribe(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let cursor = q.get("cursor").and_then(|c| c.parse::<i64>().ok());
    shared.connections.fetch_add(1, Ordering::SeqCst);
    lock(&shared.cursors).push(cursor);
    ws.on_upgrade(move |socket| serve_socket(socket, shared, cursor))
}

async fn serve_socket(mut socket: WebSocket, shared: Arc<Shared>, cursor: Option<i64>) {
    // Subscribe before reading the log so nothing falls between the two.
    let mut live = shared.live.subscribe();
    let backlog: Vec<(i64, Bytes)> = lock(&shared.inner)
        .log
        .iter()
        .filter(|(seq, _)| cursor.is_none_or(|c| *seq > c))
        .cloned()
        .collect();
    let mut last = cursor.unwrap_or(0);
    for (seq, frame) in backlog {
        let len = frame.len() as u64;
        if socket.send(Message::Binary(frame)).await.is_err() {
            return;
        }
        shared.firehose_bytes.fetch_add(len, Ordering::SeqCst);
        last = last.max(seq);
    }
    loop {
        tokio::select! {
            push = live.recv() => match push {
                Ok(Push::Frame(seq, frame)) if seq > last => {
                    let len = frame.len() as u64;
                    if socket.send(Message::Binary(frame)).await.is_err() {
                        return;
                    }
                    shared.firehose_bytes.fetch_add(len, Ordering::SeqCst);
                    last = seq;
                }
                Ok(Push::Frame(..)) => {}
                Ok(Push::Raw(bytes)) => {
                    let len = bytes.len() as u64;
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                    shared.firehose_bytes.fetch_add(len, Ordering::SeqCst);
                }
                Ok(Push::Drop) | Err(_) => return,
            },
            msg = socket.recv() => if msg.is_none() { return },
        }
    }
}

async fn list_repos(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    page(&shared, "", &q)
}

/// `listReposByCollection`; a `collection` given several times (as Lightrail takes it)
/// answers the pages set for the collections joined by commas.
async fn list_by_collection(
    State(shared): State<Arc<Shared>>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let collections: Vec<&str> = raw
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("collection="))
        .collect();
    let mut q = q;
    let key = collections.join(",");
    q.insert("collection".into(), key.clone());
    page(&shared, &key, &q)
}

fn page(shared: &Shared, key: &str, q: &HashMap<String, String>) -> Response {
    let mut inner = lock(&shared.inner);
    let mut query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
    query.sort();
    inner.list_requests.push(query.join("&"));
    let index = q
        .get("cursor")
        .and_then(|c| c.parse::<usize>().ok())
        .unwrap_or(0);
    let body = inner
        .pages
        .get(key)
        .and_then(|p| p.get(index))
        .cloned()
        .unwrap_or_else(|| json!({"repos": []}));
    drop(inner);
    let text = body.to_string();
    shared
        .listing_bytes
        .fetch_add(text.len() as u64, Ordering::SeqCst);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}
