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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{self, BlockMap};
    use crate::mst::Mst;

    fn c(n: u8) -> Cid {
        hash::cid_for_cbor(&[n])
    }

    #[test]
    fn sorted_diff_emits_creates_updates_and_deletes_in_path_order() {
        let old = vec![
            ("a/1".to_owned(), c(1)),
            ("a/2".to_owned(), c(2)),
            ("a/4".to_owned(), c(4)),
        ];
        let new = vec![
            ("a/2".to_owned(), c(9)),
            ("a/3".to_owned(), c(3)),
            ("a/4".to_owned(), c(4)),
        ];
        let d = diff_sorted(old, new);
        assert_eq!(
            d,
            vec![
                DiffOp {
                    path: "a/1".into(),
                    action: DiffAction::Delete { prev: c(1) }
                },
                DiffOp {
                    path: "a/2".into(),
                    action: DiffAction::Update {
                        prev: c(2),
                        cid: c(9)
                    }
                },
                DiffOp {
                    path: "a/3".into(),
                    action: DiffAction::Create { cid: c(3) }
                },
            ]
        );
    }

    #[test]
    fn tree_diff_matches_the_changes_made() {
        let empty = BlockMap::default();
        let mut blocks = BlockMap::default();
        let mut t = Mst::new();
        for i in 0..100u8 {
            t.insert(format!("col/k{i:03}").as_bytes(), c(i), &empty)
                .unwrap();
        }
        let mut out = Vec::new();
        let before = t.root_cid_with_blocks(&mut out);
        t.remove(b"col/k005", &empty).unwrap();
        t.update(b"col/k050", c(200), &empty).unwrap();
        t.insert(b"col/k500", c(201), &empty).unwrap();
        let after = t.root_cid_with_blocks(&mut out);
        for (cid, b) in out {
            blocks.insert(cid, b.into());
        }
        let d = diff_trees(&before, &after, &blocks).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].action, DiffAction::Delete { prev: c(5) });
        assert_eq!(
            d[1].action,
            DiffAction::Update {
                prev: c(50),
                cid: c(200)
            }
        );
        assert_eq!(d[2].action, DiffAction::Create { cid: c(201) });
        assert!(diff_trees(&after, &after, &blocks).unwrap().is_empty());
    }
}
