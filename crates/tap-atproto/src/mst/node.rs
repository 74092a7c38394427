//! MST node codec: `{e: [{p, k, v, t}], l}` with prefix-compressed keys. `l` and `t` are
//! always present (null when absent), as the canonical encoding requires.

use cid::Cid;

use super::{MstError, common_prefix_len};
use crate::cbor::{self, CborError, Reader, major};

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

/// A CID link as found in a node block: the binary CID (after the `0x00` prefix) and the
/// offset of its tag head (for errors). Parsed by the caller.
#[derive(Clone, Copy)]
pub(crate) struct RawLink<'a> {
    pub(crate) pos: usize,
    pub(crate) bytes: &'a [u8],
}

/// The binary CID prefix of a CIDv1 DAG-CBOR SHA-256 link: version, codec, hash, length.
pub(crate) const STD_CID_PREFIX: [u8; 4] = [0x01, 0x71, 0x12, 0x20];

impl<'a> RawLink<'a> {
    /// The digest, when the link is a CIDv1 DAG-CBOR SHA-256 (the CID of every atproto
    /// node and record).
    #[inline]
    pub(crate) fn std_digest(self) -> Option<&'a [u8; 32]> {
        self.bytes
            .strip_prefix(&STD_CID_PREFIX)
            .and_then(|d| d.try_into().ok())
    }

    /// Checks that the link is a parseable CID (what [`Reader::link`] checks), cheaply for
    /// the usual DAG-CBOR SHA-256 CID.
    fn validate(self) -> Result<Self, MstError> {
        if self.std_digest().is_none() {
            self.cid()?;
        }
        Ok(self)
    }

    /// Parses the link as a `Cid`, with the error [`Reader::link`] gives.
    pub(crate) fn cid(self) -> Result<Cid, MstError> {
        crate::hash::parse_cid_exact(self.bytes).ok_or(MstError::Cbor(CborError::Invalid {
            pos: self.pos,
            what: "malformed CID",
        }))
    }
}

fn raw_link<'a>(r: &mut Reader<'a>) -> Result<RawLink<'a>, MstError> {
    let pos = r.position();
    Ok(RawLink {
        pos,
        bytes: r.link_bytes()?,
    })
}

fn nullable_raw_link<'a>(r: &mut Reader<'a>) -> Result<Option<RawLink<'a>>, MstError> {
    if r.null()? {
        Ok(None)
    } else {
        raw_link(r).map(Some)
    }
}

/// One entry as [`parse_node`] hands it over.
pub(crate) struct ParsedEntry<'a, 'k> {
    /// The full (decompressed) key.
    pub(crate) key: &'k [u8],
    /// On the first entry only: how many entries the node declares (capped by what its
    /// size allows), for pre-sizing.
    pub(crate) first_of: Option<usize>,
    /// Subtree to the right.
    pub(crate) right: Option<RawLink<'a>>,
    /// The value.
    pub(crate) value: RawLink<'a>,
}

/// The one node parser: checks the shape `{e: [{k, p, t, v}], l}` (fields in canonical
/// order), checks each link is a valid CID as it meets it, decompresses each key (into a
/// reused buffer: no allocation per entry) and checks that keys strictly increase, then
/// calls `entry` with it. Returns the node's `l` link. Both [`decode_node`] and the mutable
/// tree's loader go through here, so they accept exactly the same blocks and fail with the
/// same errors.
pub(crate) fn parse_node<'a>(
    bytes: &'a [u8],
    mut entry: impl FnMut(ParsedEntry<'a, '_>) -> Result<(), MstError>,
) -> Result<Option<RawLink<'a>>, MstError> {
    let mut r = Reader::new(bytes);
    if r.map_len()? != 2 || r.text_bytes()? != b"e" {
        return Err(MstError::Malformed("node must be {e, l}"));
    }
    let n = r.array_len()?;
    // The smallest entry takes 20 bytes (12 of field names and heads, a link of 8), so a
    // lying count cannot inflate this beyond what the block could hold.
    let count = usize::try_from(n)
        .unwrap_or(usize::MAX)
        .min(bytes.len() / 20);
    // One buffer for the node's keys: each shares a prefix with the one before.
    let mut key: Vec<u8> = Vec::new();
    for i in 0..n {
        let (suffix, p, right, value) = general_entry(&mut r)?;
        let p = usize::try_from(p).unwrap_or(usize::MAX);
        if i == 0 {
            if p != 0 {
                return Err(MstError::Malformed("first entry must have p = 0"));
            }
            key.extend_from_slice(suffix);
        } else {
            let prev = key.as_slice();
            if p > prev.len() {
                return Err(MstError::Malformed("prefix longer than previous key"));
            }
            // The new key shares prev[..p] with the previous one, so it is greater exactly
            // when its suffix is greater than the previous key's rest.
            let greater = suffix > &prev[p..];
            key.truncate(p);
            key.extend_from_slice(suffix);
            if !greater {
                return Err(MstError::KeyOrder(super::key_string(key.as_slice())));
            }
        }
        entry(ParsedEntry {
            key: key.as_slice(),
            first_of: (i == 0).then_some(count),
            right,
            value,
        })?;
    }
    if r.text_bytes()? != b"l" {
        return Err(MstError::Malformed("node must be {e, l}"));
    }
    let left = nullable_raw_link(&mut r)?
        .map(RawLink::validate)
        .transpose()?;
    r.finish()?;
    Ok(left)
}

