//! The relay firehose: follow `subscribeRepos`, decode frames, and hand them to the live
//! workers ([`crate::live`]) as [`Work`], with strict per-DID order.

pub mod consumer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tap_atproto::firehose::Frame;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::live::cursor::SeqTracker;
use crate::live::dispatch::{Dispatcher, Handler, Job};
use crate::live::{self, StageHandle};
use crate::repos::engine::{Engine, EngineError, Outcome};
use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::{Store, StoreError};

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

/// Where the first connection starts: the stored cursor, unless `--no-replay`.
///
/// # Errors
/// The stored cursor cannot be read.
pub async fn start_cursor(
    settings: &FirehoseSettings,
    store: &Store,
) -> Result<Option<i64>, StoreError> {
    live::start_cursor(store, settings.relay_url.as_str(), settings.no_replay).await
}

/// What a worker is handed: a decoded frame, or what could be read of one that failed to
/// decode (its repo is resynced, in order with the repo's other events).
#[derive(Debug)]
pub enum Work {
    /// A decoded frame, and its seq when it has one.
    Frame(Frame, Option<i64>),
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
    /// A decoded frame.
    #[must_use]
    pub fn frame(frame: Frame) -> Self {
        let seq = frame.seq();
        Self::Frame(frame, seq)
    }

    fn seq(&self) -> &Option<i64> {
        match self {
            Self::Frame(_, seq) | Self::Refused { seq, .. } => seq,
        }
    }
}

impl Job for Work {
    fn did(&self) -> Option<&str> {
        match self {
            Self::Frame(Frame::Commit(c), _) => Some(c.repo.as_str()),
            Self::Frame(Frame::Sync(s), _) => Some(s.did.as_str()),
            Self::Frame(Frame::Identity(i), _) => Some(i.did.as_str()),
            Self::Frame(Frame::Account(a), _) => Some(a.did.as_str()),
            Self::Frame(Frame::Info(_) | Frame::Error(_) | Frame::Unknown { .. }, _) => None,
            Self::Refused { did, .. } => Some(did),
        }
    }

    fn positions(&self) -> &[i64] {
        self.seq().as_slice()
    }

    fn describe(&self) -> String {
        format!("firehose event {:?}", self.seq())
    }
}

/// Firehose frames go to the engine's handlers.
#[derive(Clone)]
struct FrameHandler(Engine);

impl Handler for FrameHandler {
    type Job = Work;

    async fn handle(&self, work: &Work) -> Result<Outcome, EngineError> {
        let engine = &self.0;
        match work {
            Work::Frame(Frame::Commit(c), _) => engine.handle_commit(c).await,
            Work::Frame(Frame::Sync(s), _) => engine.handle_sync(s).await,
            Work::Frame(Frame::Identity(i), _) => engine.handle_identity(i).await,
            Work::Frame(Frame::Account(a), _) => engine.handle_account(a).await,
            Work::Frame(Frame::Info(_) | Frame::Error(_) | Frame::Unknown { .. }, _) => {
                Ok(Outcome::Skipped("not a repo event"))
            }
            Work::Refused { did, reason, seq } => {
                let reason = format!("firehose event {seq:?} could not be decoded: {reason}");
                engine.desynchronize(did, &reason).await
            }
        }
    }

    fn engine(&self) -> &Engine {
        &self.0
    }
}

/// Starts the reader and workers (stopped by `intake`) and the cursor saver (stopped by
/// [`StageHandle::flush`], after the workers, so its last save covers them), from
/// `start` (see [`start_cursor`]).
pub fn spawn(
    settings: FirehoseSettings,
    start: Option<i64>,
    engine: Engine,
    store: Store,
    progress: Arc<Progress>,
    supervisor: &Supervisor,
    intake: CancellationToken,
) -> StageHandle {
    if let Some(seq) = start {
        progress.set_firehose_seq(seq);
    }
    // With --no-replay the tracker starts empty: the first frames set the mark.
    let seqs = Arc::new(Mutex::new(SeqTracker::resume(start)));
    let ledger = engine.ledger().clone();
    let dispatcher = Dispatcher::spawn(
        settings.parallelism,
        FrameHandler(engine),
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
    live::spawn_saver(
        "firehose cursor saver",
        store,
        settings.relay_url.to_string(),
        seqs,
        progress,
        settings.cursor_save_interval,
        supervisor,
    )
}
