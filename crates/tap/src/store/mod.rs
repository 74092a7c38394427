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

mod error;
mod pg_tls;
mod postgres;
pub mod record_index;
mod retry;
mod schema;
mod sqlite;
#[cfg(test)]
mod tests;
mod types;
mod url;

pub use error::StoreError;
pub use retry::ResyncFailure;
pub use types::{
    AccountStatus, BufferedCommit, EventId, EventStorage, FetchKind, HISTORY_MINUTES, LastFetch,
    MinuteRow, NewEvent, OutboxRow, RESYNC_REQUESTED, RecordChange, RecordRow, RepoChange, RepoRow,
    RepoState, RepoSummary, RepoWrite, ResyncRequest, WriteCondition,
};
pub use url::DatabaseUrl;

pub(crate) use types::id_runs;
use types::{CLAIM_ORDER, Table, count_i64, event_id, to_i64};

use std::sync::Arc;

/// Tuning that is not part of the URL.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Postgres: size of the connection pool (`--max-db-conn`, default 32). Ignored for SQLite,
    /// which always has one writer connection plus a fixed small reader pool.
    pub max_pg_conns: usize,
    /// Postgres: how long a statement may run before the server cancels it (a transient
    /// error, retried), unless the URL's `options` set `statement_timeout` themselves.
    pub pg_statement_timeout: std::time::Duration,
    /// Postgres: how long an operation waits for a free pooled connection before it fails
    /// (transient, retried), so a hung database surfaces as errors instead of a stall.
    pub pg_pool_wait: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_pg_conns: 32,
            pg_statement_timeout: std::time::Duration::from_secs(60),
            pg_pool_wait: std::time::Duration::from_secs(30),
        }
    }
}

