//! Firehose (`com.atproto.sync.subscribeRepos`) frames: header `{op, t}` + body decoding for
//! `#commit`, `#sync`, `#identity`, `#account`, `#info` and error frames, with size limits;
//! and [`verify_commit_frame`], the whole Sync 1.1 check of one commit.

use bytes::Bytes;
use cid::Cid;
use serde::Deserialize;

use crate::car::{self, CarError, CarLimits};
use crate::cbor::{CborError, Reader};
use crate::commit::{Commit, CommitError};
use crate::crypto::PublicKey;
use crate::hash::BlockMap;
use crate::mst::{self, MstError, OpAction, TreeOp};
use crate::syntax::{self, Did, Nsid, RecordKey, SyntaxError, Tid};

/// Size caps on one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest whole frame.
    pub max_frame_bytes: usize,
    /// Largest `blocks` CAR slice.
    pub max_blocks_bytes: usize,
    /// Most ops in one commit.
    pub max_ops: usize,
    /// Largest record block.
    pub max_record_bytes: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 5 << 20,
            max_blocks_bytes: 2 << 20,
            max_ops: 200,
            max_record_bytes: 1 << 20,
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Malformed header.
    #[error("malformed frame header: {0}")]
    Header(#[from] CborError),
    /// The header's `op` is neither 1 nor -1, or `t` is missing.
    #[error("malformed frame header: {0}")]
    BadHeader(&'static str),
    /// The body does not match its type.
    #[error("malformed {t} body: {reason}")]
    Body {
        /// The frame type.
        t: &'static str,
        /// Decoder message.
        reason: String,
    },
    /// A field has invalid syntax.
    #[error("invalid field: {0}")]
    Syntax(#[from] SyntaxError),
    /// The frame or one of its parts exceeds [`FrameLimits`].
    #[error("frame exceeds limit: {0}")]
    TooLarge(&'static str),
}

/// One repo operation as listed in a `#commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoOp {
    /// `create`, `update` or `delete`.
    pub action: OpKind,
    /// `collection/rkey`.
    pub path: String,
    /// New record CID (create/update).
    pub cid: Option<Cid>,
    /// Previous record CID (update/delete; Sync 1.1).
    pub prev: Option<Cid>,
}

/// The kind of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// New record.
    Create,
    /// Changed record.
    Update,
    /// Removed record.
    Delete,
}

impl OpKind {
    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// A `#commit` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitFrame {
    /// Relay sequence number.
    pub seq: i64,
    /// The repo's DID.
    pub repo: Did,
    /// CID of the commit block.
    pub commit: Cid,
    /// Revision of this commit.
    pub rev: Tid,
    /// Revision of the previous commit, if given.
    pub since: Option<String>,
    /// CAR slice with the commit, the changed MST nodes (the proof) and new records.
    pub blocks: Bytes,
    /// Operations.
    pub ops: Vec<RepoOp>,
    /// Blob CIDs referenced by new records.
    pub blobs: Vec<Cid>,
    /// MST root before this commit (Sync 1.1).
    pub prev_data: Option<Cid>,
    /// Timestamp string.
    pub time: String,
    /// Deprecated: the commit was too big to include.
    pub too_big: bool,
    /// Deprecated rebase flag.
    pub rebase: bool,
}

/// A `#sync` message (repo state reset to a new commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFrame {
    /// Relay sequence number.
    pub seq: i64,
    /// The repo's DID.
    pub did: Did,
    /// CAR slice holding the commit block.
    pub blocks: Bytes,
    /// Revision of the commit.
    pub rev: Tid,
    /// Timestamp string.
    pub time: String,
}

/// An `#identity` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFrame {
    /// Relay sequence number.
    pub seq: i64,
    /// The DID whose identity changed.
    pub did: Did,
    /// Timestamp string.
    pub time: String,
    /// New handle as sent (unvalidated; may be absent).
    pub handle: Option<String>,
}

/// An `#account` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountFrame {
    /// Relay sequence number.
    pub seq: i64,
    /// The account's DID.
    pub did: Did,
    /// Timestamp string.
    pub time: String,
    /// Whether the account is active.
    pub active: bool,
    /// Status when inactive (`takendown`, `suspended`, `deleted`, `deactivated`, ...).
    pub status: Option<String>,
}

/// An `#info` message (e.g. `OutdatedCursor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoFrame {
    /// Info name.
    pub name: String,
    /// Optional text.
    pub message: Option<String>,
}

