//! The outbox actor: the one owner of every queued event, its ordering state and its
//! payload. Inputs arrive on one bounded channel; released events leave on one bounded,
//! shared queue that every delivery session (WebSocket or webhook worker) pulls from, so
//! events are sharded across consumers and wait there while none is connected.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::ordering::{Barrier, OrderingScheduler};
use super::{AckMode, OutboxSettings};
use crate::store::EventId;
use crate::telemetry as t;
use crate::wire;

/// An event handed to the actor.
#[derive(Debug)]
pub struct Queued {
    /// Outbox id.
    pub id: EventId,
    /// Repo DID (the ordering key).
    pub did: String,
    /// Live events are barriers.
    pub live: bool,
    /// Stored payload (no id).
    pub payload: String,
    /// Whether it holds a capacity permit to return on ack.
    pub holds_permit: bool,
}

/// Messages to the actor.
#[derive(Debug)]
pub enum Input {
    /// New events, in id order.
    Appended(Vec<Queued>),
    /// Events the consumer is done with (client ack, successful write, or webhook 2xx).
    Acked(Vec<EventId>),
    /// Events written to a client at this instant (their resend clock starts).
    Sent(Vec<EventId>, Instant),
    /// Events taken for sending but not written (the connection failed): send again.
    Unsent(Vec<EventId>),
    /// A consumer connected.
    SessionOpened,
    /// A consumer disconnected.
    SessionClosed,
}

/// One event ready to be written: the exact text frame.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Outbox id (what the consumer acks).
    pub id: EventId,
    /// The event JSON with its id.
    pub text: String,
}

struct Held {
    payload: String,
    holds_permit: bool,
    appended_at: Instant,
}

/// Capacity of the shared queue between the actor and the sessions. Small on purpose:
/// events sitting here have not been written anywhere yet.
pub const DELIVERY_QUEUE: usize = 1024;

/// Everything the actor task needs.
pub struct Actor {
    settings: OutboxSettings,
    inputs: mpsc::Receiver<Input>,
    out: async_channel::Sender<Delivery>,
    acked_out: mpsc::Sender<Vec<EventId>>,
    permits: Arc<Semaphore>,
    order: OrderingScheduler,
    held: BTreeMap<EventId, Held>,
    ready: VecDeque<EventId>,
    in_ready: HashSet<EventId>,
    sessions: usize,
}

impl Actor {
    /// Builds the actor; run it with [`run`](Self::run).
    pub fn new(
        settings: OutboxSettings,
        inputs: mpsc::Receiver<Input>,
        out: async_channel::Sender<Delivery>,
        acked_out: mpsc::Sender<Vec<EventId>>,
        permits: Arc<Semaphore>,
    ) -> Self {
        Self {
            settings,
            inputs,
            out,
            acked_out,
            permits,
            order: OrderingScheduler::new(),
            held: BTreeMap::new(),
            ready: VecDeque::new(),
            in_ready: HashSet::new(),
            sessions: 0,
        }
    }

