//! One `/channel` WebSocket session: writes released events as text frames (one event per
//! frame) and reads acks `{"type":"ack","id":N}`.
//!
//! The server never sends a close frame: the `@atproto/tap` client reconnects only after an
//! abnormal closure, so ending a session (shutdown, malformed client frame, write error)
//! just drops the connection. A malformed frame ends only that session.
//!
//! A client that stops reading must not hold events forever: a write blocked for
//! `--channel-timeout` ends the session, and so does a client silent for that long while
//! the server pings it every third of it. Whatever the session took and was not acked on
//! it (written or not) goes back to the actor at once, for the other sessions.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DeliveryHub;
use crate::outbox::{AckMode, Input};
use crate::store::EventId;
use crate::telemetry as t;

/// Largest client frame accepted (acks are ~30 bytes).
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Frames written before one flush.
const WRITE_BATCH: usize = 256;

/// Client frames read without waiting and reported as one batch of acks, at most.
const ACK_BURST: usize = 1024;

/// Handles one read from the client: an ack id is pushed onto `acks`; `Err` ends the session.
/// Any frame (a pong too) counts as a sign of life, recorded by the caller.
fn read_one(
    msg: Option<Result<Message, axum::Error>>,
    ack_mode: AckMode,
    acks: &mut Vec<EventId>,
) -> Result<(), End> {
    let msg = match msg {
        Some(Ok(msg)) => msg,
        Some(Err(_)) | None => return Err(End::ClientClosed),
    };
    let bytes: &[u8] = match &msg {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bin) => bin,
        Message::Ping(_) | Message::Pong(_) => return Ok(()),
        Message::Close(_) => return Err(End::ClientClosed),
    };
    if ack_mode != AckMode::ClientAck {
        return Ok(()); // fire-and-forget: client messages are read and ignored
    }
    match tap_api::client_frame(bytes) {
        Ok(tap_api::ClientFrame::Ack(id)) => {
            acks.push(EventId(id));
            Ok(())
        }
        Ok(tap_api::ClientFrame::Other) => Ok(()),
        Err(error) => {
            tracing::info!(%error, "Dropping /channel client after a malformed frame.");
            Err(End::Malformed)
        }
    }
}

/// Why a session ended (for the log).
#[derive(Debug, Clone, Copy)]
enum End {
    ClientClosed,
    Malformed,
    WriteFailed,
    WriteStalled,
    Silent,
    Shutdown,
}

/// Runs one session until the client goes, a frame is malformed, a write fails or `stop`
/// is cancelled.
pub async fn run_session(socket: WebSocket, hub: DeliveryHub, stop: CancellationToken) {
    if hub.inputs.send(Input::SessionOpened).await.is_err() {
        return;
    }
    metrics::gauge!(t::CHANNEL_SESSIONS).increment(1.0);
    let (mut sink, mut stream) = socket.split();
    // Events taken from the shared queue and not yet confirmed written. Whatever is left
    // here when the session ends goes back to the actor, whichever future was running.
    let taken: Mutex<Vec<EventId>> = Mutex::new(Vec::new());
    // Written on this session and not acked on it (client-ack mode): they too go back
    // when the session ends, instead of waiting out --retry-timeout. An ack that comes
    // later on another connection is still honoured (acks are idempotent).
    let unacked: Mutex<HashSet<EventId>> = Mutex::new(HashSet::new());
    let started = Instant::now();
    // Milliseconds after `started` of the client's latest frame.
    let heard = std::sync::atomic::AtomicU64::new(0);
    let timeout = hub.channel_timeout;

    let reader = async {
        // Acks that arrived together go to the actor as one message: one actor wake-up per
        // burst instead of per ack.
        let mut acks: Vec<EventId> = Vec::new();
        loop {
            let first = stream.next().await;
            heard.store(millis_since(started), std::sync::atomic::Ordering::Relaxed);
            let mut end = read_one(first, hub.ack_mode, &mut acks).err();
            while end.is_none() && acks.len() < ACK_BURST {
                match stream.next().now_or_never() {
                    Some(msg) => end = read_one(msg, hub.ack_mode, &mut acks).err(),
                    None => break,
                }
            }
            if !acks.is_empty() {
                let mut unacked = lock(&unacked);
                for id in &acks {
                    unacked.remove(id);
                }
            }
            if !acks.is_empty()
                && hub
                    .inputs
                    .send(Input::Acked(std::mem::take(&mut acks)))
                    .await
                    .is_err()
            {
                return End::Shutdown;
            }
            if let Some(end) = end {
                return end;
            }
        }
    };

    let writer = async {
        let mut ping = tokio::time::interval(timeout / 3);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            let first = tokio::select! {
                next = hub.queue.recv() => next,
                _ = ping.tick() => {
                    let heard = Duration::from_millis(heard.load(std::sync::atomic::Ordering::Relaxed));
                    if started.elapsed().saturating_sub(heard) > timeout {
                        return End::Silent;
                    }
                    match tokio::time::timeout(timeout, sink.send(Message::Ping(Vec::new().into()))).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => return End::WriteFailed,
                        Err(_) => return End::WriteStalled,
                    }
                }
            };
            let Ok(first) = first else {
                return End::Shutdown;
            };
            let mut batch = vec![first];
            while batch.len() < WRITE_BATCH {
                match hub.queue.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
            lock(&taken).extend(batch.iter().map(|d| d.id));
            if hub.ack_mode == AckMode::ClientAck {
                // Before the write: an ack may come back while the rest is still written.
                lock(&unacked).extend(batch.iter().map(|d| d.id));
            }
            let write = async {
                for d in batch {
                    sink.feed(Message::Text(d.text.into())).await?;
                }
                sink.flush().await
            };
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return End::WriteFailed,
                Err(_) => return End::WriteStalled,
            }
            let ids = std::mem::take(&mut *lock(&taken));
            metrics::counter!(t::EVENTS_DELIVERED).increment(ids.len() as u64);
            hub.progress.delivered(ids.len() as u64);
            let report = match hub.ack_mode {
                AckMode::OnWrite => Input::Acked(ids),
                _ => Input::Sent(ids, Instant::now()),
            };
            if hub.inputs.send(report).await.is_err() {
                return End::Shutdown;
            }
        }
    };

    let end = tokio::select! {
        end = reader => end,
        end = writer => end,
        () = stop.cancelled() => End::Shutdown,
    };
    let mut unsent = std::mem::take(&mut *lock(&taken));
    unsent.extend(lock(&unacked).drain());
    unsent.sort_unstable();
    unsent.dedup();
    if !unsent.is_empty() {
        let _ = hub.inputs.send(Input::Unsent(unsent)).await;
    }
    let _ = hub.inputs.send(Input::SessionClosed).await;
    metrics::gauge!(t::CHANNEL_SESSIONS).decrement(1.0);
    tracing::debug!(?end, "Channel session ended.");
    // Dropping both halves closes the TCP connection without a close frame.
}

/// Locks the session's bookkeeping; a poisoned lock only means a panic elsewhere in this
/// session, and the list is still valid.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}
