//! SQLite backend. One dedicated writer thread owns the only write connection and group-commits
//! whatever writes are queued into one transaction; reads run on a small pool of read-only
//! connections (WAL lets them proceed while the writer commits). Pragmas are set in
//! [`configure`] for every connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::record_index::{self, FoundChunk, IndexStep, IndexWriter};
use super::schema::{self, REPO_COLUMNS, StoredRepo};
use super::{
    BufferedCommit, CLAIM_ORDER, EventId, EventStorage, OutboxRow, RecordChange, RecordRow,
    RepoChange, RepoRow, RepoState, RepoWrite, ResyncFailure, StoreError, Table, event_id, to_i64,
};

/// Capacity of the writer's command queue; callers wait (asynchronously) when it is full.
const WRITE_QUEUE: usize = 1024;
/// Most commands folded into one transaction. Bounds the latency a command waits behind others
/// and the size of one WAL commit (a resync batch is up to 400 events of ~540 B).
const MAX_GROUP: usize = 64;
/// Read-only connections. Reads are short point/range queries; a 2-core box gains nothing from
/// more, and each connection holds its own page cache.
const READERS: usize = 4;

/// Which connection [`configure`] prepares.
#[derive(Clone, Copy, Debug)]
enum Role {
    Writer,
    Reader,
}

/// Sets every pragma of a connection, in one place.
///
/// `journal_mode` is stored in the file, so the first connection makes a new database WAL and
/// later ones just read the mode back. The writer gets a 4 MiB page cache and readers 2 MiB
/// each: tap's writes are appends and key-ordered upserts that need few hot pages, and bigger
/// caches only fill up during a large backfill (64 + 4×16 MiB took a 279 MB resync to 162 MB
/// peak RSS, with the cache the largest share; the backfill benchmark is no slower with the
/// small ones — docs/benchmarks.md).
///
/// `synchronous=FULL`: with NORMAL a power loss (not a crash) can roll back transactions
/// that had committed, `sqlite_sequence` with them, and an id already delivered to a
/// consumer would be issued again for another event. FULL syncs the WAL at every commit;
/// with the group commit that cost no measurable backfill throughput, and 1.3–1.5× on a
/// lone live commit (docs/benchmarks.md, "SQLite durability").
fn configure(conn: &Connection, role: Role) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))?;
    tracing::debug!(?role, %mode, "Configured SQLite journal mode.");
    let cache_kib = match role {
        Role::Writer => 4_096,
        Role::Reader => 2_048,
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=10000;
         PRAGMA temp_store=MEMORY;
         PRAGMA cache_size=-{cache_kib};
         PRAGMA foreign_keys=OFF;"
    ))?;
    // One plan per statement whatever the bound values: otherwise statements whose range
    // bounds are parameters (the record index's chunk lookups) are re-prepared at every
    // new binding, which cost ~3 % of the writer's CPU in the backfill benchmark.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// In-memory databases cannot be shared with separate read connections (plain `:memory:` is
/// private to its connection, and shared-cache memory databases take table locks instead of
/// using WAL), so for them reads go through the writer.
fn is_memory(path: &str) -> bool {
    path == ":memory:" || path.starts_with("file::memory:") || path.contains("mode=memory")
}

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

