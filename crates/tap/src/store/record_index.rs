//! The record index packed into chunks: the pure half of how both backends store it.
//!
//! A repo's index (collection, rkey → CID) is kept as rows that each hold a sorted run of
//! one collection's entries, keyed by the run's first rkey, instead of one row per record.
//! A backfill batch of 400 records then writes a handful of rows rather than 400, which is
//! what lets it keep up with the rest of the pipeline (docs/architecture.md, "Write
//! volume"). The runs of a collection never overlap, so the chunk that holds a key is the
//! one with the greatest first rkey at or below it.
//!
//! The entries are text, one `rkey SP cid LF` line each: record keys and CIDs never contain
//! a space or a newline, the format can be produced by plain SQL (the migration from the
//! row-per-record table does so), and a stored chunk can be read by eye.
//!
//! This module decides ([`IndexWriter`] names every query); the backends only run them.

use super::{RecordChange, RecordRow};

/// Largest chunk text written (bytes), unless one entry alone is larger. Chosen so a chunk
/// row stays within one 4 KiB SQLite page: a live update rewrites one page, not a chain.
pub const CHUNK_BYTES: usize = 3_500;

/// A write refused before touching the database: a key or CID the format cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot index {what} {value:?}: it is empty or contains a space or newline")]
pub struct Unindexable {
    /// Which part was wrong (`collection`, `rkey` or `cid`).
    pub what: &'static str,
    /// The value.
    pub value: String,
}

/// A stored chunk's text that does not parse (a line without a separator, keys out of
/// order): the index was written by something else or damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record index chunk: {0}")]
pub struct CorruptChunk(pub String);

/// One collection's changes from a write, in key order, one per key (the last wins):
/// `Some(cid)` puts, `None` deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionChanges<'a> {
    /// The collection.
    pub collection: &'a str,
    /// `(rkey, cid)` in ascending rkey order.
    pub changes: Vec<(&'a str, Option<&'a str>)>,
}

/// Groups a write's index changes by collection, in key order, keeping the last change to
/// each key (so applying the groups equals applying the list in order).
///
/// # Errors
/// A collection, rkey or CID that is empty or contains a separator.
pub fn plan(records: &[RecordChange]) -> Result<Vec<CollectionChanges<'_>>, Unindexable> {
    let mut all: Vec<(&str, &str, Option<&str>)> = Vec::with_capacity(records.len());
    for change in records {
        let (collection, rkey, cid) = match change {
            RecordChange::Put {
                collection,
                rkey,
                cid,
            } => (collection.as_str(), rkey.as_str(), Some(cid.as_str())),
            RecordChange::Delete { collection, rkey } => (collection.as_str(), rkey.as_str(), None),
        };
        check("collection", collection)?;
        check("rkey", rkey)?;
        if let Some(cid) = cid {
            check("cid", cid)?;
        }
        all.push((collection, rkey, cid));
    }
    // Stable: equal keys keep their order, so the last of them is the one to keep.
    all.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut groups: Vec<CollectionChanges<'_>> = Vec::new();
    for (collection, rkey, cid) in all {
        match groups.last_mut() {
            Some(group) if group.collection == collection => match group.changes.last_mut() {
                Some(last) if last.0 == rkey => last.1 = cid,
                _ => group.changes.push((rkey, cid)),
            },
            _ => groups.push(CollectionChanges {
                collection,
                changes: vec![(rkey, cid)],
            }),
        }
    }
    Ok(groups)
}

