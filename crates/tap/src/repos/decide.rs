//! The repo state machine's decisions, as pure functions of (stored repo, incoming event).
//! No I/O and no clock: the caller verifies, persists and emits (original-behaviour.md §7,
//! with decisions.md rows 2 and 4).

use super::prepared::{Buffered, PreparedCommit};
use crate::store::{AccountStatus, RepoRow, RepoState};
use crate::wire::IdentityStatus;

/// First look at a `#commit`, before any verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitGate {
    /// Not tracked; `track` says whether to start tracking it (as `pending`).
    Untracked {
        /// Start tracking (full network, or a signal collection was touched).
        track: bool,
    },
    /// Tracked but not `active`/`resyncing`: a resync will cover it.
    SkipNotSyncing(RepoState),
    /// Rev at or below the stored rev: a replay.
    SkipReplay,
    /// Verify it, then call [`after_verification`].
    Verify,
}

/// Decides what to do with a `#commit` before verifying it.
#[must_use]
pub fn gate_commit(repo: Option<&RepoRow>, rev: &str, auto_track: bool) -> CommitGate {
    let Some(repo) = repo else {
        return CommitGate::Untracked { track: auto_track };
    };
    match repo.state {
        RepoState::Active | RepoState::Resyncing => {}
        other => return CommitGate::SkipNotSyncing(other),
    }
    // TIDs sort lexically in time order, so string comparison is rev comparison.
    if repo
        .rev
        .as_ref()
        .is_some_and(|stored| rev <= stored.as_str())
    {
        return CommitGate::SkipReplay;
    }
    CommitGate::Verify
}

/// What to do with a commit that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAction {
    /// The repo is resyncing: keep the commit durably until the cutover.
    Buffer,
    /// It chains onto the stored state: apply it and emit live events.
    Apply,
    /// It does not chain (`prevData` differs): the copy is stale, resync.
    Desynchronize(String),
}

/// Decides what to do with a verified commit. `prev_data` is the commit's `prevData`, which
/// verification requires (Sync 1.1); a repo with no stored data root yet (never backfilled
/// past its first commit) accepts any chain, and a commit from Jetstream (`None`) has none
/// to check.
#[must_use]
pub fn after_verification(repo: &RepoRow, prev_data: Option<&str>) -> CommitAction {
    if repo.state == RepoState::Resyncing {
        return CommitAction::Buffer;
    }
    match (repo.prev_data.as_deref(), prev_data) {
        (Some(stored), Some(prev_data)) if prev_data != stored => CommitAction::Desynchronize(
            format!("commit prevData {prev_data} does not match the stored data root {stored}"),
        ),
        _ => CommitAction::Apply,
    }
}

/// What a `#sync` does to a tracked repo (its signature already verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    /// Nothing to do (not active, replayed rev, or same data).
    Ignore,
    /// The repo is resyncing: remember it so the cutover can check it.
    Buffer,
    /// The repo's data changed outside the commit stream: resync.
    Desynchronize(String),
}

/// Decides what a verified `#sync` (with commit `rev` and `data` root) does.
#[must_use]
pub fn decide_sync(repo: &RepoRow, rev: &str, data: &str) -> SyncAction {
    match repo.state {
        RepoState::Active => {}
        RepoState::Resyncing => return SyncAction::Buffer,
        _ => return SyncAction::Ignore,
    }
    if repo
        .rev
        .as_ref()
        .is_some_and(|stored| rev <= stored.as_str())
    {
        return SyncAction::Ignore;
    }
    if repo.prev_data.as_deref() == Some(data) {
        return SyncAction::Ignore;
    }
    SyncAction::Desynchronize(format!("#sync announced data root {data} at rev {rev}"))
}

/// The status an `#account` event asks for, or `None` for statuses tap ignores
/// (`throttled`, `desynchronized`, unknown, missing).
#[must_use]
pub fn account_target(active: bool, status: Option<&str>) -> Option<IdentityStatus> {
    if active {
        return Some(IdentityStatus::Active);
    }
    match status? {
        "deactivated" => Some(IdentityStatus::Deactivated),
        "takendown" => Some(IdentityStatus::Takendown),
        "suspended" => Some(IdentityStatus::Suspended),
        "deleted" => Some(IdentityStatus::Deleted),
        _ => None,
    }
}

/// What an `#account` event does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountAction {
    /// Nothing.
    Ignore,
    /// Start tracking the repo (full network, active account).
    Track,
    /// Emit an identity event with this status and store it (or delete the repo for
    /// `Deleted`).
    Change(IdentityStatus),
}

