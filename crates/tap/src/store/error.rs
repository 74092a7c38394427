//! The store's errors, classified for the code that decides: transient (retry), a write
//! condition not met (the repo changed under us), closed (shutdown), or fatal.

use super::{WriteCondition, postgres, record_index, sqlite};

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
    #[error("cannot connect to Postgres at {target}: {}", with_causes(source))]
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

/// An error and its causes, `: `-separated: the pool's "db error" alone hides the server's
/// reason (a `pg_hba.conf` refusal, a certificate the TLS check refused).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}
