//! `GET`/`PUT /collection-filters` and `GET`/`PUT /signal-collections`, with the shape of
//! indigo PR 1338: bodies `{"collections": ["nsid", …]}`. A `PUT` is validated whole
//! before anything changes; its answer is the value now in force. `GET`/`PUT
//! /record-filters` (an extension) takes `{"rules": ["<collection>: <expression>", …]}`.

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde_json::json;

use super::{ApiError, ApiState, json, read_body};
use crate::repos::live_filters::FilterError;

fn refused(error: FilterError) -> ApiError {
    match error {
        FilterError::Invalid(message) => ApiError::bad_request(message),
        FilterError::FullNetwork => ApiError::new(StatusCode::CONFLICT, error.to_string()),
        FilterError::Store(error) => {
            tracing::error!(%error, "Failed to store a filter change.");
            ApiError::internal("failed to store the change; nothing changed")
        }
    }
}

pub(super) async fn get_collection_filters(State(state): State<ApiState>) -> Response {
    json(
        StatusCode::OK,
        &json!({ "collections": state.filters.collection_filters() }),
    )
}

pub(super) async fn put_collection_filters(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&headers, body, tap_api::collections).await?;
    let (collections, refetch) = state
        .filters
        .set_collection_filters(&raw)
        .await
        .map_err(refused)?;
    Ok(json(
        StatusCode::OK,
        &json!({ "collections": collections, "resyncing": refetch }),
    ))
}

pub(super) async fn get_record_filters(State(state): State<ApiState>) -> Response {
    json(
        StatusCode::OK,
        &json!({ "rules": state.filters.record_filters() }),
    )
}

pub(super) async fn put_record_filters(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&headers, body, tap_api::rules).await?;
    let (rules, refetch) = state
        .filters
        .set_record_filters(&raw)
        .await
        .map_err(refused)?;
    Ok(json(
        StatusCode::OK,
        &json!({ "rules": rules, "resyncing": refetch }),
    ))
}

pub(super) async fn get_signal_collections(State(state): State<ApiState>) -> Response {
    json(
        StatusCode::OK,
        &json!({ "collections": state.filters.signal_collections() }),
    )
}

pub(super) async fn put_signal_collections(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let raw = read_body(&headers, body, tap_api::collections).await?;
    let collections = state
        .filters
        .set_signal_collections(&raw)
        .await
        .map_err(refused)?;
    Ok(json(StatusCode::OK, &json!({ "collections": collections })))
}