fn check(what: &'static str, value: &str) -> Result<(), Unindexable> {
    if value.is_empty() || value.bytes().any(|b| b == b' ' || b == b'\n') {
        return Err(Unindexable {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// The entries of a stored chunk, in order.
///
/// # Errors
/// A line without exactly one separator, an empty part, or keys not strictly ascending.
pub fn decode(text: &str) -> Result<Vec<(&str, &str)>, CorruptChunk> {
    let mut entries: Vec<(&str, &str)> = Vec::with_capacity(text.len() / 64 + 1);
    for line in text.split_terminator('\n') {
        let Some((rkey, cid)) = line.split_once(' ') else {
            return Err(CorruptChunk(format!("line {line:?} has no separator")));
        };
        if rkey.is_empty() || cid.is_empty() || cid.contains(' ') {
            return Err(CorruptChunk(format!("line {line:?} is malformed")));
        }
        if entries.last().is_some_and(|(last, _)| *last >= rkey) {
            return Err(CorruptChunk(format!("rkey {rkey:?} is out of order")));
        }
        entries.push((rkey, cid));
    }
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(CorruptChunk("the last line is unterminated".into()));
    }
    Ok(entries)
}

/// The CID the chunk `text` holds for `rkey`, if any.
///
/// # Errors
/// The chunk does not decode.
pub fn find(text: &str, rkey: &str) -> Result<Option<String>, CorruptChunk> {
    Ok(decode(text)?
        .into_iter()
        .find(|(k, _)| *k == rkey)
        .map(|(_, cid)| cid.to_owned()))
}

/// A chunk ready to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedChunk {
    /// Its first rkey (the row key).
    pub first: String,
    /// Entries in it.
    pub count: i64,
    /// The entries' text.
    pub text: String,
}

/// Cuts sorted entries into chunks of at most [`CHUNK_BYTES`] of text each.
#[must_use]
pub fn pack(entries: &[(&str, &str)]) -> Vec<PackedChunk> {
    let mut chunks = Vec::new();
    let mut current: Option<PackedChunk> = None;
    for (rkey, cid) in entries {
        let line = rkey.len() + cid.len() + 2;
        if let Some(chunk) = current.take_if(|c| c.text.len() + line > CHUNK_BYTES) {
            chunks.push(chunk);
        }
        let chunk = current.get_or_insert_with(|| PackedChunk {
            first: (*rkey).to_owned(),
            count: 0,
            text: String::with_capacity(CHUNK_BYTES),
        });
        chunk.text.push_str(rkey);
        chunk.text.push(' ');
        chunk.text.push_str(cid);
        chunk.text.push('\n');
        chunk.count += 1;
    }
    chunks.extend(current);
    chunks
}

/// A chunk as the backend found it when asked to locate a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundChunk {
    /// Its row key.
    pub first: String,
    /// Its text.
    pub text: String,
}

/// What to do to the stored chunks of one collection for one located chunk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// Row key of the chunk to delete (the one that was read), if any.
    pub remove: Option<String>,
    /// Chunks to insert in its place (none when it ended up empty).
    pub insert: Vec<PackedChunk>,
}

/// Applies one collection's changes chunk by chunk. The backend loop is:
/// `while let Some(key) = work.next_key()` → locate the chunk holding `key` (the one with
/// the greatest first rkey ≤ `key`, else the collection's first chunk, else none) and the
/// first rkey of the chunk after it → [`CollectionWork::apply`] → delete and insert.
#[derive(Debug)]
pub struct CollectionWork<'a> {
    changes: Vec<(&'a str, Option<&'a str>)>,
    next: usize,
}

impl<'a> CollectionWork<'a> {
    /// Work for one collection's changes (from [`plan`]).
    #[must_use]
    pub fn new(changes: Vec<(&'a str, Option<&'a str>)>) -> Self {
        Self { changes, next: 0 }
    }

