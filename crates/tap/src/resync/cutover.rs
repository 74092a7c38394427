//! The end of a resync: the live commits buffered meanwhile are replayed or dropped as
//! [`Cutover`] decides, and the repo becomes active (or desynchronized again) in the same
//! transaction as the last of them, with a note of how the repo was fetched.

use tap_atproto::syntax::{Did, Tid};

use super::ResyncError;
use crate::repos::decide::{Cutover, CutoverStep};
use crate::repos::engine::Engine;
use crate::repos::prepared::Buffered;
use crate::store::{LastFetch, RepoChange, RepoState, RepoWrite, Store, WriteCondition};

/// Buffered live commits read per page at the cutover.
const CUTOVER_PAGE: usize = 500;

/// The cutover, under the repo's lock so no live commit interleaves: the buffer is read
/// a page at a time and each entry decided by [`Cutover`] (pure, in `repos::decide`);
/// applied commits go out as live events, and the repo becomes active at the last one
/// with an empty buffer, or goes straight back to desynchronized when the plan says the
/// snapshot missed a change (decisions.md row 4).
pub(super) async fn cut_over(
    engine: &Engine,
    store: &Store,
    did: &Did,
    snapshot_rev: &str,
    snapshot_data: &str,
    fetch: LastFetch,
) -> Result<(), ResyncError> {
    let _guard = engine.locks().lock(did.as_str()).await;
    let mut plan = Cutover::new(snapshot_rev, snapshot_data);
    let mut done_with = Vec::new();
    let mut after = 0;
    // A buffered commit changed what other records' rules read: the snapshot's view is
    // stale for them, so the repo is resynced again rather than activated.
    let mut refilter = false;
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
                            did,
                            &commit,
                            WriteCondition::RepoInState(RepoState::Resyncing),
                            vec![entry.id],
                        )
                        .await?;
                    if !applied.written {
                        return Err(ResyncError::Abandoned);
                    }
                    refilter |= applied.refilter;
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
    let resync_again =
        resync_again.or_else(|| refilter.then(|| crate::repos::rules::REFILTER.to_owned()));
    let rev =
        Tid::new(&rev).map_err(|e| ResyncError::Failed(format!("cutover rev {rev:?}: {e}")))?;
    let stale = resync_again.is_some();
    let mut done = RepoWrite::new(did.clone());
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
    done.fetch = Some(fetch);
    engine.outbox().append(done).await?;
    if stale {
        store.resync_wanted().notify_waiters();
    }
    Ok(())
}
