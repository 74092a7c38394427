//! A mutable MST over lazily loaded nodes. Nodes are loaded from a [`BlockSource`] only when
//! an operation must look inside them; a node that is needed but absent is
//! [`MstError::MissingBlock`]. Used for Sync 1.1 inversion (over a commit's partial tree)
//! and by repo builders (over a full tree).

use cid::Cid;

use super::node::{decode_node, encode_node_parts};
use super::{MstError, is_valid_mst_key, key_height, key_string};
use crate::hash::{self, BlockSource};

/// A subtree: either not loaded yet (only its CID is known) or loaded.
#[derive(Debug, Clone)]
enum Child {
    Stub(Cid),
    Loaded(Box<TreeNode>),
}

#[derive(Debug, Clone)]
enum Item {
    Leaf { key: Vec<u8>, value: Cid },
    Sub(Child),
}

#[derive(Debug, Clone)]
struct TreeNode {
    height: u8,
    items: Vec<Item>,
    /// Cached CID; `None` once the node was modified.
    cid: Option<Cid>,
}

impl TreeNode {
    fn empty(height: u8) -> Self {
        Self {
            height,
            items: Vec::new(),
            cid: None,
        }
    }

    /// Index of the first leaf whose key is >= `key` (or `items.len()`), and whether it is
    /// equal.
    fn seek(&self, key: &[u8]) -> (usize, bool) {
        for (i, it) in self.items.iter().enumerate() {
            if let Item::Leaf { key: k, .. } = it {
                match k.as_slice().cmp(key) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return (i, true),
                    std::cmp::Ordering::Greater => return (i, false),
                }
            }
        }
        (self.items.len(), false)
    }

    /// Whether `items[i - 1]` is a subtree (the gap left of index `i`).
    fn gap_child(&self, i: usize) -> bool {
        i > 0 && matches!(self.items[i - 1], Item::Sub(_))
    }
}

/// Loads and decodes a node. `height` is the layer the parent implies (`None` for the root,
/// whose layer is its first key's). Key order and syntax are checked for every key; the
/// layer is checked on the first key only (one hash per node instead of one per key): a
/// node with misplaced keys can only make later operations fail, and whole-tree layer
/// validation is the walks' job.
fn load_node(cid: &Cid, height: Option<u8>, src: &dyn BlockSource) -> Result<TreeNode, MstError> {
    let bytes = src.get_block(cid).ok_or(MstError::MissingBlock(*cid))?;
    let data = decode_node(bytes)?;
    if data.entries.is_empty() && data.left.is_none() {
        return Err(MstError::EmptyNode(*cid));
    }
    let height = match (height, data.entries.first()) {
        (Some(h), Some(e)) => {
            if key_height(&e.key) != h {
                return Err(MstError::WrongLayer(key_string(&e.key)));
            }
            h
        }
        (Some(h), None) => h,
        (None, Some(e)) => key_height(&e.key),
        (None, None) => return Err(MstError::NotCanonical("root has a subtree but no keys")),
    };
    let mut items = Vec::with_capacity(data.entries.len() * 2 + 1);
    if let Some(l) = data.left {
        items.push(Item::Sub(Child::Stub(l)));
    }
    for e in data.entries {
        if !is_valid_mst_key(&e.key) {
            return Err(MstError::InvalidKey(key_string(&e.key)));
        }
        items.push(Item::Leaf {
            key: e.key,
            value: e.value,
        });
        if let Some(r) = e.right {
            items.push(Item::Sub(Child::Stub(r)));
        }
    }
    if height == 0 && items.iter().any(|i| matches!(i, Item::Sub(_))) {
        return Err(MstError::NotCanonical("subtree below layer 0"));
    }
    Ok(TreeNode {
        height,
        items,
        cid: Some(*cid),
    })
}

/// Makes sure `child` is loaded and returns it.
fn loaded<'a>(
    child: &'a mut Child,
    height: u8,
    src: &dyn BlockSource,
) -> Result<&'a mut TreeNode, MstError> {
    if let Child::Stub(cid) = child {
        *child = Child::Loaded(Box::new(load_node(cid, Some(height), src)?));
    }
    match child {
        Child::Loaded(n) => Ok(n),
        Child::Stub(_) => unreachable_stub(),
    }
}

/// Takes ownership of a loaded node.
fn into_loaded(child: Child, height: u8, src: &dyn BlockSource) -> Result<TreeNode, MstError> {
    match child {
        Child::Stub(cid) => load_node(&cid, Some(height), src),
        Child::Loaded(n) => Ok(*n),
    }
}

