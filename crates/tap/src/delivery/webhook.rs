//! Webhook delivery: a bounded pool of workers POSTs each released event's JSON to the
//! receiver. Any 2xx is the ack. Anything else is retried with capped exponential backoff
//! and jitter, while the event stays in flight (so per-DID ordering holds). Retries are
//! counted and logged by kind; redirects are not followed (a 3xx is a failure); a 4xx other than 408/429 is almost certainly a receiver
//! bug, so it is logged as a warning, but it is still retried: dropping an event would
//! break at-least-once delivery.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::DeliveryHub;
use crate::outbox::{Delivery, Input};
use crate::shutdown::Supervisor;
use crate::telemetry as t;

/// Header carrying the HMAC signature when `--webhook-secret` is set.
pub const SIGNATURE_HEADER: &str = "x-tap-signature";
/// Per-request timeout (as the Go tap).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Webhook settings.
#[derive(Clone)]
pub struct WebhookSettings {
    /// Receiver.
    pub url: Url,
    /// `Authorization` header value (Basic admin credentials), if configured.
    pub authorization: Option<String>,
    /// HMAC-SHA256 key for [`SIGNATURE_HEADER`], if configured.
    pub secret: Option<String>,
    /// Concurrent requests.
    pub parallelism: usize,
}

/// The signature header value for `body` at `unix_time`:
/// `t=<unix seconds>,sha256=<hex HMAC-SHA256(secret, "<t>.<body>")>`. Binding the time
/// lets receivers reject replays of old requests.
#[must_use]
pub fn signature(secret: &str, unix_time: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(unix_time.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_time},sha256={hex}")
}

/// The HTTP client of the webhook workers.
///
/// # Errors
/// The TLS configuration cannot be loaded.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        // A followed 301/302/303 turns the POST into a bodiless GET whose 2xx would count
        // as the ack: the event would be lost. A redirect is a failure, retried and logged.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Starts `parallelism` workers; they run until `stop` is cancelled.
pub fn spawn(
    settings: &WebhookSettings,
    client: &reqwest::Client,
    hub: &DeliveryHub,
    supervisor: &Supervisor,
    stop: &CancellationToken,
) {
    for _ in 0..settings.parallelism.max(1) {
        supervisor.spawn(
            "webhook worker",
            run_worker(client.clone(), settings.clone(), hub.clone(), stop.clone()),
        );
    }
}

async fn run_worker(
    client: reqwest::Client,
    settings: WebhookSettings,
    hub: DeliveryHub,
    stop: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            () = stop.cancelled() => return,
            d = hub.queue.recv() => match d { Ok(d) => d, Err(_) => return },
        };
        let id = delivery.id;
        if !deliver(&client, &settings, delivery, &stop).await {
            // Shutting down mid-retry: the event stays in the outbox for the next run.
            return;
        }
        hub.progress.delivered(1);
        if hub.inputs.send(Input::Acked(vec![id])).await.is_err() {
            return;
        }
    }
}

/// POSTs until a 2xx; `false` if shutdown interrupted.
async fn deliver(
    client: &reqwest::Client,
    settings: &WebhookSettings,
    delivery: Delivery,
    stop: &CancellationToken,
) -> bool {
    let body = delivery.text.into_bytes();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut request = client
            .post(settings.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &settings.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        if let Some(secret) = &settings.secret {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            request = request.header(SIGNATURE_HEADER, signature(secret, now, &body));
        }
        let outcome = tokio::select! {
            () = stop.cancelled() => return false,
            r = request.body(body.clone()).send() => r,
        };
        let kind = match outcome {
            Ok(resp) if resp.status().is_success() => {
                metrics::counter!(t::WEBHOOK_REQUESTS, "status" => "success").increment(1);
                metrics::counter!(t::EVENTS_DELIVERED).increment(1);
                return true;
            }
            Ok(resp) => {
                let status = resp.status();
                let permanent_looking = status.is_client_error()
                    && status != StatusCode::REQUEST_TIMEOUT
                    && status != StatusCode::TOO_MANY_REQUESTS;
                if permanent_looking {
                    tracing::warn!(id = delivery.id.0, %status, attempt,
                        "Webhook receiver rejected an event; retrying, but the receiver likely has a bug.");
                    "rejected"
                } else {
                    tracing::info!(id = delivery.id.0, %status, attempt, "Webhook receiver failed; retrying.");
                    "non_2xx"
                }
            }
            Err(error) => {
                tracing::info!(id = delivery.id.0, %error, attempt, "Webhook request failed; retrying.");
                "error"
            }
        };
        metrics::counter!(t::WEBHOOK_REQUESTS, "status" => kind).increment(1);
        metrics::counter!(t::WEBHOOK_RETRIES, "kind" => kind).increment(1);
        if !super::wait_to_retry(attempt, stop).await {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_time_dot_body() {
        // RFC 4231 test case 2 key/data, with our "t." prefix folded into the data.
        let sig = signature("Jefe", 0, b"what do ya want for nothing?");
        let expected = {
            let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
            let tag = hmac::sign(&key, b"0.what do ya want for nothing?");
            tag.as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_eq!(sig, format!("t=0,sha256={expected}"));
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            hmac::sign(&key, b"what do ya want for nothing?").as_ref()[..4],
            [0x5b, 0xdc, 0xc1, 0x46],
            "the primitive is standard HMAC-SHA256 (RFC 4231 case 2)"
        );
    }
}
