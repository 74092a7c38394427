//! CAR v1 reading: one parsing core, two front-ends. [`read_car`]/[`CarSlice`] parse an
//! in-memory `Bytes` zero-copy (firehose commits); [`CarStream`] is fed chunk by chunk as
//! an HTTP body arrives (sync push API). Every block's SHA-256 is checked against its CID,
//! and header, block and total sizes are capped by [`CarLimits`].

use bytes::Bytes;
use cid::Cid;

use crate::cbor::{self, CborError, Reader};
use crate::hash::{self, BlockMap};

/// Size caps applied while reading a CAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarLimits {
    /// Largest header (the DAG-CBOR map after the first varint), in bytes.
    pub max_header_bytes: usize,
    /// Largest block section (CID + data), in bytes.
    pub max_block_bytes: usize,
    /// Largest whole CAR, in bytes.
    pub max_total_bytes: u64,
}

impl CarLimits {
    /// Limits for the `blocks` of one firehose message (2 MiB in total).
    #[must_use]
    pub const fn firehose() -> Self {
        Self {
            max_header_bytes: 4096,
            max_block_bytes: 2 << 20,
            max_total_bytes: 2 << 20,
        }
    }

    /// Limits for a whole repository export (`getRepo`): 2 MiB blocks, 16 GiB in total.
    #[must_use]
    pub const fn repo() -> Self {
        Self {
            max_header_bytes: 4096,
            max_block_bytes: 2 << 20,
            max_total_bytes: 16 << 30,
        }
    }
}

impl Default for CarLimits {
    fn default() -> Self {
        Self::repo()
    }
}

/// Why a CAR could not be read. Every malformed input maps to one of these; none panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    /// The input ended in the middle of the header or a block.
    #[error("CAR truncated")]
    Truncated,
    /// A length prefix is not a valid varint.
    #[error("malformed varint length at byte {0}")]
    BadVarint(u64),
    /// The header is not `{roots: [links], version: 1}`.
    #[error("malformed CAR header: {0}")]
    BadHeader(&'static str),
    /// The header's DAG-CBOR is malformed.
    #[error("malformed CAR header: {0}")]
    HeaderCbor(#[from] CborError),
    /// The header is larger than allowed.
    #[error("CAR header of {0} bytes exceeds the limit")]
    HeaderTooLarge(u64),
    /// A block is larger than allowed.
    #[error("CAR block of {0} bytes exceeds the limit")]
    BlockTooLarge(u64),
    /// The CAR is larger than allowed.
    #[error("CAR exceeds {0} bytes")]
    TotalTooLarge(u64),
    /// A block's CID is not a parseable CIDv1.
    #[error("malformed block CID at byte {0}")]
    BadCid(u64),
    /// A block's CID does not use SHA-256, so it cannot be verified.
    #[error("block {0} does not use a SHA-256 CID")]
    UnsupportedHash(Cid),
    /// A block's bytes do not hash to its CID.
    #[error("block {0} does not hash to its CID")]
    HashMismatch(Cid),
}

/// The CAR header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarHeader {
    /// Root CIDs; for a repo or commit CAR the first is the commit.
    pub roots: Vec<Cid>,
}

/// Parses the header at the start of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the header and the bytes it took.
fn parse_header(buf: &[u8], limits: &CarLimits) -> Result<Option<(CarHeader, usize)>, CarError> {
    let Some((len, n)) = varint(buf, 0)? else {
        return Ok(None);
    };
    if len > limits.max_header_bytes as u64 {
        return Err(CarError::HeaderTooLarge(len));
    }
    let len = len as usize;
    let Some(body) = buf.get(n..n + len) else {
        return Ok(None);
    };
    let mut r = Reader::new(body);
    let pairs = r.map_len()?;
    let mut roots = None;
    let mut version = None;
    for _ in 0..pairs {
        match r.text()? {
            "roots" => {
                let count = r.array_len()?;
                let mut v = Vec::new();
                for _ in 0..count {
                    v.push(r.link()?);
                }
                roots = Some(v);
            }
            "version" => version = Some(r.uint()?),
            _ => r.skip_value(1)?,
        }
    }
    r.finish()?;
    if version != Some(1) {
        return Err(CarError::BadHeader("version must be 1"));
    }
    let roots = roots.ok_or(CarError::BadHeader("missing roots"))?;
    Ok(Some((CarHeader { roots }, n + len)))
}

/// Reads a varint length at `buf[0..]`; `Ok(None)` if it is incomplete. `at` is the
/// absolute offset, for errors.
fn varint(buf: &[u8], at: u64) -> Result<Option<(u64, usize)>, CarError> {
    match hash::read_uvarint(buf) {
        Some(v) => Ok(Some(v)),
        // An incomplete varint has every byte's continuation bit set and fewer than 9 bytes.
        None if buf.len() < 9 && buf.iter().all(|b| b & 0x80 != 0) => Ok(None),
        None => Err(CarError::BadVarint(at)),
    }
}

