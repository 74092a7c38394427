//! The outbox actor: the one owner of every queued event, its ordering state and its
//! payload. Inputs arrive on one bounded channel; released events leave on one bounded,
//! shared queue that every delivery session (WebSocket or webhook worker) pulls from, so
//! events are sharded across consumers and wait there while none is connected.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backfills::InMemoryBackfills;
use super::capacity::{Capacity, Hold};
use super::ordering::{Barrier, OrderingScheduler};
use super::{AckMode, OutboxSettings};
use crate::status::Progress;
use crate::store::EventId;
use crate::telemetry as t;
use crate::wire;

/// An event handed to the actor.
#[derive(Debug)]
pub struct Queued {
    /// Outbox id.
    pub id: EventId,
    /// Repo DID (the ordering key); shared by the events of one write.
    pub did: Arc<str>,
    /// Live events are barriers.
    pub live: bool,
    /// Stored payload (no id).
    pub payload: String,
    /// The capacity it holds, returned on ack.
    pub hold: Hold,
    /// Whether it is an outbox row (`false`: numbered only, see
    /// [`EventStorage::InMemoryBackfill`](crate::store::EventStorage)).
    pub durable: bool,
}

/// What the actor hands to the deleter ([`super::acks`]) when consumers are done.
#[derive(Debug, Default)]
pub struct Finished {
    /// Acked outbox rows to delete.
    pub ids: Vec<EventId>,
    /// Repos whose in-memory backfill events are all acked, with the token of the latest
    /// such write: their backfill tokens can be cleared.
    pub backfills: Vec<(String, EventId)>,
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
    did: Arc<str>,
    payload: String,
    hold: Hold,
    appended_at: Instant,
    /// Not stored: part of its repo's in-memory backfill count.
    in_memory: bool,
}

/// Capacity of the shared queue between the actor and the sessions. Small on purpose:
/// events sitting here have not been written anywhere yet.
pub const DELIVERY_QUEUE: usize = 1024;

