//! The state store: every SQL statement of the daemon, the schema migrations and the
//! transactions. Callers see domain methods only; no SQL leaves this module.
//!
//! Invariant: the repo meta, record index rows and outbox rows of one repo event commit together
//! or not at all — [`Store::apply`] is the single transactional write of a repo event.
//!
//! Two backends share one contract (and one test suite, `test_each_store!`):
//! - SQLite ([`DatabaseUrl::Sqlite`]): one dedicated writer thread owns the only write
//!   connection and group-commits queued writes; reads use a small pool of read-only
//!   connections. See `sqlite.rs`.
//! - Postgres ([`DatabaseUrl::Postgres`]): a `deadpool-postgres` pool; each write is its own
//!   transaction. See `postgres.rs`.

mod postgres;
pub mod record_index;
mod schema;
mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;

/// Where the state lives, parsed from `--db-url` / `TAP_DATABASE_URL`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// Everything after `sqlite://`: a file path (`./tap.db`, `/var/lib/tap.db`) or an SQLite
    /// URI (`file::memory:?cache=shared`, `file:tap.db?mode=rwc`), handed to SQLite as is.
    Sqlite(String),
    /// The full `postgres://…` or `postgresql://…` URL (credentials included; never printed:
    /// the `Debug`/`Display` forms redact the password).
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a database URL: `sqlite://<path or URI>`, `postgres://…` or `postgresql://…`.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedUrl`] for any other scheme, or for `sqlite://` with an empty path.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::UnsupportedUrl {
                    url: url.to_owned(),
                    reason: "sqlite:// needs a path, e.g. sqlite://./tap.db",
                });
            }
            return Ok(Self::Sqlite(path.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err(StoreError::UnsupportedUrl {
            url: redact_url(url),
            reason: "expected sqlite://<path>, postgres://… or postgresql://…",
        })
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{path}"),
            Self::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Replaces the password of a `scheme://user:password@host…` URL by `***` so it can be logged.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The userinfo ends at the last '@' before the first '/' of the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Tuning that is not part of the URL.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Postgres: size of the connection pool (`--max-db-conn`, default 32). Ignored for SQLite,
    /// which always has one writer connection plus a fixed small reader pool.
    pub max_pg_conns: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { max_pg_conns: 32 }
    }
}

/// Where a tracked repo is in its life cycle (original-behaviour §5). Stored as the lowercase
/// name given by [`RepoState::as_str`]; `/info/:did` shows that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RepoState {
    /// Tracked but never synced; waiting for its first resync (the backfill).
    Pending,
    /// A resync worker holds the repo; live commits go to the resync buffer.
    Resyncing,
    /// In sync: live commits are applied as they arrive.
    Active,
    /// Our copy no longer chains onto the firehose; a resync is due.
    Desynchronized,
    /// The last resync failed hard; retried after `retry_after`.
    Error,
}

impl RepoState {
    /// The stored and displayed name: `pending`, `resyncing`, `active`, `desynchronized`, `error`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Resyncing => "resyncing",
            Self::Active => "active",
            Self::Desynchronized => "desynchronized",
            Self::Error => "error",
        }
    }

    /// Parses a stored name; `None` for anything else.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "pending" => Self::Pending,
            "resyncing" => Self::Resyncing,
            "active" => Self::Active,
            "desynchronized" => Self::Desynchronized,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

impl fmt::Display for RepoState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hosting status of an account (from `#account` events). Independent of [`RepoState`];
/// a `deleted` account is not a status: its repo row is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccountStatus {
    /// The account is active.
    Active,
    /// Taken down by the PDS or relay.
    Takendown,
    /// Temporarily suspended.
    Suspended,
    /// Deactivated by its owner.
    Deactivated,
}

impl AccountStatus {
    /// The stored name: `active`, `takendown`, `suspended`, `deactivated`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Takendown => "takendown",
            Self::Suspended => "suspended",
            Self::Deactivated => "deactivated",
        }
    }

    /// Parses a stored name; `None` for anything else.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "active" => Self::Active,
            "takendown" => Self::Takendown,
            "suspended" => Self::Suspended,
            "deactivated" => Self::Deactivated,
            _ => return None,
        })
    }
}

impl fmt::Display for AccountStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tracked repo as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRow {
    /// The repo's DID.
    pub did: String,
    /// Life-cycle state.
    pub state: RepoState,
    /// Account hosting status.
    pub status: AccountStatus,
    /// Last known handle; `None` until the first identity resolution.
    pub handle: Option<String>,
    /// Rev of the last applied commit (live or resync snapshot).
    pub rev: Option<String>,
    /// MST root (`data` CID) of the last applied commit: what the next commit's `prevData`
    /// must equal.
    pub prev_data: Option<String>,
    /// Reason of the last failure or desynchronization; empty when none.
    pub error: String,
    /// Consecutive failed resyncs.
    pub retry_count: u32,
    /// Unix seconds before which the repo is not claimed for resync; 0 = immediately.
    pub retry_after: i64,
}