fn unreachable_stub<T>() -> Result<T, MstError> {
    Err(MstError::NotCanonical("internal: stub after load"))
}

/// A chain of single-child nodes from `height` down to the leaf's own height.
fn chain(key: Vec<u8>, kh: u8, value: Cid, height: u8) -> TreeNode {
    let mut n = TreeNode {
        height: kh,
        items: vec![Item::Leaf { key, value }],
        cid: None,
    };
    while n.height < height {
        n = TreeNode {
            height: n.height + 1,
            items: vec![Item::Sub(Child::Loaded(Box::new(n)))],
            cid: None,
        };
    }
    n
}

fn insert(
    node: &mut TreeNode,
    key: Vec<u8>,
    kh: u8,
    value: Cid,
    src: &dyn BlockSource,
) -> Result<(), MstError> {
    node.cid = None;
    let (i, found) = node.seek(&key);
    if found {
        return Err(MstError::KeyExists(key_string(&key)));
    }
    if kh == node.height {
        if node.gap_child(i) {
            let Item::Sub(child) = node.items.remove(i - 1) else {
                return unreachable_stub();
            };
            let (l, r) = split(child, &key, node.height - 1, src)?;
            let mut at = i - 1;
            if let Some(l) = l {
                node.items.insert(at, Item::Sub(l));
                at += 1;
            }
            node.items.insert(at, Item::Leaf { key, value });
            if let Some(r) = r {
                node.items.insert(at + 1, Item::Sub(r));
            }
        } else {
            node.items.insert(i, Item::Leaf { key, value });
        }
        return Ok(());
    }
    // kh < node.height: the key belongs in the subtree of the gap.
    if node.gap_child(i) {
        let Item::Sub(child) = &mut node.items[i - 1] else {
            return unreachable_stub();
        };
        let sub = loaded(child, node.height - 1, src)?;
        insert(sub, key, kh, value, src)
    } else {
        let sub = chain(key, kh, value, node.height - 1);
        node.items
            .insert(i, Item::Sub(Child::Loaded(Box::new(sub))));
        Ok(())
    }
}

/// Splits a subtree around `key` (not in it) into the parts below and above it.
fn split(
    child: Child,
    key: &[u8],
    height: u8,
    src: &dyn BlockSource,
) -> Result<(Option<Child>, Option<Child>), MstError> {
    let mut node = into_loaded(child, height, src)?;
    let (i, found) = node.seek(key);
    if found {
        return Err(MstError::KeyExists(key_string(key)));
    }
    let mut right_items = node.items.split_off(i);
    let mut left_items = node.items;
    if matches!(left_items.last(), Some(Item::Sub(_))) {
        let Some(Item::Sub(grand)) = left_items.pop() else {
            return unreachable_stub();
        };
        let (gl, gr) = split(grand, key, height.saturating_sub(1), src)?;
        if let Some(gl) = gl {
            left_items.push(Item::Sub(gl));
        }
        if let Some(gr) = gr {
            right_items.insert(0, Item::Sub(gr));
        }
    }
    let wrap = |items: Vec<Item>| {
        (!items.is_empty()).then(|| {
            Child::Loaded(Box::new(TreeNode {
                height,
                items,
                cid: None,
            }))
        })
    };
    Ok((wrap(left_items), wrap(right_items)))
}

fn remove(node: &mut TreeNode, key: &[u8], kh: u8, src: &dyn BlockSource) -> Result<Cid, MstError> {
    let (i, found) = node.seek(key);
    if kh == node.height {
        if !found {
            return Err(MstError::KeyNotFound(key_string(key)));
        }
        node.cid = None;
        let Item::Leaf { value, .. } = node.items.remove(i) else {
            return unreachable_stub();
        };
        if node.gap_child(i) && matches!(node.items.get(i), Some(Item::Sub(_))) {
            let Item::Sub(r) = node.items.remove(i) else {
                return unreachable_stub();
            };
            let Item::Sub(l) = node.items.remove(i - 1) else {
                return unreachable_stub();
            };
            let merged = merge(l, r, node.height - 1, src)?;
            node.items.insert(i - 1, Item::Sub(merged));
        }
        return Ok(value);
    }
    if kh > node.height || !node.gap_child(i) {
        return Err(MstError::KeyNotFound(key_string(key)));
    }
    node.cid = None;
    let height = node.height;
    let Item::Sub(child) = &mut node.items[i - 1] else {
        return unreachable_stub();
    };
    let sub = loaded(child, height - 1, src)?;
    let value = remove(sub, key, kh, src)?;
    if sub.items.is_empty() {
        node.items.remove(i - 1);
    }
    Ok(value)
}

