//! Jetstream as the live source (`--jetstream-url`): only the wanted collections (and,
//! when tap tracks few repos by hand, only their DIDs) come down the wire, as JSON claims
//! one per operation. The reader ([`reader`]) groups them back into commits
//! ([`group`]); the live workers ([`crate::live`]) prove each record against its PDS
//! ([`prove`]) and settle the commit like a firehose one ([`apply`]). The cursor is
//! Jetstream's `time_us`, kept as a low-water mark like the firehose seq.

pub mod apply;
pub mod group;
pub mod prove;
pub mod reader;
pub mod wanted;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::JetstreamConfig;
use crate::live::cursor::SeqTracker;
use crate::live::dispatch::Dispatcher;
use crate::live::{self, StageHandle};
use crate::repos::engine::Engine;
use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::Store;
use apply::JetstreamHandler;
use prove::Prover;

/// How long Jetstream is assumed to keep events: a saved cursor older than this cannot
/// be replayed whole, so every syncing repo is resynced. Public instances keep about a
/// day; a shorter assumption only costs resyncs that were not needed.
pub const RETENTION: Duration = Duration::from_secs(20 * 60 * 60);

/// Settings of the Jetstream stage.
#[derive(Debug, Clone)]
pub struct JetstreamSettings {
    /// `--jetstream-url` and its verification settings.
    pub config: JetstreamConfig,
    /// Workers.
    pub parallelism: usize,
    /// How often the cursor is persisted.
    pub cursor_save_interval: Duration,
}

/// Starts the wanted-set task, the reader and workers (stopped by `intake`) and the
/// cursor saver (stopped by [`StageHandle::flush`]), from `start` (the stored cursor,
/// see [`live::start_cursor`]).
#[expect(
    clippy::too_many_arguments,
    reason = "the stage's wiring, in one place"
)]
pub fn spawn(
    settings: JetstreamSettings,
    start: Option<i64>,
    engine: Engine,
    prover: Option<Arc<Prover>>,
    store: Store,
    progress: Arc<Progress>,
    supervisor: &Supervisor,
    intake: CancellationToken,
) -> StageHandle {
    if let Some(time_us) = start {
        progress.set_firehose_seq(time_us);
    }
    let seqs = Arc::new(Mutex::new(SeqTracker::resume(start)));
    let ledger = engine.ledger().clone();
    let scope = engine.live_scope().clone();
    let dispatcher = Dispatcher::spawn(
        settings.parallelism,
        JetstreamHandler::new(engine, prover),
        Arc::clone(&seqs),
        supervisor,
        intake.clone(),
    );
    let (wanted_tx, wanted_rx) = tokio::sync::watch::channel(None);
    supervisor.spawn(
        "jetstream wanted set",
        wanted::run(scope, store.clone(), wanted_tx, intake.clone()),
    );
    supervisor.spawn(
        "jetstream reader",
        reader::run_reader(
            reader::Reader {
                url: settings.config.url.clone(),
                watchdog: settings.config.watchdog,
                dispatcher,
                seqs: Arc::clone(&seqs),
                ledger,
                progress: Arc::clone(&progress),
                store: store.clone(),
            },
            start,
            wanted_rx,
            intake,
        ),
    );
    live::spawn_saver(
        "jetstream cursor saver",
        store,
        settings.config.url.to_string(),
        seqs,
        progress,
        settings.cursor_save_interval,
        supervisor,
    )
}
