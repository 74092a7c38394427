//! `GET /channel`: the WebSocket upgrade. In webhook mode the channel does not exist (400,
//! as the Go tap); a plain GET without an upgrade is a 400 too.

use axum::{
    extract::{State, WebSocketUpgrade, ws::rejection::WebSocketUpgradeRejection},
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
    let stop = state.stop.clone();
    upgrade
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| websocket::run_session(socket, hub, stop))
}
