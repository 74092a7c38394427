//! Record proofs: the CAR `com.atproto.sync.getRecord` returns (the signed head commit,
//! the MST nodes on the record's path, and the record when it exists). A proof that
//! verifies says what the repo's owner signed for one key at the head's rev: this CID
//! (with the record's bytes), or nothing there.

use bytes::Bytes;
use cid::Cid;

use crate::car::{Car, CarError};
use crate::commit::{Commit, CommitError};
use crate::crypto::PublicKey;
use crate::hash::BlockMap;
use crate::mst::{Mst, MstError};
use crate::syntax::Did;

/// Why a proof does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// The CAR does not read (or a block does not hash to its CID).
    #[error("proof CAR: {0}")]
    Car(#[from] CarError),
    /// The CAR names no root.
    #[error("proof CAR has no root")]
    NoRoot,
    /// The root commit block is not in the CAR.
    #[error("proof CAR lacks its commit block")]
    MissingCommit,
    /// The commit is malformed or its signature fails.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The commit is another repo's.
    #[error("proof commit is for {commit}, not {expected}")]
    WrongRepo {
        /// DID in the commit.
        commit: String,
        /// DID asked about.
        expected: String,
    },
    /// A node on the key's path is missing or invalid.
    #[error("proof path: {0}")]
    Mst(#[from] MstError),
    /// The tree holds a CID for the key but the CAR lacks that record.
    #[error("proof lacks the record block {0}")]
    MissingRecord(Cid),
}

impl ProofError {
    /// Whether the commit signature failed (the key may have rotated: look it up again).
    #[must_use]
    pub fn is_signature(&self) -> bool {
        matches!(self, Self::Commit(CommitError::Signature(_)))
    }
}

/// What a verified proof says about one key.
#[derive(Debug, Clone)]
pub struct ProvenRecord {
    /// The signed head commit the proof hangs from.
    pub commit: Commit,
    /// The record at the key: its CID and bytes, or `None` when the key is absent.
    pub record: Option<(Cid, Bytes)>,
}

/// Verifies a `getRecord` proof for `path` (`collection/rkey`) in `did`'s repo, signed by
/// `key`.
///
/// # Errors
/// [`ProofError`] when anything in it fails to check.
pub fn verify_record_proof(
    car: &Car,
    did: &Did,
    path: &str,
    key: &PublicKey,
) -> Result<ProvenRecord, ProofError> {
    let root = car.roots.first().ok_or(ProofError::NoRoot)?;
    let bytes = car.blocks.get(root).ok_or(ProofError::MissingCommit)?;
    let commit = Commit::decode(bytes)?;
    if commit.did != *did {
        return Err(ProofError::WrongRepo {
            commit: commit.did.to_string(),
            expected: did.to_string(),
        });
    }
    commit.verify_signature(key)?;
    let record = match Mst::load(commit.data).get(path.as_bytes(), &car.blocks)? {
        None => None,
        Some(cid) => {
            let bytes = car.blocks.get(&cid).ok_or(ProofError::MissingRecord(cid))?;
            Some((cid, bytes.clone()))
        }
    };
    Ok(ProvenRecord { commit, record })
}

/// The blocks a proof of `path` needs from a repo whose head commit is `commit`: the
/// commit, every node the lookup visits, and the record when present (what a PDS puts in
/// its `getRecord` answer; used by test fakes and tools).
///
/// # Errors
/// [`ProofError`] when `blocks` lacks something the proof needs.
pub fn record_proof_blocks(
    commit: &Cid,
    blocks: &BlockMap,
    path: &str,
) -> Result<Vec<Cid>, ProofError> {
    let head = Commit::decode(blocks.get(commit).ok_or(ProofError::MissingCommit)?)?;
    let seen = Visited {
        blocks,
        cids: std::cell::RefCell::new(vec![*commit]),
    };
    if let Some(cid) = Mst::load(head.data).get(path.as_bytes(), &seen)? {
        if blocks.get(&cid).is_none() {
            return Err(ProofError::MissingRecord(cid));
        }
        seen.cids.borrow_mut().push(cid);
    }
    Ok(seen.cids.into_inner())
}

/// A block source that remembers what was read from it.
struct Visited<'a> {
    blocks: &'a BlockMap,
    cids: std::cell::RefCell<Vec<Cid>>,
}

impl crate::hash::BlockSource for Visited<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        let found = self.blocks.get(cid)?;
        self.cids.borrow_mut().push(*cid);
        Some(found)
    }
}
