//! Sparse and incremental fetches: only what the filters want, or only what changed,
//! verified as strictly as a whole repo.
//!
//! The PDS's head commit comes through `getBlocks` (or with the blocks written since tap's
//! rev, from `getRepo?since=`) and must carry a valid signature by the repo's key; then the
//! MST nodes whose key intervals meet the wanted collections, level by level
//! (`mst::walk_ranges` says which, and checks every node it visits), except subtrees the
//! record index proves unchanged (`mst::walk_ranges_reusing`); then the wanted records
//! whose CIDs the index does not already hold. Every block is hash-checked against its CID by the CAR reader, and a block the
//! PDS does not return is a refusal, never a gap. Nothing is handed on until all of it
//! checks out, so a failure here writes nothing and the worker can fall back to a full
//! fetch.

use tap_atproto::commit::Commit;
use tap_atproto::hash::BlockMap;
use tap_atproto::mst::{KeyRange, KnownKeys, SparseWalk, walk_ranges, walk_ranges_reusing};
use tap_atproto::syntax::{Did, Tid};
use tap_atproto::{Cid, PublicKey};
use url::Url;

use super::fetch::{FetchError, LatestCommit, PdsClient};

/// Most CIDs asked for in one `getBlocks` (the URL stays well under common limits).
pub const BLOCKS_PER_CALL: usize = 100;
/// Most bytes one sparse fetch holds in memory. A selection this large is better served
/// by the streaming full fetch, which the worker falls back to.
pub const SPARSE_MEMORY: u64 = 64 << 20;
/// Most rounds of node fetching (the MST of any real repo is far shallower).
const MAX_LEVELS: usize = 64;

/// A verified sparse snapshot: the signed commit and the wanted records in key order.
#[derive(Debug)]
pub struct SparseRepo {
    /// The verified head commit.
    pub commit: Commit,
    /// `(collection/rkey, cid, record bytes)` in key order; no bytes for a record the
    /// record index already holds with that CID (it was not fetched).
    pub records: Vec<(String, Cid, Option<bytes::Bytes>)>,
}

/// Where a fetch starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The head `getLatestCommit` named, its commit fetched with `getBlocks`.
    Head(LatestCommit),
    /// `getRepo?since=<rev>` from the rev tap holds: the new commit with the blocks the PDS
    /// wrote after it.
    Since(Tid),
}

/// Why a sparse fetch gave up.
#[derive(Debug, thiserror::Error)]
pub enum SparseError {
    /// The PDS could not be asked (rate limit, network, status): the same as for a full
    /// fetch.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// What the PDS returned does not check out (missing or lying blocks, a bad signature,
    /// an invalid tree): the repo is fetched whole instead.
    #[error("sparse fetch refused: {0}")]
    Refused(String),
    /// The selection is too large to hold; the streaming full fetch is used instead.
    #[error("sparse selection larger than its byte budget")]
    TooLarge,
}

/// What a sparse fetch cost, and what it may cost.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Body bytes downloaded.
    pub bytes: u64,
    /// Most bytes it may download: [`SPARSE_MEMORY`], or less under `--max-repo-bytes`.
    pub limit: u64,
}

impl Cost {
    /// Nothing spent yet, at most `max_repo_bytes` (and [`SPARSE_MEMORY`]) to spend.
    #[must_use]
    pub fn within(max_repo_bytes: u64) -> Self {
        Self {
            bytes: 0,
            limit: SPARSE_MEMORY.min(max_repo_bytes),
        }
    }
}

/// What a partial fetch asks for.
#[derive(Debug)]
pub struct Partial {
    /// Where it starts.
    pub start: Start,
    /// The wanted key ranges.
    pub ranges: Vec<KeyRange>,
    /// The record index of a copy tap verified under the same filters, when the fetch may
    /// rely on it: subtrees and records it proves unchanged are not fetched.
    pub known: Option<KnownKeys>,
}

