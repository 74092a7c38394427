//! `tap healthcheck`: one GET of a running tap's `/health`, for container health checks in
//! images without curl. Healthy means a 200 whose body says `{"status":"ok"}` within the
//! timeout; anything else is a one-line reason.

use crate::api::basic_header;
use crate::config::Healthcheck;

/// Asks `check.url`'s `/health`.
///
/// # Errors
/// Why tap is not healthy, or could not be asked, in one line.
pub async fn run(check: &Healthcheck) -> Result<(), String> {
    let url = check
        .url
        .join("/health")
        .map_err(|e| format!("{}: {e}", check.url))?;
    let client = reqwest::Client::builder()
        .timeout(check.timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let mut request = client.get(url.clone());
    if let Some(password) = &check.admin_password {
        request = request.header(
            reqwest::header::AUTHORIZATION,
            basic_header("admin", password),
        );
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("{url}: no answer: {e}"))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| format!("{url}: {e}"))?;
    let ok = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .is_some_and(|v| v["status"] == "ok");
    if status.is_success() && ok {
        Ok(())
    } else {
        let body: String = body.chars().take(200).collect();
        Err(format!("{url}: {status}: {}", body.trim()))
    }
}
