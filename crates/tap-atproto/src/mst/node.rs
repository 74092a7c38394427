//! MST node codec: `{e: [{p, k, v, t}], l}` with prefix-compressed keys. `l` and `t` are
//! always present (null when absent), as the canonical encoding requires.

use cid::Cid;

use super::{MstError, common_prefix_len};
use crate::cbor::{self, Reader, major};

/// One key/value entry of a node, with the subtree to its right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full (decompressed) key.
    pub key: Vec<u8>,
    /// The record CID.
    pub value: Cid,
    /// Subtree between this key and the next.
    pub right: Option<Cid>,
}

/// A decoded node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeData {
    /// Subtree left of the first key.
    pub left: Option<Cid>,
    /// Entries in key order.
    pub entries: Vec<Entry>,
}

/// Decodes a node block, decompressing keys. Checks shape and that keys strictly increase;
/// layers and key syntax are checked by the walk.
///
/// # Errors
/// [`MstError`] on malformed input.
pub fn decode_node(bytes: &[u8]) -> Result<NodeData, MstError> {
    let mut r = Reader::new(bytes);
    if r.map_len()? != 2 || r.text_bytes()? != b"e" {
        return Err(MstError::Malformed("node must be {e, l}"));
    }
    let n = r.array_len()?;
    // Each entry takes at least 8 bytes, so a huge count fails fast without allocating.
    let mut entries: Vec<Entry> = Vec::with_capacity((n as usize).min(bytes.len() / 8));
    for _ in 0..n {
        if r.map_len()? != 4 {
            return Err(MstError::Malformed("entry must be {k, p, t, v}"));
        }
        if r.text_bytes()? != b"k" {
            return Err(MstError::Malformed("entry key order"));
        }
        let suffix = r.bytes()?;
        if r.text_bytes()? != b"p" {
            return Err(MstError::Malformed("entry key order"));
        }
        let p = usize::try_from(r.uint()?).unwrap_or(usize::MAX);
        if r.text_bytes()? != b"t" {
            return Err(MstError::Malformed("entry key order"));
        }
        let right = r.nullable_link()?;
        if r.text_bytes()? != b"v" {
            return Err(MstError::Malformed("entry key order"));
        }
        let value = r.link()?;
        let key = match entries.last() {
            None if p == 0 => suffix.to_vec(),
            None => return Err(MstError::Malformed("first entry must have p = 0")),
            Some(prev) => {
                if p > prev.key.len() {
                    return Err(MstError::Malformed("prefix longer than previous key"));
                }
                let mut k = Vec::with_capacity(p + suffix.len());
                k.extend_from_slice(&prev.key[..p]);
                k.extend_from_slice(suffix);
                if k <= prev.key {
                    return Err(MstError::KeyOrder(super::key_string(&k)));
                }
                k
            }
        };
        entries.push(Entry { key, value, right });
    }
    if r.text_bytes()? != b"l" {
        return Err(MstError::Malformed("node must be {e, l}"));
    }
    let left = r.nullable_link()?;
    r.finish()?;
    Ok(NodeData { left, entries })
}

/// Encodes a node canonically (maximal shared prefixes, null `l`/`t` written out).
#[must_use]
pub fn encode_node(node: &NodeData) -> Vec<u8> {
    let entries: Vec<(&[u8], &Cid, Option<&Cid>)> = node
        .entries
        .iter()
        .map(|e| (e.key.as_slice(), &e.value, e.right.as_ref()))
        .collect();
    encode_node_parts(node.left.as_ref(), &entries)
}

/// Encodes a node from borrowed parts: `(key, value, right subtree)` per entry.
#[must_use]
pub fn encode_node_parts(left: Option<&Cid>, entries: &[(&[u8], &Cid, Option<&Cid>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 96);
    cbor::write_head(&mut out, major::MAP, 2);
    cbor::write_text(&mut out, "e");
    cbor::write_head(&mut out, major::ARRAY, entries.len() as u64);
    let mut prev: &[u8] = &[];
    for (key, value, right) in entries {
        let p = common_prefix_len(prev, key);
        cbor::write_head(&mut out, major::MAP, 4);
        cbor::write_text(&mut out, "k");
        cbor::write_bytes(&mut out, &key[p..]);
        cbor::write_text(&mut out, "p");
        cbor::write_head(&mut out, major::UINT, p as u64);
        cbor::write_text(&mut out, "t");
        cbor::write_nullable_link(&mut out, *right);
        cbor::write_text(&mut out, "v");
        cbor::write_link(&mut out, value);
        prev = key;
    }
    cbor::write_text(&mut out, "l");
    cbor::write_nullable_link(&mut out, left);
    out
}
