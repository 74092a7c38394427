//! Start-up: pages the outbox rows of a previous run back into the actor, in id order,
//! before any producer may append (so per-DID order holds across restarts). In
//! outbox-only mode it keeps polling for rows written by another process.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::capacity::Capacity;
use super::scheduler::{Input, Queued};
use crate::store::{EventId, Store};

const PAGE: usize = 1000;
/// How often outbox-only mode looks for new rows.
pub const POLL: Duration = Duration::from_secs(1);

/// Loads every stored event into the actor, then flips `ready` so producers may append.
/// With `follow`, keeps loading rows appended later by another process.
pub async fn run_loader(
    store: Store,
    inputs: mpsc::Sender<Input>,
    capacity: Capacity,
    ready: watch::Sender<bool>,
    follow: bool,
    stop: CancellationToken,
) {
    let mut after: Option<EventId> = None;
    let mut loaded = 0usize;
    let backlog_end = loop {
        match store.max_event_id().await {
            Ok(max) => break max,
            // Following, this task is the only producer: it must not end.
            Err(error) if follow => {
                tracing::warn!(%error, "Cannot read the outbox; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, "Cannot read the outbox; starting without its backlog.");
                let _ = ready.send(true);
                return;
            }
        }
    };
    loop {
        let limit_reached = |after: Option<EventId>| match (after, backlog_end) {
            (_, None) => true,
            (Some(a), Some(end)) => a >= end,
            (None, Some(_)) => false,
        };
        if !follow && limit_reached(after) {
            break;
        }
        let rows = tokio::select! {
            () = stop.cancelled() => return,
            rows = store.load_outbox(after, PAGE) => rows,
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "Failed to read outbox rows; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(POLL) => continue,
                }
            }
        };
        if rows.is_empty() {
            if !*ready.borrow() {
                tracing::info!(events = loaded, "Outbox backlog loaded.");
                let _ = ready.send(true);
            }
            if !follow {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL) => continue,
            }
        }
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            // Producers do not start until this loop is done, so rows past the backlog's
            // end only appear with `follow` (another process writes them).
            if !follow && backlog_end.is_some_and(|end| row.id > end) {
                break;
            }
            let hold = if let Some(hold) = capacity.try_acquire_one(row.payload.len()) {
                hold
            } else {
                // At capacity: hand over what is loaded so it can be delivered and acked,
                // which is what frees the capacity we wait for.
                let full = std::mem::take(&mut batch);
                if !full.is_empty() && inputs.send(Input::Appended(full)).await.is_err() {
                    return;
                }
                let hold = tokio::select! {
                    () = stop.cancelled() => return,
                    hold = capacity.acquire_one(row.payload.len()) => hold,
                };
                let Ok(hold) = hold else { return };
                hold
            };
            after = Some(row.id);
            loaded += 1;
            batch.push(Queued {
                id: row.id,
                did: row.did.into(),
                live: row.live,
                payload: row.payload,
                hold,
                durable: true,
            });
        }
        if !batch.is_empty() && inputs.send(Input::Appended(batch)).await.is_err() {
            return;
        }
    }
    if !*ready.borrow() {
        tracing::info!(events = loaded, "Outbox backlog loaded.");
        let _ = ready.send(true);
    }
}
