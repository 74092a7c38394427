//! A fake PLC directory that is also a did:web host, a handle host and a `resolveHandle`
//! endpoint: one axum server on 127.0.0.1:0 whose answers a test sets per [`Route`], with
//! knobs for status codes, delays, oversized bodies, holding requests, and request counting.
//!
//! Routes:
//! - `GET /{did}` (any Host): the PLC directory ([`Route::Plc`]).
//! - `GET /.well-known/did.json` with `Host: {host}`: a did:web document ([`Route::WebDoc`]).
//! - `GET /.well-known/atproto-did` with `Host: {handle}` ([`Route::HandleWellKnown`]).
//! - `GET /xrpc/com.atproto.identity.resolveHandle?handle=…` ([`Route::ResolveHandle`]).
//!
//! Unset routes answer 404, except `resolveHandle`, which answers 400 `HandleNotFound` as a
//! PDS does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tap_atproto::PublicKey;
use tap_atproto::crypto::KeyType;
use tokio::sync::watch;

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// `GET /{did}` from the PLC directory.
    Plc(String),
    /// `GET https://{host}/.well-known/did.json`.
    WebDoc(String),
    /// `GET https://{handle}/.well-known/atproto-did`.
    HandleWellKnown(String),
    /// `GET /xrpc/com.atproto.identity.resolveHandle?handle={handle}`.
    ResolveHandle(String),
}

/// How a route answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this JSON.
    Json(Value),
    /// 200 with this text.
    Text(String),
    /// This status with a small JSON error body.
    Status(u16),
    /// 200 with this JSON document grown to about this many bytes by `alsoKnownAs`
    /// entries, made for each request: a thousand large documents cost no memory while
    /// they are set.
    Padded(Value, usize),
    /// 200 with a body of this many bytes, streamed in 64 KiB chunks without a
    /// `Content-Length` (so only a streaming cap can stop it).
    Oversized(usize),
}

#[derive(Default)]
struct Config {
    replies: HashMap<Route, Reply>,
    delays: HashMap<Route, Duration>,
    counts: HashMap<Route, usize>,
    total: usize,
    /// Response body bytes sent (every route).
    bytes: u64,
    last_user_agent: Option<String>,
}

struct Shared {
    config: Mutex<Config>,
    /// `true` while requests are held (they wait until it becomes `false`).
    held: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running fake. Dropping it stops the server.
pub struct FakePlc {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakePlc {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakePlc {
    /// Binds 127.0.0.1:0 and starts serving.
    ///
    /// # Panics
    /// If the loopback listener cannot be bound.
    #[expect(
        clippy::expect_used,
        reason = "a test fixture: failing loudly is the point"
    )]
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            config: Mutex::new(Config::default()),
            held: watch::channel(false).0,
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// `http://127.0.0.1:{port}`, for `--plc-url` and `--handle-resolver-url`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address (the loopback override for did:web and well-known requests).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets how `route` answers.
    pub fn set(&self, route: Route, reply: Reply) {
        self.shared.lock().replies.insert(route, reply);
    }

    /// Serves `doc` as the PLC document of `did`.
    pub fn set_plc_doc(&self, did: &str, doc: Value) {
        self.set(Route::Plc(did.to_owned()), Reply::Json(doc));
    }

    /// Makes `handle` resolve to `did`, both through its well-known file and `resolveHandle`.
    pub fn set_handle(&self, handle: &str, did: &str) {
        self.set(
            Route::HandleWellKnown(handle.to_owned()),
            Reply::Text(did.to_owned()),
        );
        self.set(
            Route::ResolveHandle(handle.to_owned()),
            Reply::Json(json!({ "did": did })),
        );
    }

    /// Delays every answer of `route` (the request is counted on arrival).
    pub fn set_delay(&self, route: Route, delay: Duration) {
        self.shared.lock().delays.insert(route, delay);
    }

    /// Holds every request (counted on arrival) until [`release`](Self::release).
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Lets held requests, and later ones, through.
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    /// Requests received for `route` so far.
    #[must_use]
    pub fn requests(&self, route: &Route) -> usize {
        self.shared.lock().counts.get(route).copied().unwrap_or(0)
    }

    /// Requests received in total (unknown paths included).
    #[must_use]
    pub fn total_requests(&self) -> usize {
        self.shared.lock().total
    }