/// Counters of the writer, for tests and diagnostics.
#[derive(Debug, Default)]
pub(super) struct WriterStats {
    /// Transactions committed holding more than one command.
    pub(super) groups: AtomicU64,
    /// Commands committed as part of such a group.
    pub(super) grouped_jobs: AtomicU64,
    /// Groups that failed as a whole and were retried one command at a time.
    pub(super) fallbacks: AtomicU64,
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
        let job = Box::new(Job {
            run: job,
            result: None,
            reply: Some(reply),
        });
        self.writes
            .send(WriterMsg::Job(job))
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
            let count: Option<i64> = conn
                .prepare_cached(
                    "SELECT retry_count FROM repos WHERE did = ?1 AND state = 'resyncing'",
                )
                .and_then(|mut stmt| stmt.query_row([&did], |row| row.get(0)).optional())
                .map_err(sq(OP))?;
            let Some(count) = count else {
                return Ok(()); // removed (or re-added) mid-resync: nothing to record
            };
            let update = failure.row_update(count, now_unix, jitter_ms);
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

/// Maps a row selected with [`REPO_COLUMNS`]. The outer result is the driver's, the inner one
/// rejects state/status names we never write.
fn read_repo(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RepoRow, StoreError>> {
    let stored = StoredRepo {
        did: row.get(0)?,
        state: row.get(1)?,
        status: row.get(2)?,
        handle: row.get(3)?,
        rev: row.get(4)?,
        prev_data: row.get(5)?,
        error: row.get(6)?,
        retry_count: row.get(7)?,
        retry_after: row.get(8)?,
    };
    Ok(RepoRow::try_from(stored))
}

/// Deletes a repo row with its record index and resync buffer; returns 1 if the row existed.
fn delete_repo(conn: &Connection, did: &str, op: &'static str) -> Result<u64, StoreError> {
    let removed = conn
        .prepare_cached("DELETE FROM repos WHERE did = ?1")
        .and_then(|mut stmt| stmt.execute([did]))
        .map_err(sq(op))?;
    conn.prepare_cached("DELETE FROM record_chunks WHERE did = ?1")
        .and_then(|mut stmt| stmt.execute([did]))
        .map_err(sq(op))?;
    conn.prepare_cached("DELETE FROM resync_buffer WHERE did = ?1")
        .and_then(|mut stmt| stmt.execute([did]))
        .map_err(sq(op))?;
    Ok(removed as u64)
}

/// Applies index changes: [`IndexWriter`] names each query and rewrite, this runs them.
fn write_record_index(
    conn: &Connection,
    did: &str,
    records: &[RecordChange],
) -> Result<(), StoreError> {
    const OP: &str = "apply";
    let mut index = IndexWriter::new(records)?;
    loop {
        match index.step()? {
            IndexStep::ChunkAtOrBefore { collection, key } => {
                index.found(chunk_at_or_before(conn, did, collection, key, OP)?);
            }
            IndexStep::FirstChunk { collection } => index.found(
                conn.prepare_cached(
                    "SELECT first_rkey, entries FROM record_chunks \
                     WHERE did = ?1 AND collection = ?2 ORDER BY first_rkey LIMIT 1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![did, collection], found_chunk)
                        .optional()
                })
                .map_err(sq(OP))?,
            ),
            IndexStep::FirstKeyAfter { collection, first } => index.upper(
                conn.prepare_cached(
                    "SELECT first_rkey FROM record_chunks \
                     WHERE did = ?1 AND collection = ?2 AND first_rkey > ?3 \
                     ORDER BY first_rkey LIMIT 1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![did, collection, first], |row| row.get(0))
                        .optional()
                })
                .map_err(sq(OP))?,
            ),
            IndexStep::Rewrite {
                collection,
                rewrite,
            } => {
                if let Some(first) = rewrite.remove {
                    conn.prepare_cached(
                        "DELETE FROM record_chunks WHERE did = ?1 AND collection = ?2 \
                         AND first_rkey = ?3",
                    )
                    .and_then(|mut stmt| stmt.execute(params![did, collection, first]))
                    .map_err(sq(OP))?;
                }
                let mut insert = conn
                    .prepare_cached(
                        "INSERT INTO record_chunks (did, collection, first_rkey, n, entries) \
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(sq(OP))?;
                for chunk in rewrite.insert {
                    insert
                        .execute(params![
                            did,
                            collection,
                            chunk.first,
                            chunk.count,
                            chunk.text
                        ])
                        .map_err(sq(OP))?;
                }
            }
            IndexStep::Done => return Ok(()),
        }
    }
}

/// The chunk of `collection` with the greatest first rkey at or below `rkey`.
fn chunk_at_or_before(
    conn: &Connection,
    did: &str,
    collection: &str,
    rkey: &str,
    op: &'static str,
) -> Result<Option<FoundChunk>, StoreError> {
    conn.prepare_cached(
        "SELECT first_rkey, entries FROM record_chunks \
         WHERE did = ?1 AND collection = ?2 AND first_rkey <= ?3 \
         ORDER BY first_rkey DESC LIMIT 1",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![did, collection, rkey], found_chunk)
            .optional()
    })
    .map_err(sq(op))
}

fn found_chunk(row: &rusqlite::Row<'_>) -> rusqlite::Result<FoundChunk> {
    Ok(FoundChunk {
        first: row.get(0)?,
        text: row.get(1)?,
    })
}