/// Joins two adjacent subtrees of the same height.
fn merge(l: Child, r: Child, height: u8, src: &dyn BlockSource) -> Result<Child, MstError> {
    let mut left = into_loaded(l, height, src)?;
    let mut right = into_loaded(r, height, src)?;
    if matches!(left.items.last(), Some(Item::Sub(_)))
        && matches!(right.items.first(), Some(Item::Sub(_)))
    {
        let Some(Item::Sub(a)) = left.items.pop() else {
            return unreachable_stub();
        };
        let Item::Sub(b) = right.items.remove(0) else {
            return unreachable_stub();
        };
        left.items
            .push(Item::Sub(merge(a, b, height.saturating_sub(1), src)?));
    }
    left.items.append(&mut right.items);
    left.cid = None;
    Ok(Child::Loaded(Box::new(left)))
}

/// Computes (and caches) the CID of a subtree; newly encoded node blocks are appended to
/// `emit` when given.
fn subtree_cid(child: &mut Child, emit: &mut Option<&mut Vec<(Cid, Vec<u8>)>>) -> Cid {
    match child {
        Child::Stub(cid) => *cid,
        Child::Loaded(node) => node_cid(node, emit),
    }
}

fn node_cid(node: &mut TreeNode, emit: &mut Option<&mut Vec<(Cid, Vec<u8>)>>) -> Cid {
    if let Some(c) = node.cid {
        return c;
    }
    // Children first (mutable pass), then encode from borrowed keys (no clones).
    let child_cids: Vec<Cid> = node
        .items
        .iter_mut()
        .filter_map(|it| match it {
            Item::Sub(c) => Some(subtree_cid(c, emit)),
            Item::Leaf { .. } => None,
        })
        .collect();
    let mut children = child_cids.iter();
    let mut left = None;
    let mut entries: Vec<(&[u8], &Cid, Option<&Cid>)> = Vec::with_capacity(node.items.len());
    for it in &node.items {
        match it {
            Item::Sub(_) => {
                let c = children.next();
                match entries.last_mut() {
                    Some(e) => e.2 = c,
                    None => left = c,
                }
            }
            Item::Leaf { key, value } => entries.push((key.as_slice(), value, None)),
        }
    }
    let bytes = encode_node_parts(left, &entries);
    let cid = hash::cid_for_cbor(&bytes);
    if let Some(out) = emit.as_mut() {
        out.push((cid, bytes));
    }
    node.cid = Some(cid);
    cid
}

/// A mutable MST rooted at one node, loading nodes on demand.
#[derive(Debug, Clone)]
pub struct Mst {
    root: Child,
}

impl Default for Mst {
    fn default() -> Self {
        Self::new()
    }
}

impl Mst {
    /// An empty tree.
    #[must_use]
    pub fn new() -> Self {
        Self {
            root: Child::Loaded(Box::new(TreeNode::empty(0))),
        }
    }

    /// A tree whose root node is `root` (loaded lazily from the source given to each
    /// operation).
    #[must_use]
    pub fn load(root: Cid) -> Self {
        Self {
            root: Child::Stub(root),
        }
    }

    /// Builds a tree from keys in strictly increasing order, bottom-up (faster than
    /// inserting one by one).
    ///
    /// # Errors
    /// [`MstError::KeyOrder`] / [`MstError::InvalidKey`] on bad input.
    pub fn from_sorted(
        entries: impl IntoIterator<Item = (Vec<u8>, Cid)>,
    ) -> Result<Self, MstError> {
        let mut items: Vec<(Vec<u8>, Cid, u8)> = Vec::new();
        for (k, v) in entries {
            if !is_valid_mst_key(&k) {
                return Err(MstError::InvalidKey(key_string(&k)));
            }
            if items.last().is_some_and(|(p, _, _)| *p >= k) {
                return Err(MstError::KeyOrder(key_string(&k)));
            }
            let h = key_height(&k);
            items.push((k, v, h));
        }
        let Some(top) = items.iter().map(|i| i.2).max() else {
            return Ok(Self::new());
        };
        let root = build(&mut items.into_iter().peekable(), top);
        Ok(Self {
            root: Child::Loaded(Box::new(root)),
        })
    }

