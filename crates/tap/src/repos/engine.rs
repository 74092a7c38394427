//! The I/O shell of the repo state machine: looks the repo up, verifies against its
//! identity, asks [`super::decide`] what to do, and applies the decision in one
//! transaction through the outbox. Firehose workers and resync workers share it, under
//! the same per-DID lock.

use std::collections::HashMap;
use std::sync::Arc;

use tap_atproto::PublicKey;
use tap_atproto::commit::CommitError;
use tap_atproto::firehose::{
    AccountFrame, CommitFrame, IdentityFrame, SyncFrame, VerifyError, verify_commit_frame,
    verify_sync_frame,
};
use tap_atproto::syntax::{Did, Tid};

use super::decide::{self, AccountAction, CommitAction, CommitGate, SyncAction};
use super::filter::{LiveScope, Scope};
use super::locks::DidLocks;
use super::prepared::{Buffered, PreparedCommit};
use super::rules;
use crate::identity::{Identity, IdentityError};
use crate::ledger::Ledger;
use crate::outbox::{Outbox, OutboxError};
use crate::store::{
    EventStorage, RepoChange, RepoRow, RepoState, RepoWrite, Store, StoreError, WriteCondition,
};
use crate::telemetry as t;
use crate::wire::{IdentityEvent, IdentityStatus};
use tap_atproto::record_filter::NoFacts;

/// Most live events kept for one repo while it resyncs (bounds the buffer's rows and the
/// cutover's work; the cutover reads it a page at a time).
pub const RESYNC_BUFFER_LIMIT: u64 = 10_000;

/// What [`Engine::apply_commit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The commit was written (`false`: its condition no longer held; nothing changed).
    pub written: bool,
    /// A change the record-content rules could not settle alone: the repo must be
    /// resynced to recompute what is delivered ([`rules::REFILTER`]).
    pub refilter: bool,
}

/// Whether a live record's bytes count as kept in the byte ledger: a rule that reads only
/// the record decides here; one that reads other records is settled later, and its
/// records count as kept.
fn kept_by_content_rule(
    scope: &Scope,
    did: &str,
    prepared: &PreparedCommit,
    collection: &str,
    rkey: &str,
) -> bool {
    let rules = scope.rules();
    let Some(rule) = rules.rule(collection) else {
        return true;
    };
    if rules.is_dependent(collection) {
        return true;
    }
    let Some(op) = prepared
        .ops
        .iter()
        .find(|op| op.collection == collection && op.rkey == rkey)
    else {
        return true;
    };
    let record = rules::record_value(op.record.as_deref());
    rules::holds(rule, did, collection, rkey, &record, &NoFacts)
}

/// Failures that stop an event from being handled; the firehose retries transient ones
/// (the cursor does not pass the event meanwhile).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The identity needed to verify the event could not be looked up now (PLC or DID
    /// host timed out, failed or answered 5xx): no verdict on the event.
    #[error("identity unavailable: {0}")]
    Unavailable(IdentityError),
    /// The PDS's proof of a Jetstream claim could not be had now (unreachable, timed
    /// out, rate limiting, 5xx): no verdict on the event.
    #[error("{0}")]
    ProofUnavailable(String),
    /// A buffered entry could not be encoded or decoded.
    #[error("resync buffer entry for {did}: {reason}")]
    Buffer {
        /// The repo.
        did: String,
        /// What failed.
        reason: String,
    },
}

/// What a failed event means for the stage that handed it in. The firehose cursor may
/// pass an event only once its effects are committed, or once its repo is marked for a
/// resync that will bring them in: no class lets an event be skipped silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Try the same event again soon (database busy, connection lost).
    Transient,
    /// Tap is stopping: leave the event unfinished, so the cursor stays below it.
    Stopping,
    /// A peer the event needs is unreachable: retry for a while, then leave the event to
    /// a resync of its repo (which has its own backoff) rather than hold the stream.
    Unavailable,
    /// This event cannot be applied to its repo as it is (it does not index, a buffered
    /// entry does not encode, the database refused it): resync the repo, then move on.
    Repo,
}

