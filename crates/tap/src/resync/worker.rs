//! The resync workers: claim a repo, fetch and verify it, hand the walk to the snapshot,
//! cut over; record a failure with its class so the retry policy can tell a verdict from a
//! passing fault.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tap_atproto::Cid;
use tap_atproto::mst::{KeyRange, KnownKeys};
use tap_atproto::stream::{RepoWalker, WalkLimits};
use tap_atproto::syntax::Did;
use tokio_util::sync::CancellationToken;

use super::cutover::cut_over;
use super::fetch::LatestCommit;
use super::fetch::{FetchError, PdsClient};
use super::snapshot::Snapshot;
use super::sparse::{self, Partial, SparseError, Start};
use super::strategy::{self, Fetch};
use super::{IDLE_POLL, ResyncError, ResyncSettings, WALK_MEMORY_BUDGET};
use crate::repos::engine::Engine;
use crate::repos::filter::Scope;
use crate::repos::filter::widens;
use crate::repos::handle_checks::HandleChecks;
use crate::repos::live_filters::{RULES_CHANGED, WIDENED};
use crate::repos::rules::{self, REFILTER};
use crate::shutdown::Supervisor;
use crate::status::Progress;
use crate::store::{EventStorage, FetchKind, LastFetch, RepoRow, ResyncFailure, Store};
use crate::telemetry as t;

