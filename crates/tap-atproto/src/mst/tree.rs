//! A mutable MST over lazily loaded nodes. Nodes are loaded from a [`BlockSource`] only when
//! an operation must look inside them; a node that is needed but absent is
//! [`MstError::MissingBlock`]. Used for Sync 1.1 inversion (over a commit's partial tree)
//! and by repo builders (over a full tree).
//!
//! The representation is tuned for verifying firehose commits, where every commit loads,
//! edits and re-encodes a handful of nodes: keys of up to [`KEY_INLINE`] bytes are stored
//! inline and DAG-CBOR/SHA-256 links as bare digests, so loading a node allocates once (its
//! item vector) instead of once per key, and encoding writes links without varint work.

use cid::Cid;

use super::node::{RawLink, STD_CID_PREFIX, parse_node};
use super::{MstError, common_prefix_len, is_valid_mst_key, key_height, key_string};
use crate::cbor::{self, major};
use crate::hash::{self, BlockSource};

/// Keys up to this long (every `collection/rkey` path seen in practice) live inline.
const KEY_INLINE: usize = 62;

/// An MST key: inline when short, boxed otherwise.
#[derive(Clone)]
enum Key {
    Inline { len: u8, buf: [u8; KEY_INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    fn new(k: &[u8]) -> Self {
        if k.len() <= KEY_INLINE {
            let mut buf = [0u8; KEY_INLINE];
            buf[..k.len()].copy_from_slice(k);
            Self::Inline {
                len: k.len() as u8,
                buf,
            }
        } else {
            Self::Heap(k.into())
        }
    }

    /// An empty inline key, to be filled in place with [`Key::set`].
    const EMPTY: Self = Self::Inline {
        len: 0,
        buf: [0; KEY_INLINE],
    };

    /// Overwrites the key with `k`, in place when it fits inline. Loading a node pushes
    /// [`Key::EMPTY`] and then sets it: building the key on the stack and moving it into
    /// the vector would re-read freshly copied bytes with wider loads (a store-forwarding
    /// stall per key).
    fn set(&mut self, k: &[u8]) {
        match self {
            Self::Inline { len, buf } if k.len() <= KEY_INLINE => {
                buf[..k.len()].copy_from_slice(k);
                *len = k.len() as u8;
            }
            _ => *self = Self::new(k),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Inline { len, buf } => &buf[..usize::from(*len)],
            Self::Heap(b) => b,
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_slice()))
    }
}

/// A CID as the tree holds it: the DAG-CBOR/SHA-256 CIDv1 every atproto node and record
/// uses as its bare digest (40 bytes instead of `Cid`'s 96, encoded with one copy),
/// anything else boxed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Std(Digest),
    Other(Box<Cid>),
}

/// A SHA-256 digest, 8-byte aligned so links move as whole words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(align(8))]
struct Digest([u8; 32]);

impl Link {
    fn from_cid(cid: &Cid) -> Self {
        let mh = cid.hash();
        if cid.version() == cid::Version::V1
            && cid.codec() == hash::DAG_CBOR
            && mh.code() == hash::SHA2_256
            && let Ok(d) = <[u8; 32]>::try_from(mh.digest())
        {
            Self::Std(Digest(d))
        } else {
            Self::Other(Box::new(*cid))
        }
    }

    /// Converts a link found in a node block (already validated by the parser).
    #[inline]
    fn parse(raw: RawLink<'_>) -> Result<Self, MstError> {
        match raw.std_digest() {
            Some(d) => Ok(Self::Std(Digest(*d))),
            None => raw.cid().map(|c| Self::from_cid(&c)),
        }
    }

    /// A placeholder, overwritten in place with [`Link::set`].
    const EMPTY: Self = Self::Std(Digest([0; 32]));