/// An outbox event id: unique and strictly increasing in commit order for the life of the
/// database (never reused, even after every event was acked and deleted and the process
/// restarted). On Postgres, concurrent transactions may commit out of id order across DIDs;
/// within one DID (one writer at a time) commit order is id order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An event to append to the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    /// `true` for firehose (live) events, `false` for resync (historical) events.
    pub live: bool,
    /// The event JSON without its id (e.g. `{"type":"record","record":{…}}`); the wire layer
    /// splices the assigned [`EventId`] in when sending. Stored verbatim.
    pub payload: String,
}

/// A persisted, not yet deleted outbox event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Assigned id.
    pub id: EventId,
    /// DID of the repo the event belongs to.
    pub did: String,
    /// Live (firehose) or historical (resync).
    pub live: bool,
    /// The payload as given in [`NewEvent::payload`].
    pub payload: String,
}

/// One row of a repo's record index (record bodies are not stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordRow {
    /// NSID of the collection.
    pub collection: String,
    /// Record key.
    pub rkey: String,
    /// CID of the record block, as a string.
    pub cid: String,
}

/// A change to a repo's record index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordChange {
    /// Insert or overwrite the record's CID.
    Put {
        /// NSID of the collection (must not be empty).
        collection: String,
        /// Record key (must not be empty).
        rkey: String,
        /// New CID.
        cid: String,
    },
    /// Remove the record from the index (no-op when absent).
    Delete {
        /// NSID of the collection.
        collection: String,
        /// Record key.
        rkey: String,
    },
}

/// What a [`RepoWrite`] does to the repo row itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoChange {
    /// Leave the repo row as it is (e.g. a historical batch in the middle of a resync).
    None,
    /// A live commit was applied: set `rev` and `prev_data`.
    Commit {
        /// The commit's rev.
        rev: String,
        /// The commit's MST root (`data`), the next commit's expected `prevData`.
        prev_data: String,
    },
    /// A resync completed: `state = active`, `rev`/`prev_data` from the snapshot, error cleared,
    /// `retry_count = 0`, `retry_after = 0`.
    ResyncDone {
        /// The snapshot's rev.
        rev: String,
        /// The snapshot's MST root.
        prev_data: String,
    },
    /// A resync completed but the repo changed in a way its snapshot misses: `rev`/`prev_data`
    /// from what was applied, and straight back to `desynchronized` with `reason`, in the
    /// same transaction (a crash between the two would leave it active and stale).
    ResyncStale {
        /// The rev applied.
        rev: String,
        /// The MST root applied.
        prev_data: String,
        /// Why it must be resynced again.
        reason: String,
    },
    /// The repo's handle changed.
    Handle(String),
    /// The account's hosting status changed.
    Status(AccountStatus),
    /// The account was deleted: remove the repo row, its record index and its resync buffer
    /// (outbox rows, including this write's events, are kept).
    Delete,
}

/// A precondition on the repo row, checked inside the write's transaction. Writes that race
/// with `/repos/remove` (resync batches, live commits) must use one, or a removed repo could
/// get orphaned record rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteCondition {
    /// No precondition.
    Always,
    /// The repo row must exist.
    RepoExists,
    /// The repo row must exist and be in this state (e.g. `Resyncing` for resync batches: a
    /// repo removed and re-added mid-resync is `Pending`, so the stale worker's writes are
    /// refused).
    RepoInState(RepoState),
}

impl fmt::Display for WriteCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("no condition"),
            Self::RepoExists => f.write_str("repo exists"),
            Self::RepoInState(state) => write!(f, "repo in state {state}"),
        }
    }
}

/// Where the events of a [`RepoWrite`] live until a consumer is done with them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventStorage {
    /// Each event is a row of the outbox table: it survives a crash.
    #[default]
    Durable,
    /// Only ids are assigned (from the same sequence, so they still grow); the events are
    /// delivered from memory. The repo's backfill token is set to the first of those ids in
    /// the same transaction, and [`Store::reset_undelivered_backfills`] at the next start
    /// re-runs the backfill of any repo whose token was never cleared
    /// ([`Store::clear_backfill_token`]): a crash re-derives the events instead of losing
    /// them. Only sound for a first backfill, whose events are all creates re-derivable from
    /// the repo itself. The store does not read the events' payloads in this mode.
    InMemoryBackfill,
}

/// The one transactional write of a repo event: everything in it commits together or nothing
/// does. Order inside the transaction: condition check, record index changes, resync buffer
/// deletions, repo change, outbox appends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoWrite {
    /// The repo.
    pub did: String,
    /// Checked first; when not met nothing is written and
    /// [`StoreError::ConditionNotMet`] is returned.
    pub condition: WriteCondition,
    /// Change to the repo row.
    pub repo: RepoChange,
    /// Record index changes, applied in order (a later change to the same key wins).
    pub records: Vec<RecordChange>,
    /// Events appended to the outbox, in order; [`Store::apply`] returns their ids.
    pub events: Vec<NewEvent>,
    /// Ids of this repo's buffered commits consumed by this write (see
    /// [`Store::buffered_commits`]); ids of other repos are ignored.
    pub resync_buffer_delete: Vec<i64>,
    /// Whether `events` are stored or only numbered (see [`EventStorage`]).
    pub storage: EventStorage,
}

