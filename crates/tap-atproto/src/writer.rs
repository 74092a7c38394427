//! Writing repos and commit messages, for tests, fixtures and tools: an in-memory repo that
//! applies record operations, signs commits through a caller-supplied signer, and emits
//! CAR exports (tree order or any order) and `#commit` frames with Sync 1.1 proofs.

use std::cell::RefCell;
use std::collections::BTreeSet;

use bytes::Bytes;
use cid::Cid;
use serde::Serialize;

use crate::car;
use crate::cbor::{self, major};
use crate::commit::Commit;
use crate::hash::{self, BlockMap, BlockSource};
use crate::mst::{self, Mst, MstError, OpAction};
use crate::syntax::{Did, Tid};

/// A record change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Create `path` with the given DAG-CBOR record.
    Create {
        /// `collection/rkey`.
        path: String,
        /// Record bytes.
        record: Vec<u8>,
    },
    /// Replace the record at `path`.
    Update {
        /// `collection/rkey`.
        path: String,
        /// Record bytes.
        record: Vec<u8>,
    },
    /// Remove the record at `path`.
    Delete {
        /// `collection/rkey`.
        path: String,
    },
}

/// What one applied commit produced.
#[derive(Debug, Clone)]
pub struct CommitOutput {
    /// CID of the signed commit block.
    pub commit_cid: Cid,
    /// The signed commit.
    pub commit: Commit,
    /// MST root before the commit.
    pub prev_data: Cid,
    /// `(path, action)` per op, in order.
    pub ops: Vec<(String, OpAction)>,
    /// The proof CAR for a `#commit`: commit, proof nodes, new records.
    pub car: Vec<u8>,
    /// The previous revision.
    pub since: Option<Tid>,
}

/// Records which CIDs were read.
struct Recording<'a> {
    inner: &'a BlockMap,
    seen: RefCell<BTreeSet<Cid>>,
}

impl BlockSource for Recording<'_> {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.seen.borrow_mut().insert(*cid);
        self.inner.get_block(cid)
    }
}

/// Signs the unsigned commit bytes; must return a 64-byte compact signature (or anything,
/// for deliberately broken commits).
pub type Signer<'a> = &'a dyn Fn(&[u8]) -> Vec<u8>;

/// An in-memory repo: MST, every block ever written, and the latest signed commit.
#[derive(Debug, Clone)]
pub struct RepoWriter {
    did: Did,
    tree: Mst,
    blocks: BlockMap,
    head: Option<(Cid, Commit)>,
}

impl RepoWriter {
    /// An empty repo for `did`.
    #[must_use]
    pub fn new(did: Did) -> Self {
        Self {
            did,
            tree: Mst::new(),
            blocks: BlockMap::default(),
            head: None,
        }
    }

    /// A repo holding `records` (sorted by path, unique) as its first commit, built
    /// bottom-up (fast for large repos).
    ///
    /// # Errors
    /// [`MstError`] when paths are unsorted, duplicated or invalid.
    pub fn with_records(
        did: Did,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
        rev: Tid,
        signer: Signer<'_>,
    ) -> Result<Self, MstError> {
        let mut blocks = BlockMap::default();
        let mut entries = Vec::new();
        for (path, rec) in records {
            let cid = hash::cid_for_cbor(&rec);
            blocks.insert(cid, Bytes::from(rec));
            entries.push((path.into_bytes(), cid));
        }
        let tree = Mst::from_sorted(entries)?;
        let mut w = Self {
            did,
            tree,
            blocks,
            head: None,
        };
        w.sign_head(rev, signer);
        Ok(w)
    }

    /// The repo's DID.
    #[must_use]
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The latest commit, if any.
    #[must_use]
    pub fn head(&self) -> Option<&(Cid, Commit)> {
        self.head.as_ref()
    }

    /// Every block written so far (nodes of all versions, records, commits).
    #[must_use]
    pub fn blocks(&self) -> &BlockMap {
        &self.blocks
    }

    /// Current MST root.
    pub fn data_root(&mut self) -> Cid {
        self.store_tree()
    }

    fn store_tree(&mut self) -> Cid {
        let mut new = Vec::new();
        let root = self.tree.root_cid_with_blocks(&mut new);
        for (c, b) in new {
            self.blocks.insert(c, Bytes::from(b));
        }
        root
    }

