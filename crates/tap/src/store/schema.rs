//! What both SQL backends share about the schema: the migration history and the rules for
//! applying it, the repo row's columns and how they read back, and the write precondition.
//! The backends keep only their dialect: statements, types, locking.

use tap_atproto::syntax::Tid;

use super::{
    AccountStatus, FetchKind, LastFetch, RepoRow, RepoState, RepoWrite, StoreError, WriteCondition,
};

/// One numbered schema migration, in both dialects, embedded at build time.
pub(super) struct Migration {
    /// Strictly increasing from 1.
    pub version: i64,
    /// The file name stem, `NNNN_what`, the same in both dialect directories.
    pub name: &'static str,
    /// The SQLite statements.
    pub sqlite: &'static str,
    /// The PostgreSQL statements.
    pub postgres: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sqlite: include_str!(concat!("migrations/sqlite/", $name, ".sql")),
            postgres: include_str!(concat!("migrations/postgres/", $name, ".sql")),
        }
    };
}

/// Schema history, oldest first.
pub(super) const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_initial"),
    migration!(2, "0002_backfill_token"),
    migration!(3, "0003_record_chunks"),
    migration!(4, "0004_last_fetch"),
    migration!(5, "0005_fetch_filters"),
    migration!(6, "0006_settings"),
    migration!(7, "0007_status_minutes"),
];

/// What a backend found before migrating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Existing {
    /// The `schema_migrations` table exists.
    pub history: bool,
    /// A `repos` table exists.
    pub repos: bool,
}

/// Whether the history table must be created first. A `repos` table without our history
/// is someone else's schema (the Go tap's, say): refused, nothing touched.
pub(super) fn needs_history(found: Existing, target: &str) -> Result<bool, StoreError> {
    match found {
        Existing { history: true, .. } => Ok(false),
        Existing { repos: true, .. } => Err(StoreError::ForeignSchema {
            target: target.to_owned(),
        }),
        Existing { .. } => Ok(true),
    }
}

/// The migrations to apply over a database at `current`; a database newer than this
/// build is refused rather than written by code that does not know its schema.
pub(super) fn pending(
    current: i64,
) -> Result<impl Iterator<Item = &'static Migration>, StoreError> {
    let supported = MIGRATIONS.last().map_or(0, |m| m.version);
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    Ok(MIGRATIONS.iter().filter(move |m| m.version > current))
}

/// The columns of a repo row, in the order [`StoredRepo`] reads them.
pub(super) const REPO_COLUMNS: &str = "did, state, status, handle, rev, prev_data, error_msg, \
     retry_count, retry_after, fetch_kind, fetch_bytes, fetched_at, fetch_filters";

/// A repo row as the database returns it ([`REPO_COLUMNS`], in order).
pub(super) struct StoredRepo {
    pub did: String,
    pub state: String,
    pub status: String,
    pub handle: Option<String>,
    pub rev: Option<String>,
    pub prev_data: Option<String>,
    pub error: String,
    pub retry_count: i64,
    pub retry_after: i64,
    pub fetch_kind: String,
    pub fetch_bytes: i64,
    pub fetched_at: i64,
    pub fetch_filters: String,
}

impl TryFrom<StoredRepo> for RepoRow {
    type Error = StoreError;

    /// Refuses state and status names tap never writes.
    fn try_from(row: StoredRepo) -> Result<Self, StoreError> {
        Ok(Self {
            did: row
                .did
                .parse()
                .map_err(|_| corrupt_repo("did", row.did.clone()))?,
            rev: match row.rev {
                Some(rev) => Some(Tid::new(&rev).map_err(|_| corrupt_repo("rev", rev.clone()))?),
                None => None,
            },
            state: RepoState::from_name(&row.state)
                .ok_or_else(|| corrupt_repo("state", row.state.clone()))?,
            status: AccountStatus::from_name(&row.status)
                .ok_or_else(|| corrupt_repo("status", row.status.clone()))?,
            handle: row.handle,
            prev_data: row.prev_data,
            error: row.error,
            retry_count: clamp_retry_count(row.retry_count),
            retry_after: row.retry_after,
            // A diagnostic column: a kind this version does not know (written by a newer
            // one) reads as "not known", never as a corrupt row.
            last_fetch: match FetchKind::from_name(&row.fetch_kind) {
                None => None,
                Some(kind) => Some(LastFetch {
                    kind,
                    bytes: u64::try_from(row.fetch_bytes).unwrap_or(0),
                    at: row.fetched_at,
                    filters: row.fetch_filters,
                }),
            },
        })
    }
}