impl RepoWrite {
    /// A write for `did` that changes nothing yet and has no condition; fill in the fields.
    #[must_use]
    pub fn new(did: impl Into<String>) -> Self {
        Self {
            did: did.into(),
            condition: WriteCondition::Always,
            repo: RepoChange::None,
            records: Vec::new(),
            events: Vec::new(),
            resync_buffer_delete: Vec::new(),
            storage: EventStorage::Durable,
        }
    }
}

/// A live commit held durably while its repo is resyncing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferedCommit {
    /// Buffer row id (increasing in arrival order); pass it in
    /// [`RepoWrite::resync_buffer_delete`] to consume the commit.
    pub id: i64,
    /// The commit's rev.
    pub rev: String,
    /// The serialized commit, as given to [`Store::buffer_commit`].
    pub data: String,
}

/// Runs of consecutive ids, as inclusive `(first, last)` pairs in ascending order; ids that
/// cannot be stored (above `i64::MAX`) are skipped, duplicates collapse.
pub(crate) fn id_runs(ids: &[EventId]) -> Vec<(i64, i64)> {
    let mut sorted: Vec<i64> = ids
        .iter()
        .filter_map(|id| i64::try_from(id.0).ok())
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// Why a resync failed, for [`Store::mark_resync_failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncFailure {
    /// The PDS rate-limited us: back to `desynchronized`, error cleared.
    RateLimited,
    /// A peer or the database failed in a way that may pass (timeout, 5xx, connection,
    /// busy): back to `desynchronized` with the reason, retried within seconds to minutes.
    Transient(String),
    /// A verdict on the repo (it does not verify, the PDS does not have it…): `error`, with
    /// this message, retried after the long backoff.
    Failed(String),
}

/// The repo row's new values after a failed resync: what both backends write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailedResync<'a> {
    pub state: RepoState,
    pub message: &'a str,
    pub retry_count: i64,
    pub retry_after: i64,
}

impl ResyncFailure {
    /// The row update for a repo whose stored retry count is `stored_count`.
    fn row_update(&self, stored_count: i64, now_unix: i64, jitter_ms: u64) -> FailedResync<'_> {
        let count = schema::clamp_retry_count(stored_count);
        let (state, message, retry_after) = self.next_attempt(now_unix, count, jitter_ms);
        FailedResync {
            state,
            message,
            retry_count: i64::from(count.saturating_add(1)),
            retry_after,
        }
    }

    /// Where the repo goes: its state, error message and the unix time of the next try,
    /// given the failures counted before this one.
    fn next_attempt(
        &self,
        now_unix: i64,
        retry_count_before: u32,
        jitter_ms: u64,
    ) -> (RepoState, &str, i64) {
        match self {
            Self::RateLimited => (
                RepoState::Desynchronized,
                "",
                resync_retry_after(now_unix, retry_count_before, jitter_ms),
            ),
            Self::Transient(message) => (
                RepoState::Desynchronized,
                message,
                transient_retry_after(now_unix, retry_count_before, jitter_ms),
            ),
            Self::Failed(message) => (
                RepoState::Error,
                message,
                resync_retry_after(now_unix, retry_count_before, jitter_ms),
            ),
        }
    }
}

