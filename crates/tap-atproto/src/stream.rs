//! Bounded-memory streaming walk of a whole repo CAR (`getRepo`), fed chunk by chunk from a
//! synchronous loop. Yields `(path, cid, record bytes)` in key order after checking every
//! block hash, the commit (DID, signature with a given key) and the MST structure.
//!
//! Memory: for CARs in tree preorder (commit, node, left subtree, record, right subtree …)
//! blocks are consumed as they arrive and the walker holds only O(depth) state. Blocks that
//! arrive before they are needed are buffered in memory up to a budget and spilled to an
//! unlinked temporary file beyond it (with a 16-byte-per-block index), so any block order
//! works — the reference PDS writes newest-first — at the cost of disk I/O.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
#[cfg(not(unix))]
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use bytes::Bytes;
use cid::Cid;

use crate::car::{CarError, CarLimits, CarStream};
use crate::commit::{Commit, CommitError};
use crate::crypto::PublicKey;
use crate::hash;
use crate::mst::{self, MstError, is_valid_mst_key, key_height, key_string};
use crate::syntax::Did;

/// Limits and budgets of a walk.
#[derive(Debug, Clone)]
pub struct WalkLimits {
    /// CAR size caps.
    pub car: CarLimits,
    /// Bytes of early-arriving blocks kept in memory before spilling to disk (default
    /// 16 MiB). Measured peak RSS of a shuffled 300 MB walk: ~1.1 × this plus 12 bytes per
    /// spilled block (the index) plus ~10 MB of process baseline.
    pub memory_budget: usize,
    /// Bytes of already-emitted record blocks kept to serve duplicate record CIDs (two
    /// paths with identical records share one block, which a CAR carries once).
    pub recent_records_budget: usize,
    /// Where the spill file is created (default: the system temp directory).
    pub spill_dir: Option<PathBuf>,
    /// Disk shared with other walks for spilling; `None`: bounded only by the CAR size cap.
    pub spill_budget: Option<SpillBudget>,
}

/// Disk shared by the spill files of concurrent walks: a walk reserves what it writes and
/// gives it back when it ends, so together they never spill more than the budget. Cheap to
/// clone; clones share one budget.
#[derive(Debug, Clone)]
pub struct SpillBudget {
    left: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total: u64,
}

