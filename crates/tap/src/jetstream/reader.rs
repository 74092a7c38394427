//! The Jetstream connection: `GET /subscribe` over WebSocket with the wanted collections
//! and DIDs ([`super::wanted`]) and a `time_us` cursor, resumed from the low-water mark.
//! Changes of the wanted set go out as `options_update` messages on the open socket.
//! A connection silent for [`WATCHDOG`] is replaced; reconnects back off like the
//! firehose's. Every byte read is counted in the ledger under `jetstream`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tap_atproto::jetstream::{Event, MAX_EVENT_BYTES, parse_event};
use tap_atproto::syntax::Did;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::group::{Grouper, Job, JobKind};
use super::wanted::Wanted;
use crate::firehose::consumer::{PING_INTERVAL, backoff};
use crate::ledger::{Ledger, Source};
use crate::live::cursor::SeqTracker;
use crate::live::dispatch::Dispatcher;
use crate::live::{Opened, open_socket};
use crate::status::Progress;
use crate::store::Store;
use crate::telemetry as t;

/// A connection that sends no event for this long is replaced. On the real network a
/// stalled Jetstream looks like this; a narrow subscription may also be quiet this long,
/// and then costs one reconnect (resumed from the cursor) a minute.
pub const WATCHDOG: Duration = Duration::from_secs(60);
/// How long an open group waits for more operations of its commit once the stream pauses.
pub const GROUP_PAUSE: Duration = Duration::from_millis(50);

/// What the reader works with.
pub struct Reader {
    /// `ws(s)://host/subscribe`.
    pub url: Url,
    /// A connection silent this long is replaced.
    pub watchdog: Duration,
    /// The live workers.
    pub dispatcher: Dispatcher<Job>,
    /// Positions started and finished.
    pub seqs: Arc<Mutex<SeqTracker>>,
    /// Where bytes are counted.
    pub ledger: Ledger,
    /// Where the connection is shown.
    pub progress: Arc<Progress>,
    /// To resync every repo when the cursor is older than Jetstream keeps.
    pub store: Store,
}

/// Why a connection ended.
enum Ended {
    Stopped,
    Failed { events: u64, reason: String },
}

/// The subscription URL: the wanted collections, the cursor, and `requireHello` when the
/// DIDs follow in an `options_update` (a list of thousands does not fit a URL).
#[must_use]
pub fn subscribe_url(base: &Url, wanted: &Wanted, cursor: Option<i64>) -> Url {
    let mut url = base.clone();
    {
        let mut q = url.query_pairs_mut();
        for c in &wanted.collections {
            q.append_pair("wantedCollections", c);
        }
        if let Some(c) = cursor {
            q.append_pair("cursor", &c.to_string());
        }
        if wanted.dids.is_some() {
            q.append_pair("requireHello", "true");
        }
    }
    url
}

/// The `options_update` message for `wanted`.
#[must_use]
pub fn options_update(wanted: &Wanted) -> String {
    json!({
        "type": "options_update",
        "payload": {
            "wantedCollections": wanted.collections,
            "wantedDids": wanted.dids.clone().unwrap_or_default(),
            "maxMessageSizeBytes": 0,
        }
    })
    .to_string()
}

