//! Merkle Search Tree (atproto repo v3): node codec, key heights, ordered validating walk,
//! a mutable partial tree (insert/remove/update over lazily loaded nodes, used for Sync 1.1
//! inversion and by builders), and diffs.
//!
//! Keys are record paths (`collection/rkey`); a key's height is the number of leading zero
//! bits of SHA-256(key) divided by 2 (fanout 4). A node holds keys of exactly one height;
//! subtrees between its keys hold lower keys.

mod diff;
mod node;
mod sparse;
mod tree;
mod walk;

pub use diff::{DiffAction, DiffOp, diff_sorted, diff_trees};
pub use node::{Entry, NodeData, decode_node, encode_node, encode_node_parts};
pub use sparse::{KeyRange, KnownKeys, ReusingWalk, SparseWalk, walk_ranges, walk_ranges_reusing};
pub use tree::{Mst, OpAction, TreeOp, invert_ops, subtree_root};
pub use walk::{Visit, walk_tree, walk_tree_collect};

use cid::Cid;

use crate::cbor::CborError;
use crate::hash;

/// Why a tree is invalid or an operation cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MstError {
    /// A node block is not valid DAG-CBOR.
    #[error("malformed MST node: {0}")]
    Cbor(#[from] CborError),
    /// A node is not shaped `{e: [{k,p,t,v}], l}`.
    #[error("malformed MST node: {0}")]
    Malformed(&'static str),
    /// A block the operation needs is not available (never skipped silently).
    #[error("missing MST block {0}")]
    MissingBlock(Cid),
    /// Keys are not strictly increasing (within a node or across the tree).
    #[error("MST keys out of order at {0:?}")]
    KeyOrder(String),
    /// A key sits on the wrong layer for its height.
    #[error("MST key {0:?} on the wrong layer")]
    WrongLayer(String),
    /// A node other than the root of an empty tree has no entries and no subtree.
    #[error("empty MST node {0}")]
    EmptyNode(Cid),
    /// The tree is not in canonical form (e.g. a root with only a subtree).
    #[error("non-canonical MST: {0}")]
    NotCanonical(&'static str),
    /// A key is not a valid MST key.
    #[error("invalid MST key {0:?}")]
    InvalidKey(String),
    /// Removing or updating a key that is not in the tree.
    #[error("key {0:?} not in the tree")]
    KeyNotFound(String),
    /// Inserting a key that is already in the tree.
    #[error("key {0:?} already in the tree")]
    KeyExists(String),
    /// The tree's value for a key differs from what an operation claims.
    #[error("value mismatch for key {0:?}")]
    ValueMismatch(String),
}

/// The height of a key: leading zero bits of SHA-256(key), divided by 2.
#[must_use]
pub fn key_height(key: &[u8]) -> u8 {
    let d = hash::sha256(key);
    let mut zeros = 0u32;
    for b in d {
        if b == 0 {
            zeros += 8;
        } else {
            zeros += b.leading_zeros();
            break;
        }
    }
    (zeros / 2) as u8
}

/// Length of the common prefix of two keys, in bytes.
#[must_use]
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether `key` is acceptable as an MST key: 1–1024 bytes of `[A-Za-z0-9_~.:-]` with
/// exactly one `/` that is neither first nor last.
#[must_use]
pub fn is_valid_mst_key(key: &[u8]) -> bool {
    if key.is_empty() || key.len() > 1024 {
        return false;
    }
    let mut slashes = 0;
    for &b in key {
        if b == b'/' {
            slashes += 1;
        } else if !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'~' | b'.' | b':' | b'-')) {
            return false;
        }
    }
    slashes == 1 && key[0] != b'/' && key[key.len() - 1] != b'/'
}

pub(crate) fn key_string(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The CID of the empty tree's root node `{e: [], l: null}`.
#[must_use]
pub fn empty_root() -> Cid {
    hash::cid_for_cbor(&encode_node(&NodeData::default()))
}
