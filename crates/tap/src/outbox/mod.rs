//! The outbox: the durable queue of events not yet acked by a consumer.
//!
//! Producers call [`Outbox::append`], which commits a repo event (state, record index and
//! outbox rows) in one transaction and hands the new events to the scheduler actor. The
//! actor applies the per-DID ordering rules ([`ordering`]) and offers released events on
//! one shared queue that every delivery session pulls from. Acks flow back to the actor,
//! which frees capacity and passes the ids to the batched deleter ([`acks`]).
//!
//! A first backfill's events may be numbered but not stored
//! ([`EventStorage::InMemoryBackfill`]): the actor holds them like any other, and once
//! every such event of a repo is acked it asks the deleter to clear the repo's backfill
//! token, the durable marker that makes the next start re-run an unfinished delivery.
//!
//! Back-pressure ([`capacity`]): every event holds one of `--outbox-capacity` permits and
//! its payload's bytes from a fixed budget, from append to ack, so producers wait when
//! consumers fall behind. No queue is unbounded, in count or in bytes.

pub mod acks;
pub mod backfills;
pub mod capacity;
pub mod loader;
pub mod ordering;
pub mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use capacity::Capacity;

use crate::store::{EventId, EventStorage, RepoWrite, Store, StoreError};

pub use scheduler::{Delivery, Finished, Input};

/// How the consumer acknowledges events; decides when an event is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Done when the client acks; resent after the retry timeout.
    ClientAck,
    /// Done once written to a connection.
    OnWrite,
    /// Done when the sink confirms it (a webhook's 2xx, JetStream's publish ack); the sink
    /// retries by itself.
    Sink,
}

/// Settings of the outbox stage.
#[derive(Debug, Clone, Copy)]
pub struct OutboxSettings {
    /// Events in flight before producers wait (`--outbox-capacity`).
    pub capacity: usize,
    /// When an event counts as done.
    pub ack_mode: AckMode,
    /// Resend delay for unacked events in [`AckMode::ClientAck`] (`--retry-timeout`).
    pub retry_timeout: Duration,
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The store rejected or failed the write; nothing was committed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Tap is shutting down.
    #[error("the outbox is shut down")]
    Closed,
}

impl OutboxError {
    /// Whether retrying later may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Closed => false,
        }
    }
}

/// The producers' handle. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    capacity: Capacity,
    inputs: mpsc::Sender<Input>,
    ready: watch::Receiver<bool>,
}

impl Outbox {
    /// A handle over the given store, actor inputs and capacity semaphore.
    pub(crate) fn new(
        store: Store,
        capacity: Capacity,
        inputs: mpsc::Sender<Input>,
        ready: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            capacity,
            inputs,
            ready,
        }
    }

    /// Commits one repo event in one transaction and queues its events for delivery.
    ///
    /// Waits first until the backlog of a previous run is loaded (so per-DID order holds
    /// across restarts) and until there is capacity for the events.
    ///
    /// # Errors
    /// [`OutboxError::Store`] if the transaction failed (nothing was written);
    /// [`OutboxError::Closed`] during shutdown.
    pub async fn append(&self, write: RepoWrite) -> Result<Vec<EventId>, OutboxError> {
        let mut ready = self.ready.clone();
        ready
            .wait_for(|r| *r)
            .await
            .map_err(|_| OutboxError::Closed)?;
        let sizes: Vec<usize> = write.events.iter().map(|e| e.payload.len()).collect();
        let holds = self
            .capacity
            .acquire(&sizes)
            .await
            .map_err(|_| OutboxError::Closed)?;
        let mut write = write;
        let did: Arc<str> = Arc::from(write.did.as_str());
        let durable = write.storage == EventStorage::Durable;
        // Stored events are written by the store and held by the actor, so they are copied;
        // in-memory ones are only numbered by the store, which never reads their payloads.
        let events: Vec<(bool, String)> = write
            .events
            .iter_mut()
            .map(|e| {
                let payload = if durable {
                    e.payload.clone()
                } else {
                    std::mem::take(&mut e.payload)
                };
                (e.live, payload)
            })
            .collect();
        let ids = match self.store.apply(write).await {
            Ok(ids) => ids,
            Err(e) => {
                self.capacity.release_all(&holds);
                return Err(e.into());
            }
        };
        if ids.len() < events.len() {
            // The write was skipped by its precondition (e.g. the repo was removed).
            self.capacity.release_all(&holds);
            return Ok(ids);
        }
        let queued = ids
            .iter()
            .zip(events)
            .zip(holds)
            .map(|((&id, (live, payload)), hold)| scheduler::Queued {
                id,
                did: Arc::clone(&did),
                live,
                payload,
                hold,
                durable,
            })
            .collect();
        crate::telemetry::send_measured("outbox_appends", &self.inputs, Input::Appended(queued))
            .await
            .map_err(|_| OutboxError::Closed)?;
        Ok(ids)
    }

    /// The store behind the outbox (reads only; writes go through [`append`](Self::append)).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }
}