    /// The smallest key not yet applied.
    #[must_use]
    pub fn next_key(&self) -> Option<&'a str> {
        self.changes.get(self.next).map(|(rkey, _)| *rkey)
    }

    /// Merges every pending change below `upper` (the first rkey of the chunk after
    /// `found`; `None` when there is none) into `found` and says how to store the result.
    ///
    /// # Errors
    /// `found` does not decode.
    pub fn apply(
        &mut self,
        found: Option<&FoundChunk>,
        upper: Option<&str>,
    ) -> Result<Rewrite, CorruptChunk> {
        let stored = match found {
            Some(chunk) => decode(&chunk.text)?,
            None => Vec::new(),
        };
        let end = self.changes[self.next..]
            .iter()
            .position(|(rkey, _)| upper.is_some_and(|u| *rkey >= u))
            .map_or(self.changes.len(), |n| self.next + n);
        let mine = &self.changes[self.next..end];
        self.next = end;
        let merged = merge(&stored, mine);
        Ok(Rewrite {
            remove: found.map(|c| c.first.clone()),
            insert: pack(&merged),
        })
    }
}

/// What a backend must do next to apply a write's index changes: run the query named, hand
/// the answer back ([`IndexWriter::found`] / [`IndexWriter::upper`]), and ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexStep<'a> {
    /// Read the chunk of `collection` with the greatest first rkey at or below `key`.
    ChunkAtOrBefore {
        /// The collection.
        collection: &'a str,
        /// The smallest key not yet applied.
        key: &'a str,
    },
    /// Read the collection's first chunk (none lies at or below the key).
    FirstChunk {
        /// The collection.
        collection: &'a str,
    },
    /// Read the first rkey of the collection's chunk after the one starting at `first`.
    FirstKeyAfter {
        /// The collection.
        collection: &'a str,
        /// The found chunk's first rkey.
        first: String,
    },
    /// Delete the chunk `rewrite.remove` (if any) and insert `rewrite.insert`.
    Rewrite {
        /// The collection.
        collection: &'a str,
        /// The rows to change.
        rewrite: Rewrite,
    },
    /// Every change is applied.
    Done,
}

/// Where an [`IndexWriter`] is in locating the chunk for the next key.
#[derive(Debug)]
enum Locating {
    /// Nothing asked yet for the next key.
    Idle,
    AskedAtOrBefore,
    AskedFirst,
    /// The chunk is known (or there is none); its successor's key is wanted next.
    Found(Option<FoundChunk>),
    AskedUpper(FoundChunk),
    Located(Option<FoundChunk>, Option<String>),
}

/// The whole index write of one [`RepoWrite`](super::RepoWrite) as a step machine: it
/// decides every query and every rewrite, so the two SQL backends only translate steps
/// into statements. The loop is `loop { match writer.step()? { … } }`.
#[derive(Debug)]
pub struct IndexWriter<'a> {
    groups: std::vec::IntoIter<CollectionChanges<'a>>,
    current: Option<(&'a str, CollectionWork<'a>)>,
    locating: Locating,
}

impl<'a> IndexWriter<'a> {
    /// The writer for these changes, applied in order (a later change to a key wins).
    ///
    /// # Errors
    /// A collection, rkey or CID the format cannot hold; nothing has been asked yet.
    pub fn new(records: &'a [RecordChange]) -> Result<Self, Unindexable> {
        Ok(Self {
            groups: plan(records)?.into_iter(),
            current: None,
            locating: Locating::Idle,
        })
    }