type EntryParts<'a> = (&'a [u8], u64, Option<RawLink<'a>>, RawLink<'a>);

/// Reads one entry with full DAG-CBOR checks (any head encoding).
fn general_entry<'a>(r: &mut Reader<'a>) -> Result<EntryParts<'a>, MstError> {
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
    let p = r.uint()?;
    if r.text_bytes()? != b"t" {
        return Err(MstError::Malformed("entry key order"));
    }
    // Links are checked as they are read, so errors come in reading order.
    let right = nullable_raw_link(r)?.map(RawLink::validate).transpose()?;
    if r.text_bytes()? != b"v" {
        return Err(MstError::Malformed("entry key order"));
    }
    let value = raw_link(r)?.validate()?;
    Ok((suffix, p, right, value))
}

/// Decodes a node block, decompressing keys. Checks shape and that keys strictly increase;
/// layers and key syntax are checked by the walk.
///
/// # Errors
/// [`MstError`] on malformed input.
pub fn decode_node(bytes: &[u8]) -> Result<NodeData, MstError> {
    let mut entries: Vec<Entry> = Vec::new();
    let left = parse_node(bytes, |e| {
        entries.push(Entry {
            key: e.key.to_vec(),
            value: e.value.cid()?,
            right: e.right.map(RawLink::cid).transpose()?,
        });
        Ok(())
    })?;
    Ok(NodeData {
        left: left.map(RawLink::cid).transpose()?,
        entries,
    })
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::hash;

    /// The decoder as it was before the shared parser and its fast path: every field read
    /// through the general reader. The oracle for [`decode_node`].
    fn reference_decode(bytes: &[u8]) -> Result<NodeData, MstError> {
        let mut r = Reader::new(bytes);
        if r.map_len()? != 2 || r.text_bytes()? != b"e" {
            return Err(MstError::Malformed("node must be {e, l}"));
        }
        let n = r.array_len()?;
        let mut entries: Vec<Entry> = Vec::new();
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
                    let mut k = prev.key[..p].to_vec();
                    k.extend_from_slice(suffix);
                    if k <= prev.key {
                        return Err(MstError::KeyOrder(crate::mst::key_string(&k)));
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

    /// A node whose keys are short, medium, or (width 0) grow from short to longer than the
    /// parser's inline key buffer.
    fn sample_node(width: usize) -> Vec<u8> {
        let keys: Vec<Vec<u8>> = (0..6usize)
            .map(|i| {
                let rkey = if width == 0 {
                    "a".repeat([2, 60, 100, 108, 115, 200][i])
                } else {
                    format!("{i:0>width$}")
                };
                format!("app.bsky.feed.like/{rkey}").into_bytes()
            })
            .collect();
        let v = hash::cid_for_cbor(b"v");
        let raw = hash::cid_for(hash::RAW, b"r");
        let parts: Vec<(&[u8], &Cid, Option<&Cid>)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let right = (i % 2 == 0).then_some(&v);
                (k.as_slice(), if i == 3 { &raw } else { &v }, right)
            })
            .collect();
        encode_node_parts(Some(&v), &parts)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn decode_node_matches_the_reference_decoder_on_mutated_nodes(
            width in prop::sample::select(vec![0usize, 2, 30, 140]),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut b = sample_node(width);
            for (at, v) in flips {
                let i = at.index(b.len());
                b[i] = v;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len()));
            }
            prop_assert_eq!(decode_node(&b), reference_decode(&b));
        }
    }
}