    fn root_node(&mut self, src: &dyn BlockSource) -> Result<&mut TreeNode, MstError> {
        if let Child::Stub(cid) = self.root {
            let node = match load_node(&cid, None, src) {
                Ok(n) => n,
                // The empty tree's root is the one node allowed to be empty.
                Err(MstError::EmptyNode(_)) => TreeNode {
                    height: 0,
                    items: Vec::new(),
                    cid: Some(cid),
                },
                Err(e) => return Err(e),
            };
            self.root = Child::Loaded(Box::new(node));
        }
        match &mut self.root {
            Child::Loaded(n) => Ok(n),
            Child::Stub(_) => unreachable_stub(),
        }
    }

    /// The value stored under `key`.
    ///
    /// # Errors
    /// [`MstError::MissingBlock`] when a node on the key's path is unavailable.
    pub fn get(&mut self, key: &[u8], src: &dyn BlockSource) -> Result<Option<Cid>, MstError> {
        let kh = key_height(key);
        let mut node = self.root_node(src)?;
        loop {
            let (i, found) = node.seek(key);
            if found {
                let Item::Leaf { value, .. } = &node.items[i] else {
                    return unreachable_stub();
                };
                return Ok(Some(*value));
            }
            if kh >= node.height || !node.gap_child(i) {
                return Ok(None);
            }
            let h = node.height - 1;
            let Item::Sub(child) = &mut node.items[i - 1] else {
                return unreachable_stub();
            };
            node = loaded(child, h, src)?;
        }
    }

    /// Inserts a new key.
    ///
    /// # Errors
    /// [`MstError::KeyExists`], [`MstError::InvalidKey`] or [`MstError::MissingBlock`].
    pub fn insert(
        &mut self,
        key: &[u8],
        value: Cid,
        src: &dyn BlockSource,
    ) -> Result<(), MstError> {
        if !is_valid_mst_key(key) {
            return Err(MstError::InvalidKey(key_string(key)));
        }
        let kh = key_height(key);
        let root = self.root_node(src)?;
        if root.items.is_empty() {
            *root = TreeNode {
                height: kh,
                items: vec![Item::Leaf {
                    key: key.to_vec(),
                    value,
                }],
                cid: None,
            };
            return Ok(());
        }
        while kh > root.height {
            let old = std::mem::replace(root, TreeNode::empty(0));
            *root = TreeNode {
                height: old.height + 1,
                items: vec![Item::Sub(Child::Loaded(Box::new(old)))],
                cid: None,
            };
        }
        insert(root, key.to_vec(), kh, value, src)
    }

    /// Removes `key`, returning its value.
    ///
    /// # Errors
    /// [`MstError::KeyNotFound`] or [`MstError::MissingBlock`].
    pub fn remove(&mut self, key: &[u8], src: &dyn BlockSource) -> Result<Cid, MstError> {
        let kh = key_height(key);
        let root = self.root_node(src)?;
        let value = remove(root, key, kh, src)?;
        // Trim: a root holding only one subtree is replaced by that subtree.
        loop {
            let root = self.root_node(src)?;
            if root.items.is_empty() {
                *root = TreeNode::empty(0);
                break;
            }
            if root.items.len() == 1 && matches!(root.items[0], Item::Sub(_)) {
                let h = root.height - 1;
                let Some(Item::Sub(child)) = root.items.pop() else {
                    return unreachable_stub();
                };
                let node = into_loaded(child, h, src)?;
                self.root = Child::Loaded(Box::new(node));
                continue;
            }
            break;
        }
        Ok(value)
    }

    /// Replaces the value of an existing key, returning the old one.
    ///
    /// # Errors
    /// [`MstError::KeyNotFound`] or [`MstError::MissingBlock`].
    pub fn update(
        &mut self,
        key: &[u8],
        value: Cid,
        src: &dyn BlockSource,
    ) -> Result<Cid, MstError> {
        let kh = key_height(key);
        let mut node = self.root_node(src)?;
        loop {
            let (i, found) = node.seek(key);
            if found {
                node.cid = None;
                let Item::Leaf { value: v, .. } = &mut node.items[i] else {
                    return unreachable_stub();
                };
                return Ok(std::mem::replace(v, value));
            }
            if kh >= node.height || !node.gap_child(i) {
                return Err(MstError::KeyNotFound(key_string(key)));
            }
            node.cid = None;
            let h = node.height - 1;
            let Item::Sub(child) = &mut node.items[i - 1] else {
                return unreachable_stub();
            };
            node = loaded(child, h, src)?;
        }
    }

