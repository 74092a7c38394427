//! Per-DID delivery ordering, as a pure state machine (no I/O, no clock, no locks).
//!
//! The contract (README "Per-repo ordering"):
//! - historical events of a DID may be in flight together;
//! - a live event is sent only when nothing of its DID is in flight, and while it is in
//!   flight nothing else of its DID is sent (a barrier on both sides);
//! - identity events are not barriers (they are queued as historical);
//! - DIDs are independent; a DID with nothing queued or in flight costs no memory.
//!
//! Example: H1,H2,L1,H3,H4,L2,H5 → {H1,H2} → L1 → {H3,H4} → L2 → H5.
//!
//! The caller owns time: it passes `now` to [`OrderingScheduler::mark_sent`] and
//! [`OrderingScheduler::due_for_resend`], which makes redelivery timing testable.

use std::collections::{HashMap, VecDeque, hash_map::Entry};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::EventId;

/// Whether an event is a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// Live record event: waits for everything before it and blocks everything after it.
    Live,
    /// Historical record event or identity event: may fly with other non-barriers.
    Free,
}

impl Barrier {
    /// `Live` for `live == true`.
    #[must_use]
    pub fn from_live(live: bool) -> Self {
        if live { Self::Live } else { Self::Free }
    }
}

#[derive(Debug, Default)]
struct DidQueue {
    /// Not yet released, in arrival (id) order.
    waiting: VecDeque<(EventId, Barrier)>,
    /// Released and not yet acked.
    in_flight: usize,
    /// Whether the one in-flight event is a live barrier.
    live_in_flight: bool,
}

#[derive(Debug)]
struct InFlight {
    did: Arc<str>,
    barrier: Barrier,
    /// When it was last written to a consumer; `None` if released but not yet sent, or
    /// handed back after a failed write (then it is due at once).
    last_sent: Option<Instant>,
}

/// Owns the ordering state of every DID. One instance lives in the outbox actor.
#[derive(Debug, Default)]
pub struct OrderingScheduler {
    dids: HashMap<Arc<str>, DidQueue>,
    in_flight: HashMap<EventId, InFlight>,
    /// Send log in send order, for resend scans. Entries of events acked (or sent again)
    /// since are stale: dropped from the front on ack and compacted away when they
    /// outnumber the live ones, so the log stays proportional to what is in flight
    /// (a fast consumer acking 800 k events within one retry timeout must not leave
    /// 800 k entries behind).
    sends: VecDeque<(Instant, EventId)>,
}

/// The send log is compacted once it is this much longer than twice the in-flight count.
const SEND_LOG_SLACK: usize = 1024;

impl OrderingScheduler {
    /// An empty scheduler.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues an event (in id order per DID) and returns the events now released for
    /// delivery, in order. The DID is shared, not copied: events of one write share one.
    pub fn push(&mut self, did: &Arc<str>, id: EventId, barrier: Barrier) -> Vec<EventId> {
        let queue = self.dids.entry(Arc::clone(did)).or_default();
        queue.waiting.push_back((id, barrier));
        let mut released = Vec::new();
        Self::release(did, queue, &mut self.in_flight, &mut released);
        released
    }

    /// Records an ack and returns the events it releases. Unknown or repeated ids are
    /// ignored (acks may come from any connection, more than once).
    pub fn ack(&mut self, id: EventId) -> Vec<EventId> {
        let Some(done) = self.in_flight.remove(&id) else {
            return Vec::new();
        };
        self.drop_stale_sends();
        let mut released = Vec::new();
        if let Entry::Occupied(mut slot) = self.dids.entry(done.did) {
            let queue = slot.get_mut();
            queue.in_flight = queue.in_flight.saturating_sub(1);
            if done.barrier == Barrier::Live {
                queue.live_in_flight = false;
            }
            let did = Arc::clone(slot.key());
            Self::release(&did, slot.get_mut(), &mut self.in_flight, &mut released);
            if slot.get().waiting.is_empty() && slot.get().in_flight == 0 {
                slot.remove();
            }
        }
        released
    }

    /// Whether `id` is released and not yet acked.
    #[must_use]
    pub fn is_in_flight(&self, id: EventId) -> bool {
        self.in_flight.contains_key(&id)
    }

