//! The relay connection: `subscribeRepos` over WebSocket, resumed from the cursor, with
//! keep-alive pings and capped, jittered reconnect backoff (also after a connection that
//! drops at once or sends garbage, so a broken relay is never hammered).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tap_atproto::firehose::{Frame, FrameLimits, decode_frame, salvage_frame};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::Work;
use crate::backoff::Backoff;
use crate::ledger::{Ledger, Source};
use crate::live::Opened;
use crate::live::cursor::SeqTracker;
use crate::live::dispatch::Dispatcher;
use crate::status::Progress;
use crate::telemetry as t;

/// Interval of client pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A connection silent for this long is considered dead.
pub const READ_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait between reconnects.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Largest WebSocket message accepted from the relay.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Builds `ws(s)://host/xrpc/com.atproto.sync.subscribeRepos[?cursor=N]` from the relay URL.
#[must_use]
pub fn subscribe_url(relay: &Url, cursor: Option<i64>) -> Url {
    let mut url = relay.clone();
    let scheme = if relay.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    // `set_scheme` refuses http→ws on "special" schemes; rebuild from the string instead.
    let rebuilt = format!(
        "{scheme}://{}/xrpc/com.atproto.sync.subscribeRepos",
        &relay[url::Position::BeforeHost..url::Position::AfterPort]
    );
    if let Ok(u) = Url::parse(&rebuilt) {
        url = u;
    }
    if let Some(c) = cursor.filter(|c| *c > 0) {
        url.query_pairs_mut().append_pair("cursor", &c.to_string());
    }
    url
}

/// Reconnect delay after `failures` consecutive bad connections: 1, 2, 4 … 30 s, plus up
/// to a second of jitter.
#[must_use]
pub fn backoff(failures: u32, jitter_ms: u64) -> Duration {
    let doubling = Backoff {
        first: Duration::from_secs(1),
        max: MAX_BACKOFF,
    };
    doubling.with_jitter(
        failures.saturating_sub(1),
        jitter_ms,
        Duration::from_secs(1),
    )
}

/// Why a connection ended.
#[derive(Debug)]
enum Ended {
    Stopped,
    Failed { frames: u64, reason: String },
}

/// Follows the relay until `stop` is cancelled. `start_cursor` is where the first
/// connection starts; reconnects resume from the low-water mark of `seqs`.
pub async fn run_consumer(
    relay: Url,
    start_cursor: Option<i64>,
    dispatcher: Dispatcher<Work>,
    seqs: Arc<Mutex<SeqTracker>>,
    ledger: Ledger,
    progress: Arc<Progress>,
    stop: CancellationToken,
) {
    let limits = FrameLimits::default();
    let mut failures = 0u32;
    let mut cursor = start_cursor;
    loop {
        let url = subscribe_url(&relay, cursor);
        tracing::info!(%url, "Connecting to the relay firehose.");
        let ended =
            connect_and_read(&url, &limits, &dispatcher, &seqs, &ledger, &progress, &stop).await;
        progress.set_firehose_connected(false);
        match ended {
            Ended::Stopped => return,
            Ended::Failed { frames, reason } => {
                // A connection that carried events was healthy; one that dropped at once
                // or sent garbage was not, and the backoff keeps growing.
                if frames > 0 {
                    failures = 1;
                } else {
                    failures = failures.saturating_add(1);
                }
                metrics::counter!(t::FIREHOSE_RECONNECTS).increment(1);
                let delay = backoff(failures, rand::random::<u64>());
                tracing::warn!(
                    reason,
                    frames,
                    ?delay,
                    "Firehose connection ended; reconnecting."
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
        cursor = seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .low_water_mark();
    }
}

async fn connect_and_read(
    url: &Url,
    limits: &FrameLimits,
    dispatcher: &Dispatcher<Work>,
    seqs: &Mutex<SeqTracker>,
    ledger: &Ledger,
    progress: &Progress,
    stop: &CancellationToken,
) -> Ended {
    let failed = |frames: u64, reason: String| Ended::Failed { frames, reason };
    let socket = match crate::live::open_socket(url, MAX_MESSAGE_BYTES, READ_TIMEOUT, stop).await {
        Opened::Socket(socket) => socket,
        Opened::Stopped => return Ended::Stopped,
        Opened::Failed(reason) => return failed(0, reason),
    };
    progress.set_firehose_connected(true);
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut frames = 0u64;
    let mut last_heard = Instant::now();
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            _ = ping.tick() => {
                if last_heard.elapsed() > READ_TIMEOUT {
                    return failed(frames, "relay silent too long".into());
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    return failed(frames, "ping failed".into());
                }
                continue;
            }
            msg = stream.next() => msg,
        };
        last_heard = Instant::now();
        let data = match msg {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(text))) => {
                ledger.downloaded(Source::Relay, None, text.len() as u64);
                // Not part of the protocol; skipping it loses nothing that has a seq.
                metrics::counter!(t::FIREHOSE_BAD_FRAMES).increment(1);
                tracing::warn!(bytes = text.len(), "Relay sent a text frame; skipped.");
                continue;
            }
            Some(Ok(Message::Close(_))) | None => {
                return failed(frames, "relay closed the connection".into());
            }
            Some(Err(e)) => return failed(frames, e.to_string()),
        };
        ledger.downloaded(Source::Relay, None, data.len() as u64);
        metrics::counter!(t::original::FIREHOSE_EVENTS_RECEIVED).increment(1);
        metrics::counter!(t::original::REPO_STREAM_EVENTS_RECEIVED).increment(1);
        metrics::counter!(t::original::REPO_STREAM_BYTES).increment(data.len() as u64);
        let frame = match decode_frame(&data, limits) {
            Ok(f) => f,
            Err(e) => {
                // Ending the connection would resume below this frame and read it again
                // forever: skip it, and resync its repo so nothing it carried is lost.
                frames += 1;
                if !refuse(&data, &e.to_string(), dispatcher, seqs, stop).await {
                    return Ended::Stopped;
                }
                continue;
            }
        };
        frames += 1;
        let did = match &frame {
            Frame::Commit(c) => c.repo.as_str().to_owned(),
            Frame::Sync(s) => s.did.as_str().to_owned(),
            Frame::Identity(i) => i.did.as_str().to_owned(),
            Frame::Account(a) => a.did.as_str().to_owned(),
            Frame::Info(info) => {
                tracing::warn!(name = %info.name, message = ?info.message, "Relay info frame.");
                continue;
            }
            Frame::Error(err) => {
                tracing::warn!(error = %err.error, message = ?err.message, "Relay error frame.");
                continue;
            }
            Frame::Unknown { t } => {
                tracing::debug!(%t, "Ignoring a frame of unknown type.");
                continue;
            }
        };
        let lag = lag_seconds(&frame);
        if let Some(lag) = lag {
            metrics::gauge!(t::FIREHOSE_LAG_SECONDS).set(lag);
        }
        progress.firehose_event(lag.map(|s| (s * 1000.0) as i64));
        if let Some(seq) = frame.seq() {
            seqs.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .start(seq);
            metrics::gauge!(t::FIREHOSE_LAST_SEQ).set(seq as f64);
        }
        let dispatched = tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            ok = dispatcher.dispatch(&did, Work::frame(frame)) => ok,
        };
        if !dispatched {
            return Ended::Stopped;
        }
    }
}