/// The body of [`super::Store::apply`]; runs inside the writer's transaction.
fn apply_in_tx(conn: &Connection, w: &RepoWrite) -> Result<Vec<EventId>, StoreError> {
    const OP: &str = "apply";
    if w.has_condition() {
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM repos WHERE did = ?1")
            .and_then(|mut stmt| stmt.query_row([&w.did], |row| row.get(0)).optional())
            .map_err(sq(OP))?;
        w.check_condition(state.as_deref())?;
    }

    if !w.records.is_empty() {
        write_record_index(conn, &w.did, &w.records)?;
    }

    if !w.resync_buffer_delete.is_empty() {
        let mut delete = conn
            .prepare_cached("DELETE FROM resync_buffer WHERE id = ?1 AND did = ?2")
            .map_err(sq(OP))?;
        for id in &w.resync_buffer_delete {
            delete.execute(params![id, w.did]).map_err(sq(OP))?;
        }
    }

    let status_name = match &w.repo {
        RepoChange::Status(status) => status.as_str(),
        _ => "",
    };
    let (sql, args): (&str, Vec<&dyn rusqlite::ToSql>) = match &w.repo {
        RepoChange::None => ("", Vec::new()),
        RepoChange::Commit { rev, prev_data } => (
            "UPDATE repos SET rev = ?2, prev_data = ?3 WHERE did = ?1",
            vec![&w.did, rev, prev_data],
        ),
        RepoChange::ResyncDone { rev, prev_data } => (
            "UPDATE repos SET state = 'active', rev = ?2, prev_data = ?3, error_msg = '', \
             retry_count = 0, retry_after = 0 WHERE did = ?1",
            vec![&w.did, rev, prev_data],
        ),
        RepoChange::ResyncStale {
            rev,
            prev_data,
            reason,
        } => (
            "UPDATE repos SET state = 'desynchronized', rev = ?2, prev_data = ?3, \
             error_msg = ?4, retry_count = 0, retry_after = 0 WHERE did = ?1",
            vec![&w.did, rev, prev_data, reason],
        ),
        RepoChange::Handle(handle) => (
            "UPDATE repos SET handle = ?2 WHERE did = ?1",
            vec![&w.did, handle],
        ),
        RepoChange::Status(_) => (
            "UPDATE repos SET status = ?2 WHERE did = ?1",
            vec![&w.did, &status_name],
        ),
        RepoChange::Delete => {
            delete_repo(conn, &w.did, OP)?;
            ("", Vec::new())
        }
    };
    if !sql.is_empty() {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(args.as_slice()))
            .map_err(sq(OP))?;
    }

    if w.storage == EventStorage::InMemoryBackfill {
        return number_in_memory_events(conn, w);
    }
    let mut ids = Vec::with_capacity(w.events.len());
    if !w.events.is_empty() {
        let mut insert = conn
            .prepare_cached("INSERT INTO outbox (did, live, payload) VALUES (?1, ?2, ?3)")
            .map_err(sq(OP))?;
        for event in &w.events {
            insert
                .execute(params![w.did, event.live, event.payload])
                .map_err(sq(OP))?;
            ids.push(event_id(conn.last_insert_rowid(), "outbox")?);
        }
    }
    Ok(ids)
}

/// Assigns ids to events that are not stored: advances the outbox's AUTOINCREMENT
/// high-water mark past them (so no stored event can ever get one of their ids) and stamps
/// the repo with the first as its backfill token.
fn number_in_memory_events(conn: &Connection, w: &RepoWrite) -> Result<Vec<EventId>, StoreError> {
    const OP: &str = "apply";
    if w.events.is_empty() {
        return Ok(Vec::new());
    }
    let count = super::to_i64(w.events.len());
    // AUTOINCREMENT hands out max(seq, max(id)) + 1; the table is append-only, so seq is
    // the high-water mark once a row exists. Before the first row ever, create the entry.
    let last: i64 = conn
        .prepare_cached(
            "INSERT INTO sqlite_sequence (name, seq) \
             SELECT 'outbox', COALESCE((SELECT MAX(id) FROM outbox), 0) \
             WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'outbox')",
        )
        .and_then(|mut stmt| stmt.execute([]))
        .and_then(|_| {
            conn.prepare_cached(
                "UPDATE sqlite_sequence SET seq = seq + ?1 WHERE name = 'outbox' RETURNING seq",
            )?
            .query_row([count], |row| row.get(0))
        })
        .map_err(sq(OP))?;
    let first = last - count + 1;
    conn.prepare_cached("UPDATE repos SET backfill_token = ?2 WHERE did = ?1")
        .and_then(|mut stmt| stmt.execute(params![w.did, first]))
        .map_err(sq(OP))?;
    (first..=last).map(|id| event_id(id, "outbox")).collect()
}