    /// Removes an event of `did` that is still waiting (acked before it was released: a
    /// consumer saw it before a restart) and returns the events this releases. It will
    /// never be released. Ids that are not waiting for `did` are ignored.
    pub fn withdraw(&mut self, did: &str, id: EventId) -> Vec<EventId> {
        let mut released = Vec::new();
        let Some(did) = self.dids.get_key_value(did).map(|(k, _)| Arc::clone(k)) else {
            return released;
        };
        let Some(queue) = self.dids.get_mut(&did) else {
            return released;
        };
        let Some(at) = queue.waiting.iter().position(|&(w, _)| w == id) else {
            return released;
        };
        queue.waiting.remove(at);
        Self::release(&did, queue, &mut self.in_flight, &mut released);
        if queue.waiting.is_empty() && queue.in_flight == 0 {
            self.dids.remove(&did);
        }
        released
    }

    /// Notes that `id` was written to a consumer at `now` (its resend clock starts).
    pub fn mark_sent(&mut self, id: EventId, now: Instant) {
        if let Some(flight) = self.in_flight.get_mut(&id) {
            flight.last_sent = Some(now);
            self.sends.push_back((now, id));
        }
    }

    /// Whether a send-log entry still describes the latest send of an in-flight event.
    fn is_current(in_flight: &HashMap<EventId, InFlight>, sent_at: Instant, id: EventId) -> bool {
        in_flight
            .get(&id)
            .is_some_and(|flight| flight.last_sent == Some(sent_at))
    }

    fn drop_stale_sends(&mut self) {
        while let Some(&(sent_at, id)) = self.sends.front() {
            if Self::is_current(&self.in_flight, sent_at, id) {
                break;
            }
            self.sends.pop_front();
        }
        // Acks out of send order leave stale entries behind a live head; sweep them when
        // they dominate (amortised: the log at least halves each time).
        if self.sends.len() > 2 * self.in_flight.len() + SEND_LOG_SLACK {
            let in_flight = &self.in_flight;
            self.sends
                .retain(|&(sent_at, id)| Self::is_current(in_flight, sent_at, id));
        }
    }

    /// Hands an event back after a failed write: it stays in flight (ordering holds) and
    /// its resend clock stops; the caller queues it for sending again.
    pub fn mark_unsent(&mut self, id: EventId) {
        if let Some(flight) = self.in_flight.get_mut(&id) {
            flight.last_sent = None;
        }
    }

    /// In-flight events last sent at least `timeout` before `now`, oldest first. Each is
    /// reported once per send: after it is sent again ([`mark_sent`](Self::mark_sent)) its
    /// clock restarts, so an unacked event is resent once per timeout, never per tick.
    pub fn due_for_resend(&mut self, now: Instant, timeout: Duration) -> Vec<EventId> {
        let mut due = Vec::new();
        while let Some(&(sent_at, id)) = self.sends.front() {
            if now.saturating_duration_since(sent_at) < timeout {
                break;
            }
            self.sends.pop_front();
            // Skip entries for events acked since, or sent again later.
            if let Some(flight) = self.in_flight.get_mut(&id)
                && flight.last_sent == Some(sent_at)
            {
                // Until it is sent again, it is not due again.
                flight.last_sent = None;
                due.push(id);
            }
        }
        due
    }

    /// Number of events released and not yet acked.
    #[must_use]
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Number of DIDs with anything queued or in flight.
    #[must_use]
    pub fn did_count(&self) -> usize {
        self.dids.len()
    }

    /// Number of events waiting behind a barrier.
    #[must_use]
    pub fn waiting_len(&self) -> usize {
        self.dids.values().map(|q| q.waiting.len()).sum()
    }

    fn release(
        did: &Arc<str>,
        queue: &mut DidQueue,
        in_flight: &mut HashMap<EventId, InFlight>,
        released: &mut Vec<EventId>,
    ) {
        while let Some(&(id, barrier)) = queue.waiting.front() {
            let may_go = match barrier {
                Barrier::Live => queue.in_flight == 0,
                Barrier::Free => !queue.live_in_flight,
            };
            if !may_go {
                break;
            }
            queue.waiting.pop_front();
            queue.in_flight += 1;
            queue.live_in_flight = barrier == Barrier::Live;
            in_flight.insert(
                id,
                InFlight {
                    did: Arc::clone(did),
                    barrier,
                    last_sent: None,
                },
            );
            released.push(id);
            if barrier == Barrier::Live {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests;
