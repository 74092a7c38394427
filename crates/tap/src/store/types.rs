//! The store's vocabulary: repo rows and their states, events, record index changes, the one
//! transactional write, and the small conversions both backends share.

use std::fmt;

use tap_atproto::syntax::{Did, Tid};

use super::StoreError;

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
    pub did: Did,
    /// Life-cycle state.
    pub state: RepoState,
    /// Account hosting status.
    pub status: AccountStatus,
    /// Last known handle; `None` until the first identity resolution.
    pub handle: Option<String>,
    /// Rev of the last applied commit (live or resync snapshot).
    pub rev: Option<Tid>,
    /// MST root (`data` CID) of the last applied commit: what the next commit's `prevData`
    /// must equal.
    pub prev_data: Option<String>,
    /// Reason of the last failure or desynchronization; empty when none.
    pub error: String,
    /// Consecutive failed resyncs.
    pub retry_count: u32,
    /// Unix seconds before which the repo is not claimed for resync; 0 = immediately.
    pub retry_after: i64,
    /// How tap last fetched the repo from its PDS; `None` before the first fetch.
    pub last_fetch: Option<LastFetch>,
}

/// A repo row with its indexed record count: one row of `GET /repos`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoSummary {
    /// The stored row.
    pub repo: RepoRow,
    /// Records in its index.
    pub records: u64,
}

/// What a forced resync of some DIDs did, each DID in exactly one list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncRequest {
    /// Marked `desynchronized` for a full fetch, or `pending` (waiting for its backfill).
    pub queued: Vec<String>,
    /// Held by a worker: fetched again, from scratch, once that resync ends.
    pub resyncing: Vec<String>,
    /// Not tracked: nothing to resync.
    pub untracked: Vec<String>,
}

impl ResyncRequest {
    /// Sorts `requested` by the state each had before the request (`found`; absent DIDs are
    /// untracked). Duplicates count once.
    #[must_use]
    pub fn classify(requested: &[String], found: &[(String, String)]) -> Self {
        let states: std::collections::HashMap<&str, &str> = found
            .iter()
            .map(|(did, state)| (did.as_str(), state.as_str()))
            .collect();
        let mut out = Self::default();
        let mut seen = std::collections::HashSet::new();
        for did in requested {
            if !seen.insert(did.as_str()) {
                continue;
            }
            let list = match states.get(did.as_str()) {
                None => &mut out.untracked,
                Some(&state) if state == RepoState::Resyncing.as_str() => &mut out.resyncing,
                Some(_) => &mut out.queued,
            };
            list.push(did.clone());
        }
        out
    }
}

/// Why a forced resync's repo is `desynchronized`, shown as its `error` until the resync ends.
pub const RESYNC_REQUESTED: &str = "resync requested through the API";

/// One minute of the status history: what happened over `span_ms` from the minute's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MinuteRow {
    /// Unix minute (seconds / 60).
    pub minute: i64,
    /// The span the counts cover (about a minute).
    pub span_ms: i64,
    /// Firehose events received.
    pub events: u64,
    /// Events written to consumers.
    pub delivered: u64,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Records of finished resyncs.
    pub records: u64,
    /// Firehose lag at the minute's end.
    pub lag_ms: i64,
}

/// Minutes of status history kept (7 days).
pub const HISTORY_MINUTES: i64 = 7 * 24 * 60;

/// How a resync got the repo from its PDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FetchKind {
    /// The whole repo (`getRepo`).
    Full,
    /// The signed commit, the MST paths to the wanted collections and their records
    /// (`getBlocks`).
    Sparse,
    /// What changed since the rev tap held (`getRepo?since=`), the rest proven unchanged
    /// from the record index.
    Since,
    /// Nothing: the PDS's head was the commit tap already held.
    Skipped,
}

impl FetchKind {
    /// The stored and displayed name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Sparse => "sparse",
            Self::Since => "since",
            Self::Skipped => "skipped",
        }
    }

    /// Parses a name written by [`FetchKind::as_str`].
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Full, Self::Sparse, Self::Since, Self::Skipped]
            .into_iter()
            .find(|k| k.as_str() == name)
    }
}

/// The last fetch of a repo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastFetch {
    /// What was downloaded.
    pub kind: FetchKind,
    /// Bytes downloaded for it (every call of the fetch).
    pub bytes: u64,
    /// When it finished (unix seconds).
    pub at: i64,
    /// The collection filters it was made under ([`crate::repos::filter::Scope::fingerprint`]).
    pub filters: String,
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
        rev: Tid,
        /// The commit's MST root (`data`), the next commit's expected `prevData`.
        prev_data: String,
    },
    /// A resync completed: `state = active`, `rev`/`prev_data` from the snapshot, error cleared,
    /// `retry_count = 0`, `retry_after = 0`.
    ResyncDone {
        /// The snapshot's rev.
        rev: Tid,
        /// The snapshot's MST root.
        prev_data: String,
    },
    /// A resync completed but the repo changed in a way its snapshot misses: `rev`/`prev_data`
    /// from what was applied, and straight back to `desynchronized` with `reason`, in the
    /// same transaction (a crash between the two would leave it active and stale).
    ResyncStale {
        /// The rev applied.
        rev: Tid,
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
    pub did: Did,
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
    /// How the resync this write ends fetched the repo, noted on its row (for
    /// `/info/{did}` and the next resync's plan) in the same transaction.
    pub fetch: Option<LastFetch>,
}

impl RepoWrite {
    /// A write for `did` that changes nothing yet and has no condition; fill in the fields.
    #[must_use]
    pub fn new(did: Did) -> Self {
        Self {
            did,
            condition: WriteCondition::Always,
            repo: RepoChange::None,
            records: Vec::new(),
            events: Vec::new(),
            resync_buffer_delete: Vec::new(),
            storage: EventStorage::Durable,
            fetch: None,
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

pub(super) fn event_id(stored: i64, table: &'static str) -> Result<EventId, StoreError> {
    u64::try_from(stored)
        .map(EventId)
        .map_err(|_| StoreError::Corrupt {
            table,
            column: "id",
            value: stored.to_string(),
        })
}

/// A counter as the signed 64-bit integer both databases store (saturating).
pub(super) fn count_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Converts a count or limit to the signed 64-bit integer both databases use.
pub(super) fn to_i64(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// States a resync worker may claim, in claim priority order.
pub(super) const CLAIM_ORDER: [RepoState; 3] = [
    RepoState::Pending,
    RepoState::Desynchronized,
    RepoState::Error,
];

/// Tables that have a count accessor.
#[derive(Clone, Copy, Debug)]
pub(super) enum Table {
    Repos,
    Records,
    Outbox,
    ResyncBuffer,
}

impl Table {
    pub(super) fn count_sql(self) -> &'static str {
        match self {
            Self::Repos => "SELECT COUNT(*) FROM repos",
            Self::Records => "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) FROM record_chunks",
            Self::Outbox => "SELECT COUNT(*) FROM outbox",
            Self::ResyncBuffer => "SELECT COUNT(*) FROM resync_buffer",
        }
    }
}

#[cfg(test)]
mod tests {
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
