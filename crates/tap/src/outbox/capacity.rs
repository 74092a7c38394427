//! Back-pressure on producers. Events in flight (appended or loaded, not yet acked) are
//! bounded in number (`--outbox-capacity`, as in the Go tap) and in payload bytes: the count
//! alone let 100,000 events of a fast backfill sit in memory while a slower consumer caught
//! up (tens of MB), so memory held for delivery now stays bounded however large the events
//! and however slow the consumer.

use std::sync::Arc;

use tokio::sync::Semaphore;

/// Payload bytes that events in flight may hold together. Enough for thousands of events
/// in flight (the delivery pipeline needs far fewer to stay busy); see docs/benchmarks.md,
/// "Peak memory of the daemon", for how it was chosen.
pub const PAYLOAD_BUDGET: usize = 4 << 20;

/// The semaphores were closed: the outbox is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// What one event holds until it is acked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hold {
    /// One of the `--outbox-capacity` permits.
    pub event: bool,
    /// Payload bytes.
    pub bytes: u32,
}

/// The two budgets; clones share them.
#[derive(Debug, Clone)]
pub struct Capacity {
    events: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_events: usize,
    max_bytes: usize,
}

impl Capacity {
    /// Budgets of `max_events` events and `max_bytes` payload bytes.
    #[must_use]
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        let max_bytes = max_bytes.min(u32::MAX as usize);
        Self {
            events: Arc::new(Semaphore::new(max_events)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_events,
            max_bytes,
        }
    }

    /// Waits until events with these payload sizes fit and returns what each holds. A write
    /// larger than a whole budget takes all of it rather than waiting forever: it goes
    /// through once everything else in flight is acked.
    ///
    /// # Errors
    /// [`Closed`] during shutdown.
    pub async fn acquire(&self, sizes: &[usize]) -> Result<Vec<Hold>, Closed> {
        let events = sizes.len().min(self.max_events);
        let bytes = sizes.iter().sum::<usize>().min(self.max_bytes);
        if events > 0 {
            self.events
                .acquire_many(to_u32(events))
                .await
                .map_err(|_| Closed)?
                .forget();
        }
        if bytes > 0 {
            match self.bytes.acquire_many(to_u32(bytes)).await {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    self.events.add_permits(events);
                    return Err(Closed);
                }
            }
        }
        Ok(distribute(sizes, events, bytes))
    }

    /// What one event holds if it fits now, `None` if it must wait.
    #[must_use]
    pub fn try_acquire_one(&self, size: usize) -> Option<Hold> {
        let bytes = to_u32(size.min(self.max_bytes));
        let event = self.events.try_acquire().ok()?;
        match self.bytes.try_acquire_many(bytes) {
            Ok(permit) => {
                event.forget();
                permit.forget();
                Some(Hold { event: true, bytes })
            }
            Err(_) => None, // dropping `event` returns it
        }
    }

    /// Waits until one event of `size` payload bytes fits.
    ///
    /// # Errors
    /// [`Closed`] during shutdown.
    pub async fn acquire_one(&self, size: usize) -> Result<Hold, Closed> {
        self.acquire(&[size])
            .await
            .map(|holds| holds.first().copied().unwrap_or_default())
    }

    /// Returns what an event held.
    pub fn release(&self, hold: Hold) {
        if hold.event {
            self.events.add_permits(1);
        }
        if hold.bytes > 0 {
            self.bytes.add_permits(hold.bytes as usize);
        }
    }

    /// Returns what several events held.
    pub fn release_all(&self, holds: &[Hold]) {
        for hold in holds {
            self.release(*hold);
        }
    }
}

/// Spreads what a write was granted over its events, in order: the first `events` each
/// hold an event permit, and each holds its own size in bytes while the grant lasts.
fn distribute(sizes: &[usize], events: usize, bytes: usize) -> Vec<Hold> {
    let mut left = bytes;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let mine = size.min(left);
            left -= mine;
            Hold {
                event: i < events,
                bytes: to_u32(mine),
            }
        })
        .collect()
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_spread_over_the_events_in_order_and_adds_up() {
        let holds = distribute(&[10, 20, 30], 2, 35);
        assert_eq!(
            holds,
            [
                Hold {
                    event: true,
                    bytes: 10
                },
                Hold {
                    event: true,
                    bytes: 20
                },
                Hold {
                    event: false,
                    bytes: 5
                }
            ]
        );
    }

    #[tokio::test]
    async fn a_write_waits_for_bytes_and_releasing_lets_it_through() {
        let capacity = Capacity::new(100, 1000);
        let first = capacity.acquire(&[600, 300]).await.unwrap();
        assert!(
            capacity.try_acquire_one(200).is_none(),
            "only 100 bytes are left"
        );
        let waiting = {
            let capacity = capacity.clone();
            tokio::spawn(async move { capacity.acquire(&[200]).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        capacity.release(first[0]);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the write goes through once bytes are released")
            .unwrap()
            .unwrap();
        assert_eq!(
            second,
            [Hold {
                event: true,
                bytes: 200
            }]
        );
        capacity.release_all(&second);
        capacity.release(first[1]);
        assert!(
            capacity.try_acquire_one(1000).is_some(),
            "everything was returned"
        );
    }

    #[tokio::test]
    async fn a_write_larger_than_the_whole_budget_takes_all_of_it_instead_of_waiting() {
        let capacity = Capacity::new(2, 100);
        let holds = capacity.acquire(&[80, 80, 80]).await.unwrap();
        assert_eq!(holds.iter().filter(|h| h.event).count(), 2);
        assert_eq!(holds.iter().map(|h| h.bytes).sum::<u32>(), 100);
        assert!(capacity.try_acquire_one(1).is_none());
        capacity.release_all(&holds);
        assert!(capacity.try_acquire_one(100).is_some());
    }
}
