//! Resync: fetch a repo from its PDS, verify it, diff it against the record index, emit
//! historical events, then cut over to live processing atomically.
//!
//! A worker claims a repo (pending first, then desynchronized, then error repos whose
//! retry time has come), fetches its key and PDS anew (its handle is checked apart, see
//! `repos::handle_checks`), plans the fetch (`strategy`: skip an unchanged head, fetch what
//! changed since tap's rev, fetch sparsely under filters, or stream the whole `getRepo`
//! through the bounded-memory walker), and writes the diff
//! in batches, each one transaction guarded by "the repo is still resyncing" (so a repo
//! removed mid-resync gets nothing written). The cutover, under the repo's lock, replays
//! the live commits buffered meanwhile and marks the repo active in the same breath.

mod cutover;
mod deferred;
pub mod diff;
pub mod fetch;
mod snapshot;
pub mod sparse;
pub mod strategy;
mod worker;

pub use worker::spawn;

use std::time::Duration;

use tap_atproto::stream::{SpillBudget, WalkError};

use crate::config::FetchStrategy;
use crate::identity::IdentityError;
use crate::outbox::OutboxError;
use crate::repos::engine::{EngineError, FailureClass};
use crate::store::StoreError;
use fetch::FetchError;

/// How long an idle worker waits before looking for work again, unless the store signals
/// new work first (error repos whose retry time comes are only found by this poll).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// Historical events per transaction.
pub const BATCH: usize = 400;
/// Memory a walk may use for blocks that arrive before they are needed; beyond it they
/// spill to a temporary file. Per worker, so the total is bounded by the parallelism.
pub const WALK_MEMORY_BUDGET: usize = 4 << 20;

/// Settings of the resync stage.
#[derive(Debug, Clone)]
pub struct ResyncSettings {
    /// Workers (`--resync-parallelism`).
    pub parallelism: usize,
    /// Most of them on one PDS host at once (`--resync-parallelism-per-host`).
    pub per_host: usize,
    /// Whole-request timeout of `getRepo` (`--repo-fetch-timeout`).
    pub fetch_timeout: Duration,
    /// Largest repo CAR accepted, in bytes.
    pub max_repo_bytes: u64,
    /// Disk shared by every worker's spill file (`--max-spill-bytes`).
    pub spill_budget: SpillBudget,
    /// `--fetch-strategy`.
    pub fetch_strategy: FetchStrategy,
    /// Deliver a first backfill's events from memory (see
    /// [`EventStorage::InMemoryBackfill`]) instead of storing each one
    /// (`--durable-backfill-events` turns this off).
    pub in_memory_backfill: bool,
}

/// Why a resync failed.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The PDS asked us to slow down: back to desynchronized, retried later.
    #[error("rate limited")]
    RateLimited,
    /// A peer or the database failed in a way that may pass (timeout, 5xx, connection,
    /// busy): no verdict on the repo, retried soon.
    #[error("{0}")]
    Transient(String),
    /// A verdict: the repo does not verify, its identity or PDS refuses it: error state.
    #[error("{0}")]
    Failed(String),
    /// The repo's PDS host already has its share of resyncs: not tried, its turn comes
    /// again in seconds.
    #[error("its PDS host {0} is busy with other resyncs")]
    HostBusy(String),
    /// The repo was removed or re-added while resyncing: stop quietly.
    #[error("repo removed during resync")]
    Abandoned,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutdown.
    #[error("stopped")]
    Stopped,
}

impl From<OutboxError> for ResyncError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Store(s) if s.is_condition_not_met() => Self::Abandoned,
            OutboxError::Store(s) => Self::Store(s),
            OutboxError::Closed => Self::Stopped,
        }
    }
}

impl From<EngineError> for ResyncError {
    fn from(e: EngineError) -> Self {
        match e.class() {
            FailureClass::Stopping => Self::Stopped,
            FailureClass::Transient | FailureClass::Unavailable => Self::Transient(e.to_string()),
            FailureClass::Repo => Self::Failed(e.to_string()),
        }
    }
}

impl From<IdentityError> for ResyncError {
    fn from(e: IdentityError) -> Self {
        if e.is_transient() {
            Self::Transient(format!("identity: {e}"))
        } else {
            Self::Failed(format!("identity: {e}"))
        }
    }
}

impl From<WalkError> for ResyncError {
    fn from(e: WalkError) -> Self {
        match e {
            // This machine's disk, not the repo: retried later.
            e @ (WalkError::Io(_) | WalkError::SpillBudget { .. }) => {
                Self::Transient(e.to_string())
            }
            e => Self::Failed(format!("repo verification failed: {e}")),
        }
    }
}

impl From<FetchError> for ResyncError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::RateLimited { .. } => Self::RateLimited,
            e @ FetchError::Transport { .. } => Self::Transient(e.to_string()),
            e @ FetchError::Status { status, .. } if status >= 500 || status == 408 => {
                Self::Transient(e.to_string())
            }
            e @ (FetchError::Status { .. }
            | FetchError::Unsupported { .. }
            | FetchError::Malformed { .. }
            | FetchError::TooLarge { .. }
            | FetchError::Refused { .. }) => Self::Failed(e.to_string()),
        }
    }
}
