//! Ordered, validating walk of a whole tree held in a [`BlockSource`]: keys come out in
//! strictly increasing order; layers, emptiness and key syntax are checked; a missing node
//! is an error.

use cid::Cid;

use super::node::{NodeData, decode_node};
use super::{MstError, is_valid_mst_key, key_height, key_string};
use crate::hash::BlockSource;

/// The callback of a walk: receives each key and value in order.
pub type Visit<'a, E> = dyn FnMut(&[u8], &Cid) -> Result<(), E> + 'a;

/// Walks the tree rooted at `root` in key order, calling `f(key, value)` for every entry.
///
/// # Errors
/// [`MstError`] on any structural problem or missing node, or `f`'s error converted.
pub fn walk_tree<E: From<MstError>>(
    root: &Cid,
    src: &dyn BlockSource,
    f: &mut Visit<'_, E>,
) -> Result<(), E> {
    let mut last: Option<Vec<u8>> = None;
    walk_node(root, None, true, src, &mut last, f)
}

/// Walks the tree and returns every `(key, value)` pair in order.
///
/// # Errors
/// As [`walk_tree`].
pub fn walk_tree_collect(
    root: &Cid,
    src: &dyn BlockSource,
) -> Result<Vec<(String, Cid)>, MstError> {
    let mut out = Vec::new();
    walk_tree::<MstError>(root, src, &mut |k, v| {
        out.push((key_string(k), *v));
        Ok(())
    })?;
    Ok(out)
}

/// The checks every walk makes of a decoded node before descending: no empty node (the
/// empty tree's root aside), a canonical root, valid keys all on one layer (`height`, the
/// layer the parent implies, or the first key's for the root), no subtree below layer 0.
/// Returns the node's layer, or `None` for the empty tree's root.
///
/// # Errors
/// The [`MstError`] of the first rule broken.
pub(super) fn check_node(
    cid: &Cid,
    node: &NodeData,
    height: Option<u8>,
    is_root: bool,
) -> Result<Option<u8>, MstError> {
    if node.entries.is_empty() {
        if is_root && node.left.is_none() {
            return Ok(None);
        }
        if is_root {
            return Err(MstError::NotCanonical("root has a subtree but no keys"));
        }
        if node.left.is_none() {
            return Err(MstError::EmptyNode(*cid));
        }
    }
    let h = match (height, node.entries.first()) {
        (Some(h), _) => h,
        (None, Some(e)) => key_height(&e.key),
        (None, None) => 0,
    };
    for e in &node.entries {
        if !is_valid_mst_key(&e.key) {
            return Err(MstError::InvalidKey(key_string(&e.key)));
        }
        if key_height(&e.key) != h {
            return Err(MstError::WrongLayer(key_string(&e.key)));
        }
    }
    let has_children = node.left.is_some() || node.entries.iter().any(|e| e.right.is_some());
    if has_children && h == 0 {
        return Err(MstError::NotCanonical("subtree below layer 0"));
    }
    Ok(Some(h))
}

fn walk_node<E: From<MstError>>(
    cid: &Cid,
    height: Option<u8>,
    is_root: bool,
    src: &dyn BlockSource,
    last: &mut Option<Vec<u8>>,
    f: &mut Visit<'_, E>,
) -> Result<(), E> {
    let bytes = src.get_block(cid).ok_or(MstError::MissingBlock(*cid))?;
    let node = decode_node(bytes)?;
    let Some(h) = check_node(cid, &node, height, is_root)? else {
        return Ok(()); // the empty tree
    };
    if let Some(l) = &node.left {
        walk_node(l, Some(h - 1), false, src, last, f)?;
    }
    for e in &node.entries {
        if last.as_ref().is_some_and(|p| *p >= e.key) {
            return Err(MstError::KeyOrder(key_string(&e.key)).into());
        }
        f(&e.key, &e.value)?;
        *last = Some(e.key.clone());
        if let Some(r) = &e.right {
            walk_node(r, Some(h - 1), false, src, last, f)?;
        }
    }
    Ok(())
}
