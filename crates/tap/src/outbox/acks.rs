//! Batched deletion of acked events: ids collect in memory and are deleted in one
//! statement when 1000 have gathered or a second has passed. A crash between an ack and
//! its deletion only means a redelivery, which at-least-once permits.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{EventId, Store};

/// Delete when this many acked ids have gathered...
pub const BATCH: usize = 1000;
/// ...or when the oldest has waited this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Runs until every sender of `acked` is gone, then deletes what is left (the caller
/// bounds this final flush with its own deadline).
pub async fn run_deleter(store: Store, mut acked: mpsc::Receiver<Vec<EventId>>) {
    let mut pending: Vec<EventId> = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ids = acked.recv() => match ids {
                Some(ids) => {
                    pending.extend(ids);
                    if pending.len() >= BATCH {
                        flush(&store, &mut pending).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => flush(&store, &mut pending).await,
        }
    }
    flush(&store, &mut pending).await;
}

async fn flush(store: &Store, pending: &mut Vec<EventId>) {
    if pending.is_empty() {
        return;
    }
    match store.delete_acked(pending).await {
        Ok(_) => pending.clear(),
        // Keep them and try again on the next tick; the rows are only redundant.
        Err(error) => tracing::warn!(%error, ids = pending.len(), "Failed to delete acked events."),
    }
}
