//! Batched clean-up after acks: acked ids collect in memory and are deleted in one
//! transaction when 1000 have gathered or a second has passed; in the same pass, repos whose
//! in-memory backfill events are all acked get their backfill token cleared. A crash before
//! either only means a redelivery (or a re-run backfill), which at-least-once permits.
//!
//! At most one pass runs at a time, and work keeps being received while it runs (forming
//! the next, naturally larger, batch). So a slow delete never blocks the outbox actor that
//! feeds this task, and delivery overlaps with deletion instead of waiting for it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::scheduler::Finished;
use crate::store::{EventId, Store, StoreError};

/// Delete when this many acked ids have gathered...
pub const BATCH: usize = 1000;
/// ...or when the oldest has waited this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Work of one pass: ids to delete and backfill tokens to clear (one per repo, the latest).
#[derive(Default)]
struct Pending {
    ids: Vec<EventId>,
    backfills: HashMap<String, EventId>,
}

impl Pending {
    fn add(&mut self, done: Finished) {
        self.ids.extend(done.ids);
        for (did, token) in done.backfills {
            let latest = self.backfills.entry(did).or_insert(token);
            *latest = (*latest).max(token);
        }
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.backfills.is_empty()
    }

    fn is_full(&self) -> bool {
        self.ids.len() >= BATCH || self.backfills.len() >= BATCH
    }
}

type Flush = JoinHandle<(Pending, Result<(), StoreError>)>;

/// Runs until every sender of `acked` is gone, then finishes what is left (the caller
/// bounds this final flush with its own deadline).
pub async fn run_deleter(store: Store, mut acked: mpsc::Receiver<Finished>) {
    let mut pending = Pending::default();
    let mut running: Option<Flush> = None;
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = false;
    loop {
        tokio::select! {
            done = acked.recv() => match done {
                Some(done) => pending.add(done),
                None => break,
            },
            _ = tick.tick() => due = true,
            result = async {
                match running.as_mut() {
                    Some(flush) => finish(flush).await,
                    None => std::future::pending().await,
                }
            }, if running.is_some() => {
                running = None;
                if let Some(failed) = result {
                    pending.add(failed);
                }
            }
        }
        if running.is_none() && !pending.is_empty() && (due || pending.is_full()) {
            due = false;
            running = Some(start(&store, std::mem::take(&mut pending)));
        }
    }
    if let Some(flush) = running.as_mut()
        && let Some(failed) = finish(flush).await
    {
        pending.add(failed);
    }
    if !pending.is_empty() {
        let mut last = start(&store, pending);
        if let Some(failed) = finish(&mut last).await {
            tracing::warn!(
                ids = failed.ids.len(),
                backfills = failed.backfills.len(),
                "Acked events left in the outbox; they will be redelivered."
            );
        }
    }
}

fn start(store: &Store, work: Pending) -> Flush {
    let store = store.clone();
    tokio::spawn(async move {
        let result = run_pass(&store, &work).await;
        (work, result)
    })
}

async fn run_pass(store: &Store, work: &Pending) -> Result<(), StoreError> {
    if !work.ids.is_empty() {
        crate::failpoint::hit("acks-before-delete");
        store.delete_acked(&work.ids).await?;
    }
    for (did, token) in &work.backfills {
        store.clear_backfill_token(did, *token).await?;
    }
    Ok(())
}

/// Waits for a pass; returns the work to try again if it failed.
async fn finish(flush: &mut Flush) -> Option<Finished> {
    match flush.await {
        Ok((_, Ok(()))) => None,
        // Kept for the next attempt; the rows and tokens are only redundant meanwhile.
        Ok((work, Err(error))) => {
            tracing::warn!(%error, ids = work.ids.len(), "Failed to clean up after acks.");
            Some(Finished {
                ids: work.ids,
                backfills: work.backfills.into_iter().collect(),
            })
        }
        Err(error) => {
            tracing::warn!(%error, "Clean-up task failed; its acked events stay until restart.");
            None
        }
    }
}
