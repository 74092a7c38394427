//! The HTTP surface: health, repo management, info and stats, with the Go tap's routes,
//! JSON bodies and status codes. Handlers validate and translate; the store does the work.

mod auth;
mod channel;
mod filters;
mod repos;
mod resolve;
pub mod server;
mod stats;

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Serialize;

pub use auth::{AdminAuth, UNAUTHORIZED_BODY, basic_header, require_admin};

use tokio_util::sync::CancellationToken;

use crate::delivery::DeliveryHub;
use crate::identity::Identity;
use crate::ledger::Ledger;
use crate::repos::live_filters::FilterControl;
use crate::status::Progress;
use crate::status::board::StatusBoard;
use crate::store::Store;

/// Largest request body accepted (a `/repos/add` of ~100k DIDs).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// What the handlers need, cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// The state store.
    pub store: Store,
    /// Live progress (firehose position), shared with the pipeline.
    pub progress: Arc<Progress>,
    /// Builds `/status.json`.
    pub board: Arc<StatusBoard>,
    /// Relay URL as configured: the key of stored cursors.
    pub relay_url: String,
    /// `--light-rail-url`, when signal collections are listed there (the key of their
    /// enumeration cursor).
    pub light_rail_url: Option<String>,
    /// The name of the live cursor in `/stats/cursors`: `firehose` or `jetstream`.
    pub live_cursor: &'static str,
    /// Live records are delivered unchecked (`--jetstream-verify none`): `/info` says so.
    pub live_unverified: bool,
    /// The collection filters and signal collections, readable and changeable at runtime
    /// (also picks which enumeration cursor `/stats/cursors` reports).
    pub filters: Arc<FilterControl>,
    /// Where `/channel` sessions take events from; `None` in webhook mode.
    pub channel: Option<DeliveryHub>,
    /// Cancelled when `/channel` sessions must end (shutdown).
    pub stop: CancellationToken,
    /// One permit per `/channel` session (`--max-channel-sessions`).
    pub channel_slots: Arc<tokio::sync::Semaphore>,
    /// The cap, for the refusal's message.
    pub max_channel_sessions: usize,
    /// The cached identity resolver behind `/resolve/{did}`.
    pub identity: Identity,
    /// Downloaded bytes, for `/stats/bandwidth`.
    pub ledger: Ledger,
    /// The first task that ended unexpectedly, if any (tap is then shutting down).
    pub failure: tokio::sync::watch::Receiver<Option<crate::shutdown::TaskFailure>>,
}

/// Builds the router. Admin auth, when configured, wraps every route and the fallbacks.
pub fn router(state: ApiState, auth: Option<AdminAuth>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/channel", get(channel::channel))
        .route("/repos/add", post(repos::add))
        .route("/repos/remove", post(repos::remove))
        .route("/repos/resync", post(repos::resync))
        .route("/repos", get(repos::list))
        .route("/info/{did}", get(repos::info))
        .route("/resolve/{did}", get(resolve::resolve))
        .route("/stats/repo-count", get(stats::repo_count))
        .route("/stats/record-count", get(stats::record_count))
        .route("/stats/outbox-buffer", get(stats::outbox_buffer))
        .route("/stats/resync-buffer", get(stats::resync_buffer))
        .route("/stats/cursors", get(stats::cursors))
        .route("/stats/bandwidth", get(stats::bandwidth))
        .route("/status.json", get(stats::status))
        .route("/status/history", get(stats::history))
        .route("/", get(status_page))
        .route("/status", get(status_page))
        .route(
            "/collection-filters",
            get(filters::get_collection_filters).put(filters::put_collection_filters),
        )
        .route(
            "/record-filters",
            get(filters::get_record_filters).put(filters::put_record_filters),
        )
        .route(
            "/signal-collections",
            get(filters::get_signal_collections).put(filters::put_signal_collections),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::from_fn_with_state(auth, auth::require_admin))
}

/// `{"status":"ok"}` while every stage runs; 503 naming the stage once one has failed
/// (tap is then shutting down).
async fn health(State(state): State<ApiState>) -> Response {
    match state.failure.borrow().as_ref() {
        None => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        Some(failure) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "error", "error": failure.to_string(), "stage": failure.task}),
        ),
    }
}

/// The status page: one self-contained HTML file (no CDN, no external fonts) that reads
/// `/status.json`, `/status/history` and `/info/{did}` from the same origin.
async fn status_page() -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("status_page.html"),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "Not Found").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed").into_response()
}

/// A slow client gets this long to send its whole body.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A body decoded by `decode` (one of `tap_api`'s) after the rules of [`read_json_body`];
/// what `decode` refuses is a `400` with its message.
pub(crate) async fn read_body<T>(
    headers: &HeaderMap,
    body: Body,
    decode: fn(&[u8]) -> Result<T, tap_api::BodyError>,
) -> Result<T, ApiError> {
    let bytes = read_json_body(headers, body).await?;
    decode(&bytes).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Reads a request body meant to be JSON: within a deadline (else 408), at most
/// [`MAX_BODY_BYTES`] (413), and, when not empty, with a JSON content type (415).
async fn read_json_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let bytes =
        match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY_BYTES)).await
        {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                ));
            }
            Ok(Err(_)) => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY_BYTES} bytes"),
                ));
            }
            Ok(Ok(bytes)) => bytes,
        };
    if !bytes.is_empty() {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type",
            ));
        }
    }
    Ok(bytes)
}

/// A JSON response terminated by a newline, as the Go tap (echo) writes them.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
        }
        Err(_) => ApiError::internal("Internal Server Error").into_response(),
    }
}

/// An error answered as `{"message": …}` with its status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 500 with a fixed message; the cause is logged, never shown.
    pub fn internal(message: &str) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json(self.status, &serde_json::json!({ "message": self.message }))
    }
}