    fn sign_head(&mut self, rev: Tid, signer: Signer<'_>) -> (Cid, Commit) {
        let data = self.store_tree();
        let mut commit = Commit {
            did: self.did.clone(),
            version: 3,
            data,
            rev,
            prev: None,
            sig: Vec::new(),
        };
        commit.sig = signer(&commit.unsigned_bytes());
        let bytes = commit.signed_bytes();
        let cid = hash::cid_for_cbor(&bytes);
        self.blocks.insert(cid, Bytes::from(bytes));
        self.head = Some((cid, commit.clone()));
        (cid, commit)
    }

    /// Applies `ops` as one commit at `rev` and returns the commit with its proof CAR.
    ///
    /// # Errors
    /// [`MstError`] when an op does not fit the tree (create of an existing path, ...).
    pub fn apply(
        &mut self,
        ops: &[WriteOp],
        rev: Tid,
        signer: Signer<'_>,
    ) -> Result<CommitOutput, MstError> {
        let prev_data = self.store_tree();
        let since = self.head.as_ref().map(|(_, c)| c.rev);
        let mut applied = Vec::with_capacity(ops.len());
        let mut new_records = Vec::new();
        for op in ops {
            match op {
                WriteOp::Create { path, record } => {
                    let cid = hash::cid_for_cbor(record);
                    self.tree.insert(path.as_bytes(), cid, &self.blocks)?;
                    self.blocks.insert(cid, Bytes::from(record.clone()));
                    new_records.push(cid);
                    applied.push((path.clone(), OpAction::Create { cid }));
                }
                WriteOp::Update { path, record } => {
                    let cid = hash::cid_for_cbor(record);
                    let prev = self.tree.update(path.as_bytes(), cid, &self.blocks)?;
                    self.blocks.insert(cid, Bytes::from(record.clone()));
                    new_records.push(cid);
                    applied.push((path.clone(), OpAction::Update { cid, prev }));
                }
                WriteOp::Delete { path } => {
                    let prev = self.tree.remove(path.as_bytes(), &self.blocks)?;
                    applied.push((path.clone(), OpAction::Delete { prev }));
                }
            }
        }
        let (commit_cid, commit) = self.sign_head(rev, signer);
        // The proof: every node on the ops' paths in the new tree (see Mst::load_proof_path).
        let rec = Recording {
            inner: &self.blocks,
            seen: RefCell::new(BTreeSet::new()),
        };
        let mut fresh = Mst::load(commit.data);
        for (path, _) in &applied {
            fresh.load_proof_path(path.as_bytes(), &rec)?;
        }
        let mut car_blocks: Vec<Cid> = vec![commit_cid];
        car_blocks.extend(rec.seen.into_inner());
        for c in new_records {
            if !car_blocks.contains(&c) {
                car_blocks.push(c);
            }
        }
        let car = car::write_car(
            &[commit_cid],
            car_blocks
                .iter()
                .filter_map(|c| self.blocks.get(c).map(|b| (c, b.as_ref()))),
        );
        Ok(CommitOutput {
            commit_cid,
            commit,
            prev_data,
            ops: applied,
            car,
            since,
        })
    }

    /// The CAR export of the current repo in tree preorder (commit, node, left subtree,
    /// record, right subtree, ...), each block once.
    ///
    /// # Errors
    /// [`MstError`] if the tree is inconsistent (a bug) or the repo has no commit.
    pub fn export_preorder(&self) -> Result<Vec<u8>, MstError> {
        let mut order = Vec::new();
        self.preorder_cids(&mut order)?;
        let (cid, _) = self
            .head
            .as_ref()
            .ok_or(MstError::NotCanonical("repo has no commit"))?;
        Ok(car::write_car(
            &[*cid],
            order
                .iter()
                .filter_map(|c| self.blocks.get(c).map(|b| (c, b.as_ref()))),
        ))
    }

    /// The blocks of the current repo in tree preorder (commit first), each once.
    ///
    /// # Errors
    /// As [`RepoWriter::export_preorder`].
    pub fn preorder_cids(&self, out: &mut Vec<Cid>) -> Result<(), MstError> {
        let (cid, commit) = self
            .head
            .as_ref()
            .ok_or(MstError::NotCanonical("repo has no commit"))?;
        out.push(*cid);
        let mut seen = std::collections::HashSet::new();
        self.preorder_node(&commit.data, out, &mut seen)
    }

