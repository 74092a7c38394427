//! Counting a first backfill's in-memory events down to the moment its token can be
//! cleared.
//!
//! A repo's first backfill may deliver its events without storing them (`EventStorage::
//! InMemoryBackfill`); the repo row then keeps a backfill token (the first id of its latest
//! such write) until every one of those events is acked, so a crash before that re-runs the
//! backfill instead of losing events. This is the pure bookkeeping: which repos still have
//! unacked in-memory events, and which token each may clear.

use std::collections::HashMap;
use std::sync::Arc;

use crate::store::EventId;

/// A repo's in-memory backfill events not yet acked.
#[derive(Debug)]
struct Pending {
    unacked: usize,
    /// First id of the latest write: the value the repo's stored token should have.
    token: EventId,
}

/// Unacked in-memory backfill events, per repo.
#[derive(Debug, Default)]
pub struct InMemoryBackfills {
    repos: HashMap<Arc<str>, Pending>,
    /// Sum of `unacked` over `repos`.
    total: u64,
}

impl InMemoryBackfills {
    /// One more unacked event of `did`, from the write whose first id is `write_token`.
    pub fn appended(&mut self, did: &Arc<str>, write_token: EventId) {
        let pending = self.repos.entry(Arc::clone(did)).or_insert(Pending {
            unacked: 0,
            token: write_token,
        });
        // Writes of one repo may reach the actor out of order; the latest one's token wins.
        pending.token = pending.token.max(write_token);
        pending.unacked += 1;
        self.total += 1;
    }

    /// One event of `did` acked. When it was the repo's last, returns the token that may now
    /// be cleared; the repo is forgotten.
    pub fn acked(&mut self, did: &str) -> Option<EventId> {
        let pending = self.repos.get_mut(did)?;
        pending.unacked = pending.unacked.saturating_sub(1);
        self.total = self.total.saturating_sub(1);
        if pending.unacked > 0 {
            return None;
        }
        self.repos.remove(did).map(|done| done.token)
    }

    /// Unacked in-memory events over every repo.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_clears_when_the_last_event_of_the_latest_write_is_acked() {
        let mut b = InMemoryBackfills::default();
        let a: Arc<str> = Arc::from("did:plc:a");
        let other: Arc<str> = Arc::from("did:plc:b");
        // Two writes of `a` (tokens 10 and 20, the later one arriving first), one of `b`.
        b.appended(&a, EventId(20));
        b.appended(&a, EventId(10));
        b.appended(&a, EventId(10));
        b.appended(&other, EventId(30));
        assert_eq!(b.total(), 4);
        assert_eq!(b.acked("did:plc:a"), None);
        assert_eq!(b.acked("did:plc:b"), Some(EventId(30)));
        assert_eq!(b.acked("did:plc:a"), None);
        assert_eq!(b.total(), 1);
        assert_eq!(
            b.acked("did:plc:a"),
            Some(EventId(20)),
            "the latest write's"
        );
        assert_eq!(b.total(), 0);
        // Acks after the count reached zero (repeats, unknown repos) change nothing.
        assert_eq!(b.acked("did:plc:a"), None);
        assert_eq!(b.acked("did:plc:zzz"), None);
        assert_eq!(b.total(), 0);
    }

    #[test]
    fn a_repo_backfilled_again_after_clearing_starts_a_new_count() {
        let mut b = InMemoryBackfills::default();
        let a: Arc<str> = Arc::from("did:plc:a");
        b.appended(&a, EventId(1));
        assert_eq!(b.acked("did:plc:a"), Some(EventId(1)));
        b.appended(&a, EventId(7));
        b.appended(&a, EventId(7));
        assert_eq!(b.acked("did:plc:a"), None);
        assert_eq!(b.acked("did:plc:a"), Some(EventId(7)));
    }
}