impl SpillBudget {
    /// A budget of `bytes`.
    #[must_use]
    pub fn new(bytes: u64) -> Self {
        Self {
            left: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(bytes)),
            total: bytes,
        }
    }

    /// Bytes not reserved by any walk.
    #[must_use]
    pub fn available(&self) -> u64 {
        self.left.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reserve(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.left
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Default for WalkLimits {
    fn default() -> Self {
        Self {
            car: CarLimits::repo(),
            memory_budget: 16 << 20,
            recent_records_budget: 1 << 20,
            spill_dir: None,
            spill_budget: None,
        }
    }
}

/// Why a walk failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The CAR is malformed, oversized, truncated or has a lying block.
    #[error("repo CAR: {0}")]
    Car(#[from] CarError),
    /// The commit is malformed or its signature fails.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The MST is invalid or a block it references is missing.
    #[error("repo MST: {0}")]
    Mst(#[from] MstError),
    /// The CAR has no root.
    #[error("repo CAR has no root")]
    NoRoot,
    /// The commit's DID is not the expected one.
    #[error("commit DID {found} is not the expected {expected}")]
    DidMismatch {
        /// DID requested.
        expected: String,
        /// DID found.
        found: String,
    },
    /// Reading or writing the spill file failed.
    #[error("spill file: {0}")]
    Io(String),
    /// The disk shared by concurrent walks' spill files is taken: a local limit, not a
    /// verdict on the repo.
    #[error("spill disk budget of {limit} bytes is in use by other walks")]
    SpillBudget {
        /// The whole budget.
        limit: u64,
    },
    /// `push` after `finish`.
    #[error("input already finished")]
    Finished,
}

impl From<std::io::Error> for WalkError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// One record of the repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkedRecord {
    /// `collection/rkey` (an MST key; validated as MST key syntax only).
    pub path: String,
    /// The record CID.
    pub cid: Cid,
    /// The record's DAG-CBOR bytes (hash-checked against `cid`).
    pub bytes: Bytes,
}

enum Pending {
    Commit(Cid),
    Node { cid: Cid, height: Option<u8> },
    Record { key: Vec<u8>, cid: Cid },
}

impl Pending {
    fn cid(&self) -> Cid {
        match self {
            Self::Commit(c) | Self::Node { cid: c, .. } | Self::Record { cid: c, .. } => *c,
        }
    }
}

/// A block's SHA-256 digest: the key of every block map here. Every block the CAR reader
/// yields was checked to hash to its CID's 32-byte SHA-256 digest, so equal digests mean
/// equal bytes, and the key is a third of a [`Cid`]'s size (the maps hold ~20 k entries).
type Digest = [u8; 32];

fn digest_of(cid: &Cid) -> Digest {
    let d = cid.hash().digest();
    let mut key = [0u8; 32];
    let n = d.len().min(32);
    key[..n].copy_from_slice(&d[..n]);
    key
}

/// Blocks spilled to an unlinked temporary file. Each record is `[u32 len][u8 cid_len][cid]
/// [data]`, padded to a multiple of 8 bytes; the index holds 8 bytes per block (4 digest
/// bytes, then the offset in 8-byte units, both big-endian) so it sorts by digest prefix
/// and stays small (8 MB for a million blocks) while addressing 32 GiB of spill.
struct Spill {
    out: BufWriter<File>,
    len: u64,
    index: Vec<[u8; 8]>,
    sorted: bool,
    budget: Option<SpillBudget>,
    /// Bytes reserved from the budget (all written or being written).
    reserved: u64,
}

impl Drop for Spill {
    fn drop(&mut self) {
        // The file is unlinked and goes with its handle: its bytes are free again.
        if let Some(budget) = &self.budget {
            budget.release(self.reserved);
        }
    }
}

/// Records start at multiples of this, so the index stores offsets in these units.
const SPILL_ALIGN: u64 = 8;

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        let mut f = file;
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(buf)
    }
}

impl Spill {
    fn create(dir: Option<&PathBuf>, budget: Option<SpillBudget>) -> Result<Self, WalkError> {
        let file = match dir {
            Some(d) => tempfile::tempfile_in(d)?,
            None => tempfile::tempfile()?,
        };
        Ok(Self {
            out: BufWriter::with_capacity(256 << 10, file),
            len: 0,
            index: Vec::new(),
            sorted: false,
            budget,
            reserved: 0,
        })
    }

    fn put(&mut self, cid: &Cid, data: &[u8]) -> Result<(), WalkError> {
        let unit = u32::try_from(self.len / SPILL_ALIGN)
            .map_err(|_| WalkError::Io("spill file exceeds 32 GiB".into()))?;
        let c = cid.to_bytes();
        let rest = 1 + c.len() + data.len();
        let rest_u32 =
            u32::try_from(rest).map_err(|_| WalkError::Io("block too large to spill".into()))?;
        let written = 4 + rest as u64;
        let padding = (SPILL_ALIGN - written % SPILL_ALIGN) % SPILL_ALIGN;
        if let Some(budget) = &self.budget {
            if !budget.reserve(written + padding) {
                return Err(WalkError::SpillBudget {
                    limit: budget.total,
                });
            }
            self.reserved += written + padding;
        }
        self.out.write_all(&rest_u32.to_le_bytes())?;
        self.out.write_all(&[c.len() as u8])?;
        self.out.write_all(&c)?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 8][..padding as usize])?;
        let mut entry = [0u8; 8];
        entry[..4].copy_from_slice(&digest_of(cid)[..4]);
        entry[4..].copy_from_slice(&unit.to_be_bytes());
        if self.index.len() == self.index.capacity() {
            // Grow by a quarter, not double: the index is the walk's largest allocation
            // (one entry per spilled block), and doubling would briefly hold 1.5x of it.
            self.index.reserve_exact((self.index.len() / 4).max(4096));
        }
        self.index.push(entry);
        self.len += written + padding;
        self.sorted = false;
        Ok(())
    }

    fn get(&mut self, cid: &Cid) -> Result<Option<Bytes>, WalkError> {
        if !self.sorted {
            self.out.flush()?;
            self.index.sort_unstable();
            self.sorted = true;
        }
        let digest = digest_of(cid);
        let key = &digest[..4];
        let start = self.index.partition_point(|e| e[..4] < *key);
        let want = cid.to_bytes();
        let file = self.out.get_ref();
        for e in &self.index[start..] {
            if e[..4] != *key {
                break;
            }
            let mut unit = [0u8; 4];
            unit.copy_from_slice(&e[4..]);
            let off = u64::from(u32::from_be_bytes(unit)) * SPILL_ALIGN;
            let mut n = [0u8; 4];
            read_at(file, &mut n, off)?;
            let mut rec = vec![0u8; u32::from_le_bytes(n) as usize];
            read_at(file, &mut rec, off + 4)?;
            let cid_len = usize::from(*rec.first().unwrap_or(&0));
            if rec.get(1..1 + cid_len) != Some(want.as_slice()) {
                continue;
            }
            return Ok(Some(Bytes::from(rec).slice(1 + cid_len..)));
        }
        Ok(None)
    }
}