    /// Response body bytes sent so far, over every route.
    #[must_use]
    pub fn bytes_served(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// Publishes `repo`'s DID document (its key as a `Multikey`, `pds` as its PDS) and
    /// `handle` pointing back to it, as a real PLC directory and handle would.
    pub fn publish(&self, repo: &crate::repo_builder::RepoBuilder, handle: &str, pds: &str) {
        let did = repo.did().as_str();
        let multikey = repo
            .key()
            .did_key()
            .trim_start_matches("did:key:")
            .to_owned();
        self.set_plc_doc(
            did,
            json!({
                "id": did,
                "alsoKnownAs": [format!("at://{handle}")],
                "verificationMethod": [{
                    "id": format!("{did}#atproto"),
                    "type": "Multikey",
                    "controller": did,
                    "publicKeyMultibase": multikey,
                }],
                "service": [{
                    "id": "#atproto_pds",
                    "type": "AtprotoPersonalDataServer",
                    "serviceEndpoint": pds,
                }],
            }),
        );
        self.set_handle(handle, did);
    }

    /// The `User-Agent` of the latest request.
    #[must_use]
    pub fn last_user_agent(&self) -> Option<String> {
        self.shared.lock().last_user_agent.clone()
    }

    /// Waits until `route` has received at least `n` requests; `false` after `timeout`.
    pub async fn wait_for_requests(&self, route: &Route, n: usize, timeout: Duration) -> bool {
        crate::wait::try_poll_until(timeout, || {
            let reached = self.requests(route) >= n;
            async move { reached.then_some(()) }
        })
        .await
        .is_some()
    }
}

fn route_of(uri: &Uri, headers: &HeaderMap, query: &HashMap<String, String>) -> Option<Route> {
    let host = || {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
    };
    match uri.path() {
        "/.well-known/did.json" => host().map(Route::WebDoc),
        "/.well-known/atproto-did" => host().map(Route::HandleWellKnown),
        "/xrpc/com.atproto.identity.resolveHandle" => {
            query.get("handle").cloned().map(Route::ResolveHandle)
        }
        path => path
            .strip_prefix('/')
            .filter(|p| p.starts_with("did:"))
            .map(|p| Route::Plc(p.to_owned())),
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let route = route_of(&uri, &headers, &query);
    let (reply, delay) = {
        let mut config = shared.lock();
        config.total += 1;
        config.last_user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match &route {
            Some(route) => {
                *config.counts.entry(route.clone()).or_default() += 1;
                (
                    config.replies.get(route).cloned(),
                    config.delays.get(route).copied(),
                )
            }
            None => (None, None),
        }
    };
    let mut held = shared.held.subscribe();
    let _ = held.wait_for(|h| !*h).await;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let (response, bytes) = match (reply, route) {
        (Some(reply), _) => render(reply),
        (None, Some(Route::ResolveHandle(_))) => json_body(
            StatusCode::BAD_REQUEST,
            &json!({"error": "HandleNotFound", "message": "Unable to resolve handle"}),
        ),
        (None, _) => render(Reply::Status(404)),
    };
    shared.lock().bytes += bytes;
    response
}

/// A JSON answer and its body length.
fn json_body(status: StatusCode, value: &Value) -> (Response, u64) {
    let text = value.to_string();
    let len = text.len() as u64;
    (
        (status, [(header::CONTENT_TYPE, "application/json")], text).into_response(),
        len,
    )
}

fn render(reply: Reply) -> (Response, u64) {
    match reply {
        Reply::Json(value) => json_body(StatusCode::OK, &value),
        Reply::Padded(mut doc, size) => {
            // Aliases of 106 bytes each as JSON (a label of 90), numbered so none repeats.
            let room = size.saturating_sub(doc.to_string().len());
            let aliases = (0..room / 106)
                .map(|i| json!(format!("at://{i:0>90}.example")))
                .collect();
            doc["alsoKnownAs"] = Value::Array(aliases);
            json_body(StatusCode::OK, &doc)
        }
        Reply::Text(text) => {
            let len = text.len() as u64;
            (text.into_response(), len)
        }
        Reply::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_body(status, &json!({"message": "fake answer"}))
        }
        Reply::Oversized(len) => {
            const CHUNK: usize = 64 * 1024;
            let chunks = (0..len.div_ceil(CHUNK)).map(move |i| {
                let n = CHUNK.min(len - i * CHUNK);
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b' '; n]))
            });
            (
                Response::new(Body::from_stream(futures_util::stream::iter(chunks))),
                len as u64,
            )
        }
    }
}

/// A test key in the encodings DID documents use.
#[derive(Debug, Clone)]
pub struct TestKey {
    /// The parsed key, to compare against what a resolver returns.
    pub public: PublicKey,
    /// `Multikey` value (`z` + base58btc of multicodec ‖ compressed point).
    pub multikey: String,
    /// `did:key:` form.
    pub did_key: String,
    /// Legacy `publicKeyMultibase` (`z` + base58btc of the bare uncompressed point), as the
    /// reference PLC directory serves with `EcdsaSecp256k1VerificationKey2019`.
    pub legacy_multibase: String,
    /// The legacy verification-method type for this curve.
    pub legacy_type: &'static str,
}

