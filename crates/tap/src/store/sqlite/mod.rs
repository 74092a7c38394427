//! SQLite backend. One dedicated writer thread owns the only write connection and group-commits
//! whatever writes are queued into one transaction; reads run on a small pool of read-only
//! connections (WAL lets them proceed while the writer commits). Pragmas are set in
//! [`configure`] for every connection.
//!
//! `connection.rs` opens, configures and migrates; `writer.rs` is the writer thread and its
//! group commit; `readers.rs` the read pool; `apply.rs` the one transactional write of a
//! repo event; this file the store's other queries.

mod apply;
mod connection;
mod readers;
mod writer;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::record_index;
use super::schema::REPO_COLUMNS;
use super::schema::state_counts;
use super::{
    BufferedCommit, CLAIM_ORDER, EventId, HISTORY_MINUTES, MinuteRow, OutboxRow, RESYNC_REQUESTED,
    RecordRow, RepoRow, RepoState, RepoSummary, RepoWrite, ResyncFailure, ResyncRequest,
    StoreError, Table, count_i64, event_id, to_i64,
};

/// Marks one repo for a forced full resync (see `Store::request_resync`).
const FORCE_RESYNC_SQLITE: &str = "UPDATE repos SET state = 'desynchronized', error_msg = ?2, \
     retry_after = 0, retry_count = 0, fetch_kind = '' WHERE did = ?1 AND state <> 'pending'";

/// The most common failure reasons (see `Store::error_reasons`).
const ERROR_REASONS_SQLITE: &str = "SELECT error_msg, COUNT(*) AS n FROM repos \
     WHERE state = 'error' AND error_msg <> '' \
     GROUP BY error_msg ORDER BY n DESC, error_msg LIMIT ?1";

use apply::{apply_in_tx, chunk_at_or_before, delete_repo, read_repo};
use connection::open_blocking;
use readers::ReaderPool;
pub(in crate::store) use writer::WriterStats;
use writer::{Job, WRITE_QUEUE, WriterMsg, run_writer};

/// Whether an SQLite error may go away on retry.
pub(super) fn is_transient(err: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match err.sqlite_error_code() {
        Some(code) => matches!(
            code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::OutOfMemory
        ),
        None => false,
    }
}