/// Decides what an `#account` event does.
#[must_use]
pub fn decide_account(
    repo: Option<&RepoRow>,
    active: bool,
    status: Option<&str>,
    full_network: bool,
) -> AccountAction {
    let Some(repo) = repo else {
        return if full_network && active {
            AccountAction::Track
        } else {
            AccountAction::Ignore
        };
    };
    let Some(target) = account_target(active, status) else {
        return AccountAction::Ignore;
    };
    if target != IdentityStatus::Deleted && stored_status(repo.status) == target {
        return AccountAction::Ignore;
    }
    AccountAction::Change(target)
}

/// The wire status of a stored account status.
#[must_use]
pub fn stored_status(status: AccountStatus) -> IdentityStatus {
    match status {
        AccountStatus::Active => IdentityStatus::Active,
        AccountStatus::Takendown => IdentityStatus::Takendown,
        AccountStatus::Suspended => IdentityStatus::Suspended,
        AccountStatus::Deactivated => IdentityStatus::Deactivated,
    }
}

/// The stored status for a wire status (`Deleted` is not stored: the repo is removed).
#[must_use]
pub fn status_to_store(status: IdentityStatus) -> Option<AccountStatus> {
    match status {
        IdentityStatus::Active => Some(AccountStatus::Active),
        IdentityStatus::Takendown => Some(AccountStatus::Takendown),
        IdentityStatus::Suspended => Some(AccountStatus::Suspended),
        IdentityStatus::Deactivated => Some(AccountStatus::Deactivated),
        IdentityStatus::Deleted => None,
    }
}

/// What the cutover does with one buffered entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutoverStep {
    /// Apply this commit as live events (it chains onto what is applied so far).
    Apply(PreparedCommit),
    /// Delete the entry: already in the snapshot, moot, unreadable, or after a decision
    /// to resync again.
    Drop,
}

/// The cutover of a resync (decisions.md row 4), fed the buffered entries in arrival
/// order, page by page: commits at or below the applied rev are in the snapshot; a later
/// one that chains is applied; one that does not chain, a `#sync` announcing other data,
/// or a buffer overflow means the repo changed in a way the snapshot misses, so the rest
/// is dropped and the repo is resynced again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cutover {
    rev: String,
    data: String,
    resync_again: Option<String>,
}

impl Cutover {
    /// Starts from the snapshot's commit.
    #[must_use]
    pub fn new(snapshot_rev: &str, snapshot_data: &str) -> Self {
        Self {
            rev: snapshot_rev.to_owned(),
            data: snapshot_data.to_owned(),
            resync_again: None,
        }
    }

    /// Decides one entry (`Err` when it could not be read); an `Apply` moves the applied
    /// state to that commit.
    pub fn step(&mut self, entry: Result<Buffered, String>) -> CutoverStep {
        if self.resync_again.is_some() {
            return CutoverStep::Drop;
        }
        match entry {
            Ok(Buffered::Commit(commit)) if commit.rev.as_str() <= self.rev.as_str() => {
                CutoverStep::Drop
            }
            Ok(Buffered::Commit(commit))
                if commit.prev_data.as_ref().is_none_or(|p| *p == self.data) =>
            {
                self.rev.clone_from(&commit.rev);
                if !commit.data.is_empty() {
                    self.data.clone_from(&commit.data);
                }
                CutoverStep::Apply(commit)
            }
            Ok(Buffered::Commit(commit)) => {
                self.resync_again = Some(format!(
                    "buffered commit {} does not chain onto {}",
                    commit.rev, self.data
                ));
                CutoverStep::Drop
            }
            Ok(Buffered::Sync { rev, data }) => {
                if rev.as_str() > self.rev.as_str() && data != self.data {
                    self.resync_again = Some(format!(
                        "#sync announced new data at rev {rev} during the resync"
                    ));
                }
                CutoverStep::Drop
            }
            Ok(Buffered::Overflow) => {
                self.resync_again =
                    Some("too many live commits arrived during the resync".to_owned());
                CutoverStep::Drop
            }
            // Unreadable: nothing to apply; the rest still decides.
            Err(_) => CutoverStep::Drop,
        }
    }