/// Everything the actor task needs.
pub struct Actor {
    settings: OutboxSettings,
    inputs: mpsc::Receiver<Input>,
    out: async_channel::Sender<Delivery>,
    acked_out: mpsc::Sender<Finished>,
    capacity: Capacity,
    order: OrderingScheduler,
    in_memory: InMemoryBackfills,
    /// `in_memory.total()`, published for the resync workers' back-pressure.
    in_memory_held: Arc<AtomicU64>,
    /// Where the status document reads what the outbox holds.
    progress: Arc<Progress>,
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
        acked_out: mpsc::Sender<Finished>,
        capacity: Capacity,
        progress: Arc<Progress>,
    ) -> Self {
        Self {
            settings,
            inputs,
            out,
            acked_out,
            capacity,
            order: OrderingScheduler::new(),
            in_memory: InMemoryBackfills::default(),
            in_memory_held: progress.in_memory_events_counter(),
            progress,
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
                // One append is one write; the store stamped the repo with its first id.
                let write_token = events.first().map_or(EventId(0), |e| e.id);
                for ev in events {
                    if self.held.contains_key(&ev.id) {
                        // Already held: this copy is dropped, and so is what it holds.
                        self.capacity.release(ev.hold);
                        continue;
                    }
                    let released = self.order.push(&ev.did, ev.id, Barrier::from_live(ev.live));
                    let in_memory = !ev.durable;
                    if in_memory {
                        self.in_memory.appended(&ev.did, write_token);
                    }
                    self.held.insert(
                        ev.id,
                        Held {
                            did: ev.did,
                            payload: ev.payload,
                            hold: ev.hold,
                            appended_at: now,
                            in_memory,
                        },
                    );
                    self.queue_ready(released);
                }
            }
            Input::Acked(ids) => {
                crate::failpoint::hit("acks-received");
                let mut done = Finished::default();
                let mut acked = 0;
                for id in ids {
                    let Some(held) = self.held.remove(&id) else {
                        continue; // unknown or repeated ack
                    };
                    acked += 1;
                    self.capacity.release(held.hold);
                    // An event acked before it was released (the consumer saw it before a
                    // restart) leaves its DID's queue instead of blocking it forever.
                    let released = if self.order.is_in_flight(id) {
                        self.order.ack(id)
                    } else {
                        self.order.withdraw(&held.did, id)
                    };
                    self.queue_ready(released);
                    if held.in_memory {
                        if let Some(token) = self.in_memory.acked(&held.did) {
                            done.backfills.push((held.did.to_string(), token));
                        }
                    } else {
                        done.ids.push(id);
                    }
                }
                if acked > 0 {
                    metrics::counter!(t::EVENTS_ACKED).increment(acked);
                }
                if !done.ids.is_empty() || !done.backfills.is_empty() {
                    // The deleter batches; if it is gone (shutdown) the rows stay and are
                    // redelivered next start (and uncleared backfills re-run), which
                    // at-least-once permits.
                    let _ = t::send_measured("acks", &self.acked_out, done).await;
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
        metrics::gauge!(t::original::EVENT_CACHE_SIZE).set(self.held.len() as f64);
        self.in_memory_held
            .store(self.in_memory.total(), std::sync::atomic::Ordering::Relaxed);
        let oldest = self
            .held
            .first_key_value()
            .map(|(_, h)| h.appended_at.elapsed());
        metrics::gauge!(t::OUTBOX_OLDEST_UNACKED_SECONDS)
            .set(oldest.map_or(0.0, |age| age.as_secs_f64()));
        let oldest_ms = oldest.map(|age| {
            crate::status::unix_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX)
        });
        self.progress
            .set_outbox(self.held.len() as u64, oldest_ms, self.sessions as u64);
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
            self.progress.redelivered(due.len() as u64);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::capacity::PAYLOAD_BUDGET;

    /// A running actor over its own channels, for tests that drive it message by message.
    struct Harness {
        capacity: Capacity,
        inputs: mpsc::Sender<Input>,
        out: async_channel::Receiver<Delivery>,
        acked: mpsc::Receiver<Finished>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn start() -> Self {
            Self::with_retry_timeout(Duration::from_secs(3600))
        }

        fn with_retry_timeout(retry_timeout: Duration) -> Self {
            let capacity = Capacity::new(100, PAYLOAD_BUDGET);
            let (inputs, inputs_rx) = mpsc::channel(64);
            let (out_tx, out) = async_channel::bounded(DELIVERY_QUEUE);
            let (acked_tx, acked) = mpsc::channel(64);
            let settings = OutboxSettings {
                capacity: 100,
                ack_mode: AckMode::ClientAck,
                retry_timeout,
            };
            let actor = Actor::new(
                settings,
                inputs_rx,
                out_tx,
                acked_tx,
                capacity.clone(),
                Arc::default(),
            );
            let stop = CancellationToken::new();
            let task = tokio::spawn(actor.run(stop.clone()));
            Self {
                capacity,
                inputs,
                out,
                acked,
                stop,
                task,
            }
        }

        async fn append(&self, did: &str, id: u64, live: bool) {
            let hold = self.capacity.acquire_one(10).await.unwrap();
            let event = Queued {
                id: EventId(id),
                did: Arc::from(did),
                live,
                payload: format!("{{\"n\":{id}}}"),
                hold,
                durable: true,
            };
            self.inputs
                .send(Input::Appended(vec![event]))
                .await
                .unwrap();
        }

        async fn input(&self, msg: Input) {
            self.inputs.send(msg).await.unwrap();
        }

        /// Plays a consumer that writes every delivery the moment it comes and never acks,
        /// until `until`: the instants (after `from`) at which each delivery was written.
        async fn write_without_acking(&self, from: Instant, until: Instant) -> Vec<Duration> {
            let mut sent = Vec::new();
            while let Ok(Ok(d)) = tokio::time::timeout_at(until, self.out.recv()).await {
                let now = Instant::now();
                sent.push(now - from);
                self.input(Input::Sent(vec![d.id], now)).await;
            }
            sent
        }

        async fn ack(&self, ids: &[u64]) {
            let ids = ids.iter().copied().map(EventId).collect();
            self.inputs.send(Input::Acked(ids)).await.unwrap();
        }

        /// The next released event, or `None` if nothing comes within a second.
        async fn next(&self) -> Option<u64> {
            tokio::time::timeout(Duration::from_secs(1), self.out.recv())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|d| d.id.0)
        }

        /// Ids handed to the deleter so far.
        fn deleted(&mut self) -> Vec<u64> {
            let mut ids = Vec::new();
            while let Ok(done) = self.acked.try_recv() {
                ids.extend(done.ids.iter().map(|id| id.0));
            }
            ids
        }

        async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    /// `@atproto/tap` 0.4 queues acks while disconnected and sends them on the next
    /// connection, so an ack can name an event that is held behind a live barrier and was
    /// never released in this run (it was delivered before a restart). The ack is honoured
    /// (the row is deleted) and the DID keeps delivering: nothing waits for it any more.
    #[tokio::test]
    async fn an_ack_for_an_event_not_yet_released_does_not_strand_its_did() {
        let mut h = Harness::start();
        h.append("did:plc:a", 1, true).await;
        h.append("did:plc:a", 2, true).await;
        assert_eq!(h.next().await, Some(1));
        // A late ack for 2, which waits behind 1.
        h.ack(&[2]).await;
        h.ack(&[1]).await;
        h.append("did:plc:a", 3, true).await;
        assert_eq!(h.next().await, Some(3), "the DID delivers again");
        h.ack(&[3]).await;
        // The same late ack again, and acks for ids that never existed, change nothing.
        h.ack(&[2, 2, 999, 0]).await;
        h.append("did:plc:a", 4, false).await;
        assert_eq!(h.next().await, Some(4));
        h.ack(&[4]).await;
        assert_eq!(h.next().await, None, "2 is never sent after its ack");
        let mut deleted = h.deleted();
        deleted.sort_unstable();
        assert_eq!(deleted, [1, 2, 3, 4], "every acked row is deleted once");
        h.stop().await;
    }

    /// Under tokio's paused clock the resend rule is exact: an unacked event goes out again
    /// once per retry timeout after its latest write (at the first tick past it), and while
    /// nobody is connected no copies pile up: the next consumer gets exactly one.
    #[tokio::test(start_paused = true)]
    async fn an_unacked_event_is_resent_once_per_retry_timeout_and_not_while_nobody_is_connected() {
        let timeout = Duration::from_millis(300);
        let tick = timeout / 4;
        let h = Harness::with_retry_timeout(timeout);
        h.input(Input::SessionOpened).await;
        let start = Instant::now();
        h.append("did:plc:a", 1, false).await;
        let sent = h
            .write_without_acking(start, start + Duration::from_secs(3))
            .await;
        assert_eq!(sent[0], Duration::ZERO, "written at once");
        for pair in sent.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= timeout && gap <= timeout + tick,
                "resent after {gap:?} (timeout {timeout:?}, tick {tick:?}): {sent:?}"
            );
        }
        // 3 s at one send per timeout (plus at most a tick of lag each).
        let most = (3000 / timeout.as_millis()) as usize;
        let least = (3000 / (timeout + tick).as_millis()) as usize;
        assert!(
            (least..=most).contains(&sent.len()),
            "{} sends in 3 s: {sent:?}",
            sent.len()
        );

        // The consumer goes away for ten timeouts; nothing is resent meanwhile.
        h.input(Input::SessionClosed).await;
        tokio::time::sleep(timeout * 10).await;
        assert!(
            h.out.is_empty(),
            "no copies queued while nobody is connected"
        );
        h.input(Input::SessionOpened).await;
        let back = Instant::now();
        let again = h.write_without_acking(back, back + timeout / 2).await;
        assert_eq!(again.len(), 1, "one copy for the next consumer: {again:?}");
        h.ack(&[1]).await;
        let after_ack = Instant::now();
        let none = h
            .write_without_acking(after_ack, after_ack + timeout * 4)
            .await;
        assert!(none.is_empty(), "an acked event is never resent: {none:?}");
        h.stop().await;
    }

    /// A copy of an event the actor already holds (a loader reading a row twice) is
    /// dropped, and the capacity it took is given back rather than leaked.
    #[tokio::test]
    async fn a_duplicate_event_returns_its_capacity() {
        let capacity = Capacity::new(10, PAYLOAD_BUDGET);
        let (inputs_tx, inputs_rx) = mpsc::channel(8);
        let (out_tx, _out_rx) = async_channel::bounded(DELIVERY_QUEUE);
        let (acked_tx, _acked_rx) = mpsc::channel(8);
        let settings = OutboxSettings {
            capacity: 10,
            ack_mode: AckMode::ClientAck,
            retry_timeout: Duration::from_secs(60),
        };
        let actor = Actor::new(
            settings,
            inputs_rx,
            out_tx,
            acked_tx,
            capacity.clone(),
            Arc::default(),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(actor.run(stop.clone()));
        let event = |hold| Queued {
            id: EventId(1),
            did: Arc::from("did:plc:a"),
            live: false,
            payload: "x".repeat(1000),
            hold,
            durable: true,
        };
        for _ in 0..2 {
            let hold = capacity.acquire_one(1000).await.unwrap();
            inputs_tx
                .send(Input::Appended(vec![event(hold)]))
                .await
                .unwrap();
        }
        // The original still holds one event and 1000 bytes; the copy held the same.
        tap_testkit::wait::poll_until(
            "the copy's capacity to come back",
            Duration::from_secs(5),
            || {
                let hold = capacity.try_acquire_one(PAYLOAD_BUDGET - 1000);
                async move { hold }
            },
        )
        .await;
        assert!(
            capacity.try_acquire_one(1).is_none(),
            "the original's is still held"
        );
        stop.cancel();
        task.await.unwrap();
    }
}