    /// Overwrites the link with a parsed node-block link, in place for the usual CID (see
    /// [`Key::set`] for why in place).
    fn set(&mut self, raw: RawLink<'_>) -> Result<(), MstError> {
        match (self, raw.std_digest()) {
            (Self::Std(d), Some(new)) => d.0.copy_from_slice(new),
            (me, _) => *me = Self::parse(raw)?,
        }
        Ok(())
    }

    fn to_cid(&self) -> Cid {
        match self {
            Self::Std(d) => hash::cid_from_digest(hash::DAG_CBOR, &d.0),
            Self::Other(c) => **c,
        }
    }

    /// Appends the link as DAG-CBOR (tag 42, bytes `0x00 ‖ cid`), as `cbor::write_link`.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Std(d) => {
                out.extend_from_slice(&[0xd8, 42, 0x58, 37, 0x00]);
                out.extend_from_slice(&STD_CID_PREFIX);
                out.extend_from_slice(&d.0);
            }
            Self::Other(c) => cbor::write_link(out, c),
        }
    }
}

fn write_nullable_link(out: &mut Vec<u8>, link: Option<&Link>) {
    match link {
        Some(l) => l.write(out),
        None => cbor::write_null(out),
    }
}

/// A subtree: either not loaded yet (only its CID is known) or loaded.
#[derive(Debug, Clone)]
enum Child {
    Stub(Link),
    Loaded(Box<TreeNode>),
}

#[derive(Debug, Clone)]
enum Item {
    Leaf { key: Key, value: Link },
    Sub(Child),
}

#[derive(Debug, Clone)]
struct TreeNode {
    height: u8,
    items: Vec<Item>,
    /// Cached CID; `None` once the node was modified.
    cid: Option<Link>,
}

impl TreeNode {
    fn empty(height: u8) -> Self {
        Self::new(height, Vec::new())
    }

