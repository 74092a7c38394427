//! A loopback stand-in for a PDS: `com.atproto.sync.getRepo` serving given CAR bytes,
//! with hostile modes (an error status, a body that trickles, a body that never ends), and,
//! for a repo given as a well-formed CAR, the calls of a sparse fetch answered from its
//! blocks the way `@atproto/pds` answers them (`getLatestCommit`, `getBlocks`,
//! `describeRepo`, `getRecord` proofs, `getRepoStatus`, and `getRepo?since=` over the CARs it was given before; see
//! research/sync-endpoints-as-served.md). It counts requests and the
//! body bytes it sends, per endpoint, so tests can check tap's byte ledger against it.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tap_atproto::Cid;
use tap_atproto::car::{CarLimits, read_car, write_car_block, write_car_header};
use tap_atproto::commit::Commit;
use tap_atproto::hash::BlockMap;
use tap_atproto::mst::walk_tree_collect;

/// How `getRepo` answers for one DID.
#[derive(Debug, Clone)]
pub enum RepoReply {
    /// The CAR, at full speed.
    Car(Vec<u8>),
    /// An error status with an XRPC error body.
    Status(u16),
    /// The CAR, one byte per interval.
    Trickle(Vec<u8>, Duration),
    /// `car` with `junk` bytes of distinct unreferenced blocks between its header and its
    /// blocks, generated while they are sent: a gigabyte of it costs no memory here.
    JunkAhead {
        /// A whole CAR (header and blocks).
        car: Vec<u8>,
        /// Bytes of junk blocks to put after its header, rounded up to whole blocks.
        junk: u64,
    },
    /// A body that never ends: `prefix` once, then `chunk` forever (e.g. a CAR header
    /// followed by one well-formed block repeated without end).
    Endless {
        /// The status answered (200, or an error status whose body never ends).
        status: u16,
        /// Sent first.
        prefix: Vec<u8>,
        /// Repeated forever.
        chunk: Vec<u8>,
    },
}

/// The XRPC methods the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `com.atproto.sync.getRepo`.
    GetRepo,
    /// `com.atproto.sync.getLatestCommit`.
    GetLatestCommit,
    /// `com.atproto.sync.getBlocks`.
    GetBlocks,
    /// `com.atproto.repo.describeRepo`.
    DescribeRepo,
    /// `com.atproto.sync.getRecord`.
    GetRecord,
    /// `com.atproto.sync.getRepoStatus`.
    GetRepoStatus,
}

/// A repo's blocks, read from the CAR it was given.
/// What `getRepo` serves for a DID: a CAR (shared, never copied per request) or a scripted
/// behaviour.
#[derive(Clone)]
enum Serving {
    Car(Bytes),
    Other(RepoReply),
}

struct Parsed {
    commit: Cid,
    rev: String,
    blocks: BlockMap,
    collections: Vec<String>,
}

/// Bytes and requests served for one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests answered.
    pub requests: u64,
    /// Response body bytes sent.
    pub bytes: u64,
}

#[derive(Default)]
struct Shared {
    replies: Mutex<HashMap<String, Serving>>,
    /// Repos read block by block, on first need (`None`: the CAR is not a readable repo).
    parsed: Mutex<HashMap<String, Option<Arc<Parsed>>>>,
    /// Methods answered 501 `MethodNotImplemented`, like a PDS that lacks them.
    unsupported: Mutex<HashSet<Endpoint>>,
    /// `getBlocks` and `getRepo?since=` answers leave these CIDs out, as a lying PDS might.
    withheld: Mutex<HashSet<Cid>>,
    /// `getRepo?since=` answers leave these CIDs out (still served by `getBlocks`).
    omitted_from_diffs: Mutex<HashSet<Cid>>,
    /// `getBlocks` and `getRepo?since=` answers carry other bytes under these CIDs (blocks
    /// that do not hash).
    corrupted: Mutex<HashSet<Cid>>,
    served: Mutex<HashMap<Endpoint, Served>>,
    /// `getRepoStatus` answers for accounts that are not active: DID → status.
    inactive: Mutex<HashMap<String, String>>,
    requests: AtomicUsize,
    /// Every CAR served for a DID, oldest first, for `getRepo?since=`.
    history: Mutex<HashMap<String, Vec<Bytes>>>,
}

