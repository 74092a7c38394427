//! `GET /stats/*`: row counts and cursors, with the Go tap's keys.

use axum::{extract::State, http::StatusCode, response::Response};
use serde_json::json;

use super::{ApiError, ApiState, json};
use crate::config::TrackingScope;
use crate::status::history::Span;
use crate::store::{Store, StoreError};

async fn count(
    state: &ApiState,
    key: &str,
    what: &str,
    f: impl AsyncFnOnce(&Store) -> Result<u64, StoreError>,
) -> Result<Response, ApiError> {
    match f(&state.store).await {
        Ok(n) => Ok(json(StatusCode::OK, &json!({ key: n }))),
        Err(error) => {
            tracing::error!(%error, "Failed to count {what}.");
            Err(ApiError::internal(&format!("failed to get {what}")))
        }
    }
}

pub(super) async fn repo_count(State(state): State<ApiState>) -> Result<Response, ApiError> {
    count(&state, "repo_count", "repo count", async |s| {
        s.repo_count().await
    })
    .await
}

pub(super) async fn record_count(State(state): State<ApiState>) -> Result<Response, ApiError> {
    count(&state, "record_count", "record count", async |s| {
        s.record_count().await
    })
    .await
}

pub(super) async fn outbox_buffer(State(state): State<ApiState>) -> Result<Response, ApiError> {
    // Events of a first backfill delivered from memory are backlog too.
    let in_memory = state.progress.in_memory_events();
    count(&state, "outbox_buffer", "outbox buffer", async |s| {
        Ok(s.outbox_count().await? + in_memory)
    })
    .await
}

pub(super) async fn resync_buffer(State(state): State<ApiState>) -> Result<Response, ApiError> {
    count(&state, "resync_buffer", "resync buffer", async |s| {
        s.resync_buffer_count().await
    })
    .await
}

/// `{"firehose": <last processed seq>, "list_repos": "<enumeration cursor>"}`; with
/// Jetstream, `"jetstream": <last processed time_us>` instead of `"firehose"` (as indigo
/// PR 1398 reports it).
pub(super) async fn cursors(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let scope = state.filters.live().current();
    let list_repos = match (scope.tracking(), &state.light_rail_url) {
        (TrackingScope::Dynamic, _) => Ok(None),
        (TrackingScope::FullNetwork, _) => state.store.list_repos_cursor(&state.relay_url).await,
        (TrackingScope::SignalCollections(collections), Some(light_rail)) => {
            state
                .store
                .collection_cursor(light_rail, &crate::crawler::listing_name(collections))
                .await
        }
        (TrackingScope::SignalCollections(collections), None) => match collections.first() {
            Some(first) => {
                state
                    .store
                    .collection_cursor(&state.relay_url, first.as_str())
                    .await
            }
            None => Ok(None),
        },
    };
    let list_repos = list_repos.map_err(|error| {
        tracing::error!(%error, "Failed to read the list repos cursor.");
        ApiError::internal("failed to get list repos cursor")
    })?;
    let mut body = serde_json::Map::new();
    body.insert(
        state.live_cursor.into(),
        json!(state.progress.firehose_seq()),
    );
    body.insert("list_repos".into(), json!(list_repos.unwrap_or_default()));
    Ok(json(StatusCode::OK, &body))
}

/// `GET /stats/bandwidth`: every downloaded byte by source, PDS host and collection
/// ([`crate::ledger`]).
pub(super) async fn bandwidth(State(state): State<ApiState>) -> Response {
    json(StatusCode::OK, &state.ledger.report())
}

/// `GET /status.json`: the status document (extension, issue 14).
pub(super) async fn status(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let doc = state.board.document().await.map_err(|error| {
        tracing::error!(%error, "Failed to build the status document.");
        ApiError::internal("failed to read the status")
    })?;
    Ok(json(StatusCode::OK, &doc))
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct HistoryQuery {
    span: Option<String>,
}

/// `GET /status/history?span=hour|day|week`: the status page's chart points.
pub(super) async fn history(
    State(state): State<ApiState>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let name = query.span.unwrap_or_else(|| "hour".into());
    let span = Span::from_name(&name).ok_or_else(|| {
        ApiError::bad_request(format!("unknown span {name:?}: expected hour, day or week"))
    })?;
    let points = state.board.history(span).await.map_err(|error| {
        tracing::error!(%error, "Failed to read the status history.");
        ApiError::internal("failed to read the status history")
    })?;
    Ok(json(
        StatusCode::OK,
        &json!({"span": name, "step_seconds": span.step_minutes() * 60, "points": points}),
    ))
}
