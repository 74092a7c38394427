//! Live progress shared read-only with the API: values the pipeline updates in memory
//! and `/stats/cursors` reports without touching the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Progress counters. Writers are the pipeline stages; readers are the API and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    firehose_seq: AtomicI64,
    in_memory_events: Arc<AtomicU64>,
}

impl Progress {
    /// The firehose seq most recently committed (0 before any event, or in outbox-only mode).
    #[must_use]
    pub fn firehose_seq(&self) -> i64 {
        self.firehose_seq.load(Ordering::Relaxed)
    }

    /// Events numbered but not stored (a first backfill's), not yet acked: part of the
    /// outbox backlog that `/stats/outbox-buffer` reports besides the stored rows.
    #[must_use]
    pub fn in_memory_events(&self) -> u64 {
        self.in_memory_events.load(Ordering::Relaxed)
    }

    /// The counter behind [`in_memory_events`](Self::in_memory_events), for the outbox
    /// actor (its only writer).
    #[must_use]
    pub fn in_memory_events_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.in_memory_events)
    }

    /// Records the firehose position.
    pub fn set_firehose_seq(&self, seq: i64) {
        self.firehose_seq.store(seq, Ordering::Relaxed);
    }
}