    /// Runs until `stop` is cancelled or every input sender is gone.
    pub async fn run(mut self, stop: CancellationToken) {
        // Resend checks are cheap (a queue head peek), so tick often enough for a timeout
        // to be honoured within ~1 s, and at least 4 times per timeout.
        let period = (self.settings.retry_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.fill_queue();
            let next = self.next_delivery();
            let has_next = next.is_some();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                msg = self.inputs.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
                // Only reached when the queue was full: wait for a session to take one.
                sent = self.out.send(next.unwrap_or_else(empty)), if has_next => {
                    if sent.is_err() { break; }
                    self.pop_ready();
                }
                _ = tick.tick() => self.resend_due(Instant::now()),
            }
        }
        // Acks already queued when delivery stopped still count: forward them to the deleter
        // so the final flush deletes them instead of the next run redelivering them.
        while let Ok(msg) = self.inputs.try_recv() {
            if matches!(msg, Input::Acked(_)) {
                self.handle(msg).await;
            }
        }
        tracing::debug!(held = self.held.len(), "Outbox actor stopped.");
    }

    async fn handle(&mut self, msg: Input) {
        match msg {
            Input::Appended(events) => {
                let now = Instant::now();
                for ev in events {
                    if self.held.contains_key(&ev.id) {
                        continue;
                    }
                    let released = self.order.push(&ev.did, ev.id, Barrier::from_live(ev.live));
                    self.held.insert(
                        ev.id,
                        Held {
                            payload: ev.payload,
                            holds_permit: ev.holds_permit,
                            appended_at: now,
                        },
                    );
                    self.queue_ready(released);
                }
            }
            Input::Acked(ids) => {
                let mut done = Vec::with_capacity(ids.len());
                for id in ids {
                    let Some(held) = self.held.remove(&id) else {
                        continue; // unknown or repeated ack
                    };
                    if held.holds_permit {
                        self.permits.add_permits(1);
                    }
                    let released = self.order.ack(id);
                    self.queue_ready(released);
                    done.push(id);
                }
                if !done.is_empty() {
                    metrics::counter!(t::EVENTS_ACKED).increment(done.len() as u64);
                    // The deleter batches; if it is gone (shutdown) the rows stay and are
                    // redelivered next start, which at-least-once permits.
                    let _ = self.acked_out.send(done).await;
                }
            }
            Input::Sent(ids, at) => {
                for id in ids {
                    self.order.mark_sent(id, at);
                }
            }
            Input::Unsent(ids) => {
                for id in &ids {
                    self.order.mark_unsent(*id);
                }
                self.queue_ready(ids);
            }
            Input::SessionOpened => self.sessions += 1,
            Input::SessionClosed => self.sessions = self.sessions.saturating_sub(1),
        }
        metrics::gauge!(t::OUTBOX_HELD).set(self.held.len() as f64);
        let oldest = self
            .held
            .first_key_value()
            .map_or(0.0, |(_, h)| h.appended_at.elapsed().as_secs_f64());
        metrics::gauge!(t::OUTBOX_OLDEST_UNACKED_SECONDS).set(oldest);
    }

    /// Unacked events whose resend time has come go out again, but only while someone is
    /// connected to take them (otherwise duplicates would pile up in the queue).
    fn resend_due(&mut self, now: Instant) {
        if self.settings.ack_mode != AckMode::ClientAck || self.sessions == 0 {
            return;
        }
        let due = self.order.due_for_resend(now, self.settings.retry_timeout);
        if !due.is_empty() {
            metrics::counter!(t::EVENTS_REDELIVERED).increment(due.len() as u64);
            tracing::debug!(events = due.len(), "Resending unacked events.");
            self.queue_ready(due);
        }
    }

    fn queue_ready(&mut self, ids: Vec<EventId>) {
        for id in ids {
            if self.in_ready.insert(id) {
                self.ready.push_back(id);
            }
        }
    }

    /// Moves ready events into the shared queue while it has room (the fast path).
    fn fill_queue(&mut self) {
        while let Some(delivery) = self.next_delivery() {
            match self.out.try_send(delivery) {
                Ok(()) => self.pop_ready(),
                Err(_) => break,
            }
        }
    }

    /// The frame of the first ready event that is still held (skipping acked ones).
    fn next_delivery(&mut self) -> Option<Delivery> {
        while let Some(&id) = self.ready.front() {
            if let Some(held) = self.held.get(&id) {
                return Some(Delivery {
                    id,
                    text: wire::frame(id, &held.payload),
                });
            }
            self.pop_ready();
        }
        None
    }

    fn pop_ready(&mut self) {
        if let Some(id) = self.ready.pop_front() {
            self.in_ready.remove(&id);
        }
    }
}

/// Placeholder for the disabled send branch of `select!` (never sent).
fn empty() -> Delivery {
    Delivery {
        id: EventId(0),
        text: String::new(),
    }
}