fn open_blocking(path: &str) -> Result<(Connection, Option<ReaderPool>), StoreError> {
    let open_err = |source| StoreError::SqliteOpen {
        path: path.to_owned(),
        source,
    };
    // Default flags: read-write, create, no mutex (the connection never leaves its thread
    // while in use), URI names allowed (`file:…?…`).
    let mut conn = Connection::open_with_flags(path, OpenFlags::default()).map_err(open_err)?;
    configure(&conn, Role::Writer).map_err(open_err)?;
    migrate(&mut conn, path)?;
    let readers = if is_memory(path) {
        tracing::info!(
            path,
            "In-memory SQLite database: reads share the writer connection."
        );
        None
    } else {
        Some(ReaderPool::open(path, READERS)?)
    };
    Ok((conn, readers))
}

fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    const OP: &str = "migrate";
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sq(OP))?;
    let table_exists = |name: &str| -> Result<bool, StoreError> {
        tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [name],
            |row| row.get(0),
        )
        .map_err(sq(OP))
    };
    let found = schema::Existing {
        history: table_exists("schema_migrations")?,
        repos: table_exists("repos")?,
    };
    if schema::needs_history(found, path)? {
        tx.execute_batch(
            "CREATE TABLE schema_migrations (
                 version    INTEGER NOT NULL PRIMARY KEY,
                 name       TEXT    NOT NULL,
                 applied_at INTEGER NOT NULL DEFAULT (unixepoch())
             )",
        )
        .map_err(sq(OP))?;
    }
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(sq(OP))?;
    for migration in schema::pending(current)? {
        let failed = |err: rusqlite::Error| StoreError::Migration {
            version: migration.version,
            name: migration.name,
            reason: err.to_string(),
        };
        tx.execute_batch(migration.sqlite).map_err(failed)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)",
            params![migration.version, migration.name],
        )
        .map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "Applied SQLite schema migration."
        );
    }
    tx.commit().map_err(sq(OP))
}

/// Read-only connections handed out to blocking tasks; the semaphore guarantees a free
/// connection for every permit holder.
struct ReaderPool {
    path: String,
    conns: Arc<Mutex<Vec<Connection>>>,
    permits: Arc<Semaphore>,
}

impl ReaderPool {
    fn open(path: &str, size: usize) -> Result<Self, StoreError> {
        let conns = (0..size)
            .map(|_| open_reader(path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            path: path.to_owned(),
            conns: Arc::new(Mutex::new(conns)),
            permits: Arc::new(Semaphore::new(size)),
        })
    }

    async fn run<T, F>(&self, op: &'static str, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let conns = Arc::clone(&self.conns);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let taken = lock(&conns).pop();
            // A connection is missing only if a query panicked while holding it; replace it.
            let conn = match taken {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = query(&conn);
            lock(&conns).push(conn);
            result
        })
        .await
        .map_err(join_err(op))?
    }

    fn close(&self) {
        self.permits.close();
        lock(&self.conns).clear();
    }
}