/// Handle to the state store. Cheap to clone; all clones share one backend.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Woken whenever a write may have made a repo claimable for resync, so idle resync
    /// workers start at once instead of at their next poll. (The poll stays: another
    /// process sharing a Postgres database cannot wake us.)
    resync_wanted: Arc<tokio::sync::Notify>,
    /// Repos whose forced resync was asked while a worker held them (this process's
    /// workers pick it up when that resync ends; see [`Store::take_forced`]).
    forced: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Bumped when this process adds or removes tracked repos (Jetstream's `wantedDids`
    /// follows it).
    repo_set: Arc<tokio::sync::watch::Sender<u64>>,
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
                Backend::Postgres(postgres::PgStore::open(url, &opts).await?)
            }
        };
        Ok(Self {
            backend,
            resync_wanted: Arc::new(tokio::sync::Notify::new()),
            forced: Arc::default(),
            repo_set: Arc::new(tokio::sync::watch::Sender::new(0)),
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
            self.repo_set.send_modify(|v| *v += 1);
        }
        Ok(added)
    }

    /// Changes whenever this process adds or removes tracked repos.
    #[must_use]
    pub fn repo_set_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.repo_set.subscribe()
    }

    /// Untracks `dids`: deletes their repo rows, record index and resync buffer in one
    /// transaction. Outbox rows stay (already emitted events are still delivered). Returns how
    /// many repo rows were deleted.
    ///
    /// # Errors
    /// Database errors; nothing is deleted then.
    pub async fn remove_repos(&self, dids: &[String]) -> Result<u64, StoreError> {
        let removed = dispatch!(self.remove_repos(dids.to_vec()))?;
        if removed > 0 {
            self.repo_set.send_modify(|v| *v += 1);
        }
        Ok(removed)
    }

    /// The repo row of `did`, if tracked.
    ///
    /// # Errors
    /// Database errors, or [`StoreError::Corrupt`] for unknown stored state names.
    pub async fn get_repo(&self, did: &str) -> Result<Option<RepoRow>, StoreError> {
        dispatch!(self.get_repo(did.to_owned()))
    }

    /// One page of tracked repos in DID order, after `after` (exclusive; `""` for the first
    /// page), optionally only those in `state`, at most `limit`.
    ///
    /// # Errors
    /// Database errors, or [`StoreError::Corrupt`] for unknown stored state names.
    pub async fn list_repos(
        &self,
        state: Option<RepoState>,
        after: &str,
        limit: u32,
    ) -> Result<Vec<RepoSummary>, StoreError> {
        dispatch!(self.list_repos(state, after.to_owned(), limit))
    }

    /// Forces a full resync of the tracked `dids` that no worker holds: each becomes
    /// `desynchronized` ([`RESYNC_REQUESTED`]), claimable at once, with its last fetch
    /// forgotten so the next fetch re-downloads rather than trusting the held copy. A
    /// `pending` repo is already waiting for its first, full fetch (its backfill): it counts
    /// as queued and keeps its state. One transaction.
    ///
    /// # Errors
    /// Database errors; nothing is changed then.
    pub async fn request_resync(&self, dids: &[String]) -> Result<ResyncRequest, StoreError> {
        let request = dispatch!(self.request_resync(dids.to_vec()))?;
        if !request.queued.is_empty() {
            self.resync_wanted.notify_waiters();
        }
        self.forced_set().extend(request.resyncing.iter().cloned());
        Ok(request)
    }

    /// Whether a forced resync of `did` was asked while a worker held it (and forgets it):
    /// that worker queues it once its resync ends.
    #[must_use]
    pub fn take_forced(&self, did: &str) -> bool {
        self.forced_set().remove(did)
    }

    fn forced_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.forced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A setting saved with [`save_setting`](Self::save_setting), if any.
    ///
    /// # Errors
    /// Database errors.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self.setting(name.to_owned()))
    }

    /// Saves (or replaces) a setting and, with `resync` (a reason), marks every `active`
    /// repo `desynchronized` with it, claimable at once, in the same transaction: a widening
    /// of the collection filters is stored together with the re-fetch it needs. Returns
    /// how many repos were marked.
    ///
    /// # Errors
    /// Database errors; nothing is changed then.
    pub async fn save_setting(
        &self,
        name: &str,
        value: &str,
        resync: Option<&str>,
    ) -> Result<u64, StoreError> {
        let marked = dispatch!(self.save_setting(
            name.to_owned(),
            value.to_owned(),
            resync.map(str::to_owned)
        ))?;
        if marked > 0 {
            self.resync_wanted.notify_waiters();
        }
        Ok(marked)
    }

    /// Saves one minute of status history and forgets minutes older than
    /// [`HISTORY_MINUTES`] before it.
    ///
    /// # Errors
    /// Database errors.
    pub async fn save_minute(&self, row: MinuteRow) -> Result<(), StoreError> {
        dispatch!(self.save_minute(row))
    }

    /// The status history from `minute` on, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn minutes_since(&self, minute: i64) -> Result<Vec<MinuteRow>, StoreError> {
        dispatch!(self.minutes_since(minute))
    }

    /// How many repos are in each state (states with none are absent).
    ///
    /// # Errors
    /// Database errors, or [`StoreError::Corrupt`] for unknown stored state names.
    pub async fn repo_states(&self) -> Result<Vec<(RepoState, u64)>, StoreError> {
        dispatch!(self.repo_states())
    }

    /// The `limit` most common reasons of repos in `error` (their last resync failed with a
    /// verdict), most common first.
    ///
    /// # Errors
    /// Database errors.
    pub async fn error_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError> {
        dispatch!(self.error_reasons(limit))
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

    /// Marks every active or resyncing repo `desynchronized` with `reason` (live events
    /// were missed for all of them). Returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn desynchronize_syncing(&self, reason: &str) -> Result<u64, StoreError> {
        let n = dispatch!(self.desynchronize_syncing(reason.to_owned()))?;
        self.resync_wanted.notify_waiters();
        Ok(n)
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

    /// The CID the record index holds for `collection/rkey` of `did`, if any.
    ///
    /// # Errors
    /// Database errors, or a corrupt index chunk.
    pub async fn record_cid(
        &self,
        did: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<Option<String>, StoreError> {
        dispatch!(self.record_cid(did.to_owned(), collection.to_owned(), rkey.to_owned()))
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
