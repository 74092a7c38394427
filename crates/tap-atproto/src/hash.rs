//! SHA-256 and CID helpers: the single `sha256` every check goes through (plus a variant
//! that records midstates and one that resumes from them, for re-hashing an edited block
//! from its first changed byte), CIDv1 construction, fast parsing of binary CIDs, base32
//! string encoding, and the block map keyed by CID.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;
use cid::Cid;
use multihash::Multihash;

/// Multicodec code of DAG-CBOR blocks (commits, MST nodes, records).
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw blocks (blobs).
pub const RAW: u64 = 0x55;
/// Multihash code of SHA-256.
pub const SHA2_256: u64 = 0x12;

/// SHA-256 of `data`. Everything hashes through here or the midstate functions below (all
/// sha2, which uses SHA-NI when the CPU has it), so the backend can be swapped in one
/// module.
#[must_use]
pub fn sha256(data: &[u8]) -> [u8; 32] {
    // The raw compression function with our own padding: ~10 ns less per call than the
    // `Digest` wrapper's buffering, which matters for the many one-block hashes (key
    // heights).
    sha256_resume(SHA256_INIT, 0, data)
}

/// Bytes between two recorded SHA-256 midstates (four compression blocks): see
/// [`sha256_recording`].
pub(crate) const MIDSTATE_STRIDE: usize = 256;

/// A SHA-256 chaining state after a whole number of 64-byte blocks.
pub(crate) type Midstate = [u32; 8];

const SHA256_INIT: Midstate = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// SHA-256 of `data` that also appends the chaining state after every complete
/// [`MIDSTATE_STRIDE`] bytes to `mids` (state `i` covers `data[..(i + 1) * STRIDE]`). A
/// block that is later re-encoded with only its tail changed (an MST node whose child link
/// changed) can then be re-hashed from the last state before the first changed byte
/// ([`sha256_resume`]) instead of from the start.
pub(crate) fn sha256_recording(data: &[u8], mids: &mut Vec<Midstate>) -> [u8; 32] {
    let mut st = SHA256_INIT;
    let (blocks, tail) = data.as_chunks::<64>();
    for group in blocks.chunks(MIDSTATE_STRIDE / 64) {
        sha2::block_api::compress256(&mut st, group);
        if group.len() == MIDSTATE_STRIDE / 64 {
            mids.push(st);
        }
    }
    sha256_finish(st, data.len(), tail)
}

/// Finishes a SHA-256 whose first `done` bytes (a multiple of 64) left the chaining state
/// `state`, over the remaining bytes `rest`.
pub(crate) fn sha256_resume(state: Midstate, done: usize, rest: &[u8]) -> [u8; 32] {
    let mut st = state;
    let (blocks, tail) = rest.as_chunks::<64>();
    sha2::block_api::compress256(&mut st, blocks);
    sha256_finish(st, done + rest.len(), tail)
}

/// Pads and compresses the final (< 64-byte) `tail` of a message of `total` bytes.
fn sha256_finish(mut st: Midstate, total: usize, tail: &[u8]) -> [u8; 32] {
    let mut last = [0u8; 128];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    let n = if tail.len() < 56 { 64 } else { 128 };
    last[n - 8..n].copy_from_slice(&((total as u64) * 8).to_be_bytes());
    let (blocks, _) = last[..n].as_chunks::<64>();
    sha2::block_api::compress256(&mut st, blocks);
    let mut out = [0u8; 32];
    for (o, w) in out.chunks_exact_mut(4).zip(st) {
        o.copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// The CIDv1 (SHA-256) of a block with the given codec.
#[must_use]
pub fn cid_for(codec: u64, data: &[u8]) -> Cid {
    cid_from_digest(codec, &sha256(data))
}

/// The CIDv1 (DAG-CBOR, SHA-256) of an encoded DAG-CBOR block.
#[must_use]
pub fn cid_for_cbor(data: &[u8]) -> Cid {
    cid_for(DAG_CBOR, data)
}

/// A CIDv1 with a SHA-256 digest.
#[must_use]
pub fn cid_from_digest(codec: u64, digest: &[u8; 32]) -> Cid {
    // A 32-byte digest always fits the 64-byte multihash.
    let mh = Multihash::<64>::wrap(SHA2_256, digest).unwrap_or_default();
    Cid::new_v1(codec, mh)
}

/// Whether `data` hashes to `cid`. Only SHA-256 CIDs can match; anything else is `false`.
#[must_use]
pub fn block_matches_cid(cid: &Cid, data: &[u8]) -> bool {
    let mh = cid.hash();
    mh.code() == SHA2_256 && mh.size() == 32 && mh.digest() == sha256(data)
}

/// Reads an unsigned LEB128 varint (at most 9 bytes, minimal) from `buf`, returning the
/// value and the number of bytes read.
#[must_use]
pub fn read_uvarint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(9) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // Reject non-minimal encodings (a trailing zero group).
            if b == 0 && i > 0 {
                return None;
            }
            return Some((v, i + 1));
        }
    }
    None
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn write_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Parses a binary CIDv1 at the start of `buf`; returns it and its length in bytes.
/// CIDv0 and digests longer than 64 bytes are rejected.
#[must_use]
pub fn parse_cid_prefix(buf: &[u8]) -> Option<(Cid, usize)> {
    // Fast path: CIDv1, DAG-CBOR or raw, SHA-256 (every block atproto writes).
    if let [1, codec @ (0x71 | 0x55), 0x12, 0x20, rest @ ..] = buf
        && rest.len() >= 32
    {
        let mh = Multihash::<64>::wrap(SHA2_256, &rest[..32]).ok()?;
        return Some((Cid::new_v1(u64::from(*codec), mh), 36));
    }
    let (version, a) = read_uvarint(buf)?;
    if version != 1 {
        return None;
    }
    let (codec, b) = read_uvarint(&buf[a..])?;
    let (code, c) = read_uvarint(&buf[a + b..])?;
    let (len, d) = read_uvarint(&buf[a + b + c..])?;
    let start = a + b + c + d;
    let len = usize::try_from(len).ok()?;
    if len > 64 {
        return None;
    }
    let digest = buf.get(start..start + len)?;
    let mh = Multihash::<64>::wrap(code, digest).ok()?;
    Some((Cid::new_v1(codec, mh), start + len))
}

