//! Live progress shared read-only with the API: values the pipeline updates in memory
//! and `/stats/cursors` reports without touching the database.

use std::sync::atomic::{AtomicI64, Ordering};

/// Progress counters. Writers are the pipeline stages; readers are the API and metrics.
#[derive(Debug, Default)]
pub struct Progress {
    firehose_seq: AtomicI64,
}

impl Progress {
    /// The firehose seq most recently committed (0 before any event, or in outbox-only mode).
    #[must_use]
    pub fn firehose_seq(&self) -> i64 {
        self.firehose_seq.load(Ordering::Relaxed)
    }

    /// Records the firehose position.
    pub fn set_firehose_seq(&self, seq: i64) {
        self.firehose_seq.store(seq, Ordering::Relaxed);
    }
}