    fn preorder_node(
        &self,
        cid: &Cid,
        out: &mut Vec<Cid>,
        seen: &mut std::collections::HashSet<Cid>,
    ) -> Result<(), MstError> {
        let bytes = self.blocks.get(cid).ok_or(MstError::MissingBlock(*cid))?;
        let node = mst::decode_node(bytes)?;
        out.push(*cid);
        if let Some(l) = &node.left {
            self.preorder_node(l, out, seen)?;
        }
        for e in &node.entries {
            if seen.insert(e.value) {
                out.push(e.value);
            }
            if let Some(r) = &e.right {
                self.preorder_node(r, out, seen)?;
            }
        }
        Ok(())
    }

    /// A CAR of the current repo with blocks in the given order (e.g. shuffled preorder).
    ///
    /// # Errors
    /// [`MstError`] when the repo has no commit.
    pub fn export_in_order(&self, order: &[Cid]) -> Result<Vec<u8>, MstError> {
        let (cid, _) = self
            .head
            .as_ref()
            .ok_or(MstError::NotCanonical("repo has no commit"))?;
        Ok(car::write_car(
            &[*cid],
            order
                .iter()
                .filter_map(|c| self.blocks.get(c).map(|b| (c, b.as_ref()))),
        ))
    }
}

#[derive(Serialize)]
struct OpOut<'a> {
    action: &'a str,
    path: &'a str,
    cid: Option<Cid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: Option<Cid>,
}

#[derive(Serialize)]
struct CommitBodyOut<'a> {
    seq: i64,
    rebase: bool,
    #[serde(rename = "tooBig")]
    too_big: bool,
    repo: &'a str,
    commit: Cid,
    rev: &'a str,
    since: Option<&'a str>,
    #[serde(with = "serde_bytes")]
    blocks: &'a [u8],
    ops: Vec<OpOut<'a>>,
    blobs: Vec<Cid>,
    #[serde(rename = "prevData")]
    prev_data: Option<Cid>,
    time: &'a str,
}

fn frame_header(out: &mut Vec<u8>, t: &str) {
    cbor::write_head(out, major::MAP, 2);
    cbor::write_text(out, "t");
    cbor::write_text(out, t);
    cbor::write_text(out, "op");
    cbor::write_int(out, 1);
}

/// Encodes a `#commit` frame (header + body) for `c`.
#[must_use]
pub fn encode_commit_frame(did: &Did, seq: i64, c: &CommitOutput, time: &str) -> Vec<u8> {
    let rev = c.commit.rev.to_string();
    let since = c.since.map(|s| s.to_string());
    let ops = c
        .ops
        .iter()
        .map(|(path, a)| match a {
            OpAction::Create { cid } => OpOut {
                action: "create",
                path,
                cid: Some(*cid),
                prev: None,
            },
            OpAction::Update { cid, prev } => OpOut {
                action: "update",
                path,
                cid: Some(*cid),
                prev: Some(*prev),
            },
            OpAction::Delete { prev } => OpOut {
                action: "delete",
                path,
                cid: None,
                prev: Some(*prev),
            },
        })
        .collect();
    let body = CommitBodyOut {
        seq,
        rebase: false,
        too_big: false,
        repo: did.as_str(),
        commit: c.commit_cid,
        rev: &rev,
        since: since.as_deref(),
        blocks: &c.car,
        ops,
        blobs: Vec::new(),
        prev_data: Some(c.prev_data),
        time,
    };
    let mut out = Vec::with_capacity(c.car.len() + 512);
    frame_header(&mut out, "#commit");
    // Serialising plain structs of strings, ints, bytes and CIDs cannot fail.
    out.extend(serde_ipld_dagcbor::to_vec(&body).unwrap_or_default());
    out
}

/// Encodes any frame from a header type and a serialisable body (for tests of other types).
#[must_use]
pub fn encode_frame<T: Serialize>(t: &str, body: &T) -> Vec<u8> {
    let mut out = Vec::new();
    frame_header(&mut out, t);
    out.extend(serde_ipld_dagcbor::to_vec(body).unwrap_or_default());
    out
}

/// Encodes an error frame (`op = -1`).
#[must_use]
pub fn encode_error_frame(error: &str, message: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    cbor::write_head(&mut out, major::MAP, 1);
    cbor::write_text(&mut out, "op");
    cbor::write_int(&mut out, -1);
    cbor::write_head(&mut out, major::MAP, if message.is_some() { 2 } else { 1 });
    cbor::write_text(&mut out, "error");
    cbor::write_text(&mut out, error);
    if let Some(m) = message {
        cbor::write_text(&mut out, "message");
        cbor::write_text(&mut out, m);
    }
    out
}
