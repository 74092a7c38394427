//! What the two live sources share: per-DID ordered workers ([`dispatch`]), the cursor
//! as a low-water mark ([`cursor`]) and its saver. The relay firehose
//! ([`crate::firehose`]) and Jetstream ([`crate::jetstream`]) each read their stream,
//! turn it into jobs, and hand them to these.

pub mod cursor;
pub mod dispatch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::{Store, StoreError};
use cursor::SeqTracker;

/// What the app keeps to stop a live stage in order.
pub struct StageHandle {
    saver: tokio::task::JoinHandle<()>,
    saver_stop: CancellationToken,
}

impl StageHandle {
    /// After the reader and workers are done: saves the final cursor and stops the saver.
    pub async fn flush(self) {
        self.saver_stop.cancel();
        let _ = self.saver.await;
    }
}

/// Where a stage's first connection starts: the cursor stored under `key`, unless
/// `no_replay`.
///
/// # Errors
/// The stored cursor cannot be read.
pub async fn start_cursor(
    store: &Store,
    key: &str,
    no_replay: bool,
) -> Result<Option<i64>, StoreError> {
    let stored = store.firehose_cursor(key).await?;
    if no_replay {
        tracing::info!(stored = ?stored, "Ignoring the saved cursor (--no-replay).");
        return Ok(None);
    }
    Ok(stored)
}

/// Starts the cursor saver of a stage whose cursor is stored under `key`: it persists the
/// low-water mark of `seqs` every `interval` when it moved, and once more when the handle
/// is flushed (after the workers, so its last save covers them).
pub fn spawn_saver(
    store: Store,
    key: String,
    seqs: Arc<Mutex<SeqTracker>>,
    progress: Arc<Progress>,
    interval: Duration,
    supervisor: &Supervisor,
) -> StageHandle {
    let saver_stop = CancellationToken::new();
    let saver = tokio::spawn(supervisor.watch(
        "cursor saver",
        true,
        run_cursor_saver(store, key, seqs, progress, interval, saver_stop.clone()),
    ));
    StageHandle { saver, saver_stop }
}

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
                Err(error) => tracing::warn!(%error, mark, "Failed to save the live cursor."),
            }
        }
        if stopping {
            if let Some(mark) = saved {
                tracing::info!(cursor = mark, "Saved the live cursor.");
            }
            return;
        }
    }
}
