//! Parallel processing with strict per-DID order: jobs are sharded by DID over N workers,
//! each with a bounded queue. A DID always lands on the same worker, so its events run one
//! at a time in stream order; different DIDs run concurrently. When a worker's queue is
//! full the reader waits, which pushes back on the upstream connection.
//!
//! Sharding by hash (instead of a free-worker pool with per-DID queues, as the Go tap
//! does) keeps every queue bounded; the cost is that a slow event delays the other DIDs
//! of its shard. With the default 10 workers that is a tenth of the stream, briefly.
//!
//! The same workers serve the relay firehose and Jetstream: each source says what its
//! jobs are ([`Job`]) and how one is handled ([`Handler`]); the retry rules are here.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cursor::SeqTracker;
use crate::repos::engine::{Engine, EngineError, FailureClass, Outcome};
use crate::shutdown::Supervisor;
use crate::telemetry as t;

/// Jobs queued per worker.
pub const WORKER_QUEUE: usize = 64;
/// Backoff between retries of an event that failed on a transient error.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Tries of an event whose identity (or proof) lookup keeps failing before its repo is
/// left to a resync: with the doubling delay (1, 2, 4, 8, 16 s) about 30 s plus the
/// lookups' own timeouts, enough for a PLC blip, short enough that an outage does not hold
/// a shard of the stream for long.
const UNAVAILABLE_ATTEMPTS: u32 = 6;

/// One unit of live work, about at most one repo.
pub trait Job: Send + Sync + 'static {
    /// The repo it is about; `None` for stream notices, which cannot fail.
    fn did(&self) -> Option<&str>;
    /// The stream positions it covers (started by the reader; finished once it is done).
    fn positions(&self) -> &[i64];
    /// How logs and desync reasons name it (`firehose event Some(42)`).
    fn describe(&self) -> String;
}

/// How a source's jobs are handled.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The source's job.
    type Job: Job;
    /// Handles one job (the engine's verdict, or why there is none yet).
    fn handle(&self, job: &Self::Job) -> impl Future<Output = Result<Outcome, EngineError>> + Send;
    /// The engine, to mark a repo for a resync when a job cannot be handled.
    fn engine(&self) -> &Engine;
}

/// The sending side: one bounded queue per worker.
pub struct Dispatcher<J> {
    workers: Vec<mpsc::Sender<J>>,
}

impl<J: Job> Dispatcher<J> {
    /// Spawns `parallelism` workers.
    #[must_use]
    pub fn spawn<H: Handler<Job = J>>(
        parallelism: usize,
        handler: H,
        seqs: Arc<Mutex<SeqTracker>>,
        supervisor: &Supervisor,
        stop: CancellationToken,
    ) -> Self {
        let workers = (0..parallelism.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                supervisor.spawn(
                    "live event worker",
                    run_worker(rx, handler.clone(), Arc::clone(&seqs), stop.clone()),
                );
                tx
            })
            .collect();
        Self { workers }
    }

    /// Queues a job on its DID's worker; waits while that worker is full. Returns `false`
    /// when the workers are gone (shutdown).
    pub async fn dispatch(&self, did: &str, job: J) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        did.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % self.workers.len() as u64).unwrap_or(0);
        t::send_measured("firehose_dispatch", &self.workers[index], job)
            .await
            .is_ok()
    }
}

async fn run_worker<H: Handler>(
    mut queue: mpsc::Receiver<H::Job>,
    handler: H,
    seqs: Arc<Mutex<SeqTracker>>,
    stop: CancellationToken,
) {
    while let Some(job) = queue.recv().await {
        if !process(&handler, &job, &stop).await {
            // Not finished: the cursor stays below this event, and the next run (or
            // reconnect) reads it again.
            return;
        }
        crate::failpoint::hit("firehose-event-committed");
        let mut seqs = seqs.lock().unwrap_or_else(PoisonError::into_inner);
        for position in job.positions() {
            seqs.finish(*position);
        }
    }
}

/// Handles one job until it is done: applied, buffered, skipped by rule, or its repo
/// marked for a resync that will bring in its effects. `false` when tap stops first.
async fn process<H: Handler>(handler: &H, job: &H::Job, stop: &CancellationToken) -> bool {
    let mut unavailable = 0u32;
    loop {
        let error = match handler.handle(job).await {
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
                tracing::warn!(%error, job = job.describe(), "Live event failed; retrying.");
            }
            FailureClass::Unavailable if unavailable + 1 < UNAVAILABLE_ATTEMPTS => {
                unavailable += 1;
                delay = RETRY_DELAY * (1 << unavailable);
                tracing::info!(%error, job = job.describe(), attempt = unavailable, ?delay, "Live event waits for its identity or proof; retrying.");
            }
            FailureClass::Unavailable => {
                let Some(did) = job.did() else {
                    return true;
                };
                let reason = format!("{} could not be verified: {error}", job.describe());
                return desynchronize(handler.engine(), did, &reason, stop).await;
            }
            FailureClass::Repo => {
                let Some(did) = job.did() else {
                    return true; // only repo events can fail
                };
                let reason = format!("{} could not be applied: {error}", job.describe());
                return desynchronize(handler.engine(), did, &reason, stop).await;
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
                    "Live event dropped; its repo will be resynced."
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
