//! Parallel processing with strict per-DID order: frames are sharded by DID over N
//! workers, each with a bounded queue. A DID always lands on the same worker, so its
//! events run one at a time in stream order; different DIDs run concurrently. When a
//! worker's queue is full the reader waits, which pushes back on the relay connection.
//!
//! Sharding by hash (instead of a free-worker pool with per-DID queues, as the Go tap
//! does) keeps every queue bounded; the cost is that a slow event delays the other DIDs
//! of its shard. With the default 10 workers that is a tenth of the stream, briefly.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tap_atproto::firehose::Frame;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cursor::SeqTracker;
use crate::repos::engine::{Engine, EngineError, FailureClass, Outcome};
use crate::shutdown::Supervisor;
use crate::telemetry as t;

/// Frames queued per worker.
pub const WORKER_QUEUE: usize = 64;
/// Backoff between retries of an event that failed on a transient error.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Tries of an event whose identity lookup keeps failing before its repo is left to a
/// resync: with the doubling delay (1, 2, 4, 8, 16 s) about 30 s plus the lookups' own
/// timeouts, enough for a PLC blip, short enough that an outage does not hold a shard of
/// the stream for long.
const UNAVAILABLE_ATTEMPTS: u32 = 6;

/// What a worker is handed: a decoded frame, or what could be read of one that failed to
/// decode (its repo is resynced, in order with that repo's other events).
#[derive(Debug)]
pub enum Work {
    /// A decoded frame.
    Frame(Frame),
    /// A frame refused by the decoder, about a repo whose DID could still be read.
    Refused {
        /// The frame's seq, if readable.
        seq: Option<i64>,
        /// The repo it was about.
        did: String,
        /// Why it was refused.
        reason: String,
    },
}

impl Work {
    fn seq(&self) -> Option<i64> {
        match self {
            Self::Frame(f) => f.seq(),
            Self::Refused { seq, .. } => *seq,
        }
    }
}

/// The sending side: one bounded queue per worker.
pub struct Dispatcher {
    workers: Vec<mpsc::Sender<Work>>,
}

impl Dispatcher {
    /// Spawns `parallelism` workers.
    #[must_use]
    pub fn spawn(
        parallelism: usize,
        engine: Engine,
        seqs: Arc<Mutex<SeqTracker>>,
        supervisor: &Supervisor,
        stop: CancellationToken,
    ) -> Self {
        let workers = (0..parallelism.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                supervisor.spawn(
                    "firehose worker",
                    run_worker(rx, engine.clone(), Arc::clone(&seqs), stop.clone()),
                );
                tx
            })
            .collect();
        Self { workers }
    }

    /// Queues work on its DID's worker; waits while that worker is full. Returns `false`
    /// when the workers are gone (shutdown).
    pub async fn dispatch(&self, did: &str, work: Work) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        did.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % self.workers.len() as u64).unwrap_or(0);
        t::send_measured("firehose_dispatch", &self.workers[index], work)
            .await
            .is_ok()
    }
}

async fn run_worker(
    mut queue: mpsc::Receiver<Work>,
    engine: Engine,
    seqs: Arc<Mutex<SeqTracker>>,
    stop: CancellationToken,
) {
    while let Some(work) = queue.recv().await {
        let seq = work.seq();
        if !process(&engine, &work, &stop).await {
            // Not finished: the cursor stays below this event, and the next run (or
            // reconnect) reads it again.
            return;
        }
        crate::failpoint::hit("firehose-event-committed");
        if let Some(seq) = seq {
            seqs.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .finish(seq);
        }
    }
}

