//! `POST /repos/add`, `POST /repos/remove`, `POST /repos/resync`, `GET /repos`, `GET /info/{did}`.
//!
//! A request is validated as a whole before anything is written: one malformed DID
//! rejects the request with 400 naming it, and the store is left untouched.

use axum::{
    body::Body,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tap_atproto::syntax::{Did, Tid};

use crate::store::{RepoRow, RepoState};

use super::{ApiError, ApiState, json, read_body};

fn as_strings(dids: &[Did]) -> Vec<String> {
    dids.iter().map(|d| d.as_str().to_owned()).collect()
}

pub(super) async fn add(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let dids = read_body(&headers, body, tap_api::did_list).await?;
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
    let dids = read_body(&headers, body, tap_api::did_list).await?;
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

/// Repos per `GET /repos` page when `limit` is not given, and the most one page holds.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /repos?state=&limit=&cursor=`: tracked repos in DID order, a page at a time. The
/// answer's `cursor` (the page's last DID) asks for the next page; it is absent on the last.
pub(super) async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let wanted = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(name) => Some(RepoState::from_name(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown state {name:?}: expected pending, resyncing, active, desynchronized or error"
            ))
        })?),
    };
    let limit = match query.limit.unwrap_or(DEFAULT_PAGE) {
        0 => return Err(ApiError::bad_request("limit must be at least 1")),
        n => n.min(MAX_PAGE),
    };
    // One more than asked: whether a next page exists, so the last page has no cursor.
    let mut page = state
        .store
        .list_repos(wanted, query.cursor.as_deref().unwrap_or(""), limit + 1)
        .await
        .map_err(|error| {
            tracing::error!(%error, "Failed to list repos.");
            ApiError::internal("failed to list repos")
        })?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let cursor = more
        .then(|| page.last().map(|s| s.repo.did.to_string()))
        .flatten();
    let repos: Vec<_> = page
        .into_iter()
        .map(|s| repo_json(s.repo, s.records))
        .collect();
    let mut body = serde_json::json!({ "repos": repos });
    if let Some(cursor) = cursor {
        body["cursor"] = cursor.into();
    }
    Ok(json(StatusCode::OK, &body))
}

/// `POST /repos/resync` `{"dids": […]}`: forces a full resync of tracked repos. Answers
/// which were queued, which a worker already holds and which are not tracked.
pub(super) async fn resync(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let dids = read_body(&headers, body, tap_api::did_list).await?;
    let request = state
        .store
        .request_resync(&as_strings(&dids))
        .await
        .map_err(|error| {
            tracing::error!(%error, "Failed to request resyncs.");
            ApiError::internal("failed to request resync")
        })?;
    tracing::info!(
        queued = request.queued.len(),
        resyncing = request.resyncing.len(),
        untracked = request.untracked.len(),
        "Resync requested."
    );
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "queued": request.queued,
            "resyncing": request.resyncing,
            "untracked": request.untracked,
        }),
    ))
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
    let mut info = repo_json(repo, records);
    if state.live_unverified {
        // `--jetstream-verify none`: what arrives live is Jetstream's word.
        info["unverified"] = serde_json::Value::Bool(true);
    }
    Ok(json(StatusCode::OK, &info))
}

/// One repo as `/info/{did}` and `GET /repos` show it.
fn repo_json(repo: RepoRow, records: u64) -> serde_json::Value {
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
    info
}
