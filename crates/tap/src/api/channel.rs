//! `GET /channel`: the WebSocket upgrade. In webhook mode the channel does not exist (400,
//! as the Go tap); a plain GET without an upgrade is a 400 too; beyond
//! `--max-channel-sessions` it is a 503.

use std::sync::Arc;

use axum::{
    extract::{State, WebSocketUpgrade, ws::rejection::WebSocketUpgradeRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{ApiError, ApiState};
use crate::delivery::websocket::{self, MAX_CLIENT_FRAME};

pub(super) async fn channel(
    State(state): State<ApiState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Some(hub) = state.channel.clone() else {
        return ApiError::bad_request("websocket not available in webhook mode").into_response();
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => {
            return ApiError::new(rejection.status(), rejection.body_text()).into_response();
        }
    };
    // Each session holds a slot until it ends; beyond the cap the upgrade is refused before
    // anything is sent, so a flood of sessions cannot starve delivery or memory.
    let Ok(slot) = Arc::clone(&state.channel_slots).try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many /channel sessions (--max-channel-sessions {})",
                state.max_channel_sessions
            ),
        )
        .into_response();
    };
    let stop = state.stop.clone();
    upgrade
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| async move {
            websocket::run_session(socket, hub, stop).await;
            drop(slot);
        })
}
