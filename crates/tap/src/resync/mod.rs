//! Resync: fetch a whole repo from its PDS, verify it, diff it against the record index,
//! emit historical events, then cut over to live processing atomically.
//!
//! A worker claims a repo (pending first, then desynchronized, then error repos whose
//! retry time has come), fetches its key and PDS anew (its handle is checked apart, see
//! `repos::handle_checks`), streams `getRepo` through the bounded-memory walker, and writes the diff
//! in batches, each one transaction guarded by "the repo is still resyncing" (so a repo
//! removed mid-resync gets nothing written). The cutover, under the repo's lock, replays
//! the live commits buffered meanwhile and marks the repo active in the same breath.

pub mod diff;
pub mod fetch;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tap_atproto::stream::{RepoWalker, WalkError, WalkLimits};
use tap_atproto::syntax::Did;
use tokio_util::sync::CancellationToken;

use crate::identity::IdentityError;
use crate::outbox::OutboxError;
use crate::repos::decide::{Cutover, CutoverStep};
use crate::repos::engine::{Engine, EngineError, FailureClass};
use crate::repos::handle_checks::HandleChecks;
use crate::repos::prepared::Buffered;
use crate::shutdown::Supervisor;
use crate::store::{
    EventStorage, NewEvent, RecordChange, RepoChange, RepoRow, RepoState, RepoWrite, ResyncFailure,
    Store, StoreError, WriteCondition,
};
use crate::telemetry as t;
use crate::wire::{Action, RecordEvent};
use diff::{Change, CollectionMerge};
use fetch::{FetchError, PdsClient};

/// How long an idle worker waits before looking for work again, unless the store signals
/// new work first (error repos whose retry time comes are only found by this poll).
pub const IDLE_POLL: Duration = Duration::from_secs(1);
/// Historical events per transaction.
pub const BATCH: usize = 400;
/// Buffered live commits read per page at the cutover.
const CUTOVER_PAGE: usize = 500;
/// Stored index rows read per page.
const INDEX_PAGE: usize = 1000;
/// Memory a walk may use for blocks that arrive before they are needed; beyond it they
/// spill to a temporary file. Per worker, so the total is bounded by the parallelism.
pub const WALK_MEMORY_BUDGET: usize = 4 << 20;

/// Settings of the resync stage.
#[derive(Debug, Clone)]
pub struct ResyncSettings {
    /// Workers (`--resync-parallelism`).
    pub parallelism: usize,
    /// Whole-request timeout of `getRepo` (`--repo-fetch-timeout`).
    pub fetch_timeout: Duration,
    /// Largest repo CAR accepted, in bytes.
    pub max_repo_bytes: u64,
    /// Deliver a first backfill's events from memory (see
    /// [`EventStorage::InMemoryBackfill`]) instead of storing each one
    /// (`--durable-backfill-events` turns this off).
    pub in_memory_backfill: bool,
}

/// Why a resync failed.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The PDS asked us to slow down: back to desynchronized, retried later.
    #[error("rate limited")]
    RateLimited,
    /// A peer or the database failed in a way that may pass (timeout, 5xx, connection,
    /// busy): no verdict on the repo, retried soon.
    #[error("{0}")]
    Transient(String),
    /// A verdict: the repo does not verify, its identity or PDS refuses it: error state.
    #[error("{0}")]
    Failed(String),
    /// The repo was removed or re-added while resyncing: stop quietly.
    #[error("repo removed during resync")]
    Abandoned,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutdown.
    #[error("stopped")]
    Stopped,
}

impl From<OutboxError> for ResyncError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Store(s) if s.is_condition_not_met() => Self::Abandoned,
            OutboxError::Store(s) => Self::Store(s),
            OutboxError::Closed => Self::Stopped,
        }
    }
}

impl From<EngineError> for ResyncError {
    fn from(e: EngineError) -> Self {
        match e.class() {
            FailureClass::Stopping => Self::Stopped,
            FailureClass::Transient | FailureClass::Unavailable => Self::Transient(e.to_string()),
            FailureClass::Repo => Self::Failed(e.to_string()),
        }
    }
}

impl From<IdentityError> for ResyncError {
    fn from(e: IdentityError) -> Self {
        if e.is_transient() {
            Self::Transient(format!("identity: {e}"))
        } else {
            Self::Failed(format!("identity: {e}"))
        }
    }
}

impl From<WalkError> for ResyncError {
    fn from(e: WalkError) -> Self {
        Self::Failed(format!("repo verification failed: {e}"))
    }
}