/// Starts the workers; they stop claiming when `intake` is cancelled and abandon a resync
/// in progress (the repo is reset at the next start).
pub fn spawn(
    settings: &ResyncSettings,
    pds: Arc<PdsClient>,
    engine: Engine,
    store: Store,
    progress: &Arc<Progress>,
    supervisor: &Supervisor,
    intake: CancellationToken,
) {
    let handles = HandleChecks::spawn(&engine, supervisor, &intake);
    for _ in 0..settings.parallelism.max(1) {
        supervisor.spawn(
            "resync worker",
            run_worker(
                Worker {
                    engine: engine.clone(),
                    store: store.clone(),
                    pds: Arc::clone(&pds),
                    handles: handles.clone(),
                    settings: settings.clone(),
                    progress: Arc::clone(progress),
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
    pds: Arc<PdsClient>,
    handles: HandleChecks,
    settings: ResyncSettings,
    progress: Arc<Progress>,
}

/// Most index records an incremental fetch reads into memory (~160 bytes each, per
/// worker); a larger repo is fetched without relying on its index.
const MAX_KNOWN_KEYS: usize = 250_000;
/// Index rows read per page when loading it.
const KNOWN_PAGE: usize = 5000;

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
        let scope_at_start = worker.engine.scope();
        let started = std::time::Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => Err(ResyncError::Stopped),
            r = resync_repo(&worker, &repo) => r,
        };
        // A repo put off for its busy host was not an attempt.
        if !matches!(result, Err(ResyncError::HostBusy(_))) {
            metrics::counter!(t::RESYNCS_STARTED).increment(1);
            metrics::histogram!(t::RESYNC_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        }
        let failure = match result {
            Ok(records) => {
                metrics::counter!(t::RESYNCS_COMPLETED).increment(1);
                worker.progress.resync_done(records);
                // Filters widened or rules changed while this fetch ran: it missed the new
                // collections or judged by old rules (the change marked only repos at
                // rest), so fetch again.
                let now = worker.engine.scope();
                let reason = if widens(scope_at_start.filters(), now.filters()) {
                    WIDENED
                } else {
                    RULES_CHANGED
                };
                if scope_at_start.refetch_for(&now)
                    && let Err(error) = worker.store.mark_desynchronized(did.as_str(), reason).await
                {
                    tracing::warn!(%error, %did, reason, "Failed to queue a re-fetch for changed filters.");
                }
                tracing::info!(%did, records, elapsed = ?started.elapsed(), "Resync complete.");
                requeue_if_forced(store, &did).await;
                continue;
            }
            Err(ResyncError::Stopped) => return,
            Err(ResyncError::Abandoned) => {
                tracing::info!(%did, "Repo removed during its resync; stopped.");
                continue;
            }
            Err(ResyncError::HostBusy(host)) => {
                // The repo waits a few seconds, and this worker until some host has room
                // (or a poll passes), so a queue of one busy host's repos is not claimed and
                // put back in a tight loop.
                metrics::counter!(t::RESYNCS_HOST_BUSY).increment(1);
                tracing::debug!(%did, %host, "PDS host full; the repo waits its turn.");
                if !record_failure(store, &did, &ResyncFailure::HostBusy, &stop).await {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = worker.progress.host_freed() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
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
        if !record_failure(store, &did, &failure, &stop).await {
            return;
        }
    }
}

/// Records `failure` for `did`. Until it is recorded the repo stays `resyncing`, which
/// nothing else claims: keeps trying rather than leave it stuck until a restart. `false`
/// when tap is stopping.
async fn record_failure(
    store: &Store,
    did: &Did,
    failure: &ResyncFailure,
    stop: &CancellationToken,
) -> bool {
    loop {
        match store
            .mark_resync_failed(
                did.as_str(),
                failure.clone(),
                now_unix(),
                rand::random::<u64>() % 60_000,
            )
            .await
        {
            Ok(()) => {
                requeue_if_forced(store, did).await;
                return true;
            }
            Err(error) if error.is_closed() => return false,
            Err(error) => {
                tracing::warn!(%did, %error, "Failed to record a resync failure; retrying.");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

/// A forced resync asked while this worker held the repo: the fetch it just finished was
/// planned before the request (it may have trusted the held copy), so queue the full one.
async fn requeue_if_forced(store: &Store, did: &Did) {
    if store.take_forced(did.as_str())
        && let Err(error) = store.request_resync(&[did.to_string()]).await
    {
        tracing::warn!(%error, %did, "Failed to queue the forced resync asked during a resync.");
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
        progress,
    } = worker;
    let did = &repo.did;
    let per_host = u32::try_from(settings.per_host).unwrap_or(u32::MAX);
    // A repo bounced off a full host keeps its identity cached: look before fetching the
    // DID document again, so waiting for a busy host costs no PLC request.
    if let Some(pds) = engine.identity().cached_pds(did).await {
        let host = super::fetch::host_of(&pds);
        if progress.host_full(&host, per_host) {
            return Err(ResyncError::HostBusy(host));
        }
    }
    // Key and PDS fetched now, from the DID document alone (a rotated key or a moved PDS
    // takes effect here); the handle is checked apart and announced when it is known.
    let ident = engine.identity().refresh_repo(did).await?;
    let key = ident.require_signing_key()?.clone();
    let pds_url = ident.require_pds()?.clone();
    let host = super::fetch::host_of(&pds_url);
    let Some(_busy) = progress.try_resync_on(&host, per_host) else {
        return Err(ResyncError::HostBusy(host));
    };
    handles.submit(did.clone()).await;
    // With nothing indexed, every record is a create that the repo itself can produce
    // again, so the events need not be stored one by one (decisions in
    // docs/architecture.md, "Write volume").
    let indexed = !store.records_page(did.as_str(), None, 1).await?.is_empty();
    let storage = if settings.in_memory_backfill && !indexed {
        EventStorage::InMemoryBackfill
    } else {
        EventStorage::Durable
    };
    // An index without a rev is a backfill whose in-memory events may not all have been
    // acked before a crash (`Store::reset_undelivered_backfills`): the consumer may lack
    // any record, and may hold ones deleted since. Re-emit every record, delete the rest.
    let replay = indexed && repo.rev.is_none();

    // One scope for the whole resync: the worker fetches again if it changes meanwhile.
    let scope = engine.scope();
    let filters = scope.fingerprint();
    // A live change the rules could not settle: the head may not have moved, but what is
    // delivered must be recomputed.
    let refilter = repo.error == REFILTER;
    let plan = strategy::plan(
        settings.fetch_strategy,
        scope.key_ranges(),
        pds.lacks_sparse(&pds_url),
        strategy::holds_verified_copy(repo, replay, &filters),
    );
    let mut spent = 0;
    let head = if plan.ask_head {
        match pds.latest_commit(&pds_url, did).await {
            Ok(head) => {
                spent += head.bytes;
                Some(head.value)
            }
            // A PDS that cannot answer is asked for the whole repo instead (a host that
            // lacks the call is remembered by the client); only a passing fault (rate
            // limit, network) ends the attempt, since `getRepo` would meet it too.
            Err(e @ (FetchError::RateLimited { .. } | FetchError::Transport { .. })) => {
                return Err(e.into());
            }
            Err(error) => {
                tracing::debug!(%did, %error, "No head from the PDS; fetching the whole repo.");
                None
            }
        }
    } else {
        None
    };
    if let (Some(head), Some(data)) = (&head, &repo.prev_data)
        && !refilter
        && strategy::unchanged(repo, replay, head, &filters)
    {
        // Buffered live commits still go through the cutover's checks.
        let fetch = fetch_note(FetchKind::Skipped, spent, &filters);
        cut_over(engine, store, did, head.rev.as_str(), data, fetch).await?;
        return Ok(0);
    }

    let mut sink = Snapshot::new(
        engine,
        did,
        repo.rev,
        storage,
        replay,
        Arc::clone(&scope),
        settings.max_repo_bytes.saturating_mul(2),
    );
    if let Some((partial, kind)) = partial_fetch(store, repo, head, plan.fetch, &scope).await? {
        let mut cost = sparse::Cost::within(settings.max_repo_bytes);
        // One budget for the whole fetch, as for a full one: many slow calls must not hold
        // a worker longer than one slow `getRepo` could.
        let fetched = tokio::time::timeout(
            settings.fetch_timeout,
            sparse::fetch(pds, &pds_url, did, &key, &partial, &mut cost),
        )
        .await
        .unwrap_or_else(|_| {
            Err(SparseError::Fetch(FetchError::Transport {
                method: "com.atproto.sync.getBlocks",
                host: super::fetch::host_of(&pds_url),
                reason: "the repo fetch timeout ran out".into(),
            }))
        });
        spent += cost.bytes;
        match fetched {
            Ok(snapshot) => {
                let rev = snapshot.commit.rev;
                sink.set_rev(rev.as_str())?;
                for (path, cid, bytes) in &snapshot.records {
                    sink.record(&rev, path, cid, bytes.as_deref()).await?;
                }
                sink.finish().await?;
                let data = snapshot.commit.data.to_string();
                let fetch = fetch_note(kind, spent, &filters);
                cut_over(engine, store, did, rev.as_str(), &data, fetch).await?;
                return Ok(snapshot.records.len() as u64);
            }
            Err(SparseError::Fetch(e)) => return Err(e.into()),
            // Nothing was handed on: the whole repo, verified as always, decides.
            Err(refused) => {
                metrics::counter!(t::SPARSE_FALLBACKS, "kind" => kind.as_str()).increment(1);
                tracing::warn!(%did, kind = kind.as_str(), reason = %refused,
                    "Partial fetch refused; fetching the whole repo.");
            }
        }
    }

    let mut body = pds.get_repo(&pds_url, did).await?;
    let mut limits = WalkLimits {
        memory_budget: WALK_MEMORY_BUDGET,
        spill_budget: Some(settings.spill_budget.clone()),
        ..WalkLimits::default()
    };
    limits.car.max_total_bytes = settings.max_repo_bytes;
    let mut walker = RepoWalker::new(Some(did.clone()), Some(key), limits);
    loop {
        let Some(chunk) = body.chunk().await? else {
            break;
        };
        walker.push(&chunk)?;
        sink.drain(&mut walker).await?;
    }
    walker.finish()?;
    sink.drain(&mut walker).await?;
    let (rev, data) = match walker.commit() {
        Some(c) => (c.rev.as_str().to_owned(), c.data.to_string()),
        None => return Err(ResyncError::Failed("repo CAR has no commit".into())),
    };
    sink.set_rev(&rev)?;
    let records = walker.records_emitted();
    sink.finish().await?;
    let fetch = fetch_note(FetchKind::Full, spent + body.bytes_read(), &filters);
    cut_over(engine, store, did, &rev, &data, fetch).await?;
    Ok(records)
}

/// Turns the plan into a partial fetch and the kind it will be noted as, reading the
/// record index when the fetch may rely on it; `None`: fetch the whole repo (no head was
/// learned, the plan says so, or an incremental fetch has no usable index).
async fn partial_fetch(
    store: &Store,
    repo: &RepoRow,
    head: Option<LatestCommit>,
    fetch: Fetch,
    scope: &Scope,
) -> Result<Option<(Partial, FetchKind)>, ResyncError> {
    let Some(head) = head else {
        return Ok(None);
    };
    let (start, ranges, reuse, kind) = match (fetch, repo.rev) {
        (Fetch::Full, _) | (Fetch::Since, None) => return Ok(None),
        (Fetch::Since, Some(rev)) => (
            Start::Since(rev),
            vec![KeyRange::prefix(b"")],
            true,
            FetchKind::Since,
        ),
        (Fetch::Sparse { ranges, reuse }, _) => {
            (Start::Head(head), ranges, reuse, FetchKind::Sparse)
        }
    };
    let known = if reuse {
        known_keys(store, &repo.did, &ranges, |c| {
            !rules::must_download(scope.rules(), c)
        })
        .await?
    } else {
        None
    };
    if kind == FetchKind::Since && known.is_none() {
        return Ok(None); // a diff cannot be checked without the index
    }
    let partial = Partial {
        start,
        ranges,
        known,
    };
    Ok(Some((partial, kind)))
}

/// The record index of `did` inside `ranges`, for an incremental fetch to rely on, left
/// out the collections `reuse` refuses (their records are downloaded whatever the index
/// says: the record-content rules must read them); `None` when it holds more than
/// [`MAX_KNOWN_KEYS`] records (those repos are fetched without it) or a CID that does
/// not parse.
async fn known_keys(
    store: &Store,
    did: &Did,
    ranges: &[KeyRange],
    reuse: impl Fn(&str) -> bool,
) -> Result<Option<KnownKeys>, ResyncError> {
    let mut entries = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .records_page(did.as_str(), after.take(), KNOWN_PAGE)
            .await?;
        let last = page.len() < KNOWN_PAGE;
        for row in page {
            let path = format!("{}/{}", row.collection, row.rkey).into_bytes();
            if reuse(&row.collection) && ranges.iter().any(|r| r.contains(&path)) {
                let Ok(cid) = Cid::try_from(row.cid.as_str()) else {
                    return Ok(None);
                };
                entries.push((path, cid));
            }
            after = Some((row.collection, row.rkey));
        }
        if entries.len() > MAX_KNOWN_KEYS {
            return Ok(None);
        }
        if last {
            break;
        }
    }
    Ok(KnownKeys::new(entries).ok())
}

/// How the repo was fetched (noted on its row by the cutover, for `/info/{did}` and the
/// next resync's plan), counted in the metrics now.
fn fetch_note(kind: FetchKind, bytes: u64, filters: &str) -> LastFetch {
    metrics::counter!(t::RESYNC_FETCHES, "kind" => kind.as_str()).increment(1);
    LastFetch {
        kind,
        bytes,
        at: now_unix(),
        filters: filters.to_owned(),
    }
}
