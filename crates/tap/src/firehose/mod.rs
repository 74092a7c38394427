//! The firehose stage: follow the relay's `subscribeRepos`, decode frames, dispatch them
//! with strict per-DID order, and persist the cursor as a low-water mark.

pub mod consumer;
pub mod cursor;
pub mod dispatch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use url::Url;

use crate::repos::engine::Engine;
use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::{Store, StoreError};
use cursor::SeqTracker;

/// Settings of the firehose stage.
#[derive(Debug, Clone)]
pub struct FirehoseSettings {
    /// Relay base URL; its string form keys the stored cursor.
    pub relay_url: Url,
    /// Ignore the stored cursor at start-up (reconnects still resume).
    pub no_replay: bool,
    /// Workers.
    pub parallelism: usize,
    /// How often the cursor is persisted.
    pub cursor_save_interval: Duration,
}

/// What the app keeps to stop the stage in order.
pub struct FirehoseHandle {
    saver: tokio::task::JoinHandle<()>,
    saver_stop: CancellationToken,
}

impl FirehoseHandle {
    /// After the reader and workers are done: saves the final cursor and stops the saver.
    pub async fn flush(self) {
        self.saver_stop.cancel();
        let _ = self.saver.await;
    }
}

/// Where the first connection starts: the stored cursor, unless `--no-replay`.
///
/// # Errors
/// The stored cursor cannot be read.
pub async fn start_cursor(
    settings: &FirehoseSettings,
    store: &Store,
) -> Result<Option<i64>, StoreError> {
    let stored = store.firehose_cursor(settings.relay_url.as_str()).await?;
    if settings.no_replay {
        tracing::info!(stored = ?stored, "Ignoring the saved firehose cursor (--no-replay).");
        return Ok(None);
    }
    Ok(stored)
}

/// Starts the reader and workers (stopped by `intake`) and the cursor saver (stopped by
/// [`FirehoseHandle::flush`], after the workers, so its last save covers them), from
/// `start` (see [`start_cursor`]).
pub fn spawn(
    settings: FirehoseSettings,
    start: Option<i64>,
    engine: Engine,
    store: Store,
    progress: Arc<Progress>,
    supervisor: &Supervisor,
    intake: CancellationToken,
) -> FirehoseHandle {
    let key = settings.relay_url.to_string();
    if let Some(seq) = start {
        progress.set_firehose_seq(seq);
    }
    // With --no-replay the tracker starts empty: the first frames set the mark.
    let seqs = Arc::new(Mutex::new(SeqTracker::resume(start)));
    let ledger = engine.ledger().clone();
    let dispatcher = dispatch::Dispatcher::spawn(
        settings.parallelism,
        engine,
        Arc::clone(&seqs),
        supervisor,
        intake.clone(),
    );
    supervisor.spawn(
        "firehose reader",
        consumer::run_consumer(
            settings.relay_url.clone(),
            start,
            dispatcher,
            Arc::clone(&seqs),
            ledger,
            Arc::clone(&progress),
            intake,
        ),
    );
    let saver_stop = CancellationToken::new();
    let saver = tokio::spawn(supervisor.watch(
        "firehose cursor saver",
        true,
        run_cursor_saver(
            store,
            key,
            seqs,
            progress,
            settings.cursor_save_interval,
            saver_stop.clone(),
        ),
    ));
    FirehoseHandle { saver, saver_stop }
}

/// Persists the low-water mark every `interval` when it moved, and once more on stop.
async fn run_cursor_saver(
    store: Store,
    key: String,
    seqs: Arc<Mutex<SeqTracker>>,
    progress: Arc<Progress>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut saved: Option<i64> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        crate::failpoint::hit("cursor-saver-tick");
        let mark = seqs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .low_water_mark();
        if let Some(mark) = mark
            && saved != Some(mark)
        {
            match store.save_firehose_cursor(&key, mark).await {
                Ok(()) => {
                    saved = Some(mark);
                    progress.set_firehose_seq(mark);
                }
                Err(error) => tracing::warn!(%error, mark, "Failed to save the firehose cursor."),
            }
        }
        if stopping {
            if let Some(mark) = saved {
                tracing::info!(cursor = mark, "Saved the firehose cursor.");
            }
            return;
        }
    }
}