/// An error frame (`op = -1`); the relay closes the stream after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Error name (`FutureCursor`, `ConsumerTooSlow`, ...).
    pub error: String,
    /// Optional text.
    pub message: Option<String>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `#commit`.
    Commit(Box<CommitFrame>),
    /// `#sync`.
    Sync(SyncFrame),
    /// `#identity`.
    Identity(IdentityFrame),
    /// `#account`.
    Account(AccountFrame),
    /// `#info`.
    Info(InfoFrame),
    /// `op = -1`.
    Error(ErrorFrame),
    /// A message type this version does not know (skip and count it).
    Unknown {
        /// The `t` value.
        t: String,
    },
}

impl Frame {
    /// The sequence number, for frames that have one.
    #[must_use]
    pub fn seq(&self) -> Option<i64> {
        match self {
            Self::Commit(c) => Some(c.seq),
            Self::Sync(s) => Some(s.seq),
            Self::Identity(i) => Some(i.seq),
            Self::Account(a) => Some(a.seq),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Deserialize)]
struct CommitBody<'a> {
    seq: i64,
    #[serde(default)]
    rebase: bool,
    #[serde(rename = "tooBig", default)]
    too_big: bool,
    repo: &'a str,
    commit: Cid,
    rev: &'a str,
    #[serde(default)]
    since: Option<&'a str>,
    #[serde(with = "serde_bytes")]
    blocks: &'a [u8],
    ops: Vec<OpBody<'a>>,
    #[serde(default)]
    blobs: Vec<Cid>,
    #[serde(rename = "prevData", default)]
    prev_data: Option<Cid>,
    time: &'a str,
}

#[derive(Debug, PartialEq, Deserialize)]
struct OpBody<'a> {
    action: &'a str,
    path: &'a str,
    cid: Option<Cid>,
    #[serde(default)]
    prev: Option<Cid>,
}

#[derive(Deserialize)]
struct SyncBody<'a> {
    seq: i64,
    did: &'a str,
    #[serde(with = "serde_bytes")]
    blocks: &'a [u8],
    rev: &'a str,
    time: &'a str,
}

#[derive(Deserialize)]
struct IdentityBody<'a> {
    seq: i64,
    did: &'a str,
    time: &'a str,
    #[serde(default)]
    handle: Option<&'a str>,
}

#[derive(Deserialize)]
struct AccountBody<'a> {
    seq: i64,
    did: &'a str,
    time: &'a str,
    active: bool,
    #[serde(default)]
    status: Option<&'a str>,
}

#[derive(Deserialize)]
struct InfoBody<'a> {
    name: &'a str,
    #[serde(default)]
    message: Option<&'a str>,
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(default)]
    message: Option<&'a str>,
}

fn body<'a, T: Deserialize<'a>>(t: &'static str, buf: &'a [u8]) -> Result<T, FrameError> {
    let mut de = serde_ipld_dagcbor::de::Deserializer::from_slice(buf);
    let v = T::deserialize(&mut de).map_err(|e| FrameError::Body {
        t,
        reason: e.to_string(),
    })?;
    de.end().map_err(|e| FrameError::Body {
        t,
        reason: e.to_string(),
    })?;
    Ok(v)
}

