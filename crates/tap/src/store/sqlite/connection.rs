//! Opening an SQLite database: every connection's pragmas, and the schema migrations.

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};

use super::super::StoreError;
use super::super::schema;
use super::readers::{READERS, ReaderPool};

use super::sq;

/// Which connection [`configure`] prepares.
#[derive(Clone, Copy, Debug)]
pub(super) enum Role {
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
pub(super) fn configure(conn: &Connection, role: Role) -> rusqlite::Result<()> {
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

pub(super) fn open_blocking(path: &str) -> Result<(Connection, Option<ReaderPool>), StoreError> {
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