    /// The next thing to do. Asking again without answering repeats the question.
    ///
    /// # Errors
    /// A found chunk does not decode.
    pub fn step(&mut self) -> Result<IndexStep<'a>, CorruptChunk> {
        loop {
            let Some((collection, work)) = &mut self.current else {
                match self.groups.next() {
                    Some(group) => {
                        self.current = Some((group.collection, CollectionWork::new(group.changes)));
                        continue;
                    }
                    None => return Ok(IndexStep::Done),
                }
            };
            let collection: &'a str = collection;
            let Some(key) = work.next_key() else {
                self.current = None;
                continue;
            };
            let (next_state, step) = match std::mem::replace(&mut self.locating, Locating::Idle) {
                Locating::Idle | Locating::AskedAtOrBefore => (
                    Locating::AskedAtOrBefore,
                    IndexStep::ChunkAtOrBefore { collection, key },
                ),
                Locating::AskedFirst => {
                    (Locating::AskedFirst, IndexStep::FirstChunk { collection })
                }
                Locating::Found(None) => {
                    self.locating = Locating::Located(None, None);
                    continue;
                }
                Locating::Found(Some(chunk)) | Locating::AskedUpper(chunk) => {
                    let first = chunk.first.clone();
                    (
                        Locating::AskedUpper(chunk),
                        IndexStep::FirstKeyAfter { collection, first },
                    )
                }
                Locating::Located(found, upper) => {
                    let rewrite = work.apply(found.as_ref(), upper.as_deref())?;
                    (
                        Locating::Idle,
                        IndexStep::Rewrite {
                            collection,
                            rewrite,
                        },
                    )
                }
            };
            self.locating = next_state;
            return Ok(step);
        }
    }

    /// The answer to [`IndexStep::ChunkAtOrBefore`] or [`IndexStep::FirstChunk`].
    pub fn found(&mut self, chunk: Option<FoundChunk>) {
        self.locating = match (&self.locating, chunk) {
            (Locating::AskedAtOrBefore, None) => Locating::AskedFirst,
            (Locating::AskedAtOrBefore | Locating::AskedFirst, chunk) => Locating::Found(chunk),
            // Not what was asked: ignored, and the question is asked again.
            _ => return,
        };
    }

    /// The answer to [`IndexStep::FirstKeyAfter`].
    pub fn upper(&mut self, first_after: Option<String>) {
        if let Locating::AskedUpper(chunk) = std::mem::replace(&mut self.locating, Locating::Idle) {
            self.locating = Locating::Located(Some(chunk), first_after);
        }
    }
}

/// Sorted entries with sorted, unique-keyed changes applied.
fn merge<'a>(
    stored: &[(&'a str, &'a str)],
    changes: &[(&'a str, Option<&'a str>)],
) -> Vec<(&'a str, &'a str)> {
    let mut out = Vec::with_capacity(stored.len() + changes.len());
    let (mut s, mut c) = (0, 0);
    while s < stored.len() || c < changes.len() {
        let take_stored = match (stored.get(s), changes.get(c)) {
            (Some(entry), Some(change)) => entry.0 < change.0,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if take_stored {
            out.push(stored[s]);
            s += 1;
            continue;
        }
        let (rkey, cid) = changes[c];
        c += 1;
        if stored.get(s).is_some_and(|entry| entry.0 == rkey) {
            s += 1; // replaced or deleted
        }
        if let Some(cid) = cid {
            out.push((rkey, cid));
        }
    }
    out
}

/// The entries of a chunk's text strictly after `after` (all of them for `None`).
///
/// # Errors
/// The text does not decode.
pub fn entries_after<'t>(
    text: &'t str,
    after: Option<&str>,
) -> Result<impl Iterator<Item = (&'t str, &'t str)>, CorruptChunk> {
    let entries = decode(text)?;
    let start = after.map_or(0, |a| entries.partition_point(|(rkey, _)| *rkey <= a));
    Ok(entries.into_iter().skip(start))
}

