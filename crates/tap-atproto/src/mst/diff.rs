//! Diffs of record sets: a merge-join of two key-ordered `(path, CID)` sequences (a tree walk
//! against stored pairs, or two walks) into create/update/delete operations.

use cid::Cid;

use super::MstError;
use super::walk::walk_tree_collect;
use crate::hash::BlockSource;

/// What changed for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffAction {
    /// Present only in the new set.
    Create {
        /// New CID.
        cid: Cid,
    },
    /// Present in both with different CIDs.
    Update {
        /// Old CID.
        prev: Cid,
        /// New CID.
        cid: Cid,
    },
    /// Present only in the old set.
    Delete {
        /// Old CID.
        prev: Cid,
    },
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffOp {
    /// Record path (`collection/rkey`).
    pub path: String,
    /// The change.
    pub action: DiffAction,
}

/// Merge-joins two sequences sorted by path (byte order, as MST walks produce them) and
/// returns the operations that turn `old` into `new`, in path order. Unchanged paths are
/// omitted.
pub fn diff_sorted<O, N>(old: O, new: N) -> Vec<DiffOp>
where
    O: IntoIterator<Item = (String, Cid)>,
    N: IntoIterator<Item = (String, Cid)>,
{
    let mut out = Vec::new();
    let mut old = old.into_iter().peekable();
    let mut new = new.into_iter().peekable();
    loop {
        let ord = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => a.0.as_bytes().cmp(b.0.as_bytes()),
        };
        match ord {
            std::cmp::Ordering::Less => {
                if let Some((path, prev)) = old.next() {
                    out.push(DiffOp {
                        path,
                        action: DiffAction::Delete { prev },
                    });
                }
            }
            std::cmp::Ordering::Greater => {
                if let Some((path, cid)) = new.next() {
                    out.push(DiffOp {
                        path,
                        action: DiffAction::Create { cid },
                    });
                }
            }
            std::cmp::Ordering::Equal => {
                if let (Some((_, prev)), Some((path, cid))) = (old.next(), new.next())
                    && prev != cid
                {
                    out.push(DiffOp {
                        path,
                        action: DiffAction::Update { prev, cid },
                    });
                }
            }
        }
    }
    out
}

/// Diffs two whole trees held in `src` (walking both, with full validation).
///
/// # Errors
/// [`MstError`] when either tree is invalid or incomplete.
pub fn diff_trees(
    old_root: &Cid,
    new_root: &Cid,
    src: &dyn BlockSource,
) -> Result<Vec<DiffOp>, MstError> {
    if old_root == new_root {
        return Ok(Vec::new());
    }
    Ok(diff_sorted(
        walk_tree_collect(old_root, src)?,
        walk_tree_collect(new_root, src)?,
    ))
}