/// Errors of the state store. Callers branch on [`StoreError::is_transient`] and
/// [`StoreError::is_condition_not_met`], never on messages.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL has a scheme we do not serve.
    #[error("unsupported database URL {url:?}: {reason}")]
    UnsupportedUrl {
        /// The URL (password redacted).
        url: String,
        /// What was expected.
        reason: &'static str,
    },
    /// A `postgres://` URL that the Postgres driver cannot parse.
    #[error("invalid Postgres URL: {source}")]
    InvalidPostgresUrl {
        /// Parser error (does not echo the password).
        source: tokio_postgres::Error,
    },
    /// The SQLite database file could not be opened or configured.
    #[error("cannot open SQLite database {path:?}: {source}")]
    SqliteOpen {
        /// Path or URI as given.
        path: String,
        /// Driver error.
        source: rusqlite::Error,
    },
    /// An SQLite statement failed.
    #[error("SQLite error during {op}: {source}")]
    Sqlite {
        /// The store operation.
        op: &'static str,
        /// Driver error.
        source: rusqlite::Error,
    },
    /// Postgres could not be reached or refused the connection.
    #[error("cannot connect to Postgres at {target}: {source}")]
    PostgresConnect {
        /// `host:port/dbname` (no credentials).
        target: String,
        /// Pool/driver error.
        source: deadpool_postgres::PoolError,
    },
    /// A Postgres statement failed.
    #[error("Postgres error during {op}: {source}")]
    Postgres {
        /// The store operation.
        op: &'static str,
        /// Driver error.
        source: tokio_postgres::Error,
    },
    /// No Postgres connection could be taken from the pool.
    #[error("Postgres pool error during {op}: {source}")]
    PostgresPool {
        /// The store operation.
        op: &'static str,
        /// Pool error.
        source: deadpool_postgres::PoolError,
    },
    /// A schema migration failed; the transaction was rolled back.
    #[error("schema migration {version} ({name}) failed: {reason}")]
    Migration {
        /// Migration number.
        version: i64,
        /// Migration file name stem.
        name: &'static str,
        /// Driver message.
        reason: String,
    },
    /// The database was migrated by a newer build.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew {
        /// Highest version recorded in the database.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// The database has a `repos` table but no migration history: another program (e.g. the
    /// Go tap) made it, and we will not guess at its schema.
    #[error(
        "database {target} already has a repos table but no schema_migrations table; it was not \
         created by this tap (a Go tap database?). Use a new database."
    )]
    ForeignSchema {
        /// Database (credentials redacted).
        target: String,
    },
    /// A stored value is not one we write (e.g. an unknown state name).
    #[error("corrupt value in {table}.{column}: {value:?}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// The stored value.
        value: String,
    },
    /// A record index change the index cannot hold (empty or with a separator); nothing
    /// was written.
    #[error(transparent)]
    Unindexable(#[from] record_index::Unindexable),
    /// A stored record index chunk does not decode.
    #[error(transparent)]
    CorruptChunk(#[from] record_index::CorruptChunk),
    /// A [`RepoWrite`]'s [`WriteCondition`] was not met; nothing was written.
    #[error("write for {did} skipped: {condition} not met")]
    ConditionNotMet {
        /// The repo.
        did: String,
        /// The unmet condition.
        condition: WriteCondition,
    },
    /// The store was closed (or its writer thread stopped).
    #[error("the store is closed")]
    Closed,
    /// A blocking worker task failed (panicked or was cancelled).
    #[error("store worker failed during {op}: {detail}")]
    Worker {
        /// The store operation.
        op: &'static str,
        /// What happened.
        detail: String,
    },
}

impl StoreError {
    /// `true` when retrying the same operation later may succeed: database busy/locked,
    /// connection lost or refused, pool timeouts, serialization failures, I/O errors.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Sqlite { source, .. } | Self::SqliteOpen { source, .. } => {
                sqlite::is_transient(source)
            }
            Self::Postgres { source, .. } => postgres::is_transient(source),
            Self::PostgresConnect { .. } | Self::PostgresPool { .. } => true,
            Self::UnsupportedUrl { .. }
            | Self::InvalidPostgresUrl { .. }
            | Self::Migration { .. }
            | Self::SchemaTooNew { .. }
            | Self::ForeignSchema { .. }
            | Self::Corrupt { .. }
            | Self::Unindexable(_)
            | Self::CorruptChunk(_)
            | Self::ConditionNotMet { .. }
            | Self::Closed
            | Self::Worker { .. } => false,
        }
    }

    /// Whether the store was closed (tap is shutting down).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed)
    }

    /// `true` when a [`RepoWrite`] was refused by its [`WriteCondition`] (typically: the repo
    /// was removed or re-added meanwhile). Nothing was written.
    #[must_use]
    pub fn is_condition_not_met(&self) -> bool {
        matches!(self, Self::ConditionNotMet { .. })
    }
}

/// Delay policy of failed resyncs (original-behaviour §5): `min(2^retry_count, 60)` minutes
/// using the count before the increment, plus `jitter_ms` rounded up to whole seconds.
/// Saturates instead of overflowing for any count and clock.
fn resync_retry_after(now_unix: i64, retry_count_before: u32, jitter_ms: u64) -> i64 {
    const VERDICT: Backoff = Backoff {
        first: Duration::from_secs(60),
        max: Duration::from_secs(60 * 60),
    };
    after(
        now_unix,
        VERDICT.base(retry_count_before),
        jitter_ms.div_ceil(1000),
    )
}

/// Delay after a transient resync failure: `min(15 s × 2^retry_count, 10 min)` plus up to
/// 5 s of jitter, so a PDS or PLC blip costs seconds, not the hour a verdict may.
fn transient_retry_after(now_unix: i64, retry_count_before: u32, jitter_ms: u64) -> i64 {
    const TRANSIENT: Backoff = Backoff {
        first: Duration::from_secs(15),
        max: Duration::from_secs(10 * 60),
    };
    after(
        now_unix,
        TRANSIENT.base(retry_count_before),
        (jitter_ms % 5000).div_ceil(1000),
    )
}

/// `now_unix + delay + jitter_secs` in whole seconds, saturating.
fn after(now_unix: i64, delay: Duration, jitter_secs: u64) -> i64 {
    let whole = |secs: u64| i64::try_from(secs).unwrap_or(i64::MAX);
    now_unix
        .saturating_add(whole(delay.as_secs()))
        .saturating_add(whole(jitter_secs))
}