/// Skips a frame the decoder refused: counted, logged with its seq, and its repo (when its
/// DID can be read) handed to the repo's worker to be desynchronized, in order with the
/// repo's other events; the cursor passes the frame once that is recorded. `false` when
/// the workers are gone.
async fn refuse(
    data: &[u8],
    reason: &str,
    dispatcher: &Dispatcher<Work>,
    seqs: &Mutex<SeqTracker>,
    stop: &CancellationToken,
) -> bool {
    metrics::counter!(t::FIREHOSE_BAD_FRAMES).increment(1);
    let salvaged = salvage_frame(data);
    tracing::warn!(
        seq = ?salvaged.seq,
        did = ?salvaged.did.as_ref().map(tap_atproto::syntax::Did::as_str),
        bytes = data.len(),
        reason,
        "Undecodable firehose frame skipped."
    );
    let Some(did) = salvaged.did else {
        // Nothing to resync; a readable seq still moves the cursor past it.
        if let Some(seq) = salvaged.seq {
            let mut seqs = seqs.lock().unwrap_or_else(PoisonError::into_inner);
            seqs.start(seq);
            seqs.finish(seq);
        }
        return true;
    };
    if let Some(seq) = salvaged.seq {
        seqs.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .start(seq);
    }
    let work = Work::Refused {
        seq: salvaged.seq,
        did: did.as_str().to_owned(),
        reason: reason.to_owned(),
    };
    tokio::select! {
        () = stop.cancelled() => false,
        ok = dispatcher.dispatch(did.as_str(), work) => ok,
    }
}

/// Seconds between the event's `time` and now (how far behind the relay we are).
fn lag_seconds(frame: &Frame) -> Option<f64> {
    let time = match frame {
        Frame::Commit(c) => &c.time,
        Frame::Sync(s) => &s.time,
        Frame::Identity(i) => &i.time,
        Frame::Account(a) => &a.time,
        _ => return None,
    };
    let event = unix_seconds(time)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64();
    Some((now - event).max(0.0))
}

/// Parses the `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` timestamps relays send.
fn unix_seconds(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    if b.len() < 20 || b.get(4) != Some(&b'-') || b.get(10) != Some(&b'T') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac = format!("0.{}", s.get(start..i)?).parse().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let off = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    #[expect(
        clippy::cast_precision_loss,
        reason = "timestamps fit f64 exactly for centuries"
    )]
    Some(secs as f64 + frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_url_maps_http_to_ws_and_adds_the_cursor_only_when_positive() {
        let relay = Url::parse("https://relay1.us-east.bsky.network").unwrap();
        assert_eq!(
            subscribe_url(&relay, None).as_str(),
            "wss://relay1.us-east.bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        assert_eq!(
            subscribe_url(&relay, Some(0)).as_str(),
            "wss://relay1.us-east.bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
        let local = Url::parse("http://127.0.0.1:2583/some/path").unwrap();
        assert_eq!(
            subscribe_url(&local, Some(42)).as_str(),
            "ws://127.0.0.1:2583/xrpc/com.atproto.sync.subscribeRepos?cursor=42"
        );
    }

    #[test]
    fn backoff_grows_to_thirty_seconds_without_overflow() {
        let secs: Vec<u64> = (1..=8).map(|f| backoff(f, 0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX, 0), MAX_BACKOFF);
    }

    #[test]
    fn relay_timestamps_parse_to_unix_seconds() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            unix_seconds("2024-10-07T12:00:00.500Z"),
            Some(1_728_302_400.5)
        );
        assert_eq!(
            unix_seconds("2024-10-07T14:00:00+02:00"),
            Some(1_728_302_400.0)
        );
        assert_eq!(unix_seconds("not a time"), None);
    }
}