fn sq(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

fn join_err(op: &'static str) -> impl FnOnce(tokio::task::JoinError) -> StoreError {
    move |err| StoreError::Worker {
        op,
        detail: err.to_string(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (a connection list, a join handle) stay consistent even if a holder
    // panicked, so poisoning is ignored.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) struct SqliteStore {
    writes: mpsc::Sender<WriterMsg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Option<ReaderPool>,
    pub(super) stats: Arc<WriterStats>,
}

impl SqliteStore {
    pub(super) async fn open(path: String) -> Result<Self, StoreError> {
        let (conn, readers) = tokio::task::spawn_blocking(move || open_blocking(&path))
            .await
            .map_err(join_err("open"))??;
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        let stats = Arc::new(WriterStats::default());
        let writer_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name("tap-sqlite-writer".into())
            .spawn(move || run_writer(conn, queue, &writer_stats))
            .map_err(|err| StoreError::Worker {
                op: "open",
                detail: format!("cannot start the writer thread: {err}"),
            })?;
        Ok(Self {
            writes,
            writer: Mutex::new(Some(handle)),
            readers,
            stats,
        })
    }

    /// Commands waiting for the writer (tests use it to know a group is queued).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.writes.max_capacity() - self.writes.capacity()
    }

    pub(super) async fn close(&self) {
        if let Some(readers) = &self.readers {
            readers.close();
        }
        let (ack, done) = oneshot::channel();
        if self.writes.send(WriterMsg::Shutdown(ack)).await.is_ok() {
            // Err only if the writer is already gone; either way it has stopped.
            let _ = done.await;
        }
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("SQLite writer thread panicked."),
                Err(err) => tracing::error!(%err, "Could not join the SQLite writer thread."),
            }
        }
        tracing::debug!(
            groups = self.stats.groups.load(Ordering::Relaxed),
            grouped_jobs = self.stats.grouped_jobs.load(Ordering::Relaxed),
            fallbacks = self.stats.fallbacks.load(Ordering::Relaxed),
            "SQLite store closed."
        );
    }

    /// Runs `job` on the writer connection inside a (possibly shared) transaction and returns
    /// its result once that transaction has committed. `job` may run more than once (a failed
    /// group is retried command by command), always on a rolled-back state.
    pub(super) async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        crate::telemetry::send_measured("sqlite_writes", &self.writes, Job::queue(job, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        result.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, op: &'static str, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        match &self.readers {
            Some(pool) => pool.run(op, query).await,
            None => self.write(query).await,
        }
    }

    pub(super) async fn add_repos(&self, dids: Vec<String>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut insert = conn
                .prepare_cached("INSERT INTO repos (did) VALUES (?1) ON CONFLICT (did) DO NOTHING")
                .map_err(sq("add_repos"))?;
            let mut inserted = 0;
            for did in &dids {
                inserted += insert.execute([did]).map_err(sq("add_repos"))? as u64;
            }
            Ok(inserted)
        })
        .await
    }

    pub(super) async fn remove_repos(&self, dids: Vec<String>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut removed = 0;
            for did in &dids {
                removed += delete_repo(conn, did, "remove_repos")?;
            }
            Ok(removed)
        })
        .await
    }

    pub(super) async fn get_repo(&self, did: String) -> Result<Option<RepoRow>, StoreError> {
        self.read("get_repo", move |conn| {
            conn.prepare_cached(&format!("SELECT {REPO_COLUMNS} FROM repos WHERE did = ?1"))
                .and_then(|mut stmt| stmt.query_row([&did], read_repo).optional())
                .map_err(sq("get_repo"))?
                .transpose()
        })
        .await
    }

    pub(super) async fn set_repo_state(
        &self,
        did: String,
        state: RepoState,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached("UPDATE repos SET state = ?2 WHERE did = ?1")
                .and_then(|mut stmt| stmt.execute(params![did, state.as_str()]))
                .map_err(sq("set_repo_state"))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn mark_desynchronized(
        &self,
        did: String,
        reason: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE repos SET state = 'desynchronized', error_msg = ?2, retry_after = 0 \
                 WHERE did = ?1",
            )
            .and_then(|mut stmt| stmt.execute(params![did, reason]))
            .map_err(sq("mark_desynchronized"))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn desynchronize_syncing(&self, reason: String) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE repos SET state = 'desynchronized', error_msg = ?1, retry_after = 0 \
                     WHERE state IN ('active', 'resyncing')",
                )
                .and_then(|mut stmt| stmt.execute(params![reason]))
                .map_err(sq("desynchronize_syncing"))?;
            Ok(n as u64)
        })
        .await
    }

    pub(super) async fn list_repos(
        &self,
        state: Option<RepoState>,
        after: String,
        limit: u32,
    ) -> Result<Vec<RepoSummary>, StoreError> {
        const OP: &str = "list_repos";
        self.read(OP, move |conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {REPO_COLUMNS}, \
                     (SELECT COALESCE(SUM(n), 0) FROM record_chunks c WHERE c.did = repos.did) \
                     FROM repos WHERE did > ?1 AND (?2 IS NULL OR state = ?2) \
                     ORDER BY did LIMIT ?3"
                ))
                .map_err(sq(OP))?;
            let rows = stmt
                .query_map(params![after, state.map(RepoState::as_str), limit], |row| {
                    let records: i64 = row.get(13)?;
                    Ok(read_repo(row)?.map(|repo| RepoSummary {
                        repo,
                        records: records.unsigned_abs(),
                    }))
                })
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(sq(OP))?;
            rows.into_iter().collect()
        })
        .await
    }

    pub(super) async fn request_resync(
        &self,
        dids: Vec<String>,
    ) -> Result<ResyncRequest, StoreError> {
        const OP: &str = "request_resync";
        self.write(move |conn| {
            let mut found = Vec::new();
            let mut lookup = conn
                .prepare_cached("SELECT state FROM repos WHERE did = ?1")
                .map_err(sq(OP))?;
            for did in &dids {
                let state: Option<String> = lookup
                    .query_row([did], |row| row.get(0))
                    .optional()
                    .map_err(sq(OP))?;
                if let Some(state) = state {
                    found.push((did.clone(), state));
                }
            }
            let request = ResyncRequest::classify(&dids, &found);
            let mut mark = conn.prepare_cached(FORCE_RESYNC_SQLITE).map_err(sq(OP))?;
            for did in &request.queued {
                mark.execute(params![did, RESYNC_REQUESTED])
                    .map_err(sq(OP))?;
            }
            Ok(request)
        })
        .await
    }

    pub(super) async fn setting(&self, name: String) -> Result<Option<String>, StoreError> {
        self.read("setting", move |conn| {
            conn.prepare_cached("SELECT value FROM settings WHERE name = ?1")
                .and_then(|mut stmt| stmt.query_row([&name], |row| row.get(0)).optional())
                .map_err(sq("setting"))
        })
        .await
    }

    pub(super) async fn save_setting(
        &self,
        name: String,
        value: String,
        resync: Option<String>,
    ) -> Result<u64, StoreError> {
        const OP: &str = "save_setting";
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut stmt| stmt.execute(params![name, value]))
            .map_err(sq(OP))?;
            let Some(reason) = &resync else {
                return Ok(0);
            };
            conn.prepare_cached(
                "UPDATE repos SET state = 'desynchronized', error_msg = ?1, retry_after = 0 \
                 WHERE state = 'active'",
            )
            .and_then(|mut stmt| stmt.execute([reason]))
            .map(|n| n as u64)
            .map_err(sq(OP))
        })
        .await
    }

    pub(super) async fn save_minute(&self, row: MinuteRow) -> Result<(), StoreError> {
        const OP: &str = "save_minute";
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO status_minutes \
                 (minute, span_ms, events, delivered, bytes, records, lag_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (minute) DO UPDATE SET span_ms = excluded.span_ms, \
                 events = excluded.events, delivered = excluded.delivered, \
                 bytes = excluded.bytes, records = excluded.records, lag_ms = excluded.lag_ms",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    row.minute,
                    row.span_ms,
                    count_i64(row.events),
                    count_i64(row.delivered),
                    count_i64(row.bytes),
                    count_i64(row.records),
                    row.lag_ms
                ])
            })
            .map_err(sq(OP))?;
            conn.prepare_cached("DELETE FROM status_minutes WHERE minute < ?1")
                .and_then(|mut stmt| stmt.execute([row.minute - HISTORY_MINUTES]))
                .map_err(sq(OP))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn minutes_since(&self, minute: i64) -> Result<Vec<MinuteRow>, StoreError> {
        const OP: &str = "minutes_since";
        self.read(OP, move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT minute, span_ms, events, delivered, bytes, records, lag_ms \
                     FROM status_minutes WHERE minute >= ?1 ORDER BY minute",
                )
                .map_err(sq(OP))?;
            stmt.query_map([minute], |row| {
                let count = |i| row.get::<_, i64>(i).map(i64::unsigned_abs);
                Ok(MinuteRow {
                    minute: row.get(0)?,
                    span_ms: row.get(1)?,
                    events: count(2)?,
                    delivered: count(3)?,
                    bytes: count(4)?,
                    records: count(5)?,
                    lag_ms: row.get(6)?,
                })
            })
            .and_then(Iterator::collect)
            .map_err(sq(OP))
        })
        .await
    }

    pub(super) async fn repo_states(&self) -> Result<Vec<(RepoState, u64)>, StoreError> {
        const OP: &str = "repo_states";
        self.read(OP, move |conn| {
            let counts: Vec<(String, i64)> = conn
                .prepare_cached("SELECT state, COUNT(*) FROM repos GROUP BY state")
                .and_then(|mut stmt| {
                    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                        .and_then(Iterator::collect)
                })
                .map_err(sq(OP))?;
            state_counts(counts)
        })
        .await
    }

    pub(super) async fn error_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError> {
        const OP: &str = "error_reasons";
        self.read(OP, move |conn| {
            let reasons: Vec<(String, i64)> = conn
                .prepare_cached(ERROR_REASONS_SQLITE)
                .and_then(|mut stmt| {
                    stmt.query_map([limit], |row| Ok((row.get(0)?, row.get(1)?)))
                        .and_then(Iterator::collect)
                })
                .map_err(sq(OP))?;
            Ok(reasons
                .into_iter()
                .map(|(reason, n)| (reason, n.unsigned_abs()))
                .collect())
        })
        .await
    }

    pub(super) async fn count_records_for(&self, did: String) -> Result<u64, StoreError> {
        self.read("count_records_for", move |conn| {
            let count: i64 = conn
                .prepare_cached("SELECT COALESCE(SUM(n), 0) FROM record_chunks WHERE did = ?1")
                .and_then(|mut stmt| stmt.query_row([&did], |row| row.get(0)))
                .map_err(sq("count_records_for"))?;
            Ok(count.unsigned_abs())
        })
        .await
    }

    pub(super) async fn record_collections(&self, did: String) -> Result<Vec<String>, StoreError> {
        self.read("record_collections", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT DISTINCT collection FROM record_chunks WHERE did = ?1 \
                     ORDER BY collection",
                )
                .map_err(sq("record_collections"))?;
            stmt.query_map([&did], |row| row.get(0))
                .and_then(Iterator::collect)
                .map_err(sq("record_collections"))
        })
        .await
    }

    pub(super) async fn count_table(&self, table: Table) -> Result<u64, StoreError> {
        self.read("count", move |conn| {
            let count: i64 = conn
                .query_row(table.count_sql(), [], |row| row.get(0))
                .map_err(sq("count"))?;
            Ok(count.unsigned_abs())
        })
        .await
    }

    pub(super) async fn firehose_cursor(&self, url: String) -> Result<Option<i64>, StoreError> {
        self.read("firehose_cursor", move |conn| {
            conn.prepare_cached("SELECT cursor FROM firehose_cursors WHERE url = ?1")
                .and_then(|mut stmt| stmt.query_row([&url], |row| row.get(0)).optional())
                .map_err(sq("firehose_cursor"))
        })
        .await
    }

    pub(super) async fn save_firehose_cursor(
        &self,
        url: String,
        seq: i64,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO firehose_cursors (url, cursor) VALUES (?1, ?2) \
                 ON CONFLICT (url) DO UPDATE SET cursor = excluded.cursor",
            )
            .and_then(|mut stmt| stmt.execute(params![url, seq]))
            .map_err(sq("save_firehose_cursor"))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn list_repos_cursor(
        &self,
        url: String,
    ) -> Result<Option<String>, StoreError> {
        self.read("list_repos_cursor", move |conn| {
            conn.prepare_cached("SELECT cursor FROM list_repos_cursors WHERE url = ?1")
                .and_then(|mut stmt| stmt.query_row([&url], |row| row.get(0)).optional())
                .map_err(sq("list_repos_cursor"))
        })
        .await
    }

    pub(super) async fn save_list_repos_cursor(
        &self,
        url: String,
        cursor: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO list_repos_cursors (url, cursor) VALUES (?1, ?2) \
                 ON CONFLICT (url) DO UPDATE SET cursor = excluded.cursor",
            )
            .and_then(|mut stmt| stmt.execute(params![url, cursor]))
            .map_err(sq("save_list_repos_cursor"))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn collection_cursor(
        &self,
        url: String,
        collection: String,
    ) -> Result<Option<String>, StoreError> {
        self.read("collection_cursor", move |conn| {
            conn.prepare_cached(
                "SELECT cursor FROM collection_cursors WHERE url = ?1 AND collection = ?2",
            )
            .and_then(|mut stmt| {
                stmt.query_row([&url, &collection], |row| row.get(0))
                    .optional()
            })
            .map_err(sq("collection_cursor"))
        })
        .await
    }

    pub(super) async fn save_collection_cursor(
        &self,
        url: String,
        collection: String,
        cursor: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO collection_cursors (url, collection, cursor) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (url, collection) DO UPDATE SET cursor = excluded.cursor",
            )
            .and_then(|mut stmt| stmt.execute(params![url, collection, cursor]))
            .map_err(sq("save_collection_cursor"))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn apply(&self, batch: RepoWrite) -> Result<Vec<EventId>, StoreError> {
        self.write(move |conn| apply_in_tx(conn, &batch)).await
    }

    pub(super) async fn load_outbox(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // Ids above i64::MAX cannot exist in SQLite; saturate so "after" stays meaningful.
        let after = after.map_or(0, |id| i64::try_from(id.0).unwrap_or(i64::MAX));
        let limit = to_i64(limit);
        self.read("load_outbox", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, did, live, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(sq("load_outbox"))?;
            let rows = stmt
                .query_map(params![after, limit], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, bool>(2)?,
                        row.get::<_, String>(3)?,
                    ))
                })
                .map_err(sq("load_outbox"))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, did, live, payload) = row.map_err(sq("load_outbox"))?;
                out.push(OutboxRow {
                    id: event_id(id, "outbox")?,
                    did,
                    live,
                    payload,
                });
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn delete_acked(&self, ids: Vec<EventId>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            // Acks arrive mostly in id order, so a batch collapses into a few ranges: one
            // statement per run of consecutive ids instead of one per id.
            let mut delete = conn
                .prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2")
                .map_err(sq("delete_acked"))?;
            let mut deleted = 0;
            for (first, last) in super::id_runs(&ids) {
                deleted += delete.execute([first, last]).map_err(sq("delete_acked"))? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    pub(super) async fn max_event_id(&self) -> Result<Option<EventId>, StoreError> {
        self.read("max_event_id", |conn| {
            // sqlite_sequence holds the AUTOINCREMENT high-water mark, which survives deletes.
            let seq: Option<i64> = conn
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'",
                    [],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sq("max_event_id"))?;
            seq.filter(|seq| *seq > 0)
                .map(|seq| event_id(seq, "sqlite_sequence"))
                .transpose()
        })
        .await
    }

    pub(super) async fn reset_resyncing(&self) -> Result<u64, StoreError> {
        self.write(|conn| {
            let changed = conn
                .execute(
                    "UPDATE repos SET state = 'desynchronized' WHERE state = 'resyncing'",
                    [],
                )
                .map_err(sq("reset_resyncing"))?;
            Ok(changed as u64)
        })
        .await
    }

    pub(super) async fn reset_undelivered_backfills(&self) -> Result<u64, StoreError> {
        const OP: &str = "reset_undelivered_backfills";
        self.write(|conn| {
            let reset = conn
                .execute(
                    "UPDATE repos SET state = 'pending', rev = NULL, prev_data = NULL, \
                       error_msg = '', retry_count = 0, retry_after = 0, backfill_token = NULL \
                     WHERE backfill_token IS NOT NULL",
                    [],
                )
                .map_err(sq(OP))?;
            Ok(reset as u64)
        })
        .await
    }

    pub(super) async fn clear_backfill_token(
        &self,
        did: String,
        token: EventId,
    ) -> Result<bool, StoreError> {
        let token = i64::try_from(token.0).unwrap_or(i64::MAX);
        self.write(move |conn| {
            let cleared = conn
                .prepare_cached(
                    "UPDATE repos SET backfill_token = NULL \
                     WHERE did = ?1 AND backfill_token = ?2",
                )
                .and_then(|mut stmt| stmt.execute(params![did, token]))
                .map_err(sq("clear_backfill_token"))?;
            Ok(cleared > 0)
        })
        .await
    }

    pub(super) async fn backfill_token(&self, did: String) -> Result<Option<EventId>, StoreError> {
        self.read("backfill_token", move |conn| {
            let token: Option<Option<i64>> = conn
                .prepare_cached("SELECT backfill_token FROM repos WHERE did = ?1")
                .and_then(|mut stmt| stmt.query_row([&did], |row| row.get(0)).optional())
                .map_err(sq("backfill_token"))?;
            token.flatten().map(|t| event_id(t, "repos")).transpose()
        })
        .await
    }

    pub(super) async fn claim_resync_job(
        &self,
        now_unix: i64,
    ) -> Result<Option<RepoRow>, StoreError> {
        // Runs on the single writer, so the select-and-update is atomic.
        self.write(move |conn| {
            let mut claim = conn
                .prepare_cached(&format!(
                    "UPDATE repos SET state = 'resyncing' WHERE did = ( \
                       SELECT did FROM repos WHERE state = ?1 AND retry_after < ?2 \
                       ORDER BY retry_after LIMIT 1) \
                     RETURNING {REPO_COLUMNS}"
                ))
                .map_err(sq("claim_resync_job"))?;
            for state in CLAIM_ORDER {
                let row = claim
                    .query_row(params![state.as_str(), now_unix], read_repo)
                    .optional()
                    .map_err(sq("claim_resync_job"))?;
                if let Some(row) = row {
                    return row.map(Some);
                }
            }
            Ok(None)
        })
        .await
    }

    pub(super) async fn mark_resync_failed(
        &self,
        did: String,
        failure: ResyncFailure,
        now_unix: i64,
        jitter_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            const OP: &str = "mark_resync_failed";
            let stored: Option<(i64, String)> = conn
                .prepare_cached(
                    "SELECT retry_count, error_msg FROM repos \
                     WHERE did = ?1 AND state = 'resyncing'",
                )
                .and_then(|mut stmt| {
                    stmt.query_row([&did], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                })
                .map_err(sq(OP))?;
            let Some((count, message)) = stored else {
                return Ok(()); // removed (or re-added) mid-resync: nothing to record
            };
            let update = failure.row_update(count, &message, now_unix, jitter_ms);
            conn.prepare_cached(
                "UPDATE repos SET state = ?2, error_msg = ?3, retry_count = ?4, retry_after = ?5 \
                 WHERE did = ?1",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    did,
                    update.state.as_str(),
                    update.message,
                    update.retry_count,
                    update.retry_after
                ])
            })
            .map_err(sq(OP))?;
            Ok(())
        })
        .await
    }

    pub(super) async fn record_cid(
        &self,
        did: String,
        collection: String,
        rkey: String,
    ) -> Result<Option<String>, StoreError> {
        const OP: &str = "record_cid";
        self.read(OP, move |conn| {
            match apply::chunk_at_or_before(conn, &did, &collection, &rkey, OP)? {
                Some(found) => Ok(record_index::find(&found.text, &rkey)?),
                None => Ok(None),
            }
        })
        .await
    }

    pub(super) async fn records_page(
        &self,
        did: String,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<RecordRow>, StoreError> {
        self.read("records_page", move |conn| {
            const OP: &str = "records_page";
            // One snapshot for the two reads of a page: a chunk rewritten between them (split
            // or merged) would otherwise show some entries twice or not at all. (Through the
            // writer, for in-memory databases, the page is read inside its transaction.)
            let _snapshot = if conn.is_autocommit() {
                Some(conn.unchecked_transaction().map_err(sq(OP))?)
            } else {
                None
            };
            let mut page = Vec::with_capacity(limit);
            // The rest of the chunk holding `after`, then the chunks after it, read lazily
            // until the page is full.
            let mut rows = match &after {
                None => conn
                    .prepare_cached(
                        "SELECT collection, entries FROM record_chunks WHERE did = ?1 \
                         ORDER BY collection, first_rkey",
                    )
                    .map_err(sq(OP))?,
                Some((collection, rkey)) => {
                    if let Some(found) = chunk_at_or_before(conn, &did, collection, rkey, OP)?
                        && !record_index::fill_page(
                            &mut page,
                            limit,
                            collection,
                            &found.text,
                            Some(rkey),
                        )?
                    {
                        return Ok(page);
                    }
                    conn.prepare_cached(
                        "SELECT collection, entries FROM record_chunks \
                         WHERE did = ?1 AND (collection, first_rkey) > (?2, ?3) \
                         ORDER BY collection, first_rkey",
                    )
                    .map_err(sq(OP))?
                }
            };
            let mut cursor = match &after {
                None => rows.query(params![did]),
                Some((collection, rkey)) => rows.query(params![did, collection, rkey]),
            }
            .map_err(sq(OP))?;
            while let Some(row) = cursor.next().map_err(sq(OP))? {
                let collection: String = row.get(0).map_err(sq(OP))?;
                let text: String = row.get(1).map_err(sq(OP))?;
                if !record_index::fill_page(&mut page, limit, &collection, &text, None)? {
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    pub(super) async fn buffer_commit(
        &self,
        did: String,
        rev: String,
        data: String,
        limit: i64,
    ) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let stored = conn
                .prepare_cached(
                    "INSERT INTO resync_buffer (did, rev, data) SELECT ?1, ?2, ?3 \
                     WHERE (SELECT count(*) FROM resync_buffer WHERE did = ?1) < ?4",
                )
                .and_then(|mut stmt| stmt.execute(params![did, rev, data, limit]))
                .map_err(sq("buffer_commit"))?;
            Ok(stored == 1)
        })
        .await
    }

    pub(super) async fn buffered_commits(
        &self,
        did: String,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BufferedCommit>, StoreError> {
        self.read("buffered_commits", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, rev, data FROM resync_buffer WHERE did = ?1 AND id > ?2 \
                     ORDER BY id LIMIT ?3",
                )
                .map_err(sq("buffered_commits"))?;
            stmt.query_map(params![did, after, limit], |row| {
                Ok(BufferedCommit {
                    id: row.get(0)?,
                    rev: row.get(1)?,
                    data: row.get(2)?,
                })
            })
            .and_then(Iterator::collect)
            .map_err(sq("buffered_commits"))
        })
        .await
    }
}