    /// Loads every node that a commit proof for an operation on `key` must carry: the path
    /// to the key (or to where it would be) and, where the key sits between two subtrees,
    /// the facing edges of both (what an insert splits and a removal merges). Use with a
    /// recording [`BlockSource`] to collect a proof.
    ///
    /// # Errors
    /// [`MstError::MissingBlock`] when a node on those paths is unavailable.
    pub fn load_proof_path(&mut self, key: &[u8], src: &dyn BlockSource) -> Result<(), MstError> {
        let root = self.root_node(src)?;
        proof_path(root, key, src)
    }

    /// The root CID (recomputing modified nodes).
    pub fn root_cid(&mut self) -> Cid {
        subtree_cid(&mut self.root, &mut None)
    }

    /// The root CID, appending every node block that had to be (re-)encoded to `out`.
    pub fn root_cid_with_blocks(&mut self, out: &mut Vec<(Cid, Vec<u8>)>) -> Cid {
        subtree_cid(&mut self.root, &mut Some(out))
    }
}

fn proof_path(node: &mut TreeNode, key: &[u8], src: &dyn BlockSource) -> Result<(), MstError> {
    if node.height == 0 {
        return Ok(());
    }
    let h = node.height - 1;
    let (i, found) = node.seek(key);
    let follow = |item: Option<&mut Item>| -> Result<(), MstError> {
        if let Some(Item::Sub(c)) = item {
            proof_path(loaded(c, h, src)?, key, src)?;
        }
        Ok(())
    };
    if i > 0 {
        follow(node.items.get_mut(i - 1))?;
    }
    if found {
        follow(node.items.get_mut(i + 1))?;
    }
    Ok(())
}

/// Builds the node at `height` from sorted items whose heights are all <= `height`,
/// consuming items until one with a greater height (or the end).
fn build(
    it: &mut std::iter::Peekable<std::vec::IntoIter<(Vec<u8>, Cid, u8)>>,
    height: u8,
) -> TreeNode {
    let mut node = TreeNode::empty(height);
    while let Some((_, _, h)) = it.peek() {
        let h = *h;
        if h > height {
            break;
        }
        if h == height {
            let Some((key, value, _)) = it.next() else {
                break;
            };
            node.items.push(Item::Leaf { key, value });
        } else {
            let sub = build(it, height - 1);
            node.items.push(Item::Sub(Child::Loaded(Box::new(sub))));
        }
    }
    node
}

/// A repo operation as a commit states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeOp {
    /// The MST key (`collection/rkey`).
    pub path: String,
    /// What happened.
    pub action: OpAction,
}

/// Create, update or delete with the CIDs involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpAction {
    /// A new record.
    Create {
        /// Its CID.
        cid: Cid,
    },
    /// A changed record.
    Update {
        /// The new CID.
        cid: Cid,
        /// The previous CID.
        prev: Cid,
    },
    /// A removed record.
    Delete {
        /// The previous CID.
        prev: Cid,
    },
}

/// Sync 1.1 inversion: checks that each op's effect is visible in `tree` (the tree after the
/// commit), then undoes the ops in reverse order and returns the root before the commit.
/// Every missing node or inconsistency is an error; nothing is skipped.
///
/// # Errors
/// [`MstError`] when an op does not match the tree or a needed node is missing.
pub fn invert_ops(tree: &mut Mst, ops: &[TreeOp], src: &dyn BlockSource) -> Result<Cid, MstError> {
    for op in ops {
        let key = op.path.as_bytes();
        let current = tree.get(key, src)?;
        let expected = match op.action {
            OpAction::Create { cid } | OpAction::Update { cid, .. } => Some(cid),
            OpAction::Delete { .. } => None,
        };
        if current != expected {
            return Err(MstError::ValueMismatch(op.path.clone()));
        }
    }
    for op in ops.iter().rev() {
        let key = op.path.as_bytes();
        match op.action {
            OpAction::Create { cid } => {
                if tree.remove(key, src)? != cid {
                    return Err(MstError::ValueMismatch(op.path.clone()));
                }
            }
            OpAction::Update { cid, prev } => {
                if tree.update(key, prev, src)? != cid {
                    return Err(MstError::ValueMismatch(op.path.clone()));
                }
            }
            OpAction::Delete { prev } => tree.insert(key, prev, src)?,
        }
    }
    Ok(tree.root_cid())
}