/// One block section located in a buffer.
struct Located {
    cid: Cid,
    data: std::ops::Range<usize>,
    consumed: usize,
}

/// Parses and verifies the block section at the start of `buf`; `Ok(None)` when more bytes
/// are needed. `at` is the absolute offset of `buf[0]`, for errors.
fn parse_block(buf: &[u8], at: u64, limits: &CarLimits) -> Result<Option<Located>, CarError> {
    let Some((len, n)) = varint(buf, at)? else {
        return Ok(None);
    };
    if len > limits.max_block_bytes as u64 {
        return Err(CarError::BlockTooLarge(len));
    }
    let len = len as usize;
    let Some(section) = buf.get(n..n + len) else {
        return Ok(None);
    };
    let (cid, cid_len) = hash::parse_cid_prefix(section).ok_or(CarError::BadCid(at))?;
    let mh = cid.hash();
    if mh.code() != hash::SHA2_256 || mh.size() != 32 {
        return Err(CarError::UnsupportedHash(cid));
    }
    let data = n + cid_len..n + len;
    if mh.digest() != hash::sha256(&buf[data.clone()]) {
        return Err(CarError::HashMismatch(cid));
    }
    Ok(Some(Located {
        cid,
        data,
        consumed: n + len,
    }))
}

/// Zero-copy reader over a whole CAR held in memory. Iterate it for `(cid, bytes)` blocks,
/// each already hash-verified; the bytes are slices of the input `Bytes`.
#[derive(Debug, Clone)]
pub struct CarSlice {
    buf: Bytes,
    pos: usize,
    header: CarHeader,
    limits: CarLimits,
    failed: bool,
}

impl CarSlice {
    /// Parses the header of `buf`.
    ///
    /// # Errors
    /// [`CarError`] when the header is malformed, too large, or the CAR exceeds the total cap.
    pub fn new(buf: Bytes, limits: CarLimits) -> Result<Self, CarError> {
        if buf.len() as u64 > limits.max_total_bytes {
            return Err(CarError::TotalTooLarge(limits.max_total_bytes));
        }
        let (header, pos) = parse_header(&buf, &limits)?.ok_or(CarError::Truncated)?;
        Ok(Self {
            buf,
            pos,
            header,
            limits,
            failed: false,
        })
    }

    /// The header.
    #[must_use]
    pub fn header(&self) -> &CarHeader {
        &self.header
    }
}

impl Iterator for CarSlice {
    type Item = Result<(Cid, Bytes), CarError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let res = match parse_block(&self.buf[self.pos..], self.pos as u64, &self.limits) {
            Ok(Some(l)) => {
                let data = self
                    .buf
                    .slice(self.pos + l.data.start..self.pos + l.data.end);
                self.pos += l.consumed;
                Ok((l.cid, data))
            }
            Ok(None) => Err(CarError::Truncated),
            Err(e) => Err(e),
        };
        self.failed = res.is_err();
        Some(res)
    }
}

/// A fully read in-memory CAR.
#[derive(Debug, Clone, Default)]
pub struct Car {
    /// Header roots.
    pub roots: Vec<Cid>,
    /// Every block, hash-verified, as zero-copy slices of the input.
    pub blocks: BlockMap,
}

/// Reads a whole CAR from memory into a block map, verifying every block.
///
/// # Errors
/// [`CarError`] on any malformed, oversized, truncated or lying input.
pub fn read_car(buf: Bytes, limits: CarLimits) -> Result<Car, CarError> {
    let slice = CarSlice::new(buf, limits)?;
    let roots = slice.header().roots.clone();
    let mut blocks = BlockMap::default();
    for item in slice {
        let (cid, data) = item?;
        blocks.insert(cid, data);
    }
    Ok(Car { roots, blocks })
}

/// Incremental CAR reader: [`CarStream::push`] chunks as they arrive, then drain
/// [`CarStream::next_block`] until it returns `Ok(None)`; call [`CarStream::finish`] after
/// the last chunk. Memory held is at most one block plus one chunk.
#[derive(Debug)]
pub struct CarStream {
    buf: Vec<u8>,
    start: usize,
    offset: u64,
    header: Option<CarHeader>,
    limits: CarLimits,
    total: u64,
}

