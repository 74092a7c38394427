//! `tap healthcheck`: one GET of a running tap's `/health`, for container health checks in
//! images without curl. Healthy means a 200 whose body says `{"status":"ok"}` within the
//! timeout; anything else is a one-line reason.

use super::Client;
use crate::config::Remote;

/// Asks `check.url`'s `/health`.
///
/// # Errors
/// Why tap is not healthy, or could not be asked, in one line.
pub async fn run(check: &Remote) -> Result<(), String> {
    let client = Client::new(check).map_err(|e| e.to_string())?;
    let answer = client.get("/health").await.map_err(|e| e.to_string())?;
    if answer["status"] == "ok" {
        Ok(())
    } else {
        Err(format!("{}health: {answer}", check.url))
    }
}
