//! The `/channel` consumer: one WebSocket session at a time, each event handed to the
//! handler and acked only after it returned `Ok`, and a new session (with backoff) whenever
//! the connection ends: a tap restart, a close frame, a network fault.
//!
//! While a handler runs, the socket is still read: pings are answered (tap drops a client
//! it does not hear from), frames that arrive are kept in order for later, and a dropped
//! connection is noticed. Its event is then not acked (there is no one to ack to): tap sends
//! it again on the next session, so nothing waits on a socket that is gone.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

use crate::{ClientError, Event};

/// Longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A consumer of one tap's `/channel`.
#[derive(Debug, Clone)]
pub struct Channel {
    base: Url,
    password: Option<String>,
}

/// How a session ended.
enum End {
    /// It had connected: reconnect at once.
    Dropped,
    /// It could not connect: back off.
    Unreachable,
}

impl Channel {
    /// The channel of the tap at `base` (e.g. `http://127.0.0.1:2480`), with its
    /// `--admin-password` if it has one.
    #[must_use]
    pub fn new(base: Url, password: Option<String>) -> Self {
        Self { base, password }
    }

    /// Hands every event to `handler` until `stop` resolves, acking each once the handler
    /// returned `Ok` (an `Err` leaves it unacked: tap sends it again after its
    /// `--retry-timeout`). Reconnects by itself, with backoff while tap is unreachable.
    ///
    /// # Errors
    /// Only what retrying cannot mend: a wrong password, a frame that is no event this
    /// client knows, a URL that is not http(s).
    pub async fn consume<H, F, E>(
        &self,
        mut handler: H,
        stop: impl Future<Output = ()>,
    ) -> Result<(), ClientError>
    where
        H: FnMut(Event) -> F,
        F: Future<Output = Result<(), E>>,
    {
        tokio::pin!(stop);
        let mut failures = 0u32;
        loop {
            let end = tokio::select! {
                () = &mut stop => return Ok(()),
                end = self.session(&mut handler) => end?,
            };
            failures = match end {
                End::Dropped => 0,
                End::Unreachable => failures.saturating_add(1),
            };
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(backoff(failures)) => {}
            }
        }
    }

    fn channel_url(&self) -> Result<Url, ClientError> {
        let mut url = self
            .base
            .join("/channel")
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let scheme = match url.scheme() {
            "http" | "ws" => "ws",
            "https" | "wss" => "wss",
            other => return Err(ClientError::Url(format!("{other}: not http(s)"))),
        };
        url.set_scheme(scheme)
            .map_err(|()| ClientError::Url(url.to_string()))?;
        Ok(url)
    }

    async fn session<H, F, E>(&self, handler: &mut H) -> Result<End, ClientError>
    where
        H: FnMut(Event) -> F,
        F: Future<Output = Result<(), E>>,
    {
        let mut request = self
            .channel_url()?
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Url(e.to_string()))?;
        if let Some(password) = &self.password {
            use base64::Engine as _;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"));
            let value = format!("Basic {token}")
                .parse()
                .map_err(|_| ClientError::Url("password not sendable in a header".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let mut ws = match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => ws,
            Err(tungstenite::Error::Http(response)) if response.status().as_u16() == 401 => {
                return Err(ClientError::Unauthorized);
            }
            Err(_) => return Ok(End::Unreachable),
        };
        let mut pending: VecDeque<String> = VecDeque::new();
        loop {
            let text = match pending.pop_front() {
                Some(text) => text,
                None => match ws.next().await {
                    Some(Ok(Message::Text(text))) => text.to_string(),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Ok(End::Dropped),
                },
            };
            let event = Event::parse(&text)?;
            let id = event.id;
            let handled = handler(event);
            tokio::pin!(handled);
            let mut dropped = false;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut handled => break outcome,
                    msg = ws.next(), if !dropped => match msg {
                        Some(Ok(Message::Text(text))) => pending.push_back(text.to_string()),
                        // tungstenite queued the pong; send it now, not at the next ack.
                        Some(Ok(Message::Ping(_))) => dropped = ws.flush().await.is_err(),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => dropped = true,
                    },
                }
            };
            if dropped {
                return Ok(End::Dropped);
            }
            if outcome.is_ok() && ws.send(Message::text(tap_api::ack(id))).await.is_err() {
                return Ok(End::Dropped);
            }
        }
    }
}

/// Wait before connection attempt `failures` + 1: none after a session that worked, then
/// 250 ms doubling to [`MAX_BACKOFF`], plus up to a quarter of it at random.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::from_millis(50);
    }
    let base = Duration::from_millis(250)
        .saturating_mul(1 << failures.min(7).saturating_sub(1))
        .min(MAX_BACKOFF);
    base + base.mul_f64(rand::random::<f64>() / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_at_once_after_a_session_and_back_off_to_ten_seconds_while_unreachable() {
        assert!(backoff(0) < Duration::from_millis(100));
        assert!(
            backoff(1) >= Duration::from_millis(250) && backoff(1) < Duration::from_millis(320)
        );
        assert!(backoff(30) >= MAX_BACKOFF && backoff(30) <= MAX_BACKOFF.mul_f64(1.25));
    }
}
