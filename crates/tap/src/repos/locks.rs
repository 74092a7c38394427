//! Per-DID mutual exclusion shared by the firehose workers and the resync workers, so at
//! most one event of a repo is processed at a time (invariant 2) and a resync's cutover
//! is atomic with respect to live commits (decisions.md row 4). Entries exist only while
//! held or awaited, so idle DIDs cost nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The lock table.
#[derive(Debug, Default, Clone)]
pub struct DidLocks {
    table: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

/// Holds one DID's lock; releases (and forgets idle entries) on drop.
pub struct DidGuard {
    did: String,
    table: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl DidLocks {
    /// An empty table.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for and takes the lock of `did`.
    pub async fn lock(&self, did: &str) -> DidGuard {
        let cell = {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(table.entry(did.to_owned()).or_default())
        };
        let guard = cell.lock_owned().await;
        DidGuard {
            did: did.to_owned(),
            table: Arc::clone(&self.table),
            guard: Some(guard),
        }
    }

    /// DIDs with a lock held or awaited.
    #[must_use]
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no lock is held or awaited.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for DidGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this table and no waiter hold the cell: nobody needs it any more.
        if table
            .get(&self.did)
            .is_some_and(|cell| Arc::strong_count(cell) == 1)
        {
            table.remove(&self.did);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_did_and_idle_dids_are_forgotten() {
        let locks = DidLocks::new();
        let a = locks.lock("did:a").await;
        let _b = locks.lock("did:b").await;
        let locks2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = locks2.lock("did:a").await;
        });
        // The waiter cannot finish while `a` is held.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), async {
                while !waiter.is_finished() {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .is_err()
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(locks.len(), 1, "did:a is forgotten once idle");
    }
}