impl From<FetchError> for ResyncError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::RateLimited { .. } => Self::RateLimited,
            e @ FetchError::Transport { .. } => Self::Transient(e.to_string()),
            e @ FetchError::Status { status, .. } if status >= 500 || status == 408 => {
                Self::Transient(e.to_string())
            }
            e @ FetchError::Status { .. } => Self::Failed(e.to_string()),
        }
    }
}

/// Starts the workers; they stop claiming when `intake` is cancelled and abandon a resync
/// in progress (the repo is reset at the next start).
pub fn spawn(
    settings: &ResyncSettings,
    pds: PdsClient,
    engine: Engine,
    store: Store,
    supervisor: &Supervisor,
    intake: CancellationToken,
) {
    let pds = std::sync::Arc::new(pds);
    let handles = HandleChecks::spawn(&engine, supervisor, &intake);
    for _ in 0..settings.parallelism.max(1) {
        supervisor.spawn(
            "resync worker",
            run_worker(
                Worker {
                    engine: engine.clone(),
                    store: store.clone(),
                    pds: std::sync::Arc::clone(&pds),
                    handles: handles.clone(),
                    settings: settings.clone(),
                },
                intake.clone(),
            ),
        );
    }
}

/// What a resync worker works with.
struct Worker {
    engine: Engine,
    store: Store,
    pds: std::sync::Arc<PdsClient>,
    handles: HandleChecks,
    settings: ResyncSettings,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn run_worker(worker: Worker, stop: CancellationToken) {
    let store = &worker.store;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // Armed before the claim: a repo added between the claim and the wait still wakes us.
        let wanted = store.resync_wanted().notified();
        tokio::pin!(wanted);
        wanted.as_mut().enable();
        let job = match store.claim_resync_job(now_unix()).await {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(%error, "Failed to claim a resync job.");
                None
            }
        };
        let Some(repo) = job else {
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut wanted => continue,
                () = tokio::time::sleep(IDLE_POLL) => continue,
            }
        };
        let did = repo.did.clone();
        metrics::counter!(t::RESYNCS_STARTED).increment(1);
        let started = std::time::Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => Err(ResyncError::Stopped),
            r = resync_repo(&worker, &repo) => r,
        };
        metrics::histogram!(t::RESYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(records) => {
                metrics::counter!(t::RESYNCS_COMPLETED).increment(1);
                tracing::info!(%did, records, elapsed = ?started.elapsed(), "Resync complete.");
                continue;
            }
            Err(ResyncError::Stopped) => return,
            Err(ResyncError::Abandoned) => {
                tracing::info!(%did, "Repo removed during its resync; stopped.");
                continue;
            }
            Err(ResyncError::RateLimited) => ResyncFailure::RateLimited,
            Err(ResyncError::Transient(reason)) => ResyncFailure::Transient(reason),
            Err(ResyncError::Failed(reason)) => ResyncFailure::Failed(reason),
            Err(ResyncError::Store(e)) if e.is_closed() => return,
            Err(ResyncError::Store(e)) if e.is_transient() => {
                ResyncFailure::Transient(format!("store: {e}"))
            }
            Err(ResyncError::Store(e)) => ResyncFailure::Failed(format!("store: {e}")),
        };
        metrics::counter!(t::RESYNCS_FAILED).increment(1);
        tracing::info!(%did, ?failure, "Resync failed.");
        // Until it is recorded the repo stays `resyncing`, which nothing else claims: keep
        // trying rather than leave it stuck until a restart.
        loop {
            match store
                .mark_resync_failed(
                    &did,
                    failure.clone(),
                    now_unix(),
                    rand::random::<u64>() % 60_000,
                )
                .await
            {
                Ok(()) => break,
                Err(error) if error.is_closed() => return,
                Err(error) => {
                    tracing::warn!(%did, %error, "Failed to record a resync failure; retrying.");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}

/// One resync. Returns the number of records in the snapshot.
async fn resync_repo(worker: &Worker, repo: &RepoRow) -> Result<u64, ResyncError> {
    let Worker {
        engine,
        store,
        pds,
        handles,
        settings,
    } = worker;
    let did: Did = repo
        .did
        .parse()
        .map_err(|e| ResyncError::Failed(format!("invalid DID: {e}")))?;
    // Key and PDS fetched now, from the DID document alone (a rotated key or a moved PDS
    // takes effect here); the handle is checked apart and announced when it is known.
    let ident = engine.identity().refresh_repo(&did).await?;
    handles.submit(did.clone()).await;
    let key = ident.require_signing_key()?.clone();
    let pds_url = ident.require_pds()?.clone();
    let mut body = pds.get_repo(&pds_url, &did).await?;
    let host = body.host().to_owned();
    let mut limits = WalkLimits {
        memory_budget: WALK_MEMORY_BUDGET,
        ..WalkLimits::default()
    };
    limits.car.max_total_bytes = settings.max_repo_bytes;
    let mut walker = RepoWalker::new(Some(did.clone()), Some(key), limits);
    // With nothing indexed, every record is a create that the repo itself can produce
    // again, so the events need not be stored one by one (decisions in
    // docs/architecture.md, "Write volume").
    let indexed = !store.records_page(did.as_str(), None, 1).await?.is_empty();
    let storage = if settings.in_memory_backfill && !indexed {
        EventStorage::InMemoryBackfill
    } else {
        EventStorage::Durable
    };
    let mut sink = Snapshot::new(engine, store, &did, repo.rev.clone(), storage);
    // An index without a rev is a backfill whose in-memory events may not all have been
    // acked before a crash (`Store::reset_undelivered_backfills`): the consumer may lack
    // any record, and may hold ones deleted since. Re-emit every record, delete the rest.
    sink.replay = indexed && repo.rev.is_none();
    loop {
        let Some(chunk) = body.chunk().await? else {
            break;
        };
        metrics::counter!(t::BYTES_DOWNLOADED, "source" => host.clone())
            .increment(chunk.len() as u64);
        walker.push(&chunk)?;
        sink.drain(&mut walker).await?;
    }
    walker.finish()?;
    sink.drain(&mut walker).await?;
    let (rev, data) = match walker.commit() {
        Some(c) => (c.rev.as_str().to_owned(), c.data.to_string()),
        None => return Err(ResyncError::Failed("repo CAR has no commit".into())),
    };
    sink.check_rev(&rev)?;
    let records = walker.records_emitted();
    sink.finish().await?;
    cut_over(engine, store, &did, &rev, &data).await?;
    Ok(records)
}

/// Turns the walked snapshot into index changes and historical events.
struct Snapshot<'a> {
    engine: &'a Engine,
    store: &'a Store,
    did: &'a Did,
    stored_rev: Option<String>,
    rev: Option<String>,
    /// Collection being merged, and its merge state.
    current: Option<(String, CollectionMerge)>,
    /// Collections seen in the snapshot (to find stored collections that vanished).
    seen: Vec<String>,
    /// `InMemoryBackfill` when the index was empty at the start: no merge, all creates.
    storage: EventStorage,
    /// Emit unchanged records too (as creates): the rerun of an undelivered backfill.
    replay: bool,
    write: RepoWrite,
}

impl<'a> Snapshot<'a> {
    fn new(
        engine: &'a Engine,
        store: &'a Store,
        did: &'a Did,
        stored_rev: Option<String>,
        storage: EventStorage,
    ) -> Self {
        Self {
            engine,
            store,
            did,
            stored_rev,
            rev: None,
            current: None,
            seen: Vec::new(),
            storage,
            replay: false,
            write: Self::empty_write(did, storage),
        }
    }

    fn empty_write(did: &Did, storage: EventStorage) -> RepoWrite {
        let mut w = RepoWrite::new(did.as_str());
        w.condition = WriteCondition::RepoInState(RepoState::Resyncing);
        w.storage = storage;
        w
    }

    /// Whether the index was empty at the start, so there is nothing to merge against.
    fn is_first_backfill(&self) -> bool {
        self.storage == EventStorage::InMemoryBackfill
    }

    /// The snapshot must not be older than what tap already applied.
    fn check_rev(&self, rev: &str) -> Result<(), ResyncError> {
        match &self.stored_rev {
            Some(stored) if rev < stored.as_str() => Err(ResyncError::Failed(format!(
                "snapshot rev {rev} is older than the stored rev {stored}"
            ))),
            _ => Ok(()),
        }
    }

    async fn drain(&mut self, walker: &mut RepoWalker) -> Result<(), ResyncError> {
        while let Some(record) = walker.next_record()? {
            if self.rev.is_none() {
                let rev = walker
                    .commit()
                    .map(|c| c.rev.as_str().to_owned())
                    .ok_or_else(|| ResyncError::Failed("record before commit".into()))?;
                self.check_rev(&rev)?;
                self.rev = Some(rev);
            }
            let Some((collection, rkey)) = record.path.split_once('/') else {
                continue; // not a record path; the Go tap skips these too
            };
            if !self.engine.scope().wants_collection(collection) {
                continue;
            }
            if self.is_first_backfill() {
                let cid = record.cid.to_string();
                let json = record_json(&record.bytes);
                let create = Change::Create {
                    rkey: rkey.to_owned(),
                };
                self.add(collection, create, Some((&cid, json.as_deref())))
                    .await?;
                continue;
            }
            if self.current.as_ref().is_none_or(|(c, _)| c != collection) {
                self.finish_collection().await?;
                self.seen.push(collection.to_owned());
                self.current = Some((collection.to_owned(), CollectionMerge::new()));
            }
            let cid = record.cid.to_string();
            let mut changes = Vec::new();
            loop {
                let done = match &mut self.current {
                    Some((_, merge)) => merge.push(rkey, &cid, &mut changes),
                    None => true,
                };
                if done {
                    break;
                }
                self.refill().await?;
            }
            let announced = changes.iter().any(|c| {
                matches!(c, Change::Create { rkey: k } | Change::Update { rkey: k } if k == rkey)
            });
            if self.replay && !announced {
                changes.push(Change::Create {
                    rkey: rkey.to_owned(),
                });
            }
            let json = record_json(&record.bytes);
            for change in changes {
                self.add(collection, change, Some((&cid, json.as_deref())))
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads the next page of the current collection's stored rows.
    async fn refill(&mut self) -> Result<(), ResyncError> {
        let Some((collection, merge)) = &mut self.current else {
            return Ok(());
        };
        let after = (
            collection.clone(),
            merge.stored_resume_key().unwrap_or("").to_owned(),
        );
        let page = self
            .store
            .records_page(self.did.as_str(), Some(after), INDEX_PAGE)
            .await?;
        let mine: Vec<(String, String)> = page
            .into_iter()
            .take_while(|r| r.collection == *collection)
            .map(|r| (r.rkey, r.cid))
            .collect();
        // A short page (the index ended, or ran into the next collection) is the last.
        let last = mine.len() < INDEX_PAGE;
        merge.feed_stored(mine, last);
        Ok(())
    }

    /// Ends the current collection: stored rows after the snapshot's last record of it are
    /// deletes, emitted a page at a time (memory stays bounded however many there are).
    async fn finish_collection(&mut self) -> Result<(), ResyncError> {
        let Some(collection) = self.current.as_ref().map(|(c, _)| c.clone()) else {
            return Ok(());
        };
        let mut changes = Vec::new();
        loop {
            let done = match &mut self.current {
                Some((_, merge)) => merge.finish(&mut changes),
                None => true,
            };
            for change in changes.drain(..) {
                self.add(&collection, change, None).await?;
            }
            if done {
                break;
            }
            self.refill().await?;
        }
        self.current = None;
        Ok(())
    }

    /// Stored collections absent from the snapshot: every record in them was deleted.
    async fn delete_vanished_collections(&mut self) -> Result<(), ResyncError> {
        // Only the collections the snapshot did not have are read again.
        let mut vanished = self.store.record_collections(self.did.as_str()).await?;
        vanished.retain(|c| !self.seen.contains(c));
        for collection in vanished {
            let wanted = self.engine.scope().wants_collection(&collection);
            let mut last_rkey = String::new();
            loop {
                let page = self
                    .store
                    .records_page(
                        self.did.as_str(),
                        Some((collection.clone(), last_rkey.clone())),
                        INDEX_PAGE,
                    )
                    .await?;
                let rows: Vec<_> = page
                    .into_iter()
                    .take_while(|r| r.collection == collection)
                    .collect();
                let done = rows.len() < INDEX_PAGE;
                for row in rows {
                    last_rkey.clone_from(&row.rkey);
                    if wanted {
                        self.add(&collection, Change::Delete { rkey: row.rkey }, None)
                            .await?;
                    } else {
                        // No longer wanted by the filters: forget it silently.
                        self.write.records.push(RecordChange::Delete {
                            collection: collection.clone(),
                            rkey: row.rkey,
                        });
                        if self.write.records.len() >= BATCH {
                            self.flush().await?;
                        }
                    }
                }
                if done {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn add(
        &mut self,
        collection: &str,
        change: Change,
        record: Option<(&str, Option<&str>)>,
    ) -> Result<(), ResyncError> {
        let (action, rkey) = match change {
            Change::Create { rkey } => (Action::Create, rkey),
            Change::Update { rkey } => (Action::Update, rkey),
            Change::Delete { rkey } => (Action::Delete, rkey),
        };
        let (cid, json) = match (action, record) {
            (Action::Delete, _) | (_, None) => (None, None),
            (_, Some((cid, json))) => (Some(cid), json),
        };
        let payload = RecordEvent {
            live: false,
            did: self.did.as_str(),
            rev: self.rev.as_deref().unwrap_or_default(),
            collection,
            rkey: &rkey,
            action,
            cid,
            record_json: json,
        }
        .payload();
        self.write.events.push(NewEvent {
            live: false,
            payload,
        });
        self.write.records.push(match cid {
            Some(cid) => RecordChange::Put {
                collection: collection.to_owned(),
                rkey,
                cid: cid.to_owned(),
            },
            None => RecordChange::Delete {
                collection: collection.to_owned(),
                rkey,
            },
        });
        if self.write.events.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ResyncError> {
        if self.write.events.is_empty() && self.write.records.is_empty() {
            return Ok(());
        }
        let write = std::mem::replace(&mut self.write, Self::empty_write(self.did, self.storage));
        self.engine.outbox().append(write).await?;
        crate::failpoint::hit("resync-batch-written");
        Ok(())
    }

    async fn finish(mut self) -> Result<(), ResyncError> {
        if !self.is_first_backfill() {
            self.finish_collection().await?;
            self.delete_vanished_collections().await?;
        }
        self.flush().await
    }
}

/// The record as atproto JSON; `None` if it cannot be transcoded (the event then carries
/// no record body, as for a record tap cannot read).
fn record_json(cbor: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(cbor.len() * 2);
    tap_atproto::record_to_json(cbor, &mut out)
        .ok()
        .and_then(|()| String::from_utf8(out).ok())
}

/// The cutover, under the repo's lock so no live commit interleaves: the buffer is read
/// a page at a time and each entry decided by [`Cutover`] (pure, in `repos::decide`);
/// applied commits go out as live events, and the repo becomes active at the last one
/// with an empty buffer, or goes straight back to desynchronized when the plan says the
/// snapshot missed a change (decisions.md row 4).
async fn cut_over(
    engine: &Engine,
    store: &Store,
    did: &Did,
    snapshot_rev: &str,
    snapshot_data: &str,
) -> Result<(), ResyncError> {
    let _guard = engine.locks().lock(did.as_str()).await;
    let mut plan = Cutover::new(snapshot_rev, snapshot_data);
    let mut done_with = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .buffered_commits(did.as_str(), after, CUTOVER_PAGE)
            .await?;
        let last_page = page.len() < CUTOVER_PAGE;
        for entry in page {
            after = entry.id;
            let decoded = serde_json::from_str::<Buffered>(&entry.data).map_err(|e| {
                tracing::warn!(%did, error = %e, "Dropping an unreadable resync buffer entry.");
                e.to_string()
            });
            match plan.step(decoded) {
                // Applying consumes its entry in the same transaction.
                CutoverStep::Apply(commit) => {
                    let applied = engine
                        .apply_commit(
                            did.as_str(),
                            &commit,
                            WriteCondition::RepoInState(RepoState::Resyncing),
                            vec![entry.id],
                        )
                        .await?;
                    if !applied {
                        return Err(ResyncError::Abandoned);
                    }
                    crate::failpoint::hit("cutover-buffered-applied");
                }
                CutoverStep::Drop => done_with.push(entry.id),
            }
        }
        if last_page {
            break;
        }
    }
    let (rev, data, resync_again) = plan.finish();
    let stale = resync_again.is_some();
    let mut done = RepoWrite::new(did.as_str());
    done.condition = WriteCondition::RepoInState(RepoState::Resyncing);
    done.repo = match resync_again {
        None => RepoChange::ResyncDone {
            rev,
            prev_data: data,
        },
        Some(reason) => {
            tracing::info!(%did, reason, "Repo changed during its resync; resyncing again.");
            RepoChange::ResyncStale {
                rev,
                prev_data: data,
                reason,
            }
        }
    };
    done.resync_buffer_delete = done_with;
    engine.outbox().append(done).await?;
    if stale {
        store.resync_wanted().notify_waiters();
    }
    Ok(())
}