/// Follows Jetstream until `stop`, from `start` (the stored cursor).
pub async fn run_reader(
    reader: Reader,
    start: Option<i64>,
    mut wanted: watch::Receiver<Option<Wanted>>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    // The stale mark every syncing repo was already resynced for (a long outage is checked
    // at every reconnect, but answered once).
    let mut gap_handled: Option<i64> = None;
    loop {
        // Nothing to follow until the wanted set is known and names at least one repo.
        let current = loop {
            let now = wanted.borrow_and_update().clone();
            match now {
                Some(w) if w.dids.as_ref().is_none_or(|d| !d.is_empty()) => break w,
                _ => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = wanted.changed() => if changed.is_err() { return },
            }
        };
        let mark = reader
            .seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .low_water_mark()
            .or(start);
        if mark.is_some() && mark != gap_handled {
            match check_retention(&reader.store, mark).await {
                None => return,
                Some(true) => gap_handled = mark,
                Some(false) => {}
            }
        }
        // Jetstream replays from `time_us ≥ cursor`; the mark itself is done.
        let url = subscribe_url(&reader.url, &current, mark.map(|m| m + 1));
        tracing::info!(url = %reader.url, cursor = ?mark, collections = ?current.collections,
            dids = current.dids.as_ref().map(Vec::len), "Connecting to Jetstream.");
        let ended = connect_and_read(&reader, &url, current, &mut wanted, &stop).await;
        reader.progress.set_firehose_connected(false);
        match ended {
            Ended::Stopped => return,
            Ended::Failed { events, reason } => {
                failures = if events > 0 {
                    1
                } else {
                    failures.saturating_add(1)
                };
                metrics::counter!(t::FIREHOSE_RECONNECTS).increment(1);
                let delay = backoff(failures, rand::random::<u64>());
                tracing::warn!(
                    reason,
                    events,
                    ?delay,
                    "Jetstream connection ended; reconnecting."
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// A cursor older than Jetstream keeps cannot be replayed whole: every syncing repo may
/// have missed events, so all of them are resynced. `Some(true)` when that was done,
/// `Some(false)` when the cursor is recent enough, `None` when tap stops first.
async fn check_retention(store: &Store, mark: Option<i64>) -> Option<bool> {
    let Some(mark) = mark else {
        return Some(false);
    };
    let now_us = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
    )
    .unwrap_or(i64::MAX);
    let age = Duration::from_micros(u64::try_from(now_us.saturating_sub(mark)).unwrap_or(0));
    if age <= super::RETENTION {
        return Some(false);
    }
    let reason = format!(
        "the Jetstream cursor is {} h old, past what Jetstream keeps: live events may be missing",
        age.as_secs() / 3600
    );
    tracing::warn!(
        cursor = mark,
        age_hours = age.as_secs() / 3600,
        "Jetstream cursor older than its retention; resyncing every syncing repo."
    );
    loop {
        match store.desynchronize_syncing(&reason).await {
            Ok(n) => {
                tracing::warn!(
                    repos = n,
                    "Repos marked for a resync after a Jetstream gap."
                );
                return Some(true);
            }
            Err(e) if e.is_closed() => return None,
            Err(error) => tracing::warn!(%error, "Cannot mark repos for a resync; retrying."),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn connect_and_read(
    reader: &Reader,
    url: &Url,
    mut current: Wanted,
    wanted: &mut watch::Receiver<Option<Wanted>>,
    stop: &CancellationToken,
) -> Ended {
    let failed = |events: u64, reason: String| Ended::Failed { events, reason };
    let socket = match open_socket(url, MAX_EVENT_BYTES, reader.watchdog, stop).await {
        Opened::Socket(socket) => socket,
        Opened::Stopped => return Ended::Stopped,
        Opened::Failed(reason) => return failed(0, reason),
    };
    let host = reader.url.host_str().map(str::to_owned);
    let (mut sink, mut stream) = socket.split();
    if current.dids.is_some()
        && sink
            .send(Message::text(options_update(&current)))
            .await
            .is_err()
    {
        return failed(0, "could not send the wanted DIDs".into());
    }
    reader.progress.set_firehose_connected(true);
    let mut ping = tokio::time::interval(PING_INTERVAL.min(reader.watchdog / 2));
    ping.tick().await;
    let mut events = 0u64;
    let mut last_heard = Instant::now();
    let mut grouper = Grouper::default();
    let mut ready = Vec::new();
    let ended = loop {
        // While a group is open, a pause in the stream closes it.
        let pause = if grouper.is_empty() {
            reader.watchdog
        } else {
            GROUP_PAUSE
        };
        let msg = tokio::select! {
            () = stop.cancelled() => break Ended::Stopped,
            _ = ping.tick() => {
                if last_heard.elapsed() > reader.watchdog {
                    break failed(events, "Jetstream silent too long".into());
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break failed(events, "ping failed".into());
                }
                continue;
            }
            changed = wanted.changed() => {
                if changed.is_err() {
                    break Ended::Stopped;
                }
                let Some(next) = wanted.borrow_and_update().clone() else { continue };
                if next == current {
                    continue;
                }
                // No DIDs at all cannot be said in an update (it means every DID), and
                // a list too long to keep means reconnecting without one.
                if next.dids.as_ref().is_some_and(Vec::is_empty) || current.dids.is_some() != next.dids.is_some() {
                    break failed(events, "the wanted repos changed shape; resubscribing".into());
                }
                tracing::info!(collections = ?next.collections, dids = next.dids.as_ref().map(Vec::len), "Updating the Jetstream subscription.");
                if sink.send(Message::text(options_update(&next))).await.is_err() {
                    break failed(events, "could not send an options_update".into());
                }
                current = next;
                continue;
            }
            msg = tokio::time::timeout(pause, stream.next()) => match msg {
                Ok(msg) => msg,
                Err(_) => {
                    grouper.flush(&mut ready);
                    if !dispatch(reader, &mut ready, stop).await {
                        break Ended::Stopped;
                    }
                    continue;
                }
            },
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(data))) => {
                last_heard = Instant::now();
                reader
                    .ledger
                    .downloaded(Source::Jetstream, host.as_deref(), data.len() as u64);
                // Compression is never asked for; a binary frame is not an event.
                metrics::counter!(t::FIREHOSE_BAD_FRAMES).increment(1);
                tracing::warn!(
                    bytes = data.len(),
                    "Jetstream sent a binary frame; skipped."
                );
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | None => {
                break failed(events, "Jetstream closed the connection".into());
            }
            Some(Err(e)) => break failed(events, e.to_string()),
        };
        reader
            .ledger
            .downloaded(Source::Jetstream, host.as_deref(), text.len() as u64);
        metrics::counter!(t::original::FIREHOSE_EVENTS_RECEIVED).increment(1);
        events += 1;
        take(reader, text.as_str(), &mut grouper, &mut ready);
        if !dispatch(reader, &mut ready, stop).await {
            break Ended::Stopped;
        }
    };
    // What was read is handed on: its positions are started, so the cursor waits for it.
    grouper.flush(&mut ready);
    if !dispatch(reader, &mut ready, stop).await {
        return Ended::Stopped;
    }
    ended
}

/// Reads one text frame into the grouper (or, for a repo event that does not read, a job
/// that resyncs the repo). Every position read is started in the tracker.
fn take(reader: &Reader, text: &str, grouper: &mut Grouper, ready: &mut Vec<Job>) {
    let start = |time_us: i64| {
        reader
            .seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .start(time_us);
    };
    match parse_event(text) {
        Ok(positioned) => {
            let time_us = positioned.time_us;
            reader.progress.firehose_event(lag_ms(time_us));
            let (did, kind) = match positioned.event {
                Event::Commit(op) => {
                    start(time_us);
                    grouper.push_op(op, time_us, ready);
                    return;
                }
                Event::Identity { did } => (did, JobKind::Identity),
                Event::Account {
                    did,
                    active,
                    status,
                } => (did, JobKind::Account { active, status }),
                Event::Unknown { .. } => return,
            };
            start(time_us);
            grouper.push_other(
                Job {
                    did,
                    positions: vec![time_us],
                    kind,
                },
                ready,
            );
        }
        Err(error) => {
            metrics::counter!(t::FIREHOSE_BAD_FRAMES).increment(1);
            let (did, time_us) = salvage(text);
            tracing::warn!(did = ?did.as_ref().map(Did::as_str), time_us, bytes = text.len(), %error, "Unreadable Jetstream event skipped.");
            // Nothing to resync without a repo; a readable position still lets the
            // cursor pass it (nothing started stays unfinished).
            let Some(did) = did else { return };
            let positions: Vec<i64> = time_us.into_iter().collect();
            positions.iter().for_each(|t| start(*t));
            grouper.push_other(
                Job {
                    did,
                    positions,
                    kind: JobKind::Refused {
                        reason: error.to_string(),
                    },
                },
                ready,
            );
        }
    }
}

/// The repo and position of an event that did not read, when they can be read.
fn salvage(text: &str) -> (Option<Did>, Option<i64>) {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return (None, None);
    };
    let did = value["did"].as_str().and_then(|d| Did::new(d).ok());
    let time_us = value["time_us"].as_i64().filter(|t| *t > 0);
    (did, time_us)
}

/// Hands `ready` jobs to the workers in order; `false` when they are gone.
async fn dispatch(reader: &Reader, ready: &mut Vec<Job>, stop: &CancellationToken) -> bool {
    for job in ready.drain(..) {
        let did = job.did.as_str().to_owned();
        let sent = tokio::select! {
            () = stop.cancelled() => false,
            ok = reader.dispatcher.dispatch(&did, job) => ok,
        };
        if !sent {
            return false;
        }
    }
    true
}

/// How far behind Jetstream's clock the event is, in milliseconds.
fn lag_ms(time_us: i64) -> Option<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros();
    let lag = i64::try_from(now).ok()?.saturating_sub(time_us) / 1000;
    Some(lag.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(dids: Option<Vec<&str>>) -> Wanted {
        Wanted {
            collections: vec![
                "app.bsky.actor.profile".into(),
                "app.bsky.graph.starterpack".into(),
            ],
            dids: dids.map(|d| d.into_iter().map(str::to_owned).collect()),
        }
    }

    #[test]
    fn the_subscription_asks_for_the_collections_and_resumes_from_the_cursor() {
        let base = Url::parse("wss://jetstream.example/subscribe").unwrap();
        assert_eq!(
            subscribe_url(&base, &wanted(None), Some(17)).as_str(),
            "wss://jetstream.example/subscribe?wantedCollections=app.bsky.actor.profile&wantedCollections=app.bsky.graph.starterpack&cursor=17"
        );
        // DIDs go in the first message, which Jetstream waits for.
        assert!(
            subscribe_url(&base, &wanted(Some(vec!["did:plc:a"])), None)
                .as_str()
                .ends_with("&requireHello=true")
        );
        let update: Value =
            serde_json::from_str(&options_update(&wanted(Some(vec!["did:plc:a"])))).unwrap();
        assert_eq!(update["type"], "options_update");
        assert_eq!(update["payload"]["wantedDids"], json!(["did:plc:a"]));
        assert_eq!(
            update["payload"]["wantedCollections"][1],
            "app.bsky.graph.starterpack"
        );
    }

    #[test]
    fn an_unreadable_event_still_gives_its_repo_and_position_when_they_read() {
        let (did, time) =
            salvage(r#"{"did":"did:plc:abc","time_us":42,"kind":"commit","commit":{}}"#);
        assert_eq!(did.unwrap().as_str(), "did:plc:abc");
        assert_eq!(time, Some(42));
        assert_eq!(salvage("garbage"), (None, None));
        assert_eq!(salvage(r#"{"did":"nope","time_us":-1}"#), (None, None));
    }
}