/// A zero-copy `Bytes` for `part`, which borrows from `whole`'s buffer.
fn sub_bytes(whole: &Bytes, part: &[u8]) -> Bytes {
    let base = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    if p >= base && p + part.len() <= base + whole.len() {
        whole.slice(p - base..p - base + part.len())
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// What can still be read from a frame that [`decode_frame`] refused: enough to skip it
/// without stalling the stream (its `seq`) and to resync the repo it was about (its DID,
/// when that has valid syntax).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// The body's top-level `seq`, if it is an integer.
    pub seq: Option<i64>,
    /// The body's top-level `repo` (`#commit`) or `did` (other types), if it is a valid DID.
    pub did: Option<Did>,
}

/// Reads the `seq` and DID of a frame that failed to decode, leniently: only the header
/// map and the body's top-level keys are walked, every other value is skipped, and a
/// malformed part simply yields less. Never reads more than `frame`.
#[must_use]
pub fn salvage_frame(frame: &[u8]) -> Salvaged {
    let mut out = Salvaged::default();
    let mut r = Reader::new(frame);
    let Ok(pairs) = r.map_len() else { return out };
    for _ in 0..pairs {
        if r.text().is_err() || r.skip_value(1).is_err() {
            return out;
        }
    }
    let Ok(pairs) = r.map_len() else { return out };
    for _ in 0..pairs {
        let Ok(key) = r.text() else { return out };
        let ok = match key {
            "seq" => r.int().map(|seq| out.seq = Some(seq)).is_ok(),
            "repo" | "did" => r
                .text()
                .map(|did| out.did = did.parse().ok().or(out.did.take()))
                .is_ok(),
            _ => r.skip_value(1).is_ok(),
        };
        if !ok {
            return out;
        }
    }
    out
}

/// Decodes one binary WebSocket message of `subscribeRepos`. Unknown message types are
/// returned as [`Frame::Unknown`], not as errors.
///
/// # Errors
/// [`FrameError`] on malformed headers/bodies, trailing bytes, or exceeded limits.
pub fn decode_frame(frame: &Bytes, limits: &FrameLimits) -> Result<Frame, FrameError> {
    if frame.len() > limits.max_frame_bytes {
        return Err(FrameError::TooLarge("frame"));
    }
    let mut r = Reader::new(frame);
    let pairs = r.map_len()?;
    let (mut op, mut t) = (None, None);
    for _ in 0..pairs {
        match r.text()? {
            "op" => op = Some(r.int()?),
            "t" => t = Some(r.text()?),
            _ => r.skip_value(1)?,
        }
    }
    let rest = &frame[r.position()..];
    match op {
        Some(-1) => {
            let b: ErrorBody<'_> = body("error", rest)?;
            return Ok(Frame::Error(ErrorFrame {
                error: b.error.to_owned(),
                message: b.message.map(str::to_owned),
            }));
        }
        Some(1) => {}
        _ => return Err(FrameError::BadHeader("op must be 1 or -1")),
    }
    let t = t.ok_or(FrameError::BadHeader("missing t"))?;
    Ok(match t {
        "#commit" => {
            let b: CommitBody<'_> = body("#commit", rest)?;
            if b.blocks.len() > limits.max_blocks_bytes {
                return Err(FrameError::TooLarge("blocks"));
            }
            if b.ops.len() > limits.max_ops {
                return Err(FrameError::TooLarge("ops"));
            }
            let mut ops = Vec::with_capacity(b.ops.len());
            for o in b.ops {
                let action = match o.action {
                    "create" => OpKind::Create,
                    "update" => OpKind::Update,
                    "delete" => OpKind::Delete,
                    _ => {
                        return Err(FrameError::Body {
                            t: "#commit",
                            reason: format!("unknown op action {:?}", o.action),
                        });
                    }
                };
                ops.push(RepoOp {
                    action,
                    path: o.path.to_owned(),
                    cid: o.cid,
                    prev: o.prev,
                });
            }
            Frame::Commit(Box::new(CommitFrame {
                seq: b.seq,
                repo: Did::new(b.repo)?,
                commit: b.commit,
                rev: Tid::new(b.rev)?,
                since: b.since.map(str::to_owned),
                blocks: sub_bytes(frame, b.blocks),
                ops,
                blobs: b.blobs,
                prev_data: b.prev_data,
                time: b.time.to_owned(),
                too_big: b.too_big,
                rebase: b.rebase,
            }))
        }
        "#sync" => {
            let b: SyncBody<'_> = body("#sync", rest)?;
            if b.blocks.len() > limits.max_blocks_bytes {
                return Err(FrameError::TooLarge("blocks"));
            }
            Frame::Sync(SyncFrame {
                seq: b.seq,
                did: Did::new(b.did)?,
                blocks: sub_bytes(frame, b.blocks),
                rev: Tid::new(b.rev)?,
                time: b.time.to_owned(),
            })
        }
        "#identity" => {
            let b: IdentityBody<'_> = body("#identity", rest)?;
            Frame::Identity(IdentityFrame {
                seq: b.seq,
                did: Did::new(b.did)?,
                time: b.time.to_owned(),
                handle: b.handle.map(str::to_owned),
            })
        }
        "#account" => {
            let b: AccountBody<'_> = body("#account", rest)?;
            Frame::Account(AccountFrame {
                seq: b.seq,
                did: Did::new(b.did)?,
                time: b.time.to_owned(),
                active: b.active,
                status: b.status.map(str::to_owned),
            })
        }
        "#info" => {
            let b: InfoBody<'_> = body("#info", rest)?;
            Frame::Info(InfoFrame {
                name: b.name.to_owned(),
                message: b.message.map(str::to_owned),
            })
        }
        other => Frame::Unknown {
            t: other.to_owned(),
        },
    })
}

/// Why a commit failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The `blocks` CAR is malformed or a block lies about its CID.
    #[error("commit CAR: {0}")]
    Car(#[from] CarError),
    /// The commit block is malformed or its signature fails.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The partial MST is invalid, incomplete, or disagrees with the ops.
    #[error("commit MST: {0}")]
    Mst(#[from] MstError),
    /// The CAR's first root is not the frame's commit CID.
    #[error("CAR root does not match the frame's commit CID")]
    RootMismatch,
    /// The commit block is not in the CAR.
    #[error("commit block missing from CAR")]
    MissingCommitBlock,
    /// The commit's DID differs from the frame's.
    #[error("commit DID {commit} does not match frame repo {frame}")]
    DidMismatch {
        /// DID in the commit.
        commit: String,
        /// DID in the frame.
        frame: String,
    },
    /// The commit's rev differs from the frame's.
    #[error("commit rev {commit} does not match frame rev {frame}")]
    RevMismatch {
        /// rev in the commit.
        commit: String,
        /// rev in the frame.
        frame: String,
    },
    /// The frame has no `prevData` (pre-Sync-1.1), so it cannot be verified by inversion.
    #[error("commit has no prevData")]
    MissingPrevData,
    /// `tooBig` commits cannot be verified (resync instead).
    #[error("commit marked tooBig")]
    TooBig,
    /// An op is missing a CID it needs, or is otherwise inconsistent.
    #[error("bad op {path:?}: {reason}")]
    BadOp {
        /// Op path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An op path is not `collection/rkey`.
    #[error("bad op path: {0}")]
    BadPath(#[from] SyntaxError),
    /// A created/updated record's block is not in the CAR.
    #[error("record block for {0:?} missing from CAR")]
    MissingRecord(String),
    /// A record block exceeds the size limit.
    #[error("record {0:?} exceeds the size limit")]
    RecordTooLarge(String),
    /// Inverting the ops does not yield `prevData`.
    #[error("inverted root {computed} does not match prevData {expected}")]
    PrevDataMismatch {
        /// `prevData` from the frame.
        expected: Box<Cid>,
        /// Root computed by inversion.
        computed: Box<Cid>,
    },
}

/// One verified operation, ready to become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedOp {
    /// Collection NSID.
    pub collection: Nsid,
    /// Record key.
    pub rkey: RecordKey,
    /// `collection/rkey`.
    pub path: String,
    /// Create/update/delete with CIDs.
    pub action: OpAction,
    /// The record's DAG-CBOR bytes (create/update), hash-checked against its CID.
    pub record: Option<Bytes>,
}

/// A commit that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommit {
    /// Relay sequence number.
    pub seq: i64,
    /// The repo.
    pub did: Did,
    /// This commit's revision.
    pub rev: Tid,
    /// Previous revision as stated by the frame.
    pub since: Option<String>,
    /// CID of the commit block.
    pub commit_cid: Cid,
    /// The new MST root (the repo's new `data`).
    pub data: Cid,
    /// The MST root before this commit (checked by inversion).
    pub prev_data: Cid,
    /// The operations, in frame order.
    pub ops: Vec<VerifiedOp>,
}

/// Runs the whole Sync 1.1 check on a `#commit`: CAR parse with every block hash-checked,
/// CAR root = commit CID, commit decode (v3), DID and rev match the frame, signature with
/// `key`, every op's CID matches the tree (record blocks present), and inverting the ops
/// yields `prevData`. Returns the verified ops with their record bytes.
///
/// # Errors
/// [`VerifyError`] naming the first failed check.
pub fn verify_commit_frame(
    frame: &CommitFrame,
    key: &PublicKey,
) -> Result<VerifiedCommit, VerifyError> {
    verify_commit_frame_with(frame, key, &FrameLimits::default())
}

/// [`verify_commit_frame`] with explicit limits.
///
/// # Errors
/// As [`verify_commit_frame`].
pub fn verify_commit_frame_with(
    frame: &CommitFrame,
    key: &PublicKey,
    limits: &FrameLimits,
) -> Result<VerifiedCommit, VerifyError> {
    if frame.too_big {
        return Err(VerifyError::TooBig);
    }
    let prev_data = frame.prev_data.ok_or(VerifyError::MissingPrevData)?;
    let car_limits = CarLimits {
        max_total_bytes: limits.max_blocks_bytes as u64,
        max_block_bytes: limits.max_blocks_bytes,
        ..CarLimits::firehose()
    };
    let car = car::read_car(frame.blocks.clone(), car_limits)?;
    if car.roots.first() != Some(&frame.commit) {
        return Err(VerifyError::RootMismatch);
    }
    let commit = check_commit_block(&car.blocks, &frame.commit, &frame.repo, &frame.rev, key)?;

    let mut tree_ops = Vec::with_capacity(frame.ops.len());
    let mut ops = Vec::with_capacity(frame.ops.len());
    for op in &frame.ops {
        let (collection, rkey) = syntax::split_record_path(&op.path)?;
        let bad = |reason| VerifyError::BadOp {
            path: op.path.clone(),
            reason,
        };
        let action = match op.action {
            OpKind::Create => OpAction::Create {
                cid: op.cid.ok_or_else(|| bad("create without cid"))?,
            },
            OpKind::Update => OpAction::Update {
                cid: op.cid.ok_or_else(|| bad("update without cid"))?,
                prev: op.prev.ok_or_else(|| bad("update without prev"))?,
            },
            OpKind::Delete => {
                if op.cid.is_some() {
                    return Err(bad("delete with cid"));
                }
                OpAction::Delete {
                    prev: op.prev.ok_or_else(|| bad("delete without prev"))?,
                }
            }
        };
        let record = match action {
            OpAction::Create { cid } | OpAction::Update { cid, .. } => {
                let b = car
                    .blocks
                    .get(&cid)
                    .ok_or_else(|| VerifyError::MissingRecord(op.path.clone()))?;
                if b.len() > limits.max_record_bytes {
                    return Err(VerifyError::RecordTooLarge(op.path.clone()));
                }
                Some(b.clone())
            }
            OpAction::Delete { .. } => None,
        };
        tree_ops.push(TreeOp {
            path: op.path.clone(),
            action,
        });
        ops.push(VerifiedOp {
            collection,
            rkey,
            path: op.path.clone(),
            action,
            record,
        });
    }

    let mut tree = mst::Mst::load(commit.data);
    let computed = mst::invert_ops(&mut tree, &tree_ops, &car.blocks)?;
    if computed != prev_data {
        return Err(VerifyError::PrevDataMismatch {
            expected: Box::new(prev_data),
            computed: Box::new(computed),
        });
    }
    Ok(VerifiedCommit {
        seq: frame.seq,
        did: frame.repo.clone(),
        rev: frame.rev,
        since: frame.since.clone(),
        commit_cid: frame.commit,
        data: commit.data,
        prev_data,
        ops,
    })
}

fn check_commit_block(
    blocks: &BlockMap,
    cid: &Cid,
    did: &Did,
    rev: &Tid,
    key: &PublicKey,
) -> Result<Commit, VerifyError> {
    let bytes = blocks.get(cid).ok_or(VerifyError::MissingCommitBlock)?;
    let commit = Commit::decode(bytes)?;
    if commit.did != *did {
        return Err(VerifyError::DidMismatch {
            commit: commit.did.to_string(),
            frame: did.to_string(),
        });
    }
    if commit.rev != *rev {
        return Err(VerifyError::RevMismatch {
            commit: commit.rev.to_string(),
            frame: rev.to_string(),
        });
    }
    commit.verify_signature(key)?;
    Ok(commit)
}

/// A `#sync` whose commit passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSync {
    /// The repo.
    pub did: Did,
    /// The commit's revision.
    pub rev: Tid,
    /// CID of the commit block.
    pub commit_cid: Cid,
    /// The MST root the repo now has.
    pub data: Cid,
}

/// Verifies a `#sync`: CAR parse, commit block = first root, DID/rev match, signature.
///
/// # Errors
/// [`VerifyError`] naming the failed check.
pub fn verify_sync_frame(frame: &SyncFrame, key: &PublicKey) -> Result<VerifiedSync, VerifyError> {
    let car = car::read_car(frame.blocks.clone(), CarLimits::firehose())?;
    let root = *car.roots.first().ok_or(VerifyError::MissingCommitBlock)?;
    let commit = check_commit_block(&car.blocks, &root, &frame.did, &frame.rev, key)?;
    Ok(VerifiedSync {
        did: frame.did.clone(),
        rev: frame.rev,
        commit_cid: root,
        data: commit.data,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ipld_core::ipld::Ipld;

    use super::*;
    use crate::hash;

    fn text(s: &str) -> Ipld {
        Ipld::String(s.to_owned())
    }

    fn link(n: u8) -> Ipld {
        Ipld::Link(hash::cid_for_cbor(&[n]))
    }

    fn op(action: &str, cid: Option<Ipld>, prev: Option<Ipld>) -> Ipld {
        let mut m = BTreeMap::from([
            ("action".to_owned(), text(action)),
            ("path".to_owned(), text("app.bsky.feed.like/3kabc")),
        ]);
        if let Some(c) = cid {
            m.insert("cid".to_owned(), c);
        }
        if let Some(p) = prev {
            m.insert("prev".to_owned(), p);
        }
        Ipld::Map(m)
    }

    fn body_map() -> BTreeMap<String, Ipld> {
        BTreeMap::from([
            ("seq".to_owned(), Ipld::Integer(42)),
            ("rebase".to_owned(), Ipld::Bool(false)),
            ("tooBig".to_owned(), Ipld::Bool(false)),
            ("repo".to_owned(), text("did:plc:abc")),
            ("commit".to_owned(), link(1)),
            ("rev".to_owned(), text("3kabcabcabc22")),
            ("since".to_owned(), text("3kabcabcabc2a")),
            ("blocks".to_owned(), Ipld::Bytes(vec![1, 2, 3])),
            (
                "ops".to_owned(),
                Ipld::List(vec![
                    op("create", Some(link(2)), None),
                    op("update", Some(link(3)), Some(link(4))),
                    op("delete", Some(Ipld::Null), Some(link(5))),
                ]),
            ),
            ("blobs".to_owned(), Ipld::List(vec![link(6)])),
            ("prevData".to_owned(), link(7)),
            ("time".to_owned(), text("2024-01-01T00:00:00Z")),
        ])
    }

    fn enc(m: BTreeMap<String, Ipld>) -> Vec<u8> {
        serde_ipld_dagcbor::to_vec(&Ipld::Map(m)).unwrap()
    }

    fn header(t: &str) -> Vec<u8> {
        enc(BTreeMap::from([
            ("op".to_owned(), Ipld::Integer(1)),
            ("t".to_owned(), text(t)),
        ]))
    }

    #[test]
    fn a_refused_commit_still_yields_its_seq_and_repo() {
        let mut body = body_map();
        body.insert(
            "ops".to_owned(),
            Ipld::List(vec![op("explode", Some(link(2)), None)]),
        );
        body.insert("repo".to_owned(), text("did:plc:ewvi7nxzyoun6zhxrhs64oiz"));
        let frame = [header("#commit"), enc(body)].concat();
        assert!(decode_frame(&Bytes::from(frame.clone()), &FrameLimits::default()).is_err());
        let got = salvage_frame(&frame);
        assert_eq!(got.seq, Some(42));
        assert_eq!(
            got.did.map(|d| d.to_string()).as_deref(),
            Some("did:plc:ewvi7nxzyoun6zhxrhs64oiz")
        );
    }

    #[test]
    fn salvage_gives_no_did_for_bad_syntax_and_stops_at_garbage() {
        let mut body = body_map();
        body.insert("repo".to_owned(), text("not a did"));
        let frame = [header("#commit"), enc(body)].concat();
        let got = salvage_frame(&frame);
        assert_eq!((got.seq, got.did), (Some(42), None));
        assert_eq!(salvage_frame(b"\xff\x00garbage"), Salvaged::default());
        let identity = [
            header("#identity"),
            enc(BTreeMap::from([
                ("seq".to_owned(), Ipld::Integer(7)),
                ("did".to_owned(), text("did:web:example.com")),
                // Canonical order puts the longer key last: the cut falls in its value.
                ("time".to_owned(), text("2024-06-01T00:00:00.000Z")),
            ])),
        ]
        .concat();
        let truncated = &identity[..identity.len() - 3];
        assert_eq!(
            salvage_frame(truncated).seq,
            Some(7),
            "keys before the cut are read"
        );
    }
}