/// The streaming walker. Feed with [`RepoWalker::push`], drain [`RepoWalker::next_record`]
/// after every push until it returns `Ok(None)` (meaning "need more input"), then call
/// [`RepoWalker::finish`] and drain again (`Ok(None)` then means "complete").
pub struct RepoWalker {
    car: CarStream,
    limits: WalkLimits,
    expected_did: Option<Did>,
    key: Option<PublicKey>,
    commit: Option<Commit>,
    stack: Vec<Pending>,
    started: bool,
    finished: bool,
    last_key: Vec<u8>,
    mem: HashMap<Digest, Bytes>,
    mem_bytes: usize,
    spill: Option<Spill>,
    recent: HashMap<Digest, Bytes>,
    recent_order: VecDeque<Digest>,
    recent_bytes: usize,
    records: u64,
}

impl std::fmt::Debug for RepoWalker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoWalker")
            .field("records", &self.records)
            .field("buffered_bytes", &self.mem_bytes)
            .field("spilled", &self.spill.as_ref().map(|s| s.len))
            .finish_non_exhaustive()
    }
}

/// Per-entry bookkeeping (hash-map slot with its 32-byte key and `Bytes` handle at the
/// map's load factor, plus the block's allocation header) counted against the memory budget.
const ENTRY_OVERHEAD: usize = 112;

impl RepoWalker {
    /// A walker that checks the commit's DID against `expected_did` and its signature with
    /// `key` (either may be `None` to skip that check).
    #[must_use]
    pub fn new(expected_did: Option<Did>, key: Option<PublicKey>, limits: WalkLimits) -> Self {
        Self {
            car: CarStream::new(limits.car),
            limits,
            expected_did,
            key,
            commit: None,
            stack: Vec::new(),
            started: false,
            finished: false,
            last_key: Vec::new(),
            mem: HashMap::default(),
            mem_bytes: 0,
            spill: None,
            recent: HashMap::default(),
            recent_order: VecDeque::new(),
            recent_bytes: 0,
            records: 0,
        }
    }