/// Parses a binary CIDv1 that spans all of `buf`.
#[must_use]
pub fn parse_cid_exact(buf: &[u8]) -> Option<Cid> {
    match parse_cid_prefix(buf) {
        Some((cid, n)) if n == buf.len() => Some(cid),
        _ => None,
    }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Appends the multibase base32 string form (`b…`) of binary CID bytes to `out`.
pub fn push_cid_string_from_bytes(cid_bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(1 + cid_bytes.len().div_ceil(5) * 8);
    out.push(b'b');
    let mut buffer: u64 = 0;
    let mut bits = 0u32;
    for &b in cid_bytes {
        buffer = (buffer << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buffer >> bits) & 31) as usize]);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize]);
    }
}

/// Appends the `b…` string form of `cid` to `out`.
pub fn push_cid_string(cid: &Cid, out: &mut Vec<u8>) {
    let mut raw = [0u8; 80];
    let n = write_cid_bytes(cid, &mut raw);
    push_cid_string_from_bytes(&raw[..n], out);
}

/// Writes the binary form of `cid` into `out`, returning its length (at most 80 bytes).
pub fn write_cid_bytes(cid: &Cid, out: &mut [u8; 80]) -> usize {
    let mut n = 0;
    let mut put = |v: u64, out: &mut [u8; 80]| {
        let mut v = v;
        while v >= 0x80 && n < 80 {
            out[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        if n < 80 {
            out[n] = v as u8;
            n += 1;
        }
    };
    put(1, out);
    put(cid.codec(), out);
    put(cid.hash().code(), out);
    put(u64::from(cid.hash().size()), out);
    let digest = cid.hash().digest();
    let d = digest.len().min(80 - n);
    out[n..n + d].copy_from_slice(&digest[..d]);
    n + d
}

/// A hasher for CID keys: the digest is already uniformly random (SHA-256), so folding the
/// bytes with a multiply is enough and much cheaper than SipHash.
#[derive(Default, Clone, Copy)]
pub struct CidHasher(u64);

impl Hasher for CidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

/// `BuildHasher` for maps keyed by [`Cid`].
pub type BuildCidHasher = BuildHasherDefault<CidHasher>;

/// Blocks by CID. Values are zero-copy slices of the buffer they were read from.
pub type BlockMap = HashMap<Cid, Bytes, BuildCidHasher>;

/// Read access to blocks by CID (a CAR's blocks, a repo store, ...).
pub trait BlockSource {
    /// The block's bytes, or `None` when it is not available.
    fn get_block(&self, cid: &Cid) -> Option<&[u8]>;
}

impl BlockSource for BlockMap {
    fn get_block(&self, cid: &Cid) -> Option<&[u8]> {
        self.get(cid).map(Bytes::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_string_matches_cid_crate() {
        let cid = cid_for_cbor(b"\xa0");
        let mut s = Vec::new();
        push_cid_string(&cid, &mut s);
        assert_eq!(String::from_utf8(s).unwrap(), cid.to_string());
        assert_eq!(parse_cid_exact(&cid.to_bytes()), Some(cid));
    }

    #[test]
    fn recording_and_resuming_give_the_plain_digest_at_every_length_and_split() {
        let data: Vec<u8> = (0..1100u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in (0..700).chain([1023, 1024, 1025, 1100]) {
            let d = &data[..len];
            let reference: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(d).into();
            assert_eq!(sha256(d), reference, "len {len}");
            let mut mids = Vec::new();
            assert_eq!(sha256_recording(d, &mut mids), sha256(d), "len {len}");
            assert_eq!(mids.len(), len / MIDSTATE_STRIDE);
            for (i, m) in mids.iter().enumerate() {
                let done = (i + 1) * MIDSTATE_STRIDE;
                assert_eq!(
                    sha256_resume(*m, done, &d[done..]),
                    sha256(d),
                    "len {len} at {done}"
                );
            }
            assert_eq!(sha256_resume(SHA256_INIT, 0, d), sha256(d));
        }
    }

    #[test]
    fn varint_rejects_overlong_and_truncated() {
        assert_eq!(read_uvarint(&[0x80, 0x00]), None);
        assert_eq!(read_uvarint(&[0x80]), None);
        assert_eq!(read_uvarint(&[0xe7, 0x01]), Some((0xe7, 2)));
    }
}
