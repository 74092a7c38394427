//! `POST /repos/add`, `POST /repos/remove`, `GET /info/{did}`.
//!
//! A request is validated as a whole before anything is written: one malformed DID
//! rejects the request with 400 naming it, and the store is left untouched.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tap_atproto::syntax::{Did, Tid};

use super::{ApiError, ApiState, MAX_BODY_BYTES, json};

/// A slow client gets this long to send its whole body.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct DidList {
    #[serde(default)]
    dids: Option<Vec<String>>,
}

/// Reads and validates `{"dids": [...]}`: JSON content type (else 415), a size cap (413),
/// a deadline (408), well-formed JSON (400), at least one DID (400), every DID valid (400).
async fn read_did_list(headers: &HeaderMap, body: Body) -> Result<Vec<Did>, ApiError> {
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
    let dids = if bytes.is_empty() {
        Vec::new()
    } else {
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
        let list: DidList = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        list.dids.unwrap_or_default()
    };
    if dids.is_empty() {
        return Err(ApiError::bad_request(
            "no DIDs given: expected {\"dids\": [\"did:…\", …]}",
        ));
    }
    dids.iter()
        .map(|raw| {
            raw.parse::<Did>()
                .map_err(|e| ApiError::bad_request(format!("invalid DID {raw:?}: {e}")))
        })
        .collect()
}

fn as_strings(dids: &[Did]) -> Vec<String> {
    dids.iter().map(|d| d.as_str().to_owned()).collect()
}

pub(super) async fn add(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let dids = read_did_list(&headers, body).await?;
    let added = state
        .store
        .add_repos(&as_strings(&dids))
        .await
        .map_err(|error| {
            tracing::error!(%error, "Failed to add repos.");
            ApiError::internal("failed to add repos")
        })?;
    tracing::info!(requested = dids.len(), added, "Added repos.");
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn remove(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let dids = read_did_list(&headers, body).await?;
    let removed = state
        .store
        .remove_repos(&as_strings(&dids))
        .await
        .map_err(|error| {
            tracing::error!(%error, "Failed to remove repos.");
            ApiError::internal("failed to remove repos")
        })?;
    tracing::info!(requested = dids.len(), removed, "Removed repos.");
    Ok(StatusCode::OK.into_response())
}

pub(super) async fn info(
    State(state): State<ApiState>,
    Path(did): Path<String>,
) -> Result<Response, ApiError> {
    let did: Did = did
        .parse()
        .map_err(|e| ApiError::bad_request(format!("invalid DID {did:?}: {e}")))?;
    let failed = |error: crate::store::StoreError| {
        tracing::error!(%error, %did, "Failed to read repo info.");
        ApiError::internal("failed to get repo")
    };
    let repo = state
        .store
        .get_repo(did.as_str())
        .await
        .map_err(failed)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "repo not found"))?;
    let records = state
        .store
        .count_records_for(did.as_str())
        .await
        .map_err(failed)?;
    let mut info = serde_json::json!({
        "did": repo.did,
        "handle": repo.handle.unwrap_or_default(),
        "state": repo.state.as_str(),
        // The account's hosting status (active, takendown, deactivated, …), as indigo PR
        // 1262 adds it.
        "status": repo.status.as_str(),
        "rev": repo.rev.as_ref().map_or("", Tid::as_str),
        "error": repo.error,
        "retries": repo.retry_count,
        "records": records,
    });
    // Extension (issue 12), present once the repo was fetched: how, and what it cost.
    if let Some(fetch) = repo.last_fetch {
        info["last_fetch"] = serde_json::json!({
            "kind": fetch.kind.as_str(),
            "bytes": fetch.bytes,
            "at": fetch.at,
        });
    }
    Ok(json(StatusCode::OK, &info))
}