    /// A new (never encoded) node.
    fn new(height: u8, items: Vec<Item>) -> Self {
        Self {
            height,
            items,
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
fn load_node(cid: &Link, height: Option<u8>, src: &dyn BlockSource) -> Result<TreeNode, MstError> {
    let full = cid.to_cid();
    let bytes = src.get_block(&full).ok_or(MstError::MissingBlock(full))?;
    let mut items: Vec<Item> = Vec::new();
    // Syntax is checked while decoding, but reported after the structural
    // checks below (in key order), as a whole-node decode followed by checks would.
    let mut first_invalid: Option<Vec<u8>> = None;
    let mut first_key_height = None;
    let left = parse_node(bytes, |e| {
        let (k, right, value) = (e.key, e.right, e.value);
        if let Some(n) = e.first_of {
            // Room for every entry, its right subtree and the left link, which goes in
            // front (this placeholder) once it has been read at the end of the block.
            items.reserve_exact(2 * n + 1);
            items.push(Item::Sub(Child::Stub(Link::EMPTY)));
        }
        if first_invalid.is_none() && !is_valid_mst_key(k) {
            first_invalid = Some(k.to_vec());
        }
        if e.first_of.is_some() {
            first_key_height = Some(key_height(k));
        }
        items.push(Item::Leaf {
            key: Key::EMPTY,
            value: Link::EMPTY,
        });
        if let Some(Item::Leaf { key, value: v }) = items.last_mut() {
            key.set(k);
            v.set(value)?;
        }
        if let Some(r) = right {
            items.push(Item::Sub(Child::Stub(Link::EMPTY)));
            if let Some(Item::Sub(Child::Stub(l))) = items.last_mut() {
                l.set(r)?;
            }
        }
        Ok(())
    })?;
    match (left, items.is_empty()) {
        (Some(l), true) => items.push(Item::Sub(Child::Stub(Link::parse(l)?))),
        (Some(l), false) => items[0] = Item::Sub(Child::Stub(Link::parse(l)?)),
        (None, true) => {}
        (None, false) => {
            items.remove(0);
        }
    }
    if items.is_empty() {
        return Err(MstError::EmptyNode(full));
    }
    let first = items.iter().find_map(|i| match i {
        Item::Leaf { key, .. } => Some(key),
        Item::Sub(_) => None,
    });
    let height = match (height, first, first_key_height) {
        (Some(h), Some(k), Some(kh)) => {
            if kh != h {
                return Err(MstError::WrongLayer(key_string(k.as_slice())));
            }
            h
        }
        (Some(h), _, _) => h,
        (None, Some(_), Some(kh)) => kh,
        (None, _, _) => return Err(MstError::NotCanonical("root has a subtree but no keys")),
    };
    if let Some(k) = first_invalid {
        return Err(MstError::InvalidKey(key_string(&k)));
    }
    if height == 0 && items.iter().any(|i| matches!(i, Item::Sub(_))) {
        return Err(MstError::NotCanonical("subtree below layer 0"));
    }
    Ok(TreeNode {
        height,
        items,
        cid: Some(cid.clone()),
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
fn chain(key: Key, kh: u8, value: Link, height: u8) -> TreeNode {
    let mut n = TreeNode::new(kh, vec![Item::Leaf { key, value }]);
    while n.height < height {
        n = TreeNode::new(n.height + 1, vec![Item::Sub(Child::Loaded(Box::new(n)))]);
    }
    n
}

fn insert(
    node: &mut TreeNode,
    key: Key,
    kh: u8,
    value: Link,
    src: &dyn BlockSource,
) -> Result<(), MstError> {
    node.cid = None;
    let (i, found) = node.seek(key.as_slice());
    if found {
        return Err(MstError::KeyExists(key_string(key.as_slice())));
    }
    if kh == node.height {
        if node.gap_child(i) {
            let Item::Sub(child) = node.items.remove(i - 1) else {
                return unreachable_stub();
            };
            let (l, r) = split(child, key.as_slice(), node.height - 1, src)?;
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
        (!items.is_empty()).then(|| Child::Loaded(Box::new(TreeNode::new(height, items))))
    };
    Ok((wrap(left_items), wrap(right_items)))
}

fn remove(
    node: &mut TreeNode,
    key: &[u8],
    kh: u8,
    src: &dyn BlockSource,
) -> Result<Link, MstError> {
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

/// Reusable buffers for computing CIDs: the encoding of the node being hashed and a stack
/// of child links (each node pushes its children's links above its parent's and pops them
/// when done).
#[derive(Default)]
struct Encoder<'a> {
    buf: Vec<u8>,
    links: Vec<Link>,
    /// Newly encoded node blocks are appended here when given.
    emit: Option<&'a mut Vec<(Cid, Vec<u8>)>>,
}

/// Computes (and caches) the CID of a subtree.
fn subtree_cid(child: &mut Child, enc: &mut Encoder<'_>) -> Link {
    match child {
        Child::Stub(cid) => cid.clone(),
        Child::Loaded(node) => node_cid(node, enc),
    }
}

fn node_cid(node: &mut TreeNode, enc: &mut Encoder<'_>) -> Link {
    if let Some(c) = &node.cid {
        return c.clone();
    }
    // Children first; their links wait on the stack while this node is encoded.
    let base = enc.links.len();
    for it in &mut node.items {
        if let Item::Sub(c) = it {
            let link = subtree_cid(c, enc);
            enc.links.push(link);
        }
    }
    let mut buf = std::mem::take(&mut enc.buf);
    buf.clear();
    encode_items(
        &node.items,
        enc.links.get(base..).unwrap_or_default(),
        &mut buf,
    );
    enc.links.truncate(base);
    let link = Link::Std(Digest(hash::sha256(&buf)));
    if let Some(out) = enc.emit.as_mut() {
        out.push((link.to_cid(), buf.clone()));
    }
    enc.buf = buf;
    node.cid = Some(link.clone());
    link
}

/// Encodes a node canonically from its items (as `encode_node_parts`: maximal shared
/// prefixes, null `l`/`t` written out). `children` holds the links of the `Sub` items, in
/// order.
fn encode_items(items: &[Item], children: &[Link], out: &mut Vec<u8>) {
    let n = items
        .iter()
        .filter(|i| matches!(i, Item::Leaf { .. }))
        .count();
    out.reserve(16 + n * 100);
    cbor::write_head(out, major::MAP, 2);
    cbor::write_text(out, "e");
    cbor::write_head(out, major::ARRAY, n as u64);
    let mut children = children.iter();
    let mut left = None;
    // An entry is written once the item after it shows whether it has a right subtree.
    let mut pending: Option<(&[u8], &Link, Option<&Link>)> = None;
    let mut prev: &[u8] = &[];
    for it in items {
        match it {
            Item::Sub(_) => {
                let c = children.next();
                match pending.as_mut() {
                    Some(e) => e.2 = c,
                    None => left = c,
                }
            }
            Item::Leaf { key, value } => {
                if let Some(e) = pending.take() {
                    write_entry(out, prev, e);
                    prev = e.0;
                }
                pending = Some((key.as_slice(), value, None));
            }
        }
    }
    if let Some(e) = pending {
        write_entry(out, prev, e);
    }
    cbor::write_text(out, "l");
    write_nullable_link(out, left);
}

fn write_entry(out: &mut Vec<u8>, prev: &[u8], (key, value, right): (&[u8], &Link, Option<&Link>)) {
    let p = common_prefix_len(prev, key);
    // {k, p, t, v}: map head and each one-letter key are single fixed bytes.
    out.extend_from_slice(&[0xa4, 0x61, b'k']);
    cbor::write_bytes(out, &key[p..]);
    out.extend_from_slice(&[0x61, b'p']);
    cbor::write_head(out, major::UINT, p as u64);
    out.extend_from_slice(&[0x61, b't']);
    write_nullable_link(out, right);
    out.extend_from_slice(&[0x61, b'v']);
    value.write(out);
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
            root: Child::Stub(Link::from_cid(&root)),
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
        let items = sorted_items(entries)?;
        let Some(top) = items.iter().map(|i| i.2).max() else {
            return Ok(Self::new());
        };
        let root = build(&mut items.into_iter().peekable(), top);
        Ok(Self {
            root: Child::Loaded(Box::new(root)),
        })
    }

    fn root_node(&mut self, src: &dyn BlockSource) -> Result<&mut TreeNode, MstError> {
        if let Child::Stub(cid) = &self.root {
            let node = match load_node(cid, None, src) {
                Ok(n) => n,
                // The empty tree's root is the one node allowed to be empty.
                Err(MstError::EmptyNode(_)) => TreeNode {
                    cid: Some(cid.clone()),
                    ..TreeNode::empty(0)
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
                return Ok(Some(value.to_cid()));
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
            *root = TreeNode::new(
                kh,
                vec![Item::Leaf {
                    key: Key::new(key),
                    value: Link::from_cid(&value),
                }],
            );
            return Ok(());
        }
        while kh > root.height {
            let old = std::mem::replace(root, TreeNode::empty(0));
            *root = TreeNode::new(
                old.height + 1,
                vec![Item::Sub(Child::Loaded(Box::new(old)))],
            );
        }
        insert(root, Key::new(key), kh, Link::from_cid(&value), src)
    }

    /// Removes `key`, returning its value.
    ///
    /// # Errors
    /// [`MstError::KeyNotFound`] or [`MstError::MissingBlock`].
    pub fn remove(&mut self, key: &[u8], src: &dyn BlockSource) -> Result<Cid, MstError> {
        let kh = key_height(key);
        let root = self.root_node(src)?;
        let value = remove(root, key, kh, src)?.to_cid();
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
                return Ok(std::mem::replace(v, Link::from_cid(&value)).to_cid());
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
        subtree_cid(&mut self.root, &mut Encoder::default()).to_cid()
    }

    /// The root CID, appending every node block that had to be (re-)encoded to `out`.
    pub fn root_cid_with_blocks(&mut self, out: &mut Vec<(Cid, Vec<u8>)>) -> Cid {
        let mut enc = Encoder {
            emit: Some(out),
            ..Encoder::default()
        };
        subtree_cid(&mut self.root, &mut enc).to_cid()
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

/// Validated build items (key, value, key height) from keys in strictly increasing order.
fn sorted_items<K: AsRef<[u8]>>(
    entries: impl IntoIterator<Item = (K, Cid)>,
) -> Result<Vec<(Key, Link, u8)>, MstError> {
    let mut items: Vec<(Key, Link, u8)> = Vec::new();
    for (k, v) in entries {
        let k = k.as_ref();
        if !is_valid_mst_key(k) {
            return Err(MstError::InvalidKey(key_string(k)));
        }
        if items.last().is_some_and(|(p, _, _)| p.as_slice() >= k) {
            return Err(MstError::KeyOrder(key_string(k)));
        }
        items.push((Key::new(k), Link::from_cid(&v), key_height(k)));
    }
    Ok(items)
}

/// The CID of the one subtree that holds exactly `entries` (keys in strictly increasing
/// order) with its top node on layer `layer`, as the subtree below an entry of layer
/// `layer + 1` must be. `None` when no such subtree exists: no entries (an empty gap has no
/// subtree), or a key too high for the layer.
///
/// An MST's shape follows from its keys alone, so this is how a client that kept only the
/// keys and values of a tree it verified earlier proves that a subtree a newer tree links
/// to is unchanged, without holding or fetching its nodes.
///
/// # Errors
/// [`MstError::KeyOrder`] / [`MstError::InvalidKey`] on bad input.
pub fn subtree_root<K: AsRef<[u8]>>(
    entries: impl IntoIterator<Item = (K, Cid)>,
    layer: u8,
) -> Result<Option<Cid>, MstError> {
    let items = sorted_items(entries)?;
    if items.is_empty() || items.iter().any(|i| i.2 > layer) {
        return Ok(None);
    }
    let mut node = build(&mut items.into_iter().peekable(), layer);
    Ok(Some(node_cid(&mut node, &mut Encoder::default()).to_cid()))
}

/// Builds the node at `height` from sorted items whose heights are all <= `height`,
/// consuming items until one with a greater height (or the end).
fn build(
    it: &mut std::iter::Peekable<std::vec::IntoIter<(Key, Link, u8)>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BlockMap;
    use crate::mst::{decode_node, encode_node};

    /// Keys longer than the inline capacity and values that are not DAG-CBOR CIDs (raw
    /// codec; a SHA-512-style 64-byte digest) take the boxed paths.
    fn odd_entries() -> Vec<(Vec<u8>, Cid)> {
        let mut v: Vec<(Vec<u8>, Cid)> = (0..300u32)
            .map(|i| {
                let key = if i % 3 == 0 {
                    format!("com.example.a.very.long.collection.name.indeed/{i:0>40}")
                } else {
                    format!("app.bsky.feed.post/{i:0>13}")
                };
                let value = match i % 4 {
                    0 => hash::cid_for(hash::RAW, &i.to_be_bytes()),
                    1 => {
                        let mh = multihash::Multihash::<64>::wrap(0x13, &[i as u8; 64]).unwrap();
                        Cid::new_v1(hash::DAG_CBOR, mh)
                    }
                    _ => hash::cid_for_cbor(&i.to_be_bytes()),
                };
                (key.into_bytes(), value)
            })
            .collect();
        v.sort();
        v
    }

    fn blocks_of(tree: &mut Mst) -> (Cid, BlockMap) {
        let mut out = Vec::new();
        let root = tree.root_cid_with_blocks(&mut out);
        let map = out.into_iter().map(|(c, b)| (c, b.into())).collect();
        (root, map)
    }

    #[test]
    fn long_keys_and_non_dag_cbor_values_round_trip_through_blocks() {
        let entries = odd_entries();
        let mut full = Mst::from_sorted(entries.clone()).unwrap();
        let (root, blocks) = blocks_of(&mut full);
        // Every emitted block re-encodes to itself through the public codec.
        for (cid, b) in &blocks {
            assert_eq!(encode_node(&decode_node(b).unwrap()), b.as_ref());
            assert_eq!(hash::cid_for_cbor(b), *cid);
        }
        let mut lazy = Mst::load(root);
        for (k, v) in &entries {
            assert_eq!(lazy.get(k, &blocks).unwrap(), Some(*v));
        }
        // Edit the lazily loaded tree and compare with a tree built from the edited set.
        let mut expected = entries.clone();
        for i in (0..entries.len()).step_by(7) {
            let (k, v) = &entries[i];
            assert_eq!(lazy.remove(k, &blocks).unwrap(), *v);
        }
        expected.retain(|(k, _)| !entries.iter().step_by(7).any(|(r, _)| r == k));
        for (i, (k, v)) in entries.iter().enumerate().skip(1).step_by(5) {
            let new = hash::cid_for(hash::RAW, &(i as u64).to_le_bytes());
            if expected.iter().any(|(e, _)| e == k) {
                assert_eq!(lazy.update(k, new, &blocks).unwrap(), *v);
                for e in &mut expected {
                    if e.0 == *k {
                        e.1 = new;
                    }
                }
            }
        }
        let extra = b"zz.last.collection.with.a.long.name.for.heap.keys/3kaaaaaaaaaaaaaaaaaaaa";
        lazy.insert(extra, hash::cid_for_cbor(b"x"), &blocks)
            .unwrap();
        expected.push((extra.to_vec(), hash::cid_for_cbor(b"x")));
        assert_eq!(
            lazy.root_cid(),
            Mst::from_sorted(expected).unwrap().root_cid()
        );
    }

    #[test]
    fn an_unmodified_loaded_tree_keeps_its_root() {
        let mut full = Mst::from_sorted(odd_entries()).unwrap();
        let (root, blocks) = blocks_of(&mut full);
        let mut lazy = Mst::load(root);
        lazy.get(b"app.bsky.feed.post/0000000000100", &blocks)
            .unwrap();
        assert_eq!(lazy.root_cid(), root);
    }

    #[test]
    fn invalid_keys_are_found_in_any_position_of_a_node() {
        // One node of layer-0 keys; each variant breaks one key's syntax in a way the
        // incremental check must notice (bad byte in the suffix, a second slash, a slash
        // at the end, no slash at all).
        let good: Vec<Vec<u8>> = (0..6)
            .map(|i| format!("app.bsky.feed.post/3jzfcijpj2z{i}a").into_bytes())
            .collect();
        let bad_variants: [&[u8]; 4] = [
            b"app.bsky.feed.post/3jzfcijpj2z2!",
            b"app.bsky.feed.post/3jzfcijpj2z2/",
            b"app.bsky.feed.post/3jzfcijpj2z2/b",
            b"app.bsky.feed.postx",
        ];
        for bad in bad_variants {
            for at in 0..good.len() {
                let mut keys = good.clone();
                keys[at] = bad.to_vec();
                keys.sort();
                keys.dedup();
                let v = hash::cid_for_cbor(b"v");
                let parts: Vec<(&[u8], &Cid, Option<&Cid>)> =
                    keys.iter().map(|k| (k.as_slice(), &v, None)).collect();
                let block = crate::mst::encode_node_parts(None, &parts);
                let cid = hash::cid_for_cbor(&block);
                let mut blocks = BlockMap::default();
                blocks.insert(cid, block.into());
                let err = Mst::load(cid).get(b"a/b", &blocks);
                assert!(
                    matches!(err, Err(MstError::InvalidKey(_))),
                    "{bad:?} at {at}: {err:?}"
                );
            }
        }
    }
}
