//! A loopback stand-in for a PDS: `com.atproto.sync.getRepo` serving given CAR bytes,
//! with hostile modes (an error status, a body that trickles, a body that never ends).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

/// How `getRepo` answers for one DID.
#[derive(Debug, Clone)]
pub enum RepoReply {
    /// The CAR, at full speed.
    Car(Vec<u8>),
    /// An error status with an XRPC error body.
    Status(u16),
    /// The CAR, one byte per interval.
    Trickle(Vec<u8>, Duration),
    /// A body that never ends: `prefix` once, then `chunk` forever (e.g. a CAR header
    /// followed by one well-formed block repeated without end).
    Endless {
        /// Sent first.
        prefix: Vec<u8>,
        /// Repeated forever.
        chunk: Vec<u8>,
    },
}

#[derive(Default)]
struct Shared {
    replies: Mutex<HashMap<String, RepoReply>>,
    requests: AtomicUsize,
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
            .with_state(Arc::clone(&shared));
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, shared, task }
    }

    /// `http://127.0.0.1:port` (the DID document's PDS endpoint).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets how `getRepo` answers for `did`.
    pub fn set_repo(&self, did: &str, reply: RepoReply) {
        self.shared
            .replies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(did.to_owned(), reply);
    }

    /// `getRepo` requests received.
    #[must_use]
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
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
    let reply = shared
        .replies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&did)
        .cloned();
    let car = [(header::CONTENT_TYPE, "application/vnd.ipld.car")];
    match reply {
        None => (
            StatusCode::BAD_REQUEST,
            r#"{"error":"RepoNotFound","message":"Could not find repo"}"#,
        )
            .into_response(),
        Some(RepoReply::Car(bytes)) => (car, bytes).into_response(),
        Some(RepoReply::Status(code)) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            r#"{"error":"Scripted","message":"scripted failure"}"#,
        )
            .into_response(),
        Some(RepoReply::Trickle(bytes, every)) => {
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
        Some(RepoReply::Endless { prefix, chunk }) => {
            let chunk = Bytes::from(chunk);
            let first =
                futures_util::stream::once(async move { Ok::<_, Infallible>(Bytes::from(prefix)) });
            let rest = futures_util::stream::unfold(chunk, |chunk| async move {
                tokio::task::yield_now().await;
                Some((Ok::<_, Infallible>(chunk.clone()), chunk))
            });
            (
                car,
                Body::from_stream(futures_util::StreamExt::chain(first, rest)),
            )
                .into_response()
        }
    }
}