/// A deterministic K-256 key (`seed` must not be 0).
///
/// # Panics
/// If `seed` is 0.
#[must_use]
#[expect(
    clippy::expect_used,
    reason = "a test fixture: failing loudly is the point"
)]
pub fn k256_key(seed: u8) -> TestKey {
    let signing = k256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("valid K-256 scalar");
    let point = signing.verifying_key().to_sec1_point(false);
    test_key(
        KeyType::K256,
        point.as_bytes(),
        "EcdsaSecp256k1VerificationKey2019",
    )
}

/// A deterministic P-256 key (`seed` must not be 0).
///
/// # Panics
/// If `seed` is 0.
#[must_use]
#[expect(
    clippy::expect_used,
    reason = "a test fixture: failing loudly is the point"
)]
pub fn p256_key(seed: u8) -> TestKey {
    let signing = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("valid P-256 scalar");
    let point = signing.verifying_key().to_sec1_point(false);
    test_key(
        KeyType::P256,
        point.as_bytes(),
        "EcdsaSecp256r1VerificationKey2019",
    )
}

#[expect(
    clippy::expect_used,
    reason = "a test fixture: failing loudly is the point"
)]
fn test_key(key_type: KeyType, uncompressed: &[u8], legacy_type: &'static str) -> TestKey {
    let public = PublicKey::from_sec1(key_type, uncompressed).expect("a point on the curve");
    TestKey {
        multikey: public.to_multikey(),
        did_key: public.to_did_key(),
        legacy_multibase: format!("z{}", base58(uncompressed)),
        legacy_type,
        public,
    }
}

/// How the `#atproto` key appears in a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    /// `"type": "Multikey"`.
    Multikey,
    /// The legacy type with a bare point.
    Legacy,
}

/// An atproto DID document: `at://{handle}` in `alsoKnownAs`, the `#atproto` key in the
/// given form, the `#atproto_pds` service. `None` parts are left out.
#[must_use]
pub fn did_doc(
    did: &str,
    handle: Option<&str>,
    key: Option<(&TestKey, KeyForm)>,
    pds: Option<&str>,
) -> Value {
    let mut doc = json!({
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
            "https://w3id.org/security/suites/secp256k1-2019/v1"
        ],
        "id": did,
    });
    if let Some(handle) = handle {
        doc["alsoKnownAs"] = json!([format!("at://{handle}")]);
    }
    if let Some((key, form)) = key {
        let (method_type, value) = match form {
            KeyForm::Multikey => ("Multikey", key.multikey.as_str()),
            KeyForm::Legacy => (key.legacy_type, key.legacy_multibase.as_str()),
        };
        doc["verificationMethod"] = json!([{
            "id": format!("{did}#atproto"),
            "type": method_type,
            "controller": did,
            "publicKeyMultibase": value,
        }]);
    }
    if let Some(pds) = pds {
        doc["service"] = json!([{
            "id": "#atproto_pds",
            "type": "AtprotoPersonalDataServer",
            "serviceEndpoint": pds,
        }]);
    }
    doc
}

/// Base58 (Bitcoin alphabet) encoding, for legacy key values.
fn base58(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    // Little-endian base-58 digits of the big-endian input number.
    let mut digits: Vec<u8> = Vec::new();
    for &byte in bytes {
        let mut carry = u32::from(byte);
        for digit in &mut digits {
            carry += u32::from(*digit) << 8;
            *digit = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    std::iter::repeat_n('1', zeros)
        .chain(
            digits
                .iter()
                .rev()
                .map(|d| ALPHABET[usize::from(*d)] as char),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base58_matches_known_vectors() {
        assert_eq!(base58(b""), "");
        assert_eq!(base58(&[0, 0, 1]), "112");
        assert_eq!(base58(b"hello world"), "StV1DL6CwTryKyV");
    }

    #[test]
    fn legacy_and_multikey_forms_parse_to_the_same_key() {
        for key in [k256_key(7), p256_key(7)] {
            let legacy =
                PublicKey::from_verification_method(key.legacy_type, &key.legacy_multibase)
                    .unwrap();
            let multi = PublicKey::from_verification_method("Multikey", &key.multikey).unwrap();
            assert_eq!(legacy, key.public);
            assert_eq!(multi, key.public);
        }
    }
}
