//! Batched deletion of acked events: ids collect in memory and are deleted in one
//! transaction when 1000 have gathered or a second has passed. A crash between an ack and
//! its deletion only means a redelivery, which at-least-once permits.
//!
//! At most one delete runs at a time, and ids keep being received while it runs (they
//! form the next, naturally larger, batch). So a slow delete never blocks the outbox actor
//! that feeds this task, and delivery overlaps with deletion instead of waiting for it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::store::{EventId, Store, StoreError};

/// Delete when this many acked ids have gathered...
pub const BATCH: usize = 1000;
/// ...or when the oldest has waited this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

type Flush = JoinHandle<(Vec<EventId>, Result<u64, StoreError>)>;

/// Runs until every sender of `acked` is gone, then deletes what is left (the caller
/// bounds this final flush with its own deadline).
pub async fn run_deleter(store: Store, mut acked: mpsc::Receiver<Vec<EventId>>) {
    let mut pending: Vec<EventId> = Vec::with_capacity(BATCH);
    let mut running: Option<Flush> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = false;
    loop {
        tokio::select! {
            ids = acked.recv() => match ids {
                Some(ids) => pending.extend(ids),
                None => break,
            },
            _ = tick.tick() => due = true,
            done = async {
                match running.as_mut() {
                    Some(flush) => finish(flush).await,
                    None => std::future::pending().await,
                }
            }, if running.is_some() => {
                running = None;
                if let Some(failed) = done {
                    pending.extend(failed);
                }
            }
        }
        if running.is_none() && !pending.is_empty() && (due || pending.len() >= BATCH) {
            due = false;
            running = Some(start(&store, std::mem::take(&mut pending)));
        }
    }
    if let Some(flush) = running.as_mut()
        && let Some(failed) = finish(flush).await
    {
        pending.extend(failed);
    }
    if !pending.is_empty() {
        let mut last = start(&store, pending);
        if let Some(failed) = finish(&mut last).await {
            tracing::warn!(
                ids = failed.len(),
                "Acked events left in the outbox; they will be redelivered."
            );
        }
    }
}

fn start(store: &Store, ids: Vec<EventId>) -> Flush {
    let store = store.clone();
    tokio::spawn(async move {
        let result = store.delete_acked(&ids).await;
        (ids, result)
    })
}

/// Waits for a delete; returns the ids to try again if it failed.
async fn finish(flush: &mut Flush) -> Option<Vec<EventId>> {
    match flush.await {
        Ok((_, Ok(_))) => None,
        // Kept for the next attempt; the rows are only redundant meanwhile.
        Ok((ids, Err(error))) => {
            tracing::warn!(%error, ids = ids.len(), "Failed to delete acked events.");
            Some(ids)
        }
        Err(error) => {
            tracing::warn!(%error, "Delete task failed; its acked events stay until restart.");
            None
        }
    }
}