fn event_id(stored: i64, table: &'static str) -> Result<EventId, StoreError> {
    u64::try_from(stored)
        .map(EventId)
        .map_err(|_| StoreError::Corrupt {
            table,
            column: "id",
            value: stored.to_string(),
        })
}

/// Converts a count or limit to the signed 64-bit integer both databases use.
fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// States a resync worker may claim, in claim priority order.
const CLAIM_ORDER: [RepoState; 3] = [
    RepoState::Pending,
    RepoState::Desynchronized,
    RepoState::Error,
];

/// Handle to the state store. Cheap to clone; all clones share one backend.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Woken whenever a write may have made a repo claimable for resync, so idle resync
    /// workers start at once instead of at their next poll. (The poll stays: another
    /// process sharing a Postgres database cannot wake us.)
    resync_wanted: Arc<tokio::sync::Notify>,
}

#[derive(Clone)]
enum Backend {
    Sqlite(Arc<sqlite::SqliteStore>),
    Postgres(postgres::PgStore),
}

/// Calls the same-named method on whichever backend this store uses.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Sqlite(s) => s.$method($($arg),*).await,
            Backend::Postgres(s) => s.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the database and applies pending migrations in one
    /// transaction.
    ///
    /// Postgres connections use no TLS (`NoTls`): run Postgres on the same host or a private
    /// network.
    ///
    /// # Errors
    /// [`StoreError::SqliteOpen`] / [`StoreError::PostgresConnect`] when the database cannot be
    /// opened or reached (the message names the path or `host:port/db`), migration errors, and
    /// [`StoreError::ForeignSchema`] / [`StoreError::SchemaTooNew`] for databases we did not
    /// make or that a newer build migrated.
    pub async fn open(url: &DatabaseUrl, opts: StoreOptions) -> Result<Self, StoreError> {
        let backend = match url {
            DatabaseUrl::Sqlite(path) => {
                Backend::Sqlite(Arc::new(sqlite::SqliteStore::open(path.clone()).await?))
            }
            DatabaseUrl::Postgres(url) => {
                Backend::Postgres(postgres::PgStore::open(url, opts.max_pg_conns).await?)
            }
        };
        Ok(Self {
            backend,
            resync_wanted: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Signalled after writes that may have made a repo claimable for resync (added,
    /// desynchronized, reset). Enable a `notified()` future before looking for work, then
    /// wait on it, and no signal is missed.
    #[must_use]
    pub fn resync_wanted(&self) -> &tokio::sync::Notify {
        &self.resync_wanted
    }

    /// Finishes queued writes, then closes the database (SQLite: checkpoints the WAL and joins
    /// the writer thread; Postgres: closes the pool). Later calls on any clone fail with
    /// [`StoreError::Closed`]. Idempotent.
    pub async fn close(&self) {
        dispatch!(self.close());
    }

    /// Tracks `dids`: inserts each absent DID as `pending`/`active` with zeroed retry fields;
    /// existing repos are left alone. One transaction. Returns how many were inserted.
    ///
    /// # Errors
    /// Database errors; nothing is inserted then.
    pub async fn add_repos(&self, dids: &[String]) -> Result<u64, StoreError> {
        let added = dispatch!(self.add_repos(dids.to_vec()))?;
        if added > 0 {
            self.resync_wanted.notify_waiters();
        }
        Ok(added)
    }

    /// Untracks `dids`: deletes their repo rows, record index and resync buffer in one
    /// transaction. Outbox rows stay (already emitted events are still delivered). Returns how
    /// many repo rows were deleted.
    ///
    /// # Errors
    /// Database errors; nothing is deleted then.
    pub async fn remove_repos(&self, dids: &[String]) -> Result<u64, StoreError> {
        dispatch!(self.remove_repos(dids.to_vec()))
    }

    /// The repo row of `did`, if tracked.
    ///
    /// # Errors
    /// Database errors, or [`StoreError::Corrupt`] for unknown stored state names.
    pub async fn get_repo(&self, did: &str) -> Result<Option<RepoRow>, StoreError> {
        dispatch!(self.get_repo(did.to_owned()))
    }

    /// Tracks `did` if absent (firehose auto-track): inserts it as `pending`. Returns `true`
    /// if it was inserted.
    ///
    /// # Errors
    /// Database errors.
    pub async fn ensure_repo(&self, did: &str) -> Result<bool, StoreError> {
        Ok(self.add_repos(&[did.to_owned()]).await? > 0)
    }

    /// Sets the state of an existing repo (no-op if absent). Retry fields are untouched.
    ///
    /// # Errors
    /// Database errors.
    pub async fn set_repo_state(&self, did: &str, state: RepoState) -> Result<(), StoreError> {
        dispatch!(self.set_repo_state(did.to_owned(), state))
    }

    /// Marks an existing repo `desynchronized` with `reason` as its error text and makes it
    /// claimable at once (`retry_after = 0`; `retry_count` kept). No-op if absent.
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_desynchronized(&self, did: &str, reason: &str) -> Result<(), StoreError> {
        dispatch!(self.mark_desynchronized(did.to_owned(), reason.to_owned()))?;
        self.resync_wanted.notify_waiters();
        Ok(())
    }

    /// Number of indexed records of `did`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_records_for(&self, did: &str) -> Result<u64, StoreError> {
        dispatch!(self.count_records_for(did.to_owned()))
    }

    /// The collections that have records in `did`'s index, in byte order (the index's
    /// primary key serves it without a scan of the records).
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_collections(&self, did: &str) -> Result<Vec<String>, StoreError> {
        dispatch!(self.record_collections(did.to_owned()))
    }

    /// Number of tracked repos.
    ///
    /// # Errors
    /// Database errors.
    pub async fn repo_count(&self) -> Result<u64, StoreError> {
        dispatch!(self.count_table(Table::Repos))
    }

    /// Number of indexed records, all repos.
    ///
    /// # Errors
    /// Database errors.
    pub async fn record_count(&self) -> Result<u64, StoreError> {
        dispatch!(self.count_table(Table::Records))
    }

    /// Number of events in the outbox (not yet acked-and-deleted).
    ///
    /// # Errors
    /// Database errors.
    pub async fn outbox_count(&self) -> Result<u64, StoreError> {
        dispatch!(self.count_table(Table::Outbox))
    }

    /// Number of buffered live commits, all repos.
    ///
    /// # Errors
    /// Database errors.
    pub async fn resync_buffer_count(&self) -> Result<u64, StoreError> {
        dispatch!(self.count_table(Table::ResyncBuffer))
    }

    /// The saved firehose cursor (relay seq) for `relay_url`, if any.
    ///
    /// # Errors
    /// Database errors.
    pub async fn firehose_cursor(&self, relay_url: &str) -> Result<Option<i64>, StoreError> {
        dispatch!(self.firehose_cursor(relay_url.to_owned()))
    }

    /// Saves (overwrites) the firehose cursor for `relay_url`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn save_firehose_cursor(&self, relay_url: &str, seq: i64) -> Result<(), StoreError> {
        dispatch!(self.save_firehose_cursor(relay_url.to_owned(), seq))
    }

    /// The saved `listRepos` enumeration cursor for `relay_url`, if any.
    ///
    /// # Errors
    /// Database errors.
    pub async fn list_repos_cursor(&self, relay_url: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self.list_repos_cursor(relay_url.to_owned()))
    }

    /// Saves (overwrites) the `listRepos` enumeration cursor for `relay_url`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn save_list_repos_cursor(
        &self,
        relay_url: &str,
        cursor: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self.save_list_repos_cursor(relay_url.to_owned(), cursor.to_owned()))
    }

    /// The saved `listReposByCollection` cursor for (`relay_url`, `collection`), if any.
    ///
    /// # Errors
    /// Database errors.
    pub async fn collection_cursor(
        &self,
        relay_url: &str,
        collection: &str,
    ) -> Result<Option<String>, StoreError> {
        dispatch!(self.collection_cursor(relay_url.to_owned(), collection.to_owned()))
    }

    /// Saves (overwrites) the `listReposByCollection` cursor for (`relay_url`, `collection`).
    ///
    /// # Errors
    /// Database errors.
    pub async fn save_collection_cursor(
        &self,
        relay_url: &str,
        collection: &str,
        cursor: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self.save_collection_cursor(
            relay_url.to_owned(),
            collection.to_owned(),
            cursor.to_owned()
        ))
    }

    /// Applies one repo event in one transaction (see [`RepoWrite`] for the order) and returns
    /// the ids assigned to `batch.events`, in order. Either everything in `batch` is committed
    /// or nothing is.
    ///
    /// # Errors
    /// [`StoreError::ConditionNotMet`] when `batch.condition` does not hold (nothing written);
    /// database errors, including a constraint violation for an empty collection or rkey
    /// (nothing written).
    pub async fn apply(&self, batch: RepoWrite) -> Result<Vec<EventId>, StoreError> {
        dispatch!(self.apply(batch))
    }

    /// Up to `limit` outbox events with id greater than `after` (all if `None`), id ascending.
    /// Used to replay the outbox at startup, page by page.
    ///
    /// # Errors
    /// Database errors.
    pub async fn load_outbox(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        dispatch!(self.load_outbox(after, limit))
    }

    /// Deletes acked events (unknown ids are ignored) in one transaction. Returns how many rows
    /// were deleted.
    ///
    /// # Errors
    /// Database errors; nothing is deleted then.
    pub async fn delete_acked(&self, ids: &[EventId]) -> Result<u64, StoreError> {
        dispatch!(self.delete_acked(ids.to_vec()))
    }

    /// The highest event id ever assigned in this database (whether or not still in the
    /// outbox); `None` if no event was ever appended. Every id [`Store::apply`] returns later
    /// is greater.
    ///
    /// # Errors
    /// Database errors.
    pub async fn max_event_id(&self) -> Result<Option<EventId>, StoreError> {
        dispatch!(self.max_event_id())
    }

    /// Startup recovery: every `resyncing` repo (its worker died with the last process) goes
    /// back to `desynchronized`, retry fields unchanged. Returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn reset_resyncing(&self) -> Result<u64, StoreError> {
        let reset = dispatch!(self.reset_resyncing())?;
        self.resync_wanted.notify_waiters();
        Ok(reset)
    }

    /// Startup recovery for [`EventStorage::InMemoryBackfill`]: every repo still carrying a
    /// backfill token (some of its in-memory events may never have been acked) goes back to
    /// `pending` with no rev, keeping its record index: its backfill runs again as a replay
    /// that re-emits every record and deletes what vanished meanwhile (a consumer may have
    /// seen it). Returns how many repos were reset.
    ///
    /// # Errors
    /// Database errors; nothing is reset then.
    pub async fn reset_undelivered_backfills(&self) -> Result<u64, StoreError> {
        let reset = dispatch!(self.reset_undelivered_backfills())?;
        if reset > 0 {
            self.resync_wanted.notify_waiters();
        }
        Ok(reset)
    }

    /// Clears `did`'s backfill token if it still equals `token` (a newer in-memory write
    /// replaced it otherwise, and its events are not all acked yet). Call when every
    /// in-memory event of the repo up to that token's write was acked. Returns whether it
    /// was cleared.
    ///
    /// # Errors
    /// Database errors.
    pub async fn clear_backfill_token(
        &self,
        did: &str,
        token: EventId,
    ) -> Result<bool, StoreError> {
        dispatch!(self.clear_backfill_token(did.to_owned(), token))
    }

    /// The backfill token of `did` (see [`EventStorage::InMemoryBackfill`]), if set.
    ///
    /// # Errors
    /// Database errors.
    pub async fn backfill_token(&self, did: &str) -> Result<Option<EventId>, StoreError> {
        dispatch!(self.backfill_token(did.to_owned()))
    }

    /// Claims one repo for a resync worker and sets it `resyncing`, atomically (no two callers
    /// get the same repo, also across processes on Postgres). Priority: any `pending`, then
    /// `desynchronized`, then `error`; eligible when `retry_after < now_unix` or
    /// `retry_after == 0`; within a state the earliest `retry_after` first. Returns the row as
    /// it was before the claim, but with `state = Resyncing`; `None` when nothing is due.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim_resync_job(&self, now_unix: i64) -> Result<Option<RepoRow>, StoreError> {
        // retry_after is never negative, so "0 or < now" is "< max(now, 1)"; one range
        // condition keeps the (state, retry_after) index usable.
        dispatch!(self.claim_resync_job(now_unix.max(1)))
    }

    /// Records a failed resync of a `resyncing` repo: [`ResyncFailure::RateLimited`] →
    /// `desynchronized` with the error cleared, [`ResyncFailure::Failed`] → `error` with the
    /// message; `retry_count + 1`; `retry_after = now_unix + min(2^retry_count, 60) minutes +
    /// jitter_ms` (the count before the increment; jitter rounded up to whole seconds; pass a
    /// random value in `0..60_000` to match the original's spread). No-op when the repo is
    /// gone or no longer `resyncing` (removed, or removed and re-added, mid-resync).
    ///
    /// # Errors
    /// Database errors.
    pub async fn mark_resync_failed(
        &self,
        did: &str,
        failure: ResyncFailure,
        now_unix: i64,
        jitter_ms: u64,
    ) -> Result<(), StoreError> {
        dispatch!(self.mark_resync_failed(did.to_owned(), failure, now_unix, jitter_ms))
    }

    /// Up to `limit` index rows of `did` after the key `after` (exclusive; from the start if
    /// `None`), ordered by (`collection`, `rkey`) in byte order — the MST key order — so a
    /// huge repo can be diffed page by page.
    ///
    /// # Errors
    /// Database errors.
    pub async fn records_page(
        &self,
        did: &str,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<RecordRow>, StoreError> {
        dispatch!(self.records_page(did.to_owned(), after, limit))
    }

    /// Durably buffers a live commit of a repo that is being resynced, unless the repo
    /// already has `limit` entries. Returns whether it was stored.
    ///
    /// # Errors
    /// Database errors.
    pub async fn buffer_commit(
        &self,
        did: &str,
        rev: &str,
        data: &str,
        limit: u64,
    ) -> Result<bool, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        dispatch!(self.buffer_commit(did.to_owned(), rev.to_owned(), data.to_owned(), limit))
    }

    /// Up to `limit` buffered commits of `did` with an id above `after`, in arrival (id)
    /// order: a page of the buffer.
    ///
    /// # Errors
    /// Database errors.
    pub async fn buffered_commits(
        &self,
        did: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<BufferedCommit>, StoreError> {
        dispatch!(self.buffered_commits(did.to_owned(), after, to_i64(limit)))
    }
}

