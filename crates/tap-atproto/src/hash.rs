//! SHA-256 and CID helpers: the single `sha256` every check goes through, CIDv1
//! construction, parsing of binary CIDs, base32 string encoding, and the block map keyed by
//! CID.

use std::collections::HashMap;

use bytes::Bytes;
use cid::Cid;
use multihash::Multihash;

/// Multicodec code of DAG-CBOR blocks (commits, MST nodes, records).
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec code of raw blocks (blobs).
pub const RAW: u64 = 0x55;
/// Multihash code of SHA-256.
pub const SHA2_256: u64 = 0x12;

/// SHA-256 of `data`. Everything hashes through here (sha2, which uses SHA-NI when the CPU
/// has it), so the backend can be swapped in one place.
#[must_use]
pub fn sha256(data: &[u8]) -> [u8; 32] {
    <sha2::Sha256 as sha2::Digest>::digest(data).into()
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

/// Blocks by CID. Values are zero-copy slices of the buffer they were read from.
pub type BlockMap = HashMap<Cid, Bytes>;

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
    fn varint_rejects_overlong_and_truncated() {
        assert_eq!(read_uvarint(&[0x80, 0x00]), None);
        assert_eq!(read_uvarint(&[0x80]), None);
        assert_eq!(read_uvarint(&[0xe7, 0x01]), Some((0xe7, 2)));
    }
}