/// Handles one frame until it is done: applied, buffered, skipped by rule, or its repo
/// marked for a resync that will bring in its effects. `false` when tap stops first.
async fn process(engine: &Engine, work: &Work, stop: &CancellationToken) -> bool {
    let seq = work.seq();
    let frame = match work {
        Work::Frame(frame) => frame,
        Work::Refused { did, reason, .. } => {
            let reason = format!("firehose event {seq:?} could not be decoded: {reason}");
            return desynchronize(engine, did, &reason, stop).await;
        }
    };
    let mut unavailable = 0u32;
    loop {
        let error = match handle(engine, frame).await {
            Ok(outcome) => {
                record(&outcome);
                return true;
            }
            Err(error) => error,
        };
        let mut delay = RETRY_DELAY;
        match error.class() {
            FailureClass::Stopping => return false,
            FailureClass::Transient => {
                tracing::warn!(%error, ?seq, "Firehose event failed; retrying.");
            }
            FailureClass::Unavailable if unavailable + 1 < UNAVAILABLE_ATTEMPTS => {
                unavailable += 1;
                delay = RETRY_DELAY * (1 << unavailable);
                tracing::info!(%error, ?seq, attempt = unavailable, ?delay, "Firehose event waits for its identity; retrying.");
            }
            FailureClass::Unavailable => {
                let Some(did) = frame_did(frame) else {
                    return true;
                };
                let reason = format!("firehose event {seq:?} could not be verified: {error}");
                return desynchronize(engine, did, &reason, stop).await;
            }
            FailureClass::Repo => {
                let Some(did) = frame_did(frame) else {
                    return true; // only repo events can fail
                };
                let reason = format!("firehose event {seq:?} could not be applied: {error}");
                return desynchronize(engine, did, &reason, stop).await;
            }
        }
        if !pause(stop, delay).await {
            return false;
        }
    }
}

/// Marks `did` for a resync that brings in the effects of an event that could not be
/// applied, retrying store failures until it is recorded. `false` when tap stops first.
async fn desynchronize(engine: &Engine, did: &str, reason: &str, stop: &CancellationToken) -> bool {
    loop {
        match engine.desynchronize(did, reason).await {
            Ok(outcome) => {
                tracing::warn!(
                    did,
                    reason,
                    "Firehose event dropped; its repo will be resynced."
                );
                record(&outcome);
                return true;
            }
            Err(e) if e.class() == FailureClass::Stopping => return false,
            Err(e) => {
                tracing::warn!(error = %e, did, "Cannot mark the repo for a resync; retrying.");
            }
        }
        if !pause(stop, RETRY_DELAY).await {
            return false;
        }
    }
}

/// Waits before a retry; `false` when tap stops first.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// The repo a frame is about, if it is a repo event.
fn frame_did(frame: &Frame) -> Option<&str> {
    match frame {
        Frame::Commit(c) => Some(c.repo.as_str()),
        Frame::Sync(s) => Some(s.did.as_str()),
        Frame::Identity(i) => Some(i.did.as_str()),
        Frame::Account(a) => Some(a.did.as_str()),
        Frame::Info(_) | Frame::Error(_) | Frame::Unknown { .. } => None,
    }
}

async fn handle(engine: &Engine, frame: &Frame) -> Result<Outcome, EngineError> {
    match frame {
        Frame::Commit(c) => engine.handle_commit(c).await,
        Frame::Sync(s) => engine.handle_sync(s).await,
        Frame::Identity(i) => engine.handle_identity(i).await,
        Frame::Account(a) => engine.handle_account(a).await,
        Frame::Info(_) | Frame::Error(_) | Frame::Unknown { .. } => {
            Ok(Outcome::Skipped("not a repo event"))
        }
    }
}

fn record(outcome: &Outcome) {
    let label = match outcome {
        Outcome::Applied => "applied",
        Outcome::Buffered => "buffered",
        Outcome::Desynchronized(_) => "desynchronized",
        Outcome::Tracked => "tracked",
        Outcome::Skipped(_) => "skipped",
    };
    metrics::counter!(t::FIREHOSE_EVENTS, "outcome" => label).increment(1);
    let original = match outcome {
        Outcome::Skipped(_) | Outcome::Buffered => t::original::FIREHOSE_EVENTS_SKIPPED,
        _ => t::original::FIREHOSE_EVENTS_PROCESSED,
    };
    metrics::counter!(original).increment(1);
}
