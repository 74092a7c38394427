//! Postgres backend: a `deadpool-postgres` pool sized by `--max-db-conn`. Every write is its
//! own transaction; row locks (`FOR UPDATE`, `FOR UPDATE SKIP LOCKED`) serialize what the
//! SQLite writer thread serializes by construction. TLS as the URL's `sslmode` says
//! (`pg_tls`, libpq's meanings; `prefer` by default).

use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::config::Host;

use super::record_index::{self, FoundChunk, IndexStep, IndexWriter};
use super::schema::{self, REPO_COLUMNS, StoredRepo};
use super::{
    BufferedCommit, CLAIM_ORDER, EventId, EventStorage, HISTORY_MINUTES, MinuteRow, OutboxRow,
    RESYNC_REQUESTED, RecordRow, RepoChange, RepoRow, RepoState, RepoSummary, RepoWrite,
    ResyncFailure, ResyncRequest, StoreError, Table, count_i64, event_id, to_i64,
};

/// Key of the advisory lock that serializes migrations of several processes starting at once.
const MIGRATION_LOCK: i64 = 0x7461_705f_6d69_6772; // "tap_migr"
/// How long connecting may take before `open` (or a later reconnect) fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Ids per `DELETE … = ANY($1)` statement in `delete_acked`.
const DELETE_CHUNK: usize = 10_000;

fn pg(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

fn pool_err(op: &'static str) -> impl FnOnce(PoolError) -> StoreError {
    move |source| StoreError::PostgresPool { op, source }
}

/// Whether a Postgres error may go away on retry: lost connection, I/O, connection-class and
/// resource errors, serialization failures, deadlocks, statement and lock timeouts, server
/// shutdown.
pub(super) fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
                || code == "57014"
                || code == "55P03"
        }
        None => std::error::Error::source(err).is_some_and(|src| src.is::<std::io::Error>()),
    }
}