    /// The state the repo becomes active at (rev, data root), and why it must be resynced
    /// again right away, if it must.
    #[must_use]
    pub fn finish(self) -> (String, String, Option<String>) {
        (self.rev, self.data, self.resync_again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored rev from a short prefix, padded with the smallest TID digit, so that it
    /// compares with the tests' short incoming revs as the prefix alone would.
    fn tid(prefix: &str) -> tap_atproto::syntax::Tid {
        tap_atproto::syntax::Tid::new(&format!("{prefix:2<13}")).unwrap()
    }

    fn repo(state: RepoState, rev: Option<&str>, prev: Option<&str>) -> RepoRow {
        RepoRow {
            did: "did:plc:a".parse().unwrap(),
            state,
            status: AccountStatus::Active,
            handle: None,
            rev: rev.map(tid),
            prev_data: prev.map(Into::into),
            error: String::new(),
            retry_count: 0,
            retry_after: 0,
            last_fetch: None,
        }
    }

    #[test]
    fn untracked_commit_is_tracked_only_when_the_scope_says_so() {
        assert_eq!(
            gate_commit(None, "3k", false),
            CommitGate::Untracked { track: false }
        );
        assert_eq!(
            gate_commit(None, "3k", true),
            CommitGate::Untracked { track: true }
        );
    }

    #[test]
    fn commits_for_repos_not_syncing_are_skipped_without_verification() {
        for state in [
            RepoState::Pending,
            RepoState::Desynchronized,
            RepoState::Error,
        ] {
            let r = repo(state, None, None);
            assert_eq!(
                gate_commit(Some(&r), "3k", false),
                CommitGate::SkipNotSyncing(state)
            );
        }
    }

    #[test]
    fn replayed_revs_are_skipped() {
        let r = repo(RepoState::Active, Some("3kb"), Some("bafy"));
        assert_eq!(gate_commit(Some(&r), "3kb", false), CommitGate::SkipReplay);
        assert_eq!(gate_commit(Some(&r), "3ka", false), CommitGate::SkipReplay);
        assert_eq!(gate_commit(Some(&r), "3kc", false), CommitGate::Verify);
    }

    #[test]
    fn chained_commit_applies_and_broken_chain_desynchronizes() {
        let r = repo(RepoState::Active, Some("3kb"), Some("bafyA"));
        assert_eq!(after_verification(&r, Some("bafyA")), CommitAction::Apply);
        assert!(matches!(
            after_verification(&r, Some("bafyB")),
            CommitAction::Desynchronize(_)
        ));
        let unrooted = repo(RepoState::Active, Some("3kb"), None);
        assert_eq!(
            after_verification(&unrooted, Some("bafyB")),
            CommitAction::Apply,
            "no stored data root to chain onto"
        );
    }

    #[test]
    fn a_commit_without_prev_data_applies_over_any_stored_root() {
        // Jetstream commits carry no prevData: their records were proven one by one.
        let r = repo(RepoState::Active, Some("3kb"), Some("bafyA"));
        assert_eq!(after_verification(&r, None), CommitAction::Apply);
        let resyncing = repo(RepoState::Resyncing, None, None);
        assert_eq!(after_verification(&resyncing, None), CommitAction::Buffer);
    }

    #[test]
    fn the_cutover_applies_a_buffered_jetstream_commit_and_keeps_the_root_it_cannot_know() {
        let mut plan = Cutover::new("3kb", "bafyA");
        let unchained = |rev: &str, data: &str| {
            Ok(Buffered::Commit(PreparedCommit {
                rev: rev.into(),
                data: data.into(),
                prev_data: None,
                ops: Vec::new(),
                unverified: false,
            }))
        };
        assert!(matches!(plan.step(unchained("3ka", "")), CutoverStep::Drop));
        assert!(matches!(
            plan.step(unchained("3kc", "")),
            CutoverStep::Apply(_)
        ));
        assert!(matches!(
            plan.step(unchained("3kd", "bafyD")),
            CutoverStep::Apply(_)
        ));
        let (rev, data, again) = plan.finish();
        assert_eq!((rev.as_str(), data.as_str(), again), ("3kd", "bafyD", None));
    }

    #[test]
    fn commits_during_resync_are_buffered() {
        let r = repo(RepoState::Resyncing, None, None);
        assert_eq!(after_verification(&r, Some("x")), CommitAction::Buffer);
    }

    #[test]
    fn sync_event_desynchronizes_only_on_newer_different_data() {
        let r = repo(RepoState::Active, Some("3kb"), Some("bafyA"));
        assert_eq!(decide_sync(&r, "3ka", "bafyZ"), SyncAction::Ignore);
        assert_eq!(decide_sync(&r, "3kc", "bafyA"), SyncAction::Ignore);
        assert!(matches!(
            decide_sync(&r, "3kc", "bafyZ"),
            SyncAction::Desynchronize(_)
        ));
        let resyncing = repo(RepoState::Resyncing, None, None);
        assert_eq!(decide_sync(&resyncing, "3kc", "bafyZ"), SyncAction::Buffer);
        let pending = repo(RepoState::Pending, None, None);
        assert_eq!(decide_sync(&pending, "3kc", "bafyZ"), SyncAction::Ignore);
    }

    #[test]
    fn account_events_follow_the_go_status_rules() {
        let r = repo(RepoState::Active, None, None);
        assert_eq!(
            decide_account(Some(&r), true, None, false),
            AccountAction::Ignore,
            "same status"
        );
        assert_eq!(
            decide_account(Some(&r), false, Some("deactivated"), false),
            AccountAction::Change(IdentityStatus::Deactivated)
        );
        assert_eq!(
            decide_account(Some(&r), false, Some("throttled"), false),
            AccountAction::Ignore
        );
        assert_eq!(
            decide_account(Some(&r), false, None, false),
            AccountAction::Ignore
        );
        assert_eq!(
            decide_account(Some(&r), false, Some("deleted"), false),
            AccountAction::Change(IdentityStatus::Deleted)
        );
        let mut deact = r.clone();
        deact.status = AccountStatus::Deactivated;
        assert_eq!(
            decide_account(Some(&deact), true, Some("active"), false),
            AccountAction::Change(IdentityStatus::Active)
        );
        assert_eq!(decide_account(None, true, None, true), AccountAction::Track);
        assert_eq!(
            decide_account(None, false, Some("deactivated"), true),
            AccountAction::Ignore
        );
        assert_eq!(
            decide_account(None, true, None, false),
            AccountAction::Ignore
        );
    }

    fn buffered(rev: &str, prev_data: &str, data: &str) -> Result<Buffered, String> {
        Ok(Buffered::Commit(PreparedCommit {
            rev: rev.into(),
            data: data.into(),
            prev_data: Some(prev_data.into()),
            ops: Vec::new(),
            unverified: false,
        }))
    }

    fn sync(rev: &str, data: &str) -> Result<Buffered, String> {
        Ok(Buffered::Sync {
            rev: rev.into(),
            data: data.into(),
        })
    }

    /// Runs a cutover from snapshot (r5, d5): the revs applied, and the final decision.
    fn cutover(
        entries: Vec<Result<Buffered, String>>,
    ) -> (Vec<String>, (String, String, Option<String>)) {
        let mut c = Cutover::new("r5", "d5");
        let applied = entries
            .into_iter()
            .filter_map(|e| match c.step(e) {
                CutoverStep::Apply(commit) => Some(commit.rev),
                CutoverStep::Drop => None,
            })
            .collect();
        (applied, c.finish())
    }

    #[test]
    fn cutover_drops_what_the_snapshot_has_and_applies_what_chains() {
        let (applied, (rev, data, again)) = cutover(vec![
            buffered("r4", "d3", "d4"),
            buffered("r5", "d4", "d5"),
            buffered("r6", "d5", "d6"),
            buffered("r7", "d6", "d7"),
        ]);
        assert_eq!(applied, ["r6", "r7"]);
        assert_eq!((rev.as_str(), data.as_str(), again), ("r7", "d7", None));
    }

    #[test]
    fn cutover_with_an_empty_buffer_activates_at_the_snapshot() {
        assert_eq!(cutover(vec![]), (vec![], ("r5".into(), "d5".into(), None)));
    }

    #[test]
    fn a_commit_that_does_not_chain_stops_the_cutover_and_resyncs_again() {
        let (applied, (rev, _, again)) = cutover(vec![
            buffered("r6", "d5", "d6"),
            buffered("r7", "dX", "d7"),
            buffered("r8", "d7", "d8"),
        ]);
        assert_eq!(applied, ["r6"], "nothing after the break is applied");
        assert_eq!(rev, "r6");
        assert!(again.unwrap().contains("does not chain"));
    }

    #[test]
    fn a_sync_with_new_data_resyncs_again_and_one_matching_the_state_does_not() {
        let (_, (_, _, again)) = cutover(vec![sync("r6", "d5")]);
        assert_eq!(again, None, "announces what the snapshot already has");
        let (_, (_, _, again)) = cutover(vec![sync("r4", "dOld")]);
        assert_eq!(again, None, "older than the snapshot");
        let (applied, (_, _, again)) =
            cutover(vec![sync("r6", "dNew"), buffered("r7", "d5", "d7")]);
        assert!(applied.is_empty());
        assert!(again.unwrap().contains("#sync"));
    }

    #[test]
    fn an_overflowed_buffer_resyncs_again_and_unreadable_entries_are_skipped() {
        let (applied, (_, _, again)) = cutover(vec![
            Err("garbage".into()),
            buffered("r6", "d5", "d6"),
            Ok(Buffered::Overflow),
            buffered("r7", "d6", "d7"),
        ]);
        assert_eq!(applied, ["r6"]);
        assert!(again.unwrap().contains("too many"));
    }
}