impl Shared {
    fn count(&self, endpoint: Endpoint, bytes: usize) {
        let mut served = lock(&self.served);
        let entry = served.entry(endpoint).or_default();
        entry.requests += 1;
        entry.bytes += bytes as u64;
    }

    /// The repo's blocks, read from its CAR the first time a block-level call needs them.
    fn parsed(&self, did: &str) -> Option<Arc<Parsed>> {
        let mut cache = lock(&self.parsed);
        if let Some(known) = cache.get(did) {
            return known.clone();
        }
        let car = match lock(&self.replies).get(did) {
            Some(Serving::Car(car)) => car.clone(),
            _ => return None,
        };
        let parsed = parse_repo(car).map(Arc::new);
        cache.insert(did.to_owned(), parsed.clone());
        parsed
    }

    fn is_unsupported(&self, endpoint: Endpoint) -> bool {
        lock(&self.unsupported).contains(&endpoint)
    }
}

/// Reads a repo CAR's commit, rev, blocks and collections; `None` for bytes that are not a
/// readable repo (hostile CARs are served by `getRepo` only).
fn parse_repo(car: Bytes) -> Option<Parsed> {
    // Zero-copy: the blocks are slices of the CAR the fake already holds.
    let car = read_car(car, CarLimits::default()).ok()?;
    let commit = *car.roots.first()?;
    let decoded = Commit::decode(car.blocks.get(&commit)?).ok()?;
    let keys = walk_tree_collect(&decoded.data, &car.blocks).ok()?;
    let mut collections: Vec<String> = keys
        .iter()
        .filter_map(|(k, _)| k.split_once('/').map(|(c, _)| c.to_owned()))
        .collect();
    collections.dedup();
    Some(Parsed {
        commit,
        rev: decoded.rev.as_str().to_owned(),
        blocks: car.blocks,
        collections,
    })
}