impl EngineError {
    /// Whether retrying may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        self.class() == FailureClass::Transient
    }

    /// How the caller must treat this failure.
    #[must_use]
    pub fn class(&self) -> FailureClass {
        let store = match self {
            Self::Store(e) | Self::Outbox(OutboxError::Store(e)) => e,
            Self::Outbox(OutboxError::Closed) => return FailureClass::Stopping,
            Self::Buffer { .. } => return FailureClass::Repo,
            Self::Unavailable(_) | Self::ProofUnavailable(_) => {
                return FailureClass::Unavailable;
            }
        };
        if store.is_transient() {
            FailureClass::Transient
        } else if store.is_closed() {
            FailureClass::Stopping
        } else {
            FailureClass::Repo
        }
    }
}

/// What happened to an event (for metrics and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: events emitted (possibly none after filtering).
    Applied,
    /// Buffered until the repo's resync finishes.
    Buffered,
    /// The repo was marked desynchronized, for this reason.
    Desynchronized(String),
    /// The repo is now tracked (pending its backfill).
    Tracked,
    /// Nothing to do, for this reason.
    Skipped(&'static str),
}

/// Shared by every worker; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    store: Store,
    outbox: Outbox,
    identity: Identity,
    scope: LiveScope,
    locks: DidLocks,
    ledger: Ledger,
}

impl Engine {
    /// Builds the engine.
    #[must_use]
    pub fn new(
        store: Store,
        outbox: Outbox,
        identity: Identity,
        scope: LiveScope,
        locks: DidLocks,
        ledger: Ledger,
    ) -> Self {
        Self {
            store,
            outbox,
            identity,
            scope,
            locks,
            ledger,
        }
    }

    /// Where downloaded bytes are counted.
    #[must_use]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The per-DID locks (the resync cutover takes them too).
    #[must_use]
    pub fn locks(&self) -> &DidLocks {
        &self.locks
    }

    /// The tracking scope and filters.
    #[must_use]
    pub fn scope(&self) -> Arc<Scope> {
        self.scope.current()
    }

    /// The state store.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The scope as it changes (runtime filters).
    #[must_use]
    pub fn live_scope(&self) -> &LiveScope {
        &self.scope
    }

    /// The outbox (resync workers append historical events through it).
    #[must_use]
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// The identity directory.
    #[must_use]
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Handles a `#commit`.
    ///
    /// # Errors
    /// Store or outbox failures; the caller retries transient ones.
    pub async fn handle_commit(&self, frame: &CommitFrame) -> Result<Outcome, EngineError> {
        let did = frame.repo.as_str();
        let _guard = self.locks.lock(did).await;
        // One snapshot for the whole commit: a filter change lands between commits.
        let scope = self.scope();
        let collections = frame.ops.iter().map(|op| collection_of(&op.path));
        let repo = match self
            .admit_commit(did, frame.rev.as_str(), collections, &scope, false)
            .await?
        {
            Ok(repo) => repo,
            Err(outcome) => return Ok(outcome),
        };
        let verified = match self
            .verify_with_refresh(&frame.repo, |key| verify_commit_frame(frame, key))
            .await
        {
            Ok(v) => v,
            Err(VerifyFailure::Unavailable(e)) => return Err(EngineError::Unavailable(e)),
            Err(VerifyFailure::Rejected(reason)) => {
                metrics::counter!(t::COMMITS_REJECTED, "reason" => reason.kind).increment(1);
                return self.desynchronize(did, &reason.message).await;
            }
        };
        metrics::counter!(t::COMMITS_VERIFIED).increment(1);
        let prepared = PreparedCommit::from_verified(&verified, |c| scope.wants_collection(c));
        for op in &verified.ops {
            if let Some(record) = &op.record {
                let collection = op.collection.as_str();
                let kept = scope.wants_collection(collection)
                    && kept_by_content_rule(&scope, did, &prepared, collection, op.rkey.as_str());
                self.ledger.record(collection, record.len() as u64, kept);
            }
        }
        self.settle_commit(&frame.repo, &repo, prepared).await
    }