impl CarStream {
    /// A reader that has seen no bytes yet.
    #[must_use]
    pub fn new(limits: CarLimits) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            offset: 0,
            header: None,
            limits,
            total: 0,
        }
    }

    /// Appends a chunk of the CAR.
    ///
    /// # Errors
    /// [`CarError::TotalTooLarge`] once the total exceeds the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), CarError> {
        self.total += chunk.len() as u64;
        if self.total > self.limits.max_total_bytes {
            return Err(CarError::TotalTooLarge(self.limits.max_total_bytes));
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The header, once enough bytes have arrived to parse it.
    ///
    /// # Errors
    /// [`CarError`] when the header is malformed.
    pub fn header(&mut self) -> Result<Option<&CarHeader>, CarError> {
        if self.header.is_none()
            && let Some((h, n)) = parse_header(&self.buf[self.start..], &self.limits)?
        {
            self.header = Some(h);
            self.start += n;
            self.offset += n as u64;
        }
        Ok(self.header.as_ref())
    }

    /// The next complete, hash-verified block, or `Ok(None)` when more input is needed.
    /// The block's bytes are copied into their own allocation (so holding one never pins a
    /// larger buffer).
    ///
    /// # Errors
    /// [`CarError`] on malformed, oversized or lying blocks.
    pub fn next_block(&mut self) -> Result<Option<(Cid, Bytes)>, CarError> {
        if self.header()?.is_none() {
            return Ok(None);
        }
        let rest = &self.buf[self.start..];
        if rest.is_empty() {
            return Ok(None);
        }
        match parse_block(rest, self.offset, &self.limits)? {
            Some(l) => {
                let data = Bytes::copy_from_slice(&rest[l.data]);
                self.start += l.consumed;
                self.offset += l.consumed as u64;
                Ok(Some((l.cid, data)))
            }
            None => Ok(None),
        }
    }

    /// Checks that the input ended on a block boundary after a header.
    ///
    /// # Errors
    /// [`CarError::Truncated`] when bytes of an incomplete header or block remain.
    pub fn finish(&mut self) -> Result<(), CarError> {
        if self.header()?.is_none() || self.start < self.buf.len() {
            return Err(CarError::Truncated);
        }
        Ok(())
    }

    /// Total bytes pushed so far.
    #[must_use]
    pub fn bytes_seen(&self) -> u64 {
        self.total
    }
}

/// Writes a CAR v1 with the given roots and blocks (in the given order). For builders and
/// tests.
#[must_use]
pub fn write_car<'a>(
    roots: &[Cid],
    blocks: impl IntoIterator<Item = (&'a Cid, &'a [u8])>,
) -> Vec<u8> {
    let mut out = Vec::new();
    write_car_header(&mut out, roots);
    for (cid, data) in blocks {
        write_car_block(&mut out, cid, data);
    }
    out
}

/// Appends a CAR v1 header.
pub fn write_car_header(out: &mut Vec<u8>, roots: &[Cid]) {
    let mut h = Vec::new();
    cbor::write_head(&mut h, cbor::major::MAP, 2);
    cbor::write_text(&mut h, "roots");
    cbor::write_head(&mut h, cbor::major::ARRAY, roots.len() as u64);
    for r in roots {
        cbor::write_link(&mut h, r);
    }
    cbor::write_text(&mut h, "version");
    cbor::write_int(&mut h, 1);
    hash::write_uvarint(out, h.len() as u64);
    out.extend_from_slice(&h);
}

/// Appends one CAR block section.
pub fn write_car_block(out: &mut Vec<u8>, cid: &Cid, data: &[u8]) {
    let c = cid.to_bytes();
    hash::write_uvarint(out, (c.len() + data.len()) as u64);
    out.extend_from_slice(&c);
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<Cid>) {
        let a = b"\xa1aa\x01".to_vec();
        let b = b"\xa1ab\x02".to_vec();
        let ca = hash::cid_for_cbor(&a);
        let cb = hash::cid_for_cbor(&b);
        (
            write_car(&[ca], [(&ca, a.as_slice()), (&cb, b.as_slice())]),
            vec![ca, cb],
        )
    }

    #[test]
    fn slice_and_stream_agree_for_every_chunk_size() {
        let (car, cids) = sample();
        let parsed = read_car(Bytes::from(car.clone()), CarLimits::default()).unwrap();
        assert_eq!(parsed.roots, vec![cids[0]]);
        assert_eq!(parsed.blocks.len(), 2);
        for chunk in 1..car.len() {
            let mut s = CarStream::new(CarLimits::default());
            let mut got = Vec::new();
            for c in car.chunks(chunk) {
                s.push(c).unwrap();
                while let Some((cid, _)) = s.next_block().unwrap() {
                    got.push(cid);
                }
            }
            s.finish().unwrap();
            assert_eq!(got, cids);
        }
    }

    #[test]
    fn truncation_and_lies_are_typed_errors() {
        let (car, _) = sample();
        for cut in 0..car.len() {
            let r = read_car(Bytes::copy_from_slice(&car[..cut]), CarLimits::default());
            if cut > 0 && r.is_ok() {
                // Cutting exactly on a block boundary leaves a valid, shorter CAR.
                continue;
            }
            assert!(r.is_err() || cut == 0);
        }
        let mut lying = car.clone();
        let last = lying.len() - 1;
        lying[last] ^= 1;
        assert!(matches!(
            read_car(Bytes::from(lying), CarLimits::default()),
            Err(CarError::HashMismatch(_))
        ));
        let small = CarLimits {
            max_block_bytes: 8,
            ..CarLimits::default()
        };
        assert!(matches!(
            read_car(Bytes::from(car), small),
            Err(CarError::BlockTooLarge(_))
        ));
    }
}
