//! Handle checks apart from repo fetches. Verifying a handle means DNS TXT and HTTPS
//! look-ups that can take seconds each on the real network (stale or slow handles are
//! common); a resync needs only the DID document's key and PDS to start. So a resync
//! queues its repo here and goes on, and a few checkers verify handles concurrently and
//! emit the identity event when the handle is known (identity events are not ordering
//! barriers). The queue is bounded: when checks fall behind, resyncs wait to queue more.

use tap_atproto::syntax::Did;
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, FailureClass};
use crate::shutdown::Supervisor;

/// Handle checks running at once.
pub const CHECKERS: usize = 8;
/// Repos waiting for a check.
const QUEUE: usize = 1024;

/// Where resyncs queue their repos' handle checks. Cheap to clone.
#[derive(Clone)]
pub struct HandleChecks {
    queue: async_channel::Sender<Did>,
}

impl HandleChecks {
    /// Starts the checkers; they run until `stop` is cancelled.
    #[must_use]
    pub fn spawn(engine: &Engine, supervisor: &Supervisor, stop: &CancellationToken) -> Self {
        let (queue, jobs) = async_channel::bounded(QUEUE);
        for _ in 0..CHECKERS {
            supervisor.spawn(
                "handle checker",
                run_checker(engine.clone(), jobs.clone(), stop.clone()),
            );
        }
        Self { queue }
    }

    /// Queues a check of `did`'s handle; waits while the queue is full.
    pub async fn submit(&self, did: Did) {
        // Fails only when the checkers are gone: tap is stopping, and the next resync
        // checks again.
        let started = std::time::Instant::now();
        let _ = self.queue.send(did).await;
        crate::telemetry::record_channel("handle_checks", started, self.queue.len());
    }
}

async fn run_checker(engine: Engine, jobs: async_channel::Receiver<Did>, stop: CancellationToken) {
    loop {
        let did = tokio::select! {
            () = stop.cancelled() => return,
            job = jobs.recv() => match job {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let checked = tokio::select! {
            () = stop.cancelled() => return,
            r = engine.check_handle(&did) => r,
        };
        match checked {
            Ok(_) => {}
            Err(e) if e.class() == FailureClass::Stopping => return,
            // The repo syncs regardless; its next resync or #identity checks again.
            Err(error) => tracing::info!(%did, %error, "Handle check failed."),
        }
    }
}