fn open_reader(path: &str) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::SqliteOpen {
        path: path.to_owned(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    configure(&conn, Role::Reader).map_err(open_err)?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------------
// The writer thread and group commit.

enum WriterMsg {
    Job(Box<dyn WriteJob>),
    /// Finish everything queued before this message, checkpoint, close, then acknowledge.
    Shutdown(oneshot::Sender<()>),
}

/// A queued write. `run` may be called more than once, each time on a rolled-back state.
trait WriteJob: Send {
    /// Runs the statements inside the caller's transaction and keeps the result; returns
    /// whether it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Replaces the kept result: the transaction holding it did not commit.
    fn fail(&mut self, err: StoreError);
    /// Sends the kept result to the waiting caller.
    fn reply(self: Box<Self>);
}

struct Job<T, F> {
    run: F,
    result: Option<Result<T, StoreError>>,
    reply: Option<oneshot::Sender<Result<T, StoreError>>>,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: Fn(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let result = (self.run)(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn fail(&mut self, err: StoreError) {
        self.result = Some(Err(err));
    }

    fn reply(mut self: Box<Self>) {
        let result = self.result.take().unwrap_or(Err(StoreError::Worker {
            op: "write",
            detail: "the write was never run".into(),
        }));
        if let Some(reply) = self.reply.take() {
            // The caller may have given up waiting; its write is committed regardless.
            let _ = reply.send(result);
        }
    }
}

fn run_writer(conn: Connection, mut queue: mpsc::Receiver<WriterMsg>, stats: &WriterStats) {
    let mut group: Vec<Box<dyn WriteJob>> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = queue.blocking_recv() {
        let mut shutdown = None;
        match first {
            WriterMsg::Job(job) => group.push(job),
            WriterMsg::Shutdown(ack) => shutdown = Some(ack),
        }
        // Group commit: take whatever else is already waiting, without waiting for more.
        while shutdown.is_none() && group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(WriterMsg::Job(job)) => group.push(job),
                Ok(WriterMsg::Shutdown(ack)) => shutdown = Some(ack),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            commit_group(&conn, &mut group, stats);
        }
        if let Some(ack) = shutdown {
            if let Err(err) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                tracing::warn!(%err, "SQLite WAL checkpoint at close failed.");
            }
            drop(conn);
            let _ = ack.send(());
            return;
        }
    }
    tracing::debug!("All store handles dropped; SQLite writer stops.");
}

/// Commits `group` as one transaction, each command inside its own savepoint so a failing
/// command is rolled back alone and the others still commit. If the transaction as a whole is
/// lost (SQLite rolled it back, or COMMIT failed), every command is retried in a transaction of
/// its own, so one bad command never fails the others. Replies go out only after COMMIT.
fn commit_group(conn: &Connection, group: &mut Vec<Box<dyn WriteJob>>, stats: &WriterStats) {
    if group.len() == 1 {
        for job in group.drain(..) {
            commit_alone(conn, job);
        }
        return;
    }
    match run_group(conn, group) {
        Ok(()) => {
            stats.groups.fetch_add(1, Ordering::Relaxed);
            stats
                .grouped_jobs
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            for job in group.drain(..) {
                job.reply();
            }
        }
        Err(err) => {
            stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%err, jobs = group.len(), "Group commit failed; retrying writes one by one.");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            for job in group.drain(..) {
                commit_alone(conn, job);
            }
        }
    }
}

fn run_group(conn: &Connection, group: &mut [Box<dyn WriteJob>]) -> Result<(), StoreError> {
    const OP: &str = "group commit";
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sq(OP))?;
    for job in group.iter_mut() {
        conn.execute_batch("SAVEPOINT job").map_err(sq(OP))?;
        if job.run(conn) {
            conn.execute_batch("RELEASE job").map_err(sq(OP))?;
        } else if conn.is_autocommit() {
            // Some errors (I/O, disk full) make SQLite roll back the whole transaction.
            return Err(StoreError::Worker {
                op: OP,
                detail: "SQLite rolled back the transaction after a failed write".into(),
            });
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
                .map_err(sq(OP))?;
        }
    }
    conn.execute_batch("COMMIT").map_err(sq(OP))
}

fn commit_alone(conn: &Connection, mut job: Box<dyn WriteJob>) {
    const OP: &str = "commit";
    if let Err(err) = conn.execute_batch("BEGIN IMMEDIATE") {
        job.fail(sq(OP)(err));
        job.reply();
        return;
    }
    if job.run(conn)
        && let Err(err) = conn.execute_batch("COMMIT")
    {
        job.fail(sq(OP)(err));
    }
    if !conn.is_autocommit()
        && let Err(err) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(%err, "SQLite ROLLBACK failed.");
    }
    job.reply();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, defect 12: a committed transaction must survive a power loss, or an id
    /// already delivered could be issued again.
    #[test]
    fn every_connection_syncs_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        for role in [Role::Writer, Role::Reader] {
            configure(&conn, role).unwrap();
            let level: i64 = conn
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .unwrap();
            assert_eq!(level, 2, "FULL for {role:?}");
        }
    }
}