    /// Feeds the next chunk of the CAR.
    ///
    /// # Errors
    /// [`WalkError::Car`] when the CAR exceeds its size cap; [`WalkError::Finished`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), WalkError> {
        if self.finished {
            return Err(WalkError::Finished);
        }
        Ok(self.car.push(chunk)?)
    }

    /// Marks the end of input. Then drain [`RepoWalker::next_record`] to completion.
    ///
    /// # Errors
    /// [`WalkError::Car`] when the CAR ended mid-block.
    pub fn finish(&mut self) -> Result<(), WalkError> {
        self.finished = true;
        Ok(())
    }

    /// The verified commit, once it has been read.
    #[must_use]
    pub fn commit(&self) -> Option<&Commit> {
        self.commit.as_ref()
    }

    /// Records emitted so far.
    #[must_use]
    pub fn records_emitted(&self) -> u64 {
        self.records
    }

    /// Bytes written to the spill file so far (0 for tree-order CARs within budget).
    #[must_use]
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |s| s.len)
    }

    /// The next record in key order; `Ok(None)` when more input is needed (before
    /// [`RepoWalker::finish`]) or the walk is complete (after it).
    ///
    /// # Errors
    /// [`WalkError`] on the first failed check; the walker must not be used afterwards.
    pub fn next_record(&mut self) -> Result<Option<WalkedRecord>, WalkError> {
        if !self.started {
            let Some(header) = self.car.header()? else {
                return self.need_more();
            };
            let root = *header.roots.first().ok_or(WalkError::NoRoot)?;
            self.stack.push(Pending::Commit(root));
            self.started = true;
        }
        loop {
            let Some(top) = self.stack.last() else {
                // Walk complete: still read (and hash-check) any remaining blocks.
                while self.car.next_block()?.is_some() {}
                if self.finished {
                    self.car.finish()?;
                }
                return Ok(None);
            };
            let want = top.cid();
            let block = match self.take_buffered(&want)? {
                Some(b) => b,
                None => match self.car.next_block()? {
                    Some((cid, data)) if cid == want => data,
                    Some((cid, data)) => {
                        self.buffer(cid, data)?;
                        continue;
                    }
                    None if !self.finished => return Ok(None),
                    None => {
                        self.car.finish()?;
                        if let Some(b) = self.take_spilled(&want)? {
                            b
                        } else {
                            return Err(MstError::MissingBlock(want).into());
                        }
                    }
                },
            };
            let Some(item) = self.stack.pop() else {
                continue;
            };
            match item {
                Pending::Commit(_) => self.process_commit(&block)?,
                Pending::Node { cid, height } => self.process_node(&cid, height, &block)?,
                Pending::Record { key, cid } => {
                    if self.records > 0 && self.last_key >= key {
                        return Err(MstError::KeyOrder(key_string(&key)).into());
                    }
                    self.remember(cid, block.clone());
                    self.records += 1;
                    self.last_key = key.clone();
                    let path = String::from_utf8(key)
                        .map_err(|e| MstError::InvalidKey(key_string(e.as_bytes())))?;
                    return Ok(Some(WalkedRecord {
                        path,
                        cid,
                        bytes: block,
                    }));
                }
            }
        }
    }

    fn need_more(&mut self) -> Result<Option<WalkedRecord>, WalkError> {
        if self.finished {
            self.car.finish()?;
        }
        Ok(None)
    }

    fn take_buffered(&mut self, cid: &Cid) -> Result<Option<Bytes>, WalkError> {
        let key = digest_of(cid);
        if let Some(b) = self.mem.remove(&key) {
            self.mem_bytes -= b.len() + ENTRY_OVERHEAD;
            return Ok(Some(b));
        }
        Ok(self.recent.get(&key).cloned())
    }

    fn take_spilled(&mut self, cid: &Cid) -> Result<Option<Bytes>, WalkError> {
        match &mut self.spill {
            Some(s) => s.get(cid),
            None => Ok(None),
        }
    }

    fn buffer(&mut self, cid: Cid, data: Bytes) -> Result<(), WalkError> {
        let key = digest_of(&cid);
        if self.mem.contains_key(&key) {
            return Ok(());
        }
        let cost = data.len() + ENTRY_OVERHEAD;
        if self.mem_bytes + cost <= self.limits.memory_budget {
            self.mem_bytes += cost;
            self.mem.insert(key, data);
            return Ok(());
        }
        if self.spill.is_none() {
            self.spill = Some(Spill::create(
                self.limits.spill_dir.as_ref(),
                self.limits.spill_budget.clone(),
            )?);
        }
        match &mut self.spill {
            Some(s) => s.put(&cid, &data),
            None => Ok(()),
        }
    }

    /// Keeps recently emitted record blocks for duplicate record CIDs.
    fn remember(&mut self, cid: Cid, data: Bytes) {
        let key = digest_of(&cid);
        if self.recent.contains_key(&key) || data.len() > self.limits.recent_records_budget {
            return;
        }
        self.recent_bytes += data.len();
        self.recent.insert(key, data);
        self.recent_order.push_back(key);
        while self.recent_bytes > self.limits.recent_records_budget {
            let Some(old) = self.recent_order.pop_front() else {
                break;
            };
            if let Some(b) = self.recent.remove(&old) {
                self.recent_bytes -= b.len();
            }
        }
    }

    fn process_commit(&mut self, block: &[u8]) -> Result<(), WalkError> {
        let commit = Commit::decode(block)?;
        if let Some(d) = &self.expected_did
            && *d != commit.did
        {
            return Err(WalkError::DidMismatch {
                expected: d.to_string(),
                found: commit.did.to_string(),
            });
        }
        if let Some(k) = &self.key {
            commit.verify_signature(k)?;
        }
        self.stack.push(Pending::Node {
            cid: commit.data,
            height: None,
        });
        self.commit = Some(commit);
        Ok(())
    }

    fn process_node(
        &mut self,
        cid: &Cid,
        height: Option<u8>,
        block: &[u8],
    ) -> Result<(), WalkError> {
        let node = mst::decode_node(block)?;
        let is_root = height.is_none();
        if node.entries.is_empty() {
            if is_root && node.left.is_none() {
                return Ok(()); // the empty repo
            }
            if is_root {
                return Err(MstError::NotCanonical("root has a subtree but no keys").into());
            }
            if node.left.is_none() {
                return Err(MstError::EmptyNode(*cid).into());
            }
        }
        let h = match (height, node.entries.first()) {
            (Some(h), _) => h,
            (None, Some(e)) => key_height(&e.key),
            (None, None) => 0,
        };
        let has_children = node.left.is_some() || node.entries.iter().any(|e| e.right.is_some());
        if has_children && h == 0 {
            return Err(MstError::NotCanonical("subtree below layer 0").into());
        }
        for e in &node.entries {
            if !is_valid_mst_key(&e.key) {
                return Err(MstError::InvalidKey(key_string(&e.key)).into());
            }
            if key_height(&e.key) != h {
                return Err(MstError::WrongLayer(key_string(&e.key)).into());
            }
        }
        let child_h = h.saturating_sub(1);
        for e in node.entries.into_iter().rev() {
            if let Some(r) = e.right {
                self.stack.push(Pending::Node {
                    cid: r,
                    height: Some(child_h),
                });
            }
            self.stack.push(Pending::Record {
                key: e.key,
                cid: e.value,
            });
        }
        if let Some(l) = node.left {
            self.stack.push(Pending::Node {
                cid: l,
                height: Some(child_h),
            });
        }
        // Guard against a hostile tree that is wide at every level.
        if self.stack.len() > 1 << 20 {
            return Err(MstError::NotCanonical("tree too wide").into());
        }
        Ok(())
    }
}

/// Walks a whole CAR held in memory (convenience over [`RepoWalker`]) and returns every
/// record in key order.
///
/// # Errors
/// As [`RepoWalker::next_record`].
pub fn walk_car_bytes(
    car: &[u8],
    expected_did: Option<Did>,
    key: Option<PublicKey>,
    limits: WalkLimits,
) -> Result<(Commit, Vec<WalkedRecord>), WalkError> {
    let mut w = RepoWalker::new(expected_did, key, limits);
    let mut out = Vec::new();
    for chunk in car.chunks(64 << 10) {
        w.push(chunk)?;
        while let Some(r) = w.next_record()? {
            out.push(r);
        }
    }
    w.finish()?;
    while let Some(r) = w.next_record()? {
        out.push(r);
    }
    let commit = w.commit.take().ok_or(WalkError::NoRoot)?;
    Ok((commit, out))
}

/// Checks that `cid` is the hash of `data` (record blocks from the walker already are).
#[must_use]
pub fn record_matches(cid: &Cid, data: &[u8]) -> bool {
    hash::block_matches_cid(cid, data)
}