/// Fetches the parts of `did`'s repo that `partial` asks for.
///
/// # Errors
/// [`SparseError`]; `cost` holds what was downloaded whatever the outcome.
pub async fn fetch(
    pds: &PdsClient,
    pds_url: &Url,
    did: &Did,
    key: &PublicKey,
    partial: &Partial,
    cost: &mut Cost,
) -> Result<SparseRepo, SparseError> {
    let Partial {
        start,
        ranges,
        known,
    } = partial;
    let (start, known) = (*start, known.as_ref());
    let mut have = BlockMap::default();
    let head = match start {
        Start::Head(head) => head.cid,
        Start::Since(rev) => {
            let budget = cost.limit.saturating_sub(cost.bytes);
            let answer = pds
                .get_repo_since(pds_url, did, &rev, budget)
                .await
                .map_err(refusal)?;
            cost.bytes += answer.bytes;
            have = answer.value.blocks;
            *answer
                .value
                .roots
                .first()
                .ok_or_else(|| SparseError::Refused("since CAR names no commit".into()))?
        }
    };
    if !have.contains_key(&head) {
        // `since` at the head gives a CAR without even the commit.
        fetch_blocks(pds, pds_url, did, &[head], &mut have, cost).await?;
    }
    let commit = verified_commit(&have, &head, did, key)?;
    if let Start::Since(rev) = start
        && commit.rev < rev
    {
        return Err(SparseError::Refused(format!(
            "since CAR's commit {} is older than {rev}",
            commit.rev
        )));
    }

    let mut levels = 0;
    let found = loop {
        let walk = match known {
            Some(known) => walk_ranges_reusing(&commit.data, ranges, &have, known).map(|w| w.walk),
            None => walk_ranges(&commit.data, ranges, &have),
        };
        match walk.map_err(|e| SparseError::Refused(format!("MST: {e}")))? {
            SparseWalk::Complete(found) => break found,
            SparseWalk::Missing(cids) => {
                levels += 1;
                if levels > MAX_LEVELS {
                    return Err(SparseError::Refused("MST deeper than any real repo".into()));
                }
                fetch_blocks(pds, pds_url, did, &cids, &mut have, cost).await?;
            }
        }
    };
    let unchanged =
        |path: &str, cid: &Cid| known.is_some_and(|k| k.get(path.as_bytes()) == Some(cid));
    let mut wanted: Vec<Cid> = found
        .iter()
        .filter(|(path, cid)| !unchanged(path, cid) && !have.contains_key(cid))
        .map(|(_, cid)| *cid)
        .collect();
    wanted.sort_by_key(Cid::to_bytes);
    wanted.dedup();
    fetch_blocks(pds, pds_url, did, &wanted, &mut have, cost).await?;
    let records = found
        .into_iter()
        .map(|(path, cid)| {
            if unchanged(&path, &cid) {
                return Ok((path, cid, None));
            }
            let bytes = have
                .get(&cid)
                .cloned()
                .ok_or_else(|| SparseError::Refused(format!("record {cid} not returned")))?;
            Ok((path, cid, Some(bytes)))
        })
        .collect::<Result<_, SparseError>>()?;
    Ok(SparseRepo { commit, records })
}

/// The commit `cid` from `have`, for `did`, signed with `key`.
fn verified_commit(
    have: &BlockMap,
    cid: &Cid,
    did: &Did,
    key: &PublicKey,
) -> Result<Commit, SparseError> {
    let bytes = have
        .get(cid)
        .ok_or_else(|| SparseError::Refused(format!("commit {cid} not returned")))?;
    let commit =
        Commit::decode(bytes).map_err(|e| SparseError::Refused(format!("commit {cid}: {e}")))?;
    if commit.did != *did {
        return Err(SparseError::Refused(format!(
            "commit is for {}, not {did}",
            commit.did
        )));
    }
    commit
        .verify_signature(key)
        .map_err(|e| SparseError::Refused(format!("commit signature: {e}")))?;
    Ok(commit)
}

/// Whether a failed call may succeed if repeated later (then the resync is retried, not
/// redone in full).
fn is_passing(e: &FetchError) -> bool {
    match e {
        FetchError::RateLimited { .. } | FetchError::Transport { .. } => true,
        FetchError::Status { status, .. } => *status >= 500 || *status == 408,
        _ => false,
    }
}

/// What a failed call means for the fetch: a passing fault or a rate limit ends the attempt
/// as it would a full fetch; anything else is the PDS refusing or lying, and the whole repo
/// is fetched instead, now.
fn refusal(e: FetchError) -> SparseError {
    match e {
        // An answer over the budget ends the sparse attempt, not the resync.
        FetchError::TooLarge { .. } => SparseError::TooLarge,
        // A block that does not hash, or a CAR that does not read: the PDS lied.
        e @ FetchError::Malformed { .. } => SparseError::Refused(e.to_string()),
        // `Could not find cids` (a block the tree needs is not there), the call not
        // implemented, or any other refusal that is not a passing fault.
        e @ (FetchError::Unsupported { .. }
        | FetchError::Refused { .. }
        | FetchError::Status { .. })
            if !is_passing(&e) =>
        {
            SparseError::Refused(e.to_string())
        }
        e => SparseError::Fetch(e),
    }
}

/// Fetches `cids` in batches into `have`; every one must come back.
async fn fetch_blocks(
    pds: &PdsClient,
    pds_url: &Url,
    did: &Did,
    cids: &[Cid],
    have: &mut BlockMap,
    cost: &mut Cost,
) -> Result<(), SparseError> {
    for batch in cids.chunks(BLOCKS_PER_CALL) {
        let budget = cost.limit.saturating_sub(cost.bytes);
        if budget == 0 {
            return Err(SparseError::TooLarge);
        }
        let answer = pds
            .get_blocks(pds_url, did, batch, budget)
            .await
            .map_err(refusal)?;
        cost.bytes += answer.bytes;
        let mut blocks = answer.value;
        for cid in batch {
            let block = blocks
                .remove(cid)
                .ok_or_else(|| SparseError::Refused(format!("block {cid} not returned")))?;
            have.insert(*cid, block);
        }
    }
    Ok(())
}