/// Adds a chunk's entries after `after` to a page of at most `limit` rows; `true` while
/// the page wants more.
///
/// # Errors
/// The text does not decode.
pub fn fill_page(
    page: &mut Vec<RecordRow>,
    limit: usize,
    collection: &str,
    text: &str,
    after: Option<&str>,
) -> Result<bool, CorruptChunk> {
    for (rkey, cid) in entries_after(text, after)? {
        if page.len() >= limit {
            return Ok(false);
        }
        page.push(RecordRow {
            collection: collection.to_owned(),
            rkey: rkey.to_owned(),
            cid: cid.to_owned(),
        });
    }
    Ok(page.len() < limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{delete as del, put};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A store of chunks for one collection, driven exactly as a backend drives it: through
    /// [`IndexWriter`]'s steps. Returns the number of rewrites.
    fn apply_all(
        chunks: &mut BTreeMap<String, String>,
        changes: Vec<(&str, Option<&str>)>,
    ) -> usize {
        let records: Vec<RecordChange> = changes
            .iter()
            .map(|(rkey, cid)| match cid {
                Some(cid) => put("a.b.c", rkey, cid),
                None => del("a.b.c", rkey),
            })
            .collect();
        drive(chunks, &records)
    }

    /// Applies `records` (all of one collection) to `chunks` through the writer's steps; returns the number of rewrites.
    fn drive(chunks: &mut BTreeMap<String, String>, records: &[RecordChange]) -> usize {
        let mut writer = IndexWriter::new(records).unwrap();
        let mut rounds = 0;
        let found = |first: &String, text: &String| FoundChunk {
            first: first.clone(),
            text: text.clone(),
        };
        loop {
            match writer.step().unwrap() {
                IndexStep::ChunkAtOrBefore { key, .. } => {
                    let chunk = chunks.range(..=key.to_owned()).next_back();
                    writer.found(chunk.map(|(f, t)| found(f, t)));
                }
                IndexStep::FirstChunk { .. } => {
                    writer.found(chunks.iter().next().map(|(f, t)| found(f, t)));
                }
                IndexStep::FirstKeyAfter { first, .. } => {
                    let after = chunks
                        .range((std::ops::Bound::Excluded(first), std::ops::Bound::Unbounded))
                        .next()
                        .map(|(k, _)| k.clone());
                    writer.upper(after);
                }
                IndexStep::Rewrite { rewrite, .. } => {
                    rounds += 1;
                    if let Some(old) = rewrite.remove {
                        chunks.remove(&old);
                    }
                    for chunk in rewrite.insert {
                        assert!(chunk.text.len() <= CHUNK_BYTES);
                        assert_eq!(chunk.count as usize, decode(&chunk.text).unwrap().len());
                        assert!(chunks.insert(chunk.first, chunk.text).is_none());
                    }
                }
                IndexStep::Done => return rounds,
            }
        }
    }

    #[test]
    fn an_unanswered_question_is_asked_again_and_empty_writes_are_done_at_once() {
        let records = vec![put("a.b.c", "k", "c1")];
        let mut writer = IndexWriter::new(&records).unwrap();
        let ask = IndexStep::ChunkAtOrBefore {
            collection: "a.b.c",
            key: "k",
        };
        assert_eq!(writer.step().unwrap(), ask);
        assert_eq!(writer.step().unwrap(), ask, "no answer: same question");
        writer.upper(Some("z".into())); // not what was asked: ignored
        assert_eq!(writer.step().unwrap(), ask);
        writer.found(None);
        assert_eq!(
            writer.step().unwrap(),
            IndexStep::FirstChunk {
                collection: "a.b.c"
            }
        );
        writer.found(None);
        let IndexStep::Rewrite { rewrite, .. } = writer.step().unwrap() else {
            panic!("an empty collection gets its first chunk");
        };
        assert_eq!(rewrite.remove, None);
        assert_eq!(rewrite.insert.len(), 1);
        assert_eq!(writer.step().unwrap(), IndexStep::Done);
        assert_eq!(
            IndexWriter::new(&[]).unwrap().step().unwrap(),
            IndexStep::Done
        );
    }

    fn contents(chunks: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut all = BTreeMap::new();
        let mut last: Option<String> = None;
        for (first, text) in chunks {
            let entries = decode(text).unwrap();
            assert_eq!(entries[0].0, first, "a chunk is keyed by its first rkey");
            for (rkey, cid) in entries {
                assert!(last.as_deref() < Some(rkey), "chunks overlap");
                last = Some(rkey.to_owned());
                all.insert(rkey.to_owned(), cid.to_owned());
            }
        }
        all
    }

    #[test]
    fn plan_groups_by_collection_in_key_order_and_keeps_the_last_change_per_key() {
        let records = vec![
            put("b.coll", "2", "c1"),
            put("a.coll", "9", "c2"),
            put("b.coll", "1", "c3"),
            del("b.coll", "2"),
            put("a.coll", "9", "c4"),
        ];
        let groups = plan(&records).unwrap();
        assert_eq!(
            groups,
            vec![
                CollectionChanges {
                    collection: "a.coll",
                    changes: vec![("9", Some("c4"))]
                },
                CollectionChanges {
                    collection: "b.coll",
                    changes: vec![("1", Some("c3")), ("2", None)]
                },
            ]
        );
    }

    #[test]
    fn plan_refuses_keys_the_format_cannot_hold() {
        for bad in [
            put("", "r", "c"),
            put("a.b", "", "c"),
            put("a.b", "r k", "c"),
            put("a.b", "r", "c\nd"),
            del("a.b", "x\n"),
        ] {
            assert!(plan(std::slice::from_ref(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decode_rejects_damaged_chunks() {
        assert_eq!(decode("").unwrap(), vec![]);
        assert_eq!(decode("a x\nb y\n").unwrap(), vec![("a", "x"), ("b", "y")]);
        for bad in [
            "a\n",
            "a x",
            "b x\na y\n",
            "a x\na y\n",
            " x\n",
            "a \n",
            "a x y\n",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_appending_backfill_fills_chunks_to_the_size_limit() {
        let mut chunks = BTreeMap::new();
        let cid = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
        let keys: Vec<String> = (0..1000).map(|i| format!("3k{i:011}")).collect();
        for batch in keys.chunks(100) {
            let rounds = apply_all(
                &mut chunks,
                batch.iter().map(|k| (k.as_str(), Some(cid))).collect(),
            );
            assert_eq!(rounds, 1, "an append touches only the last chunk");
        }
        let per_chunk = CHUNK_BYTES / (13 + cid.len() + 2);
        assert_eq!(chunks.len(), 1000usize.div_ceil(per_chunk));
        assert_eq!(contents(&chunks).len(), 1000);
    }

    #[test]
    fn entries_after_skips_up_to_and_including_the_key() {
        let text = "a 1\nc 2\ne 3\n";
        let after = |k| entries_after(text, k).unwrap().collect::<Vec<_>>();
        assert_eq!(after(None).len(), 3);
        assert_eq!(after(Some("a")), vec![("c", "2"), ("e", "3")]);
        assert_eq!(after(Some("b")), vec![("c", "2"), ("e", "3")]);
        assert_eq!(after(Some("e")), vec![]);
    }

    proptest! {
        /// Whatever the writes (keys before, inside and after existing chunks, deletes of
        /// absent keys, chunks emptied), the chunks hold exactly what applying the same
        /// changes to a map holds, without overlaps.
        #[test]
        fn chunks_always_equal_the_changes_applied_to_a_map(
            batches in prop::collection::vec(
                prop::collection::vec((0u16..600, prop::option::weighted(0.7, 0u8..4)), 0..150),
                1..12,
            )
        ) {
            let cids = ["bafyreia", "bafyreib", "bafyreic", "bafyreid"];
            let mut chunks = BTreeMap::new();
            let mut model = BTreeMap::new();
            for batch in batches {
                let records: Vec<RecordChange> = batch
                    .iter()
                    .map(|(k, c)| {
                        let rkey = format!("rk{k:04}-{}", "x".repeat(usize::from(*k % 97)));
                        match c {
                            Some(c) => put("app.test", &rkey, cids[usize::from(*c)]),
                            None => del("app.test", &rkey),
                        }
                    })
                    .collect();
                for r in &records {
                    match r {
                        RecordChange::Put { rkey, cid, .. } => { model.insert(rkey.clone(), cid.clone()); }
                        RecordChange::Delete { rkey, .. } => { model.remove(rkey); }
                    }
                }
                drive(&mut chunks, &records);
                prop_assert_eq!(contents(&chunks), model.clone());
            }
        }
    }
}