    /// Whether a commit of `did` at `rev`, touching `collections`, is for the repo as it is
    /// stored: `Ok(repo)` to verify it, or `Err(outcome)` when it ends here (untracked,
    /// newly tracked, not syncing, replayed). `same_rev` also admits a commit at the stored
    /// rev (Jetstream may split one commit's operations). Call under the repo's lock.
    ///
    /// # Errors
    /// Store failures.
    pub async fn admit_commit<'a>(
        &self,
        did: &str,
        rev: &str,
        collections: impl Iterator<Item = &'a str>,
        scope: &Scope,
        same_rev: bool,
    ) -> Result<Result<RepoRow, Outcome>, EngineError> {
        let repo = self.store.get_repo(did).await?;
        let auto = repo.is_none() && scope.tracks_on_commit(collections);
        let gate = decide::gate_commit(repo.as_ref(), rev, auto);
        let replay_at_stored_rev = same_rev
            && repo
                .as_ref()
                .and_then(|r| r.rev.as_ref())
                .is_some_and(|stored| stored.as_str() == rev);
        Ok(match gate {
            CommitGate::Untracked { track: true } => Err(self.track(did).await?),
            CommitGate::Untracked { track: false } => Err(Outcome::Skipped("untracked")),
            CommitGate::SkipNotSyncing(_) => Err(Outcome::Skipped("repo not syncing")),
            CommitGate::SkipReplay if !replay_at_stored_rev => {
                Err(Outcome::Skipped("replayed rev"))
            }
            CommitGate::SkipReplay | CommitGate::Verify => {
                repo.ok_or(Outcome::Skipped("untracked"))
            }
        })
    }

    /// Applies, buffers or refuses a verified commit of `repo` (as read under the lock), as
    /// [`decide::after_verification`] says.
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn settle_commit(
        &self,
        did: &Did,
        repo: &RepoRow,
        prepared: PreparedCommit,
    ) -> Result<Outcome, EngineError> {
        match decide::after_verification(repo, prepared.prev_data.as_deref()) {
            CommitAction::Buffer => {
                let rev = prepared.rev.clone();
                self.buffer(did.as_str(), &rev, &Buffered::Commit(prepared))
                    .await
            }
            CommitAction::Desynchronize(reason) => self.desynchronize(did.as_str(), &reason).await,
            CommitAction::Apply => {
                let applied = self
                    .apply_commit(
                        did,
                        &prepared,
                        WriteCondition::RepoInState(RepoState::Active),
                        Vec::new(),
                    )
                    .await?;
                if applied.written && applied.refilter {
                    return Ok(Outcome::Desynchronized(rules::REFILTER.to_owned()));
                }
                Ok(Outcome::Applied)
            }
        }
    }

    /// Applies a prepared commit as live events in one transaction, its ops judged by the
    /// record-content rules in force; a write refused by its condition (the repo was
    /// removed or changed state meanwhile) is a no-op.
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn apply_commit(
        &self,
        did: &Did,
        commit: &PreparedCommit,
        condition: WriteCondition,
        consumed_buffer: Vec<i64>,
    ) -> Result<Applied, EngineError> {
        // Always a TID for a verified commit; only a damaged buffered entry can fail here.
        let rev = Tid::new(&commit.rev).map_err(|e| EngineError::Buffer {
            did: did.to_string(),
            reason: format!("rev {:?}: {e}", commit.rev),
        })?;
        let (judged, refilter) = self.judge_commit(did.as_str(), commit).await?;
        let commit = judged.as_ref().unwrap_or(commit);
        // A live commit the rules could not settle sends the repo to resync in the same
        // transaction: a crash in between would leave it active with a stale view. (At a
        // cutover the cutover's own last write does it, the repo being mid-resync.)
        let refilter_now = refilter && condition == WriteCondition::RepoInState(RepoState::Active);
        let repo = if refilter_now {
            RepoChange::ResyncStale {
                rev,
                prev_data: commit.data.clone(),
                reason: rules::REFILTER.to_owned(),
            }
        } else {
            RepoChange::Commit {
                rev,
                prev_data: commit.data.clone(),
            }
        };
        let write = RepoWrite {
            did: did.clone(),
            condition,
            repo,
            records: commit.record_changes(),
            events: commit.events(did.as_str()),
            resync_buffer_delete: consumed_buffer,
            storage: EventStorage::Durable,
            fetch: None,
        };
        match self.outbox.append(write).await {
            Ok(_) => {
                crate::failpoint::hit("commit-applied");
                if refilter_now {
                    tracing::info!(%did, "Record filters need the whole repo; resyncing it.");
                    self.store.resync_wanted().notify_waiters();
                }
                Ok(Applied {
                    written: true,
                    refilter,
                })
            }
            Err(OutboxError::Store(e)) if e.is_condition_not_met() => Ok(Applied {
                written: false,
                refilter: false,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The commit as the record-content rules let it through (`None`: unchanged, no rule
    /// concerns it), and whether the repo must be resynced for the rules to be right
    /// ([`rules::judge_op`]).
    async fn judge_commit(
        &self,
        did: &str,
        commit: &PreparedCommit,
    ) -> Result<(Option<PreparedCommit>, bool), EngineError> {
        let scope = self.scope();
        let rules = scope.rules();
        let concerned = |c: &str| rules.rule(c).is_some() || rules.is_referenced(c);
        if !commit.ops.iter().any(|op| concerned(&op.collection)) {
            return Ok((None, false));
        }
        // The view after each earlier op of this commit, which the index does not hold yet.
        let mut overlay: HashMap<(String, String), bool> = HashMap::new();
        let mut ops = Vec::with_capacity(commit.ops.len());
        let mut refilter = false;
        for op in &commit.ops {
            let key = (op.collection.clone(), op.rkey.clone());
            let referenced = rules.is_referenced(&op.collection);
            let Some(rule) = rules.rule(&op.collection) else {
                refilter |= referenced;
                overlay.insert(key, op.change.cid().is_some());
                ops.push(op.clone());
                continue;
            };
            let was = match overlay.get(&key) {
                Some(in_view) => *in_view,
                None => self
                    .store
                    .record_cid(did, &op.collection, &op.rkey)
                    .await?
                    .is_some(),
            };
            let holds = if op.change.cid().is_none() || rules.needs_referrers(&op.collection) {
                None
            } else {
                let record = rules::record_value(op.record.as_deref());
                let target = (op.collection.as_str(), op.rkey.as_str(), &record);
                Some(rules::decide_live(&self.store, did, rule, target, &overlay).await?)
            };
            let judged = rules::judge_op(op, was, holds, referenced);
            refilter |= judged.refilter;
            overlay.insert(key, judged.in_view);
            ops.extend(judged.op);
        }
        let judged = PreparedCommit {
            ops,
            ..commit.clone()
        };
        Ok((Some(judged), refilter))
    }

    /// Handles a `#sync`.
    ///
    /// # Errors
    /// Store failures.
    pub async fn handle_sync(&self, frame: &SyncFrame) -> Result<Outcome, EngineError> {
        let did = frame.did.as_str();
        let _guard = self.locks.lock(did).await;
        let Some(repo) = self.store.get_repo(did).await? else {
            if self.scope().tracks_on_other_events() {
                return self.track(did).await;
            }
            return Ok(Outcome::Skipped("untracked"));
        };
        if !matches!(repo.state, RepoState::Active | RepoState::Resyncing) {
            return Ok(Outcome::Skipped("repo not syncing"));
        }
        let verified = match self
            .verify_with_refresh(&frame.did, |key| verify_sync_frame(frame, key))
            .await
        {
            Ok(v) => v,
            Err(VerifyFailure::Unavailable(e)) => return Err(EngineError::Unavailable(e)),
            Err(VerifyFailure::Rejected(reason)) => {
                metrics::counter!(t::COMMITS_REJECTED, "reason" => reason.kind).increment(1);
                return Ok(Outcome::Skipped("sync failed verification"));
            }
        };
        let data = verified.data.to_string();
        match decide::decide_sync(&repo, verified.rev.as_str(), &data) {
            SyncAction::Ignore => Ok(Outcome::Skipped("sync changes nothing")),
            SyncAction::Buffer => {
                let rev = verified.rev.as_str().to_owned();
                self.buffer(
                    did,
                    &rev,
                    &Buffered::Sync {
                        rev: rev.clone(),
                        data,
                    },
                )
                .await
            }
            SyncAction::Desynchronize(reason) => self.desynchronize(did, &reason).await,
        }
    }

    /// Keeps `entry` for the cutover of the repo's resync. Past [`RESYNC_BUFFER_LIMIT`]
    /// entries the repo only gets one overflow marker: the snapshot being taken is stale
    /// anyway, and the cutover resyncs it again, which brings in what was not kept.
    async fn buffer(&self, did: &str, rev: &str, entry: &Buffered) -> Result<Outcome, EngineError> {
        let encode = |entry: &Buffered| {
            serde_json::to_string(entry).map_err(|e| EngineError::Buffer {
                did: did.to_owned(),
                reason: e.to_string(),
            })
        };
        if !self
            .store
            .buffer_commit(did, rev, &encode(entry)?, RESYNC_BUFFER_LIMIT)
            .await?
        {
            // Stored only once: the marker itself fills the last slot.
            self.store
                .buffer_commit(
                    did,
                    rev,
                    &encode(&Buffered::Overflow)?,
                    RESYNC_BUFFER_LIMIT + 1,
                )
                .await?;
        }
        Ok(Outcome::Buffered)
    }

    /// Handles an `#identity`: re-resolves the DID and announces a changed handle.
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn handle_identity(&self, frame: &IdentityFrame) -> Result<Outcome, EngineError> {
        self.identity_changed(&frame.did).await
    }

    /// `did`'s identity may have changed (a firehose `#identity`, a Jetstream `identity`
    /// event): re-resolves it and announces a changed handle. What the event itself says is
    /// never taken: only what resolves.
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn identity_changed(&self, did: &Did) -> Result<Outcome, EngineError> {
        let _guard = self.locks.lock(did.as_str()).await;
        let Some(repo) = self.store.get_repo(did.as_str()).await? else {
            if self.scope().tracks_on_other_events() {
                return self.track(did.as_str()).await;
            }
            return Ok(Outcome::Skipped("untracked"));
        };
        self.refresh_handle(did, &repo).await
    }

    /// Checks `did`'s handle under the repo's lock, against the repo as stored now (an
    /// `#identity` handled meanwhile may have stored a newer handle than the caller saw).
    ///
    /// # Errors
    /// Store or outbox failures; [`EngineError::Unavailable`] when the lookup failed in a
    /// way that may pass.
    pub async fn check_handle(&self, did: &Did) -> Result<Outcome, EngineError> {
        let _guard = self.locks.lock(did.as_str()).await;
        match self.store.get_repo(did.as_str()).await? {
            Some(repo) => self.refresh_handle(did, &repo).await,
            None => Ok(Outcome::Skipped("untracked")),
        }
    }

    /// Re-resolves `did` (purging the cache) and, if the verified handle differs from the
    /// stored one, stores it and emits an identity event in one transaction. A DID that
    /// does not resolve leaves the repo as it is.
    ///
    /// # Errors
    /// Store or outbox failures; [`EngineError::Unavailable`] when the lookup failed in a
    /// way that may pass (the change must not be missed).
    async fn refresh_handle(&self, did: &Did, repo: &RepoRow) -> Result<Outcome, EngineError> {
        let handle = match self.identity.refresh(did).await {
            Ok(ident) => ident.handle_or_invalid().to_owned(),
            Err(error) if error.is_transient() => return Err(EngineError::Unavailable(error)),
            Err(error) => {
                tracing::info!(%did, %error, "Identity refresh failed.");
                return Ok(Outcome::Skipped("identity unavailable"));
            }
        };
        if repo.handle.as_deref() == Some(handle.as_str()) {
            return Ok(Outcome::Skipped("handle unchanged"));
        }
        let status = decide::stored_status(repo.status);
        let event = IdentityEvent {
            did: did.as_str(),
            handle: &handle,
            is_active: status == IdentityStatus::Active,
            status,
        };
        self.emit_identity(did, &event, RepoChange::Handle(handle.clone()))
            .await
    }

    /// Stores `change` and appends the identity event in one transaction, if the repo
    /// still exists (it may have been removed meanwhile).
    async fn emit_identity(
        &self,
        did: &Did,
        event: &IdentityEvent<'_>,
        change: RepoChange,
    ) -> Result<Outcome, EngineError> {
        let mut write = RepoWrite::new(did.clone());
        write.condition = WriteCondition::RepoExists;
        write.repo = change;
        write.events.push(crate::store::NewEvent {
            live: false,
            payload: event.payload(),
        });
        match self.outbox.append(write).await {
            Ok(_) => Ok(Outcome::Applied),
            Err(OutboxError::Store(e)) if e.is_condition_not_met() => {
                Ok(Outcome::Skipped("repo removed"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Handles an `#account`.
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn handle_account(&self, frame: &AccountFrame) -> Result<Outcome, EngineError> {
        self.account_changed(&frame.did, frame.active, frame.status.as_deref())
            .await
    }

    /// `did`'s hosting status is now `active` / `status` (a firehose `#account`, a
    /// Jetstream `account` event).
    ///
    /// # Errors
    /// Store or outbox failures.
    pub async fn account_changed(
        &self,
        did_ref: &Did,
        active: bool,
        status: Option<&str>,
    ) -> Result<Outcome, EngineError> {
        let did = did_ref.as_str();
        let _guard = self.locks.lock(did).await;
        let repo = self.store.get_repo(did).await?;
        match decide::decide_account(
            repo.as_ref(),
            active,
            status,
            self.scope().tracks_on_other_events(),
        ) {
            AccountAction::Ignore => Ok(Outcome::Skipped("account status unchanged or ignored")),
            AccountAction::Track => self.track(did).await,
            AccountAction::Change(status) => {
                let Some(repo) = repo else {
                    return Ok(Outcome::Skipped("untracked"));
                };
                let handle = repo.handle.clone().unwrap_or_default();
                let event = IdentityEvent {
                    did,
                    handle: &handle,
                    is_active: active,
                    status,
                };
                let change = match decide::status_to_store(status) {
                    Some(s) => RepoChange::Status(s),
                    None => RepoChange::Delete,
                };
                self.emit_identity(did_ref, &event, change).await
            }
        }
    }

    async fn track(&self, did: &str) -> Result<Outcome, EngineError> {
        if self.store.ensure_repo(did).await? {
            tracing::debug!(%did, "Tracking a newly seen repo.");
        }
        Ok(Outcome::Tracked)
    }

    /// Marks `did` desynchronized (a resync will fetch it whole), e.g. after an event of it
    /// failed in a way retrying cannot fix.
    ///
    /// # Errors
    /// The store failed.
    pub async fn desynchronize(&self, did: &str, reason: &str) -> Result<Outcome, EngineError> {
        tracing::info!(%did, reason, "Repo desynchronized.");
        self.store.mark_desynchronized(did, reason).await?;
        Ok(Outcome::Desynchronized(reason.to_owned()))
    }

    /// Verifies with the cached key (DID document only, no handle check); on a signature
    /// failure, fetches the document again and tries once more with its key (the account
    /// may have rotated it).
    async fn verify_with_refresh<T>(
        &self,
        did: &Did,
        verify: impl Fn(&PublicKey) -> Result<T, VerifyError>,
    ) -> Result<T, VerifyFailure> {
        let first = self
            .identity
            .resolve_repo(did)
            .await
            .map_err(VerifyFailure::lookup)?;
        let key = first.require_signing_key().map_err(VerifyFailure::lookup)?;
        match verify(key) {
            Ok(v) => Ok(v),
            Err(VerifyError::Commit(CommitError::Signature(_))) => {
                let fresh = self
                    .identity
                    .refresh_repo(did)
                    .await
                    .map_err(VerifyFailure::lookup)?;
                let key = fresh.require_signing_key().map_err(VerifyFailure::lookup)?;
                verify(key).map_err(|e| VerifyFailure::Rejected(Rejection::verify(e)))
            }
            Err(e) => Err(VerifyFailure::Rejected(Rejection::verify(e))),
        }
    }
}

/// Why an event was not verified: no answer yet, or a verdict.
#[derive(Debug)]
enum VerifyFailure {
    /// The identity lookup failed in a way that may pass (timeout, 5xx, connection).
    Unavailable(IdentityError),
    /// The event or its identity is refused.
    Rejected(Rejection),
}

impl VerifyFailure {
    fn lookup(e: IdentityError) -> Self {
        if e.is_transient() {
            Self::Unavailable(e)
        } else {
            Self::Rejected(Rejection::identity(e))
        }
    }
}

/// Why an event could not be verified.
#[derive(Debug)]
struct Rejection {
    kind: &'static str,
    message: String,
}

impl Rejection {
    fn identity(e: IdentityError) -> Self {
        Self {
            kind: "identity",
            message: format!("cannot verify: identity lookup failed: {e}"),
        }
    }

    fn verify(e: VerifyError) -> Self {
        let kind = match &e {
            VerifyError::Commit(CommitError::Signature(_)) => "signature",
            VerifyError::PrevDataMismatch { .. } => "inversion",
            VerifyError::Mst(_) => "mst",
            VerifyError::Car(_) => "car",
            VerifyError::MissingPrevData => "no_prev_data",
            VerifyError::TooBig => "too_big",
            _ => "malformed",
        };
        Self {
            kind,
            message: format!("commit failed verification: {e}"),
        }
    }
}

/// The collection part of an op path (`collection/rkey`).
fn collection_of(path: &str) -> &str {
    path.split_once('/').map_or(path, |(c, _)| c)
}