/// `host:port/dbname` without credentials, for error messages.
fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(i)
                .or_else(|| config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{name}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

#[derive(Clone)]
pub(super) struct PgStore {
    pool: Pool,
}

impl PgStore {
    pub(super) async fn open(url: &str, opts: &super::StoreOptions) -> Result<Self, StoreError> {
        let max_conns = opts.max_pg_conns;
        let (url, tls) = super::pg_tls::split_url(url)
            .map_err(|detail| StoreError::Worker { op: "open", detail })?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|source| StoreError::InvalidPostgresUrl { source })?;
        config.ssl_mode(tls.mode);
        let connector = super::pg_tls::connector(&tls)
            .map_err(|detail| StoreError::Worker { op: "open", detail })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A statement that hangs (a lock held elsewhere, a stuck server) is cancelled by the
        // server and retried as a transient error, unless the URL sets its own timeout.
        let options = config.get_options().unwrap_or_default().to_owned();
        if !options.contains("statement_timeout") {
            let ms = opts.pg_statement_timeout.as_millis().max(1);
            config.options(format!("{options} -c statement_timeout={ms}").trim());
        }
        let target = describe(&config);
        let manager = Manager::from_config(
            config,
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_conns.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(opts.pg_pool_wait))
            .build()
            .map_err(|err| StoreError::Worker {
                op: "open",
                detail: format!("cannot build the Postgres pool: {err}"),
            })?;
        let store = Self { pool };
        let mut client = store
            .pool
            .get()
            .await
            .map_err(|source| StoreError::PostgresConnect {
                target: target.clone(),
                source,
            })?;
        migrate(&mut client, &target).await?;
        Ok(store)
    }

    pub(super) async fn close(&self) {
        self.pool.close();
    }

    async fn client(&self, op: &'static str) -> Result<Object, StoreError> {
        if self.pool.is_closed() {
            return Err(StoreError::Closed);
        }
        self.pool.get().await.map_err(|err| match err {
            PoolError::Closed => StoreError::Closed,
            err => pool_err(op)(err),
        })
    }

    pub(super) async fn add_repos(&self, dids: Vec<String>) -> Result<u64, StoreError> {
        const OP: &str = "add_repos";
        let client = self.client(OP).await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO repos (did) SELECT unnest($1::text[]) ON CONFLICT (did) DO NOTHING",
            )
            .await
            .map_err(pg(OP))?;
        client.execute(&stmt, &[&dids]).await.map_err(pg(OP))
    }

    pub(super) async fn remove_repos(&self, dids: Vec<String>) -> Result<u64, StoreError> {
        const OP: &str = "remove_repos";
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        // The repo rows go first: deleting them waits for any apply() holding their lock, so
        // the record rows that apply() inserted are visible to (and removed by) the next two
        // statements.
        let removed = tx
            .execute("DELETE FROM repos WHERE did = ANY($1)", &[&dids])
            .await
            .map_err(pg(OP))?;
        tx.execute("DELETE FROM record_chunks WHERE did = ANY($1)", &[&dids])
            .await
            .map_err(pg(OP))?;
        tx.execute("DELETE FROM resync_buffer WHERE did = ANY($1)", &[&dids])
            .await
            .map_err(pg(OP))?;
        tx.commit().await.map_err(pg(OP))?;
        Ok(removed)
    }

    pub(super) async fn get_repo(&self, did: String) -> Result<Option<RepoRow>, StoreError> {
        const OP: &str = "get_repo";
        let client = self.client(OP).await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {REPO_COLUMNS} FROM repos WHERE did = $1"))
            .await
            .map_err(pg(OP))?;
        let row = client.query_opt(&stmt, &[&did]).await.map_err(pg(OP))?;
        row.map(|row| read_repo(&row, OP)).transpose()
    }

    pub(super) async fn set_repo_state(
        &self,
        did: String,
        state: RepoState,
    ) -> Result<(), StoreError> {
        const OP: &str = "set_repo_state";
        let client = self.client(OP).await?;
        client
            .execute(
                "UPDATE repos SET state = $2 WHERE did = $1",
                &[&did, &state.as_str()],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn mark_desynchronized(
        &self,
        did: String,
        reason: String,
    ) -> Result<(), StoreError> {
        const OP: &str = "mark_desynchronized";
        let client = self.client(OP).await?;
        client
            .execute(
                "UPDATE repos SET state = 'desynchronized', error_msg = $2, retry_after = 0 \
                 WHERE did = $1",
                &[&did, &reason],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn desynchronize_syncing(&self, reason: String) -> Result<u64, StoreError> {
        const OP: &str = "desynchronize_syncing";
        let client = self.client(OP).await?;
        client
            .execute(
                "UPDATE repos SET state = 'desynchronized', error_msg = $1, retry_after = 0 \
                 WHERE state IN ('active', 'resyncing')",
                &[&reason],
            )
            .await
            .map_err(pg(OP))
    }

    pub(super) async fn list_repos(
        &self,
        state: Option<RepoState>,
        after: String,
        limit: u32,
    ) -> Result<Vec<RepoSummary>, StoreError> {
        const OP: &str = "list_repos";
        let client = self.client(OP).await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {REPO_COLUMNS}, \
                 (SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM record_chunks c \
                  WHERE c.did = repos.did) \
                 FROM repos WHERE did > $1 AND ($2::text IS NULL OR state = $2) \
                 ORDER BY did LIMIT $3"
            ))
            .await
            .map_err(pg(OP))?;
        let rows = client
            .query(
                &stmt,
                &[&after, &state.map(RepoState::as_str), &i64::from(limit)],
            )
            .await
            .map_err(pg(OP))?;
        rows.iter()
            .map(|row| {
                let records: i64 = row.try_get(13).map_err(pg(OP))?;
                Ok(RepoSummary {
                    repo: read_repo(row, OP)?,
                    records: records.unsigned_abs(),
                })
            })
            .collect()
    }

    pub(super) async fn request_resync(
        &self,
        dids: Vec<String>,
    ) -> Result<ResyncRequest, StoreError> {
        const OP: &str = "request_resync";
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        // FOR UPDATE: a worker claiming one of these repos meanwhile waits, so the state
        // read here is the state the update below replaces.
        let found = tx
            .query(
                // In DID order, as every multi-row lock here, so two requests cannot deadlock.
                "SELECT did, state FROM repos WHERE did = ANY($1) ORDER BY did FOR UPDATE",
                &[&dids],
            )
            .await
            .map_err(pg(OP))?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<(String, String)>, tokio_postgres::Error>>()
            .map_err(pg(OP))?;
        let request = ResyncRequest::classify(&dids, &found);
        tx.execute(
            "UPDATE repos SET state = 'desynchronized', error_msg = $2, retry_after = 0, \
             retry_count = 0, fetch_kind = '' WHERE did = ANY($1) AND state <> 'pending'",
            &[&request.queued, &RESYNC_REQUESTED],
        )
        .await
        .map_err(pg(OP))?;
        tx.commit().await.map_err(pg(OP))?;
        Ok(request)
    }

    pub(super) async fn setting(&self, name: String) -> Result<Option<String>, StoreError> {
        const OP: &str = "setting";
        let client = self.client(OP).await?;
        let row = client
            .query_opt("SELECT value FROM settings WHERE name = $1", &[&name])
            .await
            .map_err(pg(OP))?;
        row.map(|r| r.try_get(0)).transpose().map_err(pg(OP))
    }

    pub(super) async fn save_setting(
        &self,
        name: String,
        value: String,
        resync: Option<String>,
    ) -> Result<u64, StoreError> {
        const OP: &str = "save_setting";
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        tx.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&name, &value],
        )
        .await
        .map_err(pg(OP))?;
        let marked = match &resync {
            None => 0,
            Some(reason) => tx
                .execute(
                    "UPDATE repos SET state = 'desynchronized', error_msg = $1, retry_after = 0 \
                     WHERE state = 'active'",
                    &[reason],
                )
                .await
                .map_err(pg(OP))?,
        };
        tx.commit().await.map_err(pg(OP))?;
        Ok(marked)
    }

    pub(super) async fn save_minute(&self, row: MinuteRow) -> Result<(), StoreError> {
        const OP: &str = "save_minute";
        let client = self.client(OP).await?;
        client
            .execute(
                "INSERT INTO status_minutes \
                 (minute, span_ms, events, delivered, bytes, records, lag_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (minute) DO UPDATE SET span_ms = excluded.span_ms, \
                 events = excluded.events, delivered = excluded.delivered, \
                 bytes = excluded.bytes, records = excluded.records, lag_ms = excluded.lag_ms",
                &[
                    &row.minute,
                    &row.span_ms,
                    &count_i64(row.events),
                    &count_i64(row.delivered),
                    &count_i64(row.bytes),
                    &count_i64(row.records),
                    &row.lag_ms,
                ],
            )
            .await
            .map_err(pg(OP))?;
        client
            .execute(
                "DELETE FROM status_minutes WHERE minute < $1",
                &[&(row.minute - HISTORY_MINUTES)],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn minutes_since(&self, minute: i64) -> Result<Vec<MinuteRow>, StoreError> {
        const OP: &str = "minutes_since";
        let client = self.client(OP).await?;
        let rows = client
            .query(
                "SELECT minute, span_ms, events, delivered, bytes, records, lag_ms \
                 FROM status_minutes WHERE minute >= $1 ORDER BY minute",
                &[&minute],
            )
            .await
            .map_err(pg(OP))?;
        rows.iter()
            .map(|row| {
                let count = |i| row.try_get::<_, i64>(i).map(i64::unsigned_abs);
                Ok(MinuteRow {
                    minute: row.try_get(0)?,
                    span_ms: row.try_get(1)?,
                    events: count(2)?,
                    delivered: count(3)?,
                    bytes: count(4)?,
                    records: count(5)?,
                    lag_ms: row.try_get(6)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg(OP))
    }

    pub(super) async fn repo_states(&self) -> Result<Vec<(RepoState, u64)>, StoreError> {
        const OP: &str = "repo_states";
        let client = self.client(OP).await?;
        let rows = client
            .query("SELECT state, COUNT(*) FROM repos GROUP BY state", &[])
            .await
            .map_err(pg(OP))?;
        let counts = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<(String, i64)>, tokio_postgres::Error>>()
            .map_err(pg(OP))?;
        schema::state_counts(counts)
    }

    pub(super) async fn error_reasons(&self, limit: u32) -> Result<Vec<(String, u64)>, StoreError> {
        const OP: &str = "error_reasons";
        let client = self.client(OP).await?;
        let rows = client
            .query(
                "SELECT error_msg, COUNT(*) AS n FROM repos \
                 WHERE state = 'error' AND error_msg <> '' \
                 GROUP BY error_msg ORDER BY n DESC, error_msg LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
            .map_err(pg(OP))?;
        rows.iter()
            .map(|row| {
                let n: i64 = row.try_get(1)?;
                Ok((row.try_get(0)?, n.unsigned_abs()))
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg(OP))
    }

    pub(super) async fn count_records_for(&self, did: String) -> Result<u64, StoreError> {
        const OP: &str = "count_records_for";
        let client = self.client(OP).await?;
        let row = client
            .query_one(
                "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM record_chunks WHERE did = $1",
                &[&did],
            )
            .await
            .map_err(pg(OP))?;
        let count: i64 = row.try_get(0).map_err(pg(OP))?;
        Ok(count.unsigned_abs())
    }

    pub(super) async fn record_collections(&self, did: String) -> Result<Vec<String>, StoreError> {
        const OP: &str = "record_collections";
        let client = self.client(OP).await?;
        let rows = client
            .query(
                "SELECT DISTINCT collection FROM record_chunks WHERE did = $1 ORDER BY collection",
                &[&did],
            )
            .await
            .map_err(pg(OP))?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(pg(OP)))
            .collect()
    }

    pub(super) async fn count_table(&self, table: Table) -> Result<u64, StoreError> {
        const OP: &str = "count";
        let client = self.client(OP).await?;
        let row = client
            .query_one(table.count_sql(), &[])
            .await
            .map_err(pg(OP))?;
        let count: i64 = row.try_get(0).map_err(pg(OP))?;
        Ok(count.unsigned_abs())
    }

    pub(super) async fn firehose_cursor(&self, url: String) -> Result<Option<i64>, StoreError> {
        const OP: &str = "firehose_cursor";
        let client = self.client(OP).await?;
        let row = client
            .query_opt(
                "SELECT cursor FROM firehose_cursors WHERE url = $1",
                &[&url],
            )
            .await
            .map_err(pg(OP))?;
        row.map(|row| row.try_get(0).map_err(pg(OP))).transpose()
    }

    pub(super) async fn save_firehose_cursor(
        &self,
        url: String,
        seq: i64,
    ) -> Result<(), StoreError> {
        const OP: &str = "save_firehose_cursor";
        let client = self.client(OP).await?;
        client
            .execute(
                "INSERT INTO firehose_cursors (url, cursor) VALUES ($1, $2) \
                 ON CONFLICT (url) DO UPDATE SET cursor = EXCLUDED.cursor",
                &[&url, &seq],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn list_repos_cursor(
        &self,
        url: String,
    ) -> Result<Option<String>, StoreError> {
        const OP: &str = "list_repos_cursor";
        let client = self.client(OP).await?;
        let row = client
            .query_opt(
                "SELECT cursor FROM list_repos_cursors WHERE url = $1",
                &[&url],
            )
            .await
            .map_err(pg(OP))?;
        row.map(|row| row.try_get(0).map_err(pg(OP))).transpose()
    }

    pub(super) async fn save_list_repos_cursor(
        &self,
        url: String,
        cursor: String,
    ) -> Result<(), StoreError> {
        const OP: &str = "save_list_repos_cursor";
        let client = self.client(OP).await?;
        client
            .execute(
                "INSERT INTO list_repos_cursors (url, cursor) VALUES ($1, $2) \
                 ON CONFLICT (url) DO UPDATE SET cursor = EXCLUDED.cursor",
                &[&url, &cursor],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn collection_cursor(
        &self,
        url: String,
        collection: String,
    ) -> Result<Option<String>, StoreError> {
        const OP: &str = "collection_cursor";
        let client = self.client(OP).await?;
        let row = client
            .query_opt(
                "SELECT cursor FROM collection_cursors WHERE url = $1 AND collection = $2",
                &[&url, &collection],
            )
            .await
            .map_err(pg(OP))?;
        row.map(|row| row.try_get(0).map_err(pg(OP))).transpose()
    }

    pub(super) async fn save_collection_cursor(
        &self,
        url: String,
        collection: String,
        cursor: String,
    ) -> Result<(), StoreError> {
        const OP: &str = "save_collection_cursor";
        let client = self.client(OP).await?;
        client
            .execute(
                "INSERT INTO collection_cursors (url, collection, cursor) VALUES ($1, $2, $3) \
                 ON CONFLICT (url, collection) DO UPDATE SET cursor = EXCLUDED.cursor",
                &[&url, &collection, &cursor],
            )
            .await
            .map_err(pg(OP))?;
        Ok(())
    }

    pub(super) async fn apply(&self, w: RepoWrite) -> Result<Vec<EventId>, StoreError> {
        let did = w.did.as_str();
        const OP: &str = "apply";
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        if !w.records.is_empty() {
            // First, before any row lock: every index writer takes its locks in this order,
            // so they cannot deadlock with each other.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&RECORD_INDEX_LOCK, &did],
            )
            .await
            .map_err(pg(OP))?;
        }

        if w.has_condition() {
            // FOR UPDATE: a concurrent remove_repos waits for this transaction, then removes
            // whatever it wrote.
            let state: Option<String> = tx
                .query_opt("SELECT state FROM repos WHERE did = $1 FOR UPDATE", &[&did])
                .await
                .map_err(pg(OP))?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg(OP))?;
            // Dropping the transaction rolls it back.
            w.check_condition(state.as_deref())?;
        }

        if !w.records.is_empty() {
            write_record_index(&tx, did, &w.records).await?;
        }

        if !w.resync_buffer_delete.is_empty() {
            tx.execute(
                "DELETE FROM resync_buffer WHERE did = $1 AND id = ANY($2)",
                &[&did, &w.resync_buffer_delete],
            )
            .await
            .map_err(pg(OP))?;
        }

        match &w.repo {
            RepoChange::None => {}
            RepoChange::Commit { rev, prev_data } => {
                tx.execute(
                    "UPDATE repos SET rev = $2, prev_data = $3 WHERE did = $1",
                    &[&did, &rev.as_str(), prev_data],
                )
                .await
                .map_err(pg(OP))?;
            }
            RepoChange::ResyncDone { rev, prev_data } => {
                tx.execute(
                    "UPDATE repos SET state = 'active', rev = $2, prev_data = $3, error_msg = '', \
                     retry_count = 0, retry_after = 0 WHERE did = $1",
                    &[&did, &rev.as_str(), prev_data],
                )
                .await
                .map_err(pg(OP))?;
            }
            RepoChange::ResyncStale {
                rev,
                prev_data,
                reason,
            } => {
                tx.execute(
                    "UPDATE repos SET state = 'desynchronized', rev = $2, prev_data = $3, \
                     error_msg = $4, retry_count = 0, retry_after = 0 WHERE did = $1",
                    &[&did, &rev.as_str(), prev_data, reason],
                )
                .await
                .map_err(pg(OP))?;
            }
            RepoChange::Handle(handle) => {
                tx.execute(
                    "UPDATE repos SET handle = $2 WHERE did = $1",
                    &[&did, handle],
                )
                .await
                .map_err(pg(OP))?;
            }
            RepoChange::Status(status) => {
                tx.execute(
                    "UPDATE repos SET status = $2 WHERE did = $1",
                    &[&did, &status.as_str()],
                )
                .await
                .map_err(pg(OP))?;
            }
            RepoChange::Delete => {
                for sql in [
                    "DELETE FROM repos WHERE did = $1",
                    "DELETE FROM record_chunks WHERE did = $1",
                    "DELETE FROM resync_buffer WHERE did = $1",
                ] {
                    tx.execute(sql, &[&did]).await.map_err(pg(OP))?;
                }
            }
        }
        if let Some(fetch) = &w.fetch {
            tx.execute(
                "UPDATE repos SET fetch_kind = $2, fetch_bytes = $3, fetched_at = $4, \
                 fetch_filters = $5 WHERE did = $1",
                &[
                    &did,
                    &fetch.kind.as_str(),
                    &i64::try_from(fetch.bytes).unwrap_or(i64::MAX),
                    &fetch.at,
                    &fetch.filters,
                ],
            )
            .await
            .map_err(pg(OP))?;
        }

        let mut ids = Vec::new();
        if !w.events.is_empty() {
            if w.storage != EventStorage::InMemoryBackfill {
                // Ids are taken before the INSERT locks the table; lock it now, so a reader
                // that waits for the table's writers (`load_outbox`) also waits for this id.
                tx.batch_execute("LOCK TABLE outbox IN ROW EXCLUSIVE MODE")
                    .await
                    .map_err(pg(OP))?;
            }
            // Take the ids first (then insert with explicit ids: ascending ids map to events in
            // order without relying on the evaluation order of an INSERT … SELECT). The
            // sequence never goes back, so in-memory events' ids are never reused either.
            let rows = tx
                .query(
                    "SELECT nextval('outbox_id_seq') FROM generate_series(1, $1::bigint)",
                    &[&to_i64(w.events.len())],
                )
                .await
                .map_err(pg(OP))?;
            ids = rows
                .iter()
                .map(|row| row.try_get::<_, i64>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(pg(OP))?;
            ids.sort_unstable();
        }
        if w.storage == EventStorage::InMemoryBackfill && !ids.is_empty() {
            tx.execute(
                "UPDATE repos SET backfill_token = $2 WHERE did = $1",
                &[&did, &ids.first()],
            )
            .await
            .map_err(pg(OP))?;
        } else if !ids.is_empty() {
            let live: Vec<bool> = w.events.iter().map(|e| e.live).collect();
            let payload: Vec<&str> = w.events.iter().map(|e| e.payload.as_str()).collect();
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO outbox (id, did, live, payload) \
                     SELECT e.id, $2, e.live, e.payload \
                     FROM unnest($1::bigint[], $3::bool[], $4::text[]) AS e(id, live, payload)",
                )
                .await
                .map_err(pg(OP))?;
            tx.execute(&stmt, &[&ids, &did, &live, &payload])
                .await
                .map_err(pg(OP))?;
        }
        tx.commit().await.map_err(pg(OP))?;
        ids.into_iter().map(|id| event_id(id, "outbox")).collect()
    }

    pub(super) async fn load_outbox(
        &self,
        after: Option<EventId>,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        const OP: &str = "load_outbox";
        let after = after.map_or(0, |id| i64::try_from(id.0).unwrap_or(i64::MAX));
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        // Writers commit in any order, so a visible id 11 does not mean id 10 is settled: a
        // reader paging by id would pass it for good (--outbox-only beside a writing tap).
        // SHARE waits for every transaction that holds an outbox id (they lock the table
        // before taking one) and keeps new ones out while the page is read; ids taken later
        // are higher than any row read here.
        tx.batch_execute("LOCK TABLE outbox IN SHARE MODE")
            .await
            .map_err(pg(OP))?;
        let stmt = tx
            .prepare_cached(
                "SELECT id, did, live, payload FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
            )
            .await
            .map_err(pg(OP))?;
        let rows = tx
            .query(&stmt, &[&after, &to_i64(limit)])
            .await
            .map_err(pg(OP))?;
        tx.commit().await.map_err(pg(OP))?;
        rows.iter()
            .map(|row| {
                Ok(OutboxRow {
                    id: event_id(row.try_get(0).map_err(pg(OP))?, "outbox")?,
                    did: row.try_get(1).map_err(pg(OP))?,
                    live: row.try_get(2).map_err(pg(OP))?,
                    payload: row.try_get(3).map_err(pg(OP))?,
                })
            })
            .collect()
    }

    pub(super) async fn delete_acked(&self, ids: Vec<EventId>) -> Result<u64, StoreError> {
        const OP: &str = "delete_acked";
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|id| i64::try_from(id.0).ok())
            .collect();
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        let mut deleted = 0;
        for chunk in ids.chunks(DELETE_CHUNK) {
            deleted += tx
                .execute("DELETE FROM outbox WHERE id = ANY($1)", &[&chunk])
                .await
                .map_err(pg(OP))?;
        }
        tx.commit().await.map_err(pg(OP))?;
        Ok(deleted)
    }

    pub(super) async fn max_event_id(&self) -> Result<Option<EventId>, StoreError> {
        const OP: &str = "max_event_id";
        let client = self.client(OP).await?;
        let row = client
            .query_one("SELECT last_value, is_called FROM outbox_id_seq", &[])
            .await
            .map_err(pg(OP))?;
        let last: i64 = row.try_get(0).map_err(pg(OP))?;
        let called: bool = row.try_get(1).map_err(pg(OP))?;
        // Before the first nextval, last_value holds the start value but was never handed out.
        called.then(|| event_id(last, "outbox_id_seq")).transpose()
    }

    pub(super) async fn reset_resyncing(&self) -> Result<u64, StoreError> {
        const OP: &str = "reset_resyncing";
        let client = self.client(OP).await?;
        client
            .execute(
                "UPDATE repos SET state = 'desynchronized' WHERE state = 'resyncing'",
                &[],
            )
            .await
            .map_err(pg(OP))
    }

    pub(super) async fn reset_undelivered_backfills(&self) -> Result<u64, StoreError> {
        const OP: &str = "reset_undelivered_backfills";
        let client = self.client(OP).await?;
        let reset = client
            .execute(
                "UPDATE repos SET state = 'pending', rev = NULL, prev_data = NULL, \
                   error_msg = '', retry_count = 0, retry_after = 0, backfill_token = NULL \
                 WHERE backfill_token IS NOT NULL",
                &[],
            )
            .await
            .map_err(pg(OP))?;
        Ok(reset)
    }

    pub(super) async fn clear_backfill_token(
        &self,
        did: String,
        token: EventId,
    ) -> Result<bool, StoreError> {
        const OP: &str = "clear_backfill_token";
        let token = i64::try_from(token.0).unwrap_or(i64::MAX);
        let client = self.client(OP).await?;
        let cleared = client
            .execute(
                "UPDATE repos SET backfill_token = NULL WHERE did = $1 AND backfill_token = $2",
                &[&did, &token],
            )
            .await
            .map_err(pg(OP))?;
        Ok(cleared > 0)
    }

    pub(super) async fn backfill_token(&self, did: String) -> Result<Option<EventId>, StoreError> {
        const OP: &str = "backfill_token";
        let client = self.client(OP).await?;
        let row = client
            .query_opt("SELECT backfill_token FROM repos WHERE did = $1", &[&did])
            .await
            .map_err(pg(OP))?;
        let token: Option<i64> = match row {
            Some(row) => row.try_get(0).map_err(pg(OP))?,
            None => None,
        };
        token.map(|t| event_id(t, "repos")).transpose()
    }

    pub(super) async fn claim_resync_job(
        &self,
        now_unix: i64,
    ) -> Result<Option<RepoRow>, StoreError> {
        const OP: &str = "claim_resync_job";
        let client = self.client(OP).await?;
        // SKIP LOCKED: concurrent claimers (other workers or processes) each take a different
        // row instead of queueing behind the same one.
        let stmt = client
            .prepare_cached(&format!(
                "UPDATE repos SET state = 'resyncing' WHERE did = ( \
                   SELECT did FROM repos WHERE state = $1 AND retry_after < $2 \
                   ORDER BY retry_after LIMIT 1 FOR UPDATE SKIP LOCKED) \
                 RETURNING {REPO_COLUMNS}"
            ))
            .await
            .map_err(pg(OP))?;
        for state in CLAIM_ORDER {
            let row = client
                .query_opt(&stmt, &[&state.as_str(), &now_unix])
                .await
                .map_err(pg(OP))?;
            if let Some(row) = row {
                return read_repo(&row, OP).map(Some);
            }
        }
        Ok(None)
    }

    pub(super) async fn mark_resync_failed(
        &self,
        did: String,
        failure: ResyncFailure,
        now_unix: i64,
        jitter_ms: u64,
    ) -> Result<(), StoreError> {
        const OP: &str = "mark_resync_failed";
        let mut client = self.client(OP).await?;
        let tx = client.transaction().await.map_err(pg(OP))?;
        let row = tx
            .query_opt(
                "SELECT retry_count, error_msg FROM repos \
                 WHERE did = $1 AND state = 'resyncing' FOR UPDATE",
                &[&did],
            )
            .await
            .map_err(pg(OP))?;
        let Some(row) = row else {
            return Ok(()); // removed (or re-added) mid-resync: nothing to record
        };
        let message: String = row.try_get(1).map_err(pg(OP))?;
        let update = failure.row_update(
            row.try_get(0).map_err(pg(OP))?,
            &message,
            now_unix,
            jitter_ms,
        );
        tx.execute(
            "UPDATE repos SET state = $2, error_msg = $3, retry_count = $4, retry_after = $5 \
             WHERE did = $1",
            &[
                &did,
                &update.state.as_str(),
                &update.message,
                &update.retry_count,
                &update.retry_after,
            ],
        )
        .await
        .map_err(pg(OP))?;
        tx.commit().await.map_err(pg(OP))
    }

    pub(super) async fn record_cid(
        &self,
        did: String,
        collection: String,
        rkey: String,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client("record_cid").await?;
        match chunk_at_or_before(&**client, &did, &collection, &rkey).await? {
            Some(found) => Ok(record_index::find(&found.text, &rkey)?),
            None => Ok(None),
        }
    }

    pub(super) async fn records_page(
        &self,
        did: String,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<RecordRow>, StoreError> {
        const OP: &str = "records_page";
        let mut client = self.client(OP).await?;
        // One snapshot for the several reads of a page: a chunk rewritten between them
        // (split or merged) would otherwise show some entries twice or not at all.
        let client = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg(OP))?;
        let mut page = Vec::with_capacity(limit);
        // Where the next read of whole chunks starts: after `after`'s own chunk, then after
        // the last chunk read.
        let mut resume = None;
        if let Some((collection, rkey)) = &after {
            if let Some(found) = chunk_at_or_before(&*client, &did, collection, rkey).await?
                && !record_index::fill_page(&mut page, limit, collection, &found.text, Some(rkey))?
            {
                return Ok(page);
            }
            resume = Some((collection.clone(), rkey.clone()));
        }
        // A full chunk holds dozens of entries; a few at a time is enough for most pages.
        let per_read = i64::try_from(limit / 16).unwrap_or(i64::MAX).clamp(4, 256);
        loop {
            let rows = match &resume {
                None => {
                    let stmt = client
                        .prepare_cached(
                            "SELECT collection, first_rkey, entries FROM record_chunks \
                             WHERE did = $1 ORDER BY collection, first_rkey LIMIT $2",
                        )
                        .await
                        .map_err(pg(OP))?;
                    client.query(&stmt, &[&did, &per_read]).await
                }
                Some((collection, first)) => {
                    let stmt = client
                        .prepare_cached(
                            "SELECT collection, first_rkey, entries FROM record_chunks \
                             WHERE did = $1 AND (collection, first_rkey) > ($2, $3) \
                             ORDER BY collection, first_rkey LIMIT $4",
                        )
                        .await
                        .map_err(pg(OP))?;
                    client
                        .query(&stmt, &[&did, collection, first, &per_read])
                        .await
                }
            }
            .map_err(pg(OP))?;
            for row in &rows {
                let collection: String = row.try_get(0).map_err(pg(OP))?;
                let first: String = row.try_get(1).map_err(pg(OP))?;
                let text: &str = row.try_get(2).map_err(pg(OP))?;
                if !record_index::fill_page(&mut page, limit, &collection, text, None)? {
                    return Ok(page);
                }
                resume = Some((collection, first));
            }
            if i64::try_from(rows.len()).unwrap_or(i64::MAX) < per_read {
                return Ok(page);
            }
        }
    }

    pub(super) async fn buffer_commit(
        &self,
        did: String,
        rev: String,
        data: String,
        limit: i64,
    ) -> Result<bool, StoreError> {
        const OP: &str = "buffer_commit";
        let client = self.client(OP).await?;
        // One DID's commits are buffered by one firehose worker at a time (under its
        // lock), so the count cannot race with another insert for the same repo.
        let stored = client
            .execute(
                "INSERT INTO resync_buffer (did, rev, data) SELECT $1, $2, $3 \
                 WHERE (SELECT count(*) FROM resync_buffer WHERE did = $1) < $4",
                &[&did, &rev, &data, &limit],
            )
            .await
            .map_err(pg(OP))?;
        Ok(stored == 1)
    }

    pub(super) async fn buffered_commits(
        &self,
        did: String,
        after: i64,
        limit: i64,
    ) -> Result<Vec<BufferedCommit>, StoreError> {
        const OP: &str = "buffered_commits";
        let client = self.client(OP).await?;
        let rows = client
            .query(
                "SELECT id, rev, data FROM resync_buffer WHERE did = $1 AND id > $2 \
                 ORDER BY id LIMIT $3",
                &[&did, &after, &limit],
            )
            .await
            .map_err(pg(OP))?;
        rows.iter()
            .map(|row| {
                Ok(BufferedCommit {
                    id: row.try_get(0)?,
                    rev: row.try_get(1)?,
                    data: row.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(pg(OP))
    }
}

fn read_repo(row: &tokio_postgres::Row, op: &'static str) -> Result<RepoRow, StoreError> {
    let stored = StoredRepo {
        did: row.try_get(0).map_err(pg(op))?,
        state: row.try_get(1).map_err(pg(op))?,
        status: row.try_get(2).map_err(pg(op))?,
        handle: row.try_get(3).map_err(pg(op))?,
        rev: row.try_get(4).map_err(pg(op))?,
        prev_data: row.try_get(5).map_err(pg(op))?,
        error: row.try_get(6).map_err(pg(op))?,
        retry_count: row.try_get(7).map_err(pg(op))?,
        retry_after: row.try_get(8).map_err(pg(op))?,
        fetch_kind: row.try_get(9).map_err(pg(op))?,
        fetch_bytes: row.try_get(10).map_err(pg(op))?,
        fetched_at: row.try_get(11).map_err(pg(op))?,
        fetch_filters: row.try_get(12).map_err(pg(op))?,
    };
    RepoRow::try_from(stored)
}

/// Namespace of the per-repo advisory locks that serialize record index writers.
const RECORD_INDEX_LOCK: i32 = 0x7461_7072; // "tapr"

/// Applies index changes: [`IndexWriter`] names each query and rewrite, this runs them.
/// Chunks are read, merged and rewritten, so two transactions must not do it to one repo at
/// once: the caller holds the repo's [`RECORD_INDEX_LOCK`] for the transaction.
async fn write_record_index(
    tx: &tokio_postgres::Transaction<'_>,
    did: &str,
    records: &[super::RecordChange],
) -> Result<(), StoreError> {
    const OP: &str = "apply";
    let mut index = IndexWriter::new(records)?;
    loop {
        match index.step()? {
            IndexStep::ChunkAtOrBefore { collection, key } => {
                index.found(chunk_at_or_before(tx, did, collection, key).await?);
            }
            IndexStep::FirstChunk { collection } => index.found(
                tx.query_opt(
                    "SELECT first_rkey, entries FROM record_chunks \
                     WHERE did = $1 AND collection = $2 ORDER BY first_rkey LIMIT 1",
                    &[&did, &collection],
                )
                .await
                .map_err(pg(OP))?
                .map(|row| found_chunk(&row))
                .transpose()?,
            ),
            IndexStep::FirstKeyAfter { collection, first } => index.upper(
                tx.query_opt(
                    "SELECT first_rkey FROM record_chunks \
                     WHERE did = $1 AND collection = $2 AND first_rkey > $3 \
                     ORDER BY first_rkey LIMIT 1",
                    &[&did, &collection, &first],
                )
                .await
                .map_err(pg(OP))?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg(OP))?,
            ),
            IndexStep::Rewrite {
                collection,
                rewrite,
            } => {
                if let Some(first) = rewrite.remove {
                    tx.execute(
                        "DELETE FROM record_chunks WHERE did = $1 AND collection = $2 \
                         AND first_rkey = $3",
                        &[&did, &collection, &first],
                    )
                    .await
                    .map_err(pg(OP))?;
                }
                if !rewrite.insert.is_empty() {
                    let (firsts, counts, texts): (Vec<_>, Vec<_>, Vec<_>) = rewrite
                        .insert
                        .into_iter()
                        .map(|c| (c.first, c.count, c.text))
                        .collect();
                    tx.execute(
                        "INSERT INTO record_chunks (did, collection, first_rkey, n, entries) \
                         SELECT $1, $2, * FROM unnest($3::text[], $4::bigint[], $5::text[])",
                        &[&did, &collection, &firsts, &counts, &texts],
                    )
                    .await
                    .map_err(pg(OP))?;
                }
            }
            IndexStep::Done => return Ok(()),
        }
    }
}

/// The chunk of `collection` with the greatest first rkey at or below `rkey`.
async fn chunk_at_or_before(
    client: &impl tokio_postgres::GenericClient,
    did: &str,
    collection: &str,
    rkey: &str,
) -> Result<Option<FoundChunk>, StoreError> {
    client
        .query_opt(
            "SELECT first_rkey, entries FROM record_chunks \
             WHERE did = $1 AND collection = $2 AND first_rkey <= $3 \
             ORDER BY first_rkey DESC LIMIT 1",
            &[&did, &collection, &rkey],
        )
        .await
        .map_err(pg("record index"))?
        .map(|row| found_chunk(&row))
        .transpose()
}

fn found_chunk(row: &tokio_postgres::Row) -> Result<FoundChunk, StoreError> {
    Ok(FoundChunk {
        first: row.try_get(0).map_err(pg("record index"))?,
        text: row.try_get(1).map_err(pg("record index"))?,
    })
}

async fn migrate(client: &mut Object, target: &str) -> Result<(), StoreError> {
    const OP: &str = "migrate";
    let tx = client.transaction().await.map_err(pg(OP))?;
    // Migrating a large database (or waiting for another process's migration) may take
    // longer than the statement timeout that guards normal operation.
    tx.batch_execute("SET LOCAL statement_timeout = 0")
        .await
        .map_err(pg(OP))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg(OP))?;
    let exists = |name: &'static str| {
        let tx = &tx;
        async move {
            let row = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
                .await
                .map_err(pg(OP))?;
            row.try_get::<_, bool>(0).map_err(pg(OP))
        }
    };
    let found = schema::Existing {
        history: exists("schema_migrations").await?,
        repos: exists("repos").await?,
    };
    if schema::needs_history(found, target)? {
        tx.batch_execute(
            "CREATE TABLE schema_migrations (
                 version    BIGINT      NOT NULL PRIMARY KEY,
                 name       TEXT        NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg(OP))?;
    }
    let current: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(pg(OP))?
        .try_get(0)
        .map_err(pg(OP))?;
    for migration in schema::pending(current)? {
        let failed = |err: tokio_postgres::Error| StoreError::Migration {
            version: migration.version,
            name: migration.name,
            reason: err
                .as_db_error()
                .map_or_else(|| err.to_string(), ToString::to_string),
        };
        tx.batch_execute(migration.postgres).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(failed)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "Applied Postgres schema migration."
        );
    }
    tx.commit().await.map_err(pg(OP))
}