/// The fake PDS. Dropping it stops the server.
pub struct FakePds {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePds {
    /// Starts on 127.0.0.1 on a free port.
    ///
    /// # Panics
    /// If binding loopback fails.
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/xrpc/com.atproto.sync.getRepo", get(get_repo))
            .route(
                "/xrpc/com.atproto.sync.getLatestCommit",
                get(get_latest_commit),
            )
            .route("/xrpc/com.atproto.sync.getBlocks", get(get_blocks))
            .route("/xrpc/com.atproto.repo.describeRepo", get(describe_repo))
            .route("/xrpc/com.atproto.sync.getRecord", get(get_record))
            .route("/xrpc/com.atproto.sync.getRepoStatus", get(get_repo_status))
            .with_state(Arc::clone(&shared));
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:port` (the DID document's PDS endpoint).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets how `getRepo` answers for `did`. A [`RepoReply::Car`] that reads as a repo is
    /// also served block by block (`getLatestCommit`, `getBlocks`, `describeRepo`).
    pub fn set_repo(&self, did: &str, reply: RepoReply) {
        let serving = match reply {
            RepoReply::Car(bytes) => {
                let bytes = Bytes::from(bytes);
                lock(&self.shared.history)
                    .entry(did.to_owned())
                    .or_default()
                    .push(bytes.clone());
                Serving::Car(bytes)
            }
            other => Serving::Other(other),
        };
        lock(&self.shared.replies).insert(did.to_owned(), serving);
        lock(&self.shared.parsed).remove(did);
    }

    /// `getRepoStatus` says `did` is not active, for `status` (`None`: active again).
    pub fn set_account_status(&self, did: &str, status: Option<&str>) {
        let mut inactive = lock(&self.shared.inactive);
        match status {
            Some(s) => inactive.insert(did.to_owned(), s.to_owned()),
            None => inactive.remove(did),
        };
    }

    /// Answers `endpoint` with 501 `MethodNotImplemented` from now on.
    pub fn set_unsupported(&self, endpoint: Endpoint) {
        lock(&self.shared.unsupported).insert(endpoint);
    }

    /// Leaves `cid` out of every `getBlocks` and `getRepo?since=` answer (a PDS that lies by
    /// omission).
    pub fn withhold_block(&self, cid: Cid) {
        lock(&self.shared.withheld).insert(cid);
    }

    /// Leaves `cid` out of every `getRepo?since=` answer but still serves it through
    /// `getBlocks`, as an honest PDS does for a block it wrote before `since`.
    pub fn omit_from_diffs(&self, cid: Cid) {
        lock(&self.shared.omitted_from_diffs).insert(cid);
    }

    /// Serves `cid` with altered bytes in every `getBlocks` and `getRepo?since=` answer (a
    /// block that does not hash to its CID).
    pub fn corrupt_block(&self, cid: Cid) {
        lock(&self.shared.corrupted).insert(cid);
    }

    /// `getRepo` requests received.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests and body bytes served for `endpoint`.
    #[must_use]
    pub fn served(&self, endpoint: Endpoint) -> Served {
        lock(&self.shared.served)
            .get(&endpoint)
            .copied()
            .unwrap_or_default()
    }

    /// Body bytes served over every endpoint.
    #[must_use]
    pub fn bytes_served(&self) -> u64 {
        lock(&self.shared.served).values().map(|s| s.bytes).sum()
    }
}

impl Drop for FakePds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn get_repo(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let did = q.get("did").cloned().unwrap_or_default();
    let reply = lock(&shared.replies).get(&did).cloned();
    let car = [(header::CONTENT_TYPE, "application/vnd.ipld.car")];
    if let (Some(Serving::Car(_)), Some(since)) = (&reply, q.get("since"))
        && let Some(diff) = since_car(&shared, &did, since)
    {
        shared.count(Endpoint::GetRepo, diff.len());
        return (car, diff).into_response();
    }
    let reply = match reply {
        Some(Serving::Car(bytes)) => {
            shared.count(Endpoint::GetRepo, bytes.len());
            return (car, bytes).into_response();
        }
        Some(Serving::Other(reply)) => Some(reply),
        None => None,
    };
    match reply {
        None => (
            StatusCode::BAD_REQUEST,
            r#"{"error":"RepoNotFound","message":"Could not find repo"}"#,
        )
            .into_response(),
        Some(RepoReply::Car(bytes)) => {
            shared.count(Endpoint::GetRepo, bytes.len());
            (car, bytes).into_response()
        }
        Some(RepoReply::Status(code)) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            r#"{"error":"Scripted","message":"scripted failure"}"#,
        )
            .into_response(),
        Some(RepoReply::Trickle(bytes, every)) => {
            // Counted when it starts: what is served is decided, only slowly sent.
            shared.count(Endpoint::GetRepo, bytes.len());
            let stream = futures_util::stream::unfold(0usize, move |i| {
                let bytes = bytes.clone();
                async move {
                    if i >= bytes.len() {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((
                        Ok::<_, Infallible>(Bytes::copy_from_slice(&bytes[i..=i])),
                        i + 1,
                    ))
                }
            });
            (car, Body::from_stream(stream)).into_response()
        }
        Some(RepoReply::JunkAhead { car: whole, junk }) => {
            use futures_util::StreamExt as _;
            let (header, blocks) = split_car_header(whole);
            let count = junk.div_ceil(crate::repo_builder::JUNK_BLOCK as u64);
            shared.count(
                Endpoint::GetRepo,
                header.len() + blocks.len() + usize::try_from(junk).unwrap_or(usize::MAX),
            );
            let junk = futures_util::stream::iter(0..count)
                .map(|i| Ok::<_, Infallible>(Bytes::from(crate::repo_builder::junk_block(i))));
            let body = futures_util::stream::once(async move { Ok(Bytes::from(header)) })
                .chain(junk)
                .chain(futures_util::stream::once(async move {
                    Ok(Bytes::from(blocks))
                }));
            (car, Body::from_stream(body)).into_response()
        }
        Some(RepoReply::Endless {
            status,
            prefix,
            chunk,
        }) => {
            let chunk = Bytes::from(chunk);
            let first =
                futures_util::stream::once(async move { Ok::<_, Infallible>(Bytes::from(prefix)) });
            let rest = futures_util::stream::unfold(chunk, |chunk| async move {
                tokio::task::yield_now().await;
                Some((Ok::<_, Infallible>(chunk.clone()), chunk))
            });
            (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                car,
                Body::from_stream(futures_util::StreamExt::chain(first, rest)),
            )
                .into_response()
        }
    }
}

/// A CAR's header (its length varint included) and the blocks after it.
fn split_car_header(mut car: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let mut len = 0usize;
    let mut at = 0;
    for (i, byte) in car.iter().enumerate() {
        len |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            at = i + 1;
            break;
        }
    }
    let blocks = car.split_off((at + len).min(car.len()));
    (car, blocks)
}

/// An XRPC error answer, counted like any other body.
fn xrpc_error(shared: &Shared, endpoint: Endpoint, status: StatusCode, body: String) -> Response {
    shared.count(endpoint, body.len());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_reply(shared: &Shared, endpoint: Endpoint, value: &serde_json::Value) -> Response {
    let body = value.to_string();
    shared.count(endpoint, body.len());
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn not_implemented(shared: &Shared, endpoint: Endpoint) -> Option<Response> {
    shared.is_unsupported(endpoint).then(|| {
        xrpc_error(
            shared,
            endpoint,
            StatusCode::NOT_IMPLEMENTED,
            r#"{"error":"MethodNotImplemented","message":"Method Not Implemented"}"#.to_owned(),
        )
    })
}

fn repo_not_found(shared: &Shared, endpoint: Endpoint, did: &str) -> Response {
    xrpc_error(
        shared,
        endpoint,
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": "RepoNotFound", "message": format!("Could not find repo for DID: {did}")})
            .to_string(),
    )
}

async fn get_latest_commit(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    const EP: Endpoint = Endpoint::GetLatestCommit;
    if let Some(r) = not_implemented(&shared, EP) {
        return r;
    }
    let did = query_values(q.as_deref(), "did").pop().unwrap_or_default();
    match shared.parsed(&did) {
        Some(p) => json_reply(
            &shared,
            EP,
            &serde_json::json!({"cid": p.commit.to_string(), "rev": p.rev}),
        ),
        None => repo_not_found(&shared, EP, &did),
    }
}

async fn get_blocks(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    const EP: Endpoint = Endpoint::GetBlocks;
    if let Some(r) = not_implemented(&shared, EP) {
        return r;
    }
    let did = query_values(q.as_deref(), "did").pop().unwrap_or_default();
    let Some(p) = shared.parsed(&did) else {
        return repo_not_found(&shared, EP, &did);
    };
    let mut cids: Vec<Cid> = Vec::new();
    for text in query_values(q.as_deref(), "cids") {
        match Cid::try_from(text.as_str()) {
            Ok(cid) => cids.push(cid),
            Err(_) => {
                return xrpc_error(
                    &shared,
                    EP,
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "InvalidRequest", "message": format!("invalid cid: {text}")}).to_string(),
                );
            }
        }
    }
    // Duplicates removed, blocks in CID order, as the reference PDS answers.
    cids.sort_by_key(|c| c.to_bytes());
    cids.dedup();
    let withheld = lock(&shared.withheld).clone();
    let missing: Vec<String> = cids
        .iter()
        .filter(|c| !p.blocks.contains_key(*c) || withheld.contains(*c))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() && withheld.is_empty() {
        return xrpc_error(
            &shared,
            EP,
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "InvalidRequest", "message": format!("Could not find cids: {}", missing.join(","))}).to_string(),
        );
    }
    let mut out = Vec::new();
    write_car_header(&mut out, &[]);
    shared.write_blocks(
        &mut out,
        cids.iter().filter_map(|c| p.blocks.get(c).map(|b| (c, b))),
    );
    shared.count(EP, out.len());
    ([(header::CONTENT_TYPE, "application/vnd.ipld.car")], out).into_response()
}

/// `getRepoStatus`: `{did, active, status?, rev}` for a repo it serves.
async fn get_repo_status(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    const EP: Endpoint = Endpoint::GetRepoStatus;
    let did = query_values(q.as_deref(), "did").pop().unwrap_or_default();
    let Some(p) = shared.parsed(&did) else {
        return repo_not_found(&shared, EP, &did);
    };
    let inactive = lock(&shared.inactive).get(&did).cloned();
    let mut body = serde_json::json!({"did": did, "active": inactive.is_none(), "rev": p.rev});
    if let Some(status) = inactive {
        body["status"] = serde_json::json!(status);
    }
    json_reply(&shared, EP, &body)
}

/// `getRecord` as the reference PDS answers it: a CAR rooted at the head commit with the
/// commit, the record when present, and the MST nodes on its path (a proof of absence
/// when the record is not there). Withheld and corrupted blocks apply.
async fn get_record(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    const EP: Endpoint = Endpoint::GetRecord;
    if let Some(r) = not_implemented(&shared, EP) {
        return r;
    }
    let value = |name| query_values(q.as_deref(), name).pop().unwrap_or_default();
    let did = value("did");
    let Some(p) = shared.parsed(&did) else {
        return repo_not_found(&shared, EP, &did);
    };
    let path = format!("{}/{}", value("collection"), value("rkey"));
    let cids = match tap_atproto::proof::record_proof_blocks(&p.commit, &p.blocks, &path) {
        Ok(cids) => cids,
        Err(e) => {
            return xrpc_error(
                &shared,
                EP,
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "InvalidRequest", "message": e.to_string()})
                    .to_string(),
            );
        }
    };
    let mut out = Vec::new();
    write_car_header(&mut out, &[p.commit]);
    shared.write_blocks(
        &mut out,
        cids.iter().filter_map(|c| p.blocks.get(c).map(|b| (c, b))),
    );
    shared.count(EP, out.len());
    ([(header::CONTENT_TYPE, "application/vnd.ipld.car")], out).into_response()
}

/// `getRepo?since=<rev>` as the reference PDS answers it: the blocks written after `since`,
/// here the current repo's blocks that no CAR served at a rev up to `since` had (the full
/// CAR when there was none); rooted at the current commit, which itself is left out when it
/// is not newer. `None` when the repo is not a readable CAR.
fn since_car(shared: &Shared, did: &str, since: &str) -> Option<Vec<u8>> {
    let current = shared.parsed(did)?;
    let history = lock(&shared.history).get(did).cloned().unwrap_or_default();
    let omitted = lock(&shared.omitted_from_diffs).clone();
    let mut before: HashSet<Cid> = HashSet::new();
    let mut known = false;
    for car in history {
        if let Some(old) = parse_repo(car)
            && old.rev.as_str() <= since
        {
            known = true;
            before.extend(old.blocks.keys().copied());
        }
    }
    let mut out = Vec::new();
    write_car_header(&mut out, &[current.commit]);
    shared.write_blocks(
        &mut out,
        current
            .blocks
            .iter()
            .filter(|(cid, _)| !known || !(before.contains(*cid) || omitted.contains(*cid))),
    );
    Some(out)
}

impl Shared {
    /// Appends `blocks` to a CAR body, leaving out withheld ones and altering corrupted ones.
    fn write_blocks<'a>(
        &self,
        out: &mut Vec<u8>,
        blocks: impl Iterator<Item = (&'a Cid, &'a Bytes)>,
    ) {
        let withheld = lock(&self.withheld).clone();
        let corrupted = lock(&self.corrupted).clone();
        for (cid, block) in blocks.filter(|(c, _)| !withheld.contains(*c)) {
            if corrupted.contains(cid) {
                let mut lie = block.to_vec();
                if let Some(last) = lie.last_mut() {
                    *last ^= 0xff;
                }
                write_car_block(out, cid, &lie);
            } else {
                write_car_block(out, cid, block);
            }
        }
    }
}

async fn describe_repo(State(shared): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    const EP: Endpoint = Endpoint::DescribeRepo;
    if let Some(r) = not_implemented(&shared, EP) {
        return r;
    }
    let did = query_values(q.as_deref(), "repo").pop().unwrap_or_default();
    match shared.parsed(&did) {
        Some(p) => json_reply(
            &shared,
            EP,
            &serde_json::json!({
                "handle": "handle.invalid",
                "did": did,
                "didDoc": {},
                "collections": p.collections,
                "handleIsCorrect": false,
            }),
        ),
        None => repo_not_found(&shared, EP, &did),
    }
}

/// Every value of `name` in a query string, percent-decoded (repeated keys kept in order).
fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