/// Tables that have a count accessor.
#[derive(Clone, Copy, Debug)]
enum Table {
    Repos,
    Records,
    Outbox,
    ResyncBuffer,
}

impl Table {
    fn count_sql(self) -> &'static str {
        match self {
            Self::Repos => "SELECT COUNT(*) FROM repos",
            Self::Records => "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM record_chunks",
            Self::Outbox => "SELECT COUNT(*) FROM outbox",
            Self::ResyncBuffer => "SELECT COUNT(*) FROM resync_buffer",
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn acked_ids_collapse_into_runs_of_consecutive_ids() {
        let ids: Vec<EventId> = [7, 3, 4, 5, 9, 10, 5, 1, u64::MAX]
            .into_iter()
            .map(EventId)
            .collect();
        assert_eq!(id_runs(&ids), vec![(1, 1), (3, 5), (7, 7), (9, 10)]);
        assert!(id_runs(&[]).is_empty());
    }

    #[test]
    fn database_url_parses_supported_schemes() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://./tap.db").ok(),
            Some(DatabaseUrl::Sqlite("./tap.db".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite://file::memory:?cache=shared").ok(),
            Some(DatabaseUrl::Sqlite("file::memory:?cache=shared".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("postgresql://u:p@h/db").ok(),
            Some(DatabaseUrl::Postgres("postgresql://u:p@h/db".into()))
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://h/db"),
            Ok(DatabaseUrl::Postgres(_))
        ));
    }

    #[test]
    fn database_url_rejects_other_schemes_naming_the_value() {
        let err = DatabaseUrl::parse("mysql://root@localhost/tap").unwrap_err();
        assert!(matches!(err, StoreError::UnsupportedUrl { .. }));
        assert!(
            err.to_string().contains("mysql://root@localhost/tap"),
            "{err}"
        );
        assert!(DatabaseUrl::parse("sqlite://").is_err());
        assert!(DatabaseUrl::parse("./tap.db").is_err());
    }

    #[test]
    fn database_url_display_redacts_the_password() {
        let url = DatabaseUrl::parse("postgres://tap:s3cret@db:5432/tap").unwrap();
        assert_eq!(url.to_string(), "postgres://tap:***@db:5432/tap");
        assert_eq!(format!("{url:?}"), "postgres://tap:***@db:5432/tap");
        let err = DatabaseUrl::parse("mysql://root:hunter2@localhost/tap").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn resync_backoff_doubles_then_caps_at_an_hour() {
        let now = 1_000_000;
        let delays: Vec<i64> = (0..8)
            .map(|count| resync_retry_after(now, count, 0) - now)
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn a_transient_resync_failure_retries_within_seconds_and_keeps_no_verdict() {
        let now = 1_000_000;
        let delays: Vec<i64> = (0..8)
            .map(|count| transient_retry_after(now, count, 0) - now)
            .collect();
        assert_eq!(delays, [15, 30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(
            transient_retry_after(i64::MAX - 1, u32::MAX, u64::MAX),
            i64::MAX
        );
        let transient = ResyncFailure::Transient("PDS timed out".into());
        assert_eq!(
            transient.next_attempt(now, 0, 0),
            (RepoState::Desynchronized, "PDS timed out", now + 15)
        );
        let verdict = ResyncFailure::Failed("bad signature".into());
        assert_eq!(
            verdict.next_attempt(now, 0, 0),
            (RepoState::Error, "bad signature", now + 60)
        );
        assert_eq!(
            ResyncFailure::RateLimited.next_attempt(now, 1, 0),
            (RepoState::Desynchronized, "", now + 120)
        );
    }

    #[test]
    fn a_failed_resync_counts_one_more_failure_from_the_stored_count() {
        let verdict = ResyncFailure::Failed("bad signature".into());
        let update = verdict.row_update(2, 1_000, 0);
        assert_eq!(
            update,
            FailedResync {
                state: RepoState::Error,
                message: "bad signature",
                retry_count: 3,
                retry_after: 1_000 + 240,
            }
        );
        assert_eq!(verdict.row_update(-5, 0, 0).retry_count, 1, "corrupt count");
        assert_eq!(
            verdict.row_update(i64::MAX, 0, 0).retry_count,
            i64::from(u32::MAX),
            "saturates"
        );
    }

    #[test]
    fn resync_backoff_never_overflows() {
        assert_eq!(resync_retry_after(0, u32::MAX, 0), 3600);
        assert_eq!(resync_retry_after(i64::MAX - 10, 100, u64::MAX), i64::MAX);
        // Jitter is rounded up to whole seconds.
        assert_eq!(resync_retry_after(0, 0, 1), 61);
        assert_eq!(resync_retry_after(0, 0, 59_999), 120);
    }

    #[test]
    fn state_and_status_names_round_trip() {
        for state in [
            RepoState::Pending,
            RepoState::Resyncing,
            RepoState::Active,
            RepoState::Desynchronized,
            RepoState::Error,
        ] {
            assert_eq!(RepoState::from_name(state.as_str()), Some(state));
        }
        for status in [
            AccountStatus::Active,
            AccountStatus::Takendown,
            AccountStatus::Suspended,
            AccountStatus::Deactivated,
        ] {
            assert_eq!(AccountStatus::from_name(status.as_str()), Some(status));
        }
        assert_eq!(RepoState::from_name("Active"), None);
    }
}
