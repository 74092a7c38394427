//! The resync diff: a snapshot's records against the stored record index, as
//! create/update/delete changes (decisions.md rows 1 and 11: records that vanished while
//! the repo was out of sync are deleted, not left stale). Pure.
//!
//! Both sides are streamed, so memory does not grow with the repo. A snapshot walk yields
//! paths in MST (byte) order, which groups each collection's records together, sorted by
//! record key; the stored index is read one collection at a time in record-key order. The
//! merge therefore runs per collection, on record keys, where both orders agree. (Across
//! collections the orders differ: `a.b.c/x` sorts before `a.b/x` in the MST but after it
//! by (collection, rkey). Merging whole paths would turn that into false deletes.)

use std::collections::VecDeque;

/// A change the resync must apply and announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// In the snapshot, not in the index.
    Create {
        /// Record key.
        rkey: String,
    },
    /// In both, with a different CID.
    Update {
        /// Record key.
        rkey: String,
    },
    /// In the index, not in the snapshot.
    Delete {
        /// Record key.
        rkey: String,
    },
}

/// Merges one collection's snapshot records (pushed in record-key order) with its stored
/// index rows (fed in pages, record-key order).
#[derive(Debug, Default)]
pub struct CollectionMerge {
    stored: VecDeque<(String, String)>,
    exhausted: bool,
    last_fed: Option<String>,
}

impl CollectionMerge {
    /// A merge whose stored side has not been read yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the next step needs another page of stored rows.
    #[must_use]
    pub fn needs_stored(&self) -> bool {
        self.stored.is_empty() && !self.exhausted
    }

    /// The record key after which the next stored page starts (the last one fed).
    #[must_use]
    pub fn stored_resume_key(&self) -> Option<&str> {
        self.last_fed.as_deref()
    }

    /// Adds a page of stored `(rkey, cid)` rows; `last` when no more exist.
    pub fn feed_stored(&mut self, page: impl IntoIterator<Item = (String, String)>, last: bool) {
        self.stored.extend(page);
        if let Some((k, _)) = self.stored.back() {
            self.last_fed = Some(k.clone());
        }
        self.exhausted |= last;
    }

    /// Merges the next snapshot record. Returns `false` (having possibly emitted deletes for
    /// stored rows before it) when the stored side must be refilled first; call again with
    /// the same record after [`feed_stored`](Self::feed_stored).
    pub fn push(&mut self, rkey: &str, cid: &str, out: &mut Vec<Change>) -> bool {
        loop {
            let Some((stored_key, stored_cid)) = self.stored.front() else {
                if !self.exhausted {
                    return false;
                }
                out.push(Change::Create {
                    rkey: rkey.to_owned(),
                });
                return true;
            };
            match stored_key.as_str().cmp(rkey) {
                std::cmp::Ordering::Less => {
                    if let Some((k, _)) = self.stored.pop_front() {
                        out.push(Change::Delete { rkey: k });
                    }
                }
                std::cmp::Ordering::Equal => {
                    if stored_cid != cid {
                        out.push(Change::Update {
                            rkey: rkey.to_owned(),
                        });
                    }
                    self.stored.pop_front();
                    return true;
                }
                std::cmp::Ordering::Greater => {
                    out.push(Change::Create {
                        rkey: rkey.to_owned(),
                    });
                    return true;
                }
            }
        }
    }

    /// After the snapshot's last record of this collection: every stored row left is a
    /// delete. Returns `false` if more stored pages must be fed first.
    pub fn finish(&mut self, out: &mut Vec<Change>) -> bool {
        out.extend(
            self.stored
                .drain(..)
                .map(|(rkey, _)| Change::Delete { rkey }),
        );
        self.exhausted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn run(stored: &[(&str, &str)], snapshot: &[(&str, &str)], page: usize) -> Vec<Change> {
        let stored: Vec<(String, String)> = stored
            .iter()
            .map(|(k, c)| ((*k).to_owned(), (*c).to_owned()))
            .collect();
        let mut pages = stored
            .chunks(page.max(1))
            .map(<[_]>::to_vec)
            .collect::<VecDeque<_>>();
        let mut m = CollectionMerge::new();
        let mut out = Vec::new();
        let mut refill = |m: &mut CollectionMerge| {
            // Pages come back in order, as the store pages after `stored_resume_key`.
            let p = pages.pop_front().unwrap_or_default();
            if let (Some(resume), Some((first, _))) = (m.stored_resume_key(), p.first()) {
                assert!(
                    first.as_str() > resume,
                    "page must start after the resume key"
                );
            }
            let last = pages.is_empty();
            m.feed_stored(p, last);
        };
        for (k, c) in snapshot {
            while !m.push(k, c, &mut out) {
                refill(&mut m);
            }
        }
        while !m.finish(&mut out) {
            refill(&mut m);
        }
        out
    }

    #[test]
    fn creates_updates_and_deletes_are_found() {
        let out = run(
            &[("a", "1"), ("b", "2"), ("d", "4")],
            &[("b", "2x"), ("c", "3"), ("d", "4")],
            1,
        );
        assert_eq!(
            out,
            vec![
                Change::Delete { rkey: "a".into() },
                Change::Update { rkey: "b".into() },
                Change::Create { rkey: "c".into() },
            ]
        );
    }

    #[test]
    fn an_empty_snapshot_deletes_everything_stored() {
        let out = run(&[("a", "1"), ("b", "2")], &[], 1);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| matches!(c, Change::Delete { .. })));
    }

    proptest! {
        #[test]
        fn merge_equals_set_difference(
            stored in proptest::collection::btree_map("[a-z]{1,4}", 0u8..3, 0..40),
            snap in proptest::collection::btree_map("[a-z]{1,4}", 0u8..3, 0..40),
            page in 1usize..7,
        ) {
            let s: Vec<(String, String)> = stored.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
            let n: Vec<(String, String)> = snap.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
            let sr: Vec<(&str, &str)> = s.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let nr: Vec<(&str, &str)> = n.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let got = run(&sr, &nr, page);
            let mut want = BTreeMap::new();
            for (k, v) in &stored {
                match snap.get(k) {
                    None => { want.insert(k.clone(), "delete"); }
                    Some(w) if w != v => { want.insert(k.clone(), "update"); }
                    Some(_) => {}
                }
            }
            for k in snap.keys() {
                if !stored.contains_key(k) { want.insert(k.clone(), "create"); }
            }
            let got_map: BTreeMap<String, &str> = got.iter().map(|c| match c {
                Change::Create { rkey } => (rkey.clone(), "create"),
                Change::Update { rkey } => (rkey.clone(), "update"),
                Change::Delete { rkey } => (rkey.clone(), "delete"),
            }).collect();
            prop_assert_eq!(got.len(), got_map.len(), "a key changed twice");
            prop_assert_eq!(got_map, want);
        }
    }
}