/// Per-state repo counts as `GROUP BY state` returns them, refusing names tap never writes.
pub(super) fn state_counts(rows: Vec<(String, i64)>) -> Result<Vec<(RepoState, u64)>, StoreError> {
    rows.into_iter()
        .map(|(name, n)| {
            RepoState::from_name(&name)
                .map(|state| (state, n.unsigned_abs()))
                .ok_or_else(|| corrupt_repo("state", name))
        })
        .collect()
}

fn corrupt_repo(column: &'static str, value: String) -> StoreError {
    StoreError::Corrupt {
        table: "repos",
        column,
        value,
    }
}

/// A stored retry count as the counter the backoff uses (negative values read as 0).
pub(super) fn clamp_retry_count(stored: i64) -> u32 {
    u32::try_from(stored.max(0)).unwrap_or(u32::MAX)
}

impl RepoWrite {
    /// Whether the write's transaction must read the repo's state first.
    pub(super) fn has_condition(&self) -> bool {
        self.condition != WriteCondition::Always
    }

    /// Checks the precondition against the repo's stored state (`None`: no row).
    pub(super) fn check_condition(&self, state: Option<&str>) -> Result<(), StoreError> {
        let met = match (self.condition, state) {
            (WriteCondition::Always, _) => true,
            (_, None) => false,
            (WriteCondition::RepoInState(want), Some(state)) => state == want.as_str(),
            (WriteCondition::RepoExists, Some(_)) => true,
        };
        if met {
            Ok(())
        } else {
            Err(StoreError::ConditionNotMet {
                did: self.did.to_string(),
                condition: self.condition,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_need_history_unless_the_schema_is_foreign_and_never_run_backwards() {
        let fresh = Existing {
            history: false,
            repos: false,
        };
        assert!(needs_history(fresh, "t").unwrap());
        let ours = Existing {
            history: true,
            repos: true,
        };
        assert!(!needs_history(ours, "t").unwrap());
        let foreign = Existing {
            history: false,
            repos: true,
        };
        assert!(matches!(
            needs_history(foreign, "t"),
            Err(StoreError::ForeignSchema { .. })
        ));
        let all: Vec<i64> = pending(0).unwrap().map(|m| m.version).collect();
        assert_eq!(all, [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            pending(2).unwrap().map(|m| m.version).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        assert_eq!(pending(7).unwrap().count(), 0);
        assert!(matches!(
            pending(8).map(Iterator::count),
            Err(StoreError::SchemaTooNew {
                found: 8,
                supported: 7
            })
        ));
    }

    #[test]
    fn a_condition_holds_only_for_an_existing_row_in_the_wanted_state() {
        let mut w = RepoWrite::new("did:plc:a".parse().unwrap());
        assert!(w.check_condition(None).is_ok(), "no condition");
        assert!(!w.has_condition());
        w.condition = WriteCondition::RepoExists;
        assert!(w.check_condition(Some("error")).is_ok());
        assert!(w.check_condition(None).unwrap_err().is_condition_not_met());
        w.condition = WriteCondition::RepoInState(RepoState::Resyncing);
        assert!(w.check_condition(Some("resyncing")).is_ok());
        assert!(w.check_condition(Some("pending")).is_err());
        assert!(w.check_condition(None).is_err());
    }

    #[test]
    fn unknown_state_or_status_names_are_corruption_not_defaults() {
        let row = |state: &str, status: &str| StoredRepo {
            did: "did:plc:a".into(),
            state: state.into(),
            status: status.into(),
            handle: None,
            rev: None,
            prev_data: None,
            error: String::new(),
            retry_count: -3,
            retry_after: 0,
            fetch_kind: String::new(),
            fetch_bytes: 0,
            fetched_at: 0,
            fetch_filters: String::new(),
        };
        let ok = RepoRow::try_from(row("active", "active")).unwrap();
        assert_eq!(ok.retry_count, 0, "a negative count reads as zero");
        for (state, status) in [("Active", "active"), ("active", "gone")] {
            assert!(matches!(
                RepoRow::try_from(row(state, status)),
                Err(StoreError::Corrupt { table: "repos", .. })
            ));
        }
    }
}
