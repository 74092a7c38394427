//! Records a resync cannot judge yet: their collection's rule reads other records, and the
//! repo's key order may bring them before those (`listitem` sorts before `starterpack`).
//! They wait in an unlinked temporary file, not in memory, and are read back one
//! collection at a time once what they read is decided.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use tap_atproto::Cid;

/// The deferred records of one snapshot.
pub(super) struct Deferred {
    file: Option<BufWriter<File>>,
    /// Bytes written so far (where a reader stops).
    bytes: u64,
    cap: u64,
    /// Collections with a deferred record, in the order they came.
    collections: Vec<String>,
}

/// One deferred record.
pub(super) struct Entry {
    pub rkey: String,
    pub cid: Cid,
    pub bytes: Vec<u8>,
}

impl Deferred {
    /// Nothing deferred; at most `cap` bytes will be.
    pub(super) fn new(cap: u64) -> Self {
        Self {
            file: None,
            bytes: 0,
            cap,
            collections: Vec::new(),
        }
    }

    /// Keeps a record for later.
    pub(super) fn push(
        &mut self,
        collection: &str,
        rkey: &str,
        cid: &Cid,
        record: &[u8],
    ) -> io::Result<()> {
        let cid = cid.to_bytes();
        // Exactly what is written: four parts, each after its 4-byte length.
        let size = (collection.len() + rkey.len() + cid.len() + record.len() + 16) as u64;
        if self.bytes + size > self.cap {
            return Err(io::Error::other(format!(
                "records waiting for their rules exceed {} bytes",
                self.cap
            )));
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(BufWriter::new(tempfile::tempfile()?)),
        };
        for part in [collection.as_bytes(), rkey.as_bytes(), &cid, record] {
            let len = u32::try_from(part.len()).map_err(io::Error::other)?;
            file.write_all(&len.to_le_bytes())?;
            file.write_all(part)?;
        }
        self.bytes += size;
        if self.collections.last().is_none_or(|c| c != collection) {
            self.collections.push(collection.to_owned());
        }
        Ok(())
    }

    /// Reads back the records of `collection` in the order they came; `None` if it has none.
    pub(super) fn reader(&mut self, collection: &str) -> io::Result<Option<Reader>> {
        if !self.collections.iter().any(|c| c == collection) {
            return Ok(None);
        }
        let Some(file) = &mut self.file else {
            return Ok(None);
        };
        file.flush()?;
        let mut read = file.get_ref().try_clone()?;
        read.seek(SeekFrom::Start(0))?;
        Ok(Some(Reader {
            file: BufReader::new(read),
            collection: collection.to_owned(),
            end: self.bytes,
            at: 0,
        }))
    }
}

/// Reads one collection's deferred records.
pub(super) struct Reader {
    file: BufReader<File>,
    collection: String,
    end: u64,
    at: u64,
}

impl Reader {
    fn part(&mut self) -> io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len)?;
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        self.file.read_exact(&mut buf)?;
        self.at += 4 + buf.len() as u64;
        Ok(buf)
    }

    /// The next record of the collection.
    pub(super) fn next(&mut self) -> io::Result<Option<Entry>> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        while self.at < self.end {
            let collection = self.part()?;
            let rkey = self.part()?;
            let cid = self.part()?;
            let bytes = self.part()?;
            if collection != self.collection.as_bytes() {
                continue;
            }
            return Ok(Some(Entry {
                rkey: String::from_utf8(rkey).map_err(|_| bad("deferred rkey"))?,
                cid: Cid::try_from(cid.as_slice()).map_err(|_| bad("deferred cid"))?,
                bytes,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_records_come_back_per_collection_in_order_and_within_the_cap() {
        let cid = tap_atproto::hash::cid_for_cbor(b"r");
        let mut d = Deferred::new(1000);
        d.push("a.b.item", "1", &cid, b"one").unwrap();
        d.push("a.b.item", "2", &cid, b"two").unwrap();
        d.push("a.b.list", "x", &cid, b"list").unwrap();
        let mut r = d.reader("a.b.list").unwrap().unwrap();
        let e = r.next().unwrap().unwrap();
        assert_eq!(
            (e.rkey.as_str(), e.bytes.as_slice(), e.cid),
            ("x", &b"list"[..], cid)
        );
        assert!(r.next().unwrap().is_none());
        let mut r = d.reader("a.b.item").unwrap().unwrap();
        let keys: Vec<String> = std::iter::from_fn(|| r.next().unwrap())
            .map(|e| e.rkey)
            .collect();
        assert_eq!(keys, ["1", "2"]);
        assert!(d.reader("a.b.none").unwrap().is_none());
        let big = vec![0u8; 1000];
        assert!(d.push("a.b.item", "3", &cid, &big).is_err(), "over the cap");
    }
}
