//! The one transactional write of a repo event ([`super::super::Store::apply`]) and the
//! record-index queries it runs, inside the writer's transaction.

use rusqlite::{Connection, OptionalExtension, params};

use super::super::record_index::{FoundChunk, IndexStep, IndexWriter};
use super::super::schema::StoredRepo;
use super::super::{
    EventId, EventStorage, RecordChange, RepoChange, RepoRow, RepoWrite, StoreError, event_id,
};
use super::sq;

/// Maps a row selected with [`REPO_COLUMNS`]. The outer result is the driver's, the inner one
/// rejects state/status names we never write.
pub(super) fn read_repo(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<RepoRow, StoreError>> {
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
        fetch_kind: row.get(9)?,
        fetch_bytes: row.get(10)?,
        fetched_at: row.get(11)?,
        fetch_filters: row.get(12)?,
    };
    Ok(RepoRow::try_from(stored))
}

/// Deletes a repo row with its record index and resync buffer; returns 1 if the row existed.
pub(super) fn delete_repo(
    conn: &Connection,
    did: &str,
    op: &'static str,
) -> Result<u64, StoreError> {
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
pub(super) fn chunk_at_or_before(
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
pub(super) fn apply_in_tx(conn: &Connection, w: &RepoWrite) -> Result<Vec<EventId>, StoreError> {
    const OP: &str = "apply";
    let did = w.did.as_str();
    if w.has_condition() {
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM repos WHERE did = ?1")
            .and_then(|mut stmt| stmt.query_row([&did], |row| row.get(0)).optional())
            .map_err(sq(OP))?;
        w.check_condition(state.as_deref())?;
    }

    if !w.records.is_empty() {
        write_record_index(conn, did, &w.records)?;
    }

    if !w.resync_buffer_delete.is_empty() {
        let mut delete = conn
            .prepare_cached("DELETE FROM resync_buffer WHERE id = ?1 AND did = ?2")
            .map_err(sq(OP))?;
        for id in &w.resync_buffer_delete {
            delete.execute(params![id, did]).map_err(sq(OP))?;
        }
    }

    let status_name = match &w.repo {
        RepoChange::Status(status) => status.as_str(),
        _ => "",
    };
    let rev = match &w.repo {
        RepoChange::Commit { rev, .. }
        | RepoChange::ResyncDone { rev, .. }
        | RepoChange::ResyncStale { rev, .. } => rev.as_str(),
        _ => "",
    };
    let (sql, args): (&str, Vec<&dyn rusqlite::ToSql>) = match &w.repo {
        RepoChange::None => ("", Vec::new()),
        RepoChange::Commit { prev_data, .. } => (
            "UPDATE repos SET rev = ?2, prev_data = ?3 WHERE did = ?1",
            vec![&did, &rev, prev_data],
        ),
        RepoChange::ResyncDone { prev_data, .. } => (
            "UPDATE repos SET state = 'active', rev = ?2, prev_data = ?3, error_msg = '', \
             retry_count = 0, retry_after = 0 WHERE did = ?1",
            vec![&did, &rev, prev_data],
        ),
        RepoChange::ResyncStale {
            prev_data, reason, ..
        } => (
            "UPDATE repos SET state = 'desynchronized', rev = ?2, prev_data = ?3, \
             error_msg = ?4, retry_count = 0, retry_after = 0 WHERE did = ?1",
            vec![&did, &rev, prev_data, reason],
        ),
        RepoChange::Handle(handle) => (
            "UPDATE repos SET handle = ?2 WHERE did = ?1",
            vec![&did, handle],
        ),
        RepoChange::Status(_) => (
            "UPDATE repos SET status = ?2 WHERE did = ?1",
            vec![&did, &status_name],
        ),
        RepoChange::Delete => {
            delete_repo(conn, did, OP)?;
            ("", Vec::new())
        }
    };
    if !sql.is_empty() {
        conn.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(args.as_slice()))
            .map_err(sq(OP))?;
    }
    if let Some(fetch) = &w.fetch {
        conn.prepare_cached(
            "UPDATE repos SET fetch_kind = ?2, fetch_bytes = ?3, fetched_at = ?4, \
             fetch_filters = ?5 WHERE did = ?1",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                did,
                fetch.kind.as_str(),
                i64::try_from(fetch.bytes).unwrap_or(i64::MAX),
                fetch.at,
                fetch.filters
            ])
        })
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
                .execute(params![did, event.live, event.payload])
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
    let did = w.did.as_str();
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
        .and_then(|mut stmt| stmt.execute(params![did, first]))
        .map_err(sq(OP))?;
    (first..=last).map(|id| event_id(id, "outbox")).collect()
}
