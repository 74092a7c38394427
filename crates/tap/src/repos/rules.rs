//! Record-content rules (`--record-filters`) applied to what tap delivers.
//!
//! The consumer's view of a repo is the set of its records that pass the collection filters
//! and their collection's rule; the record index holds exactly that view, so "was this
//! record delivered" is an index lookup and a resync's diff against the index turns a
//! record that stopped matching into a `delete` and one that started into a `create`.
//!
//! Live, a commit's ops are judged one by one against the index ([`judge_op`], pure, with
//! [`decide_live`] asking the store what a rule reads). What a live op cannot settle alone
//! goes to a resync of the repo ([`REFILTER`]), which sees the whole repo at once: an op in
//! a collection whose rule uses `refs(..)` (its fate depends on records that name it), and
//! any change to a collection other rules read (records depending on it may change fate).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tap_atproto::record_filter::{Facts, Rule, RuleSet, Subject};
use tap_atproto::syntax::Nsid;

use crate::store::{Store, StoreError};

use super::prepared::{OpChange, PreparedOp};

/// Why a repo is resynced after a live change its rules could not settle alone; such a
/// resync recomputes the view even when the repo's head did not move.
pub const REFILTER: &str =
    "record filters: a change other records depend on; recomputing the delivered records";

/// Most referenced records (kept records of collections other rules read, and the values
/// they name) one resync keeps in memory to judge the records that depend on them.
pub const MAX_FACTS: usize = 1_000_000;

/// Whether a resync must download `collection`'s records even when the index proves them
/// unchanged: its rule depends on other records (whose fate may have changed), or other
/// rules read values inside its records.
#[must_use]
pub fn must_download(rules: &RuleSet, collection: &str) -> bool {
    rules.is_dependent(collection) || rules.is_ref_source(collection)
}

/// The record's JSON as a value for a rule (`Null` when it has no readable body).
#[must_use]
pub fn record_value(json: Option<&str>) -> Value {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null)
}

/// The `(collection, rkey)` of an at-uri in repo `did`; `None` for another repo or a
/// malformed uri (references are within the repo).
fn local_key<'u>(did: &str, uri: &'u str) -> Option<(&'u str, &'u str)> {
    let rest = uri
        .strip_prefix("at://")?
        .strip_prefix(did)?
        .strip_prefix('/')?;
    let (collection, rkey) = rest.split_once('/')?;
    (!rkey.is_empty() && !rkey.contains('/')).then_some((collection, rkey))
}

/// The at-uri of a record.
#[must_use]
pub fn record_uri(did: &str, collection: &str, rkey: &str) -> String {
    format!("at://{did}/{collection}/{rkey}")
}

/// `rule`'s verdict on the record `collection/rkey` of `did` holding `record`.
pub fn holds(
    rule: &Rule,
    did: &str,
    collection: &str,
    rkey: &str,
    record: &Value,
    facts: &dyn Facts,
) -> bool {
    let uri = record_uri(did, collection, rkey);
    rule.holds(
        &Subject {
            uri: &uri,
            rkey,
            record,
        },
        facts,
    )
}

/// What a live op does to the consumer's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    /// The op to apply and announce (its action rewritten when the record enters or leaves
    /// the view), or `None`: nothing to announce or index.
    pub op: Option<PreparedOp>,
    /// Whether the record is in the view after the op.
    pub in_view: bool,
    /// The repo must be resynced for the rules to be right ([`REFILTER`]).
    pub refilter: bool,
}

/// Judges one op of a collection with a rule. `was`: the record was in the view before;
/// `holds`: the rule's verdict on the new record (`None` for a delete, or when the verdict
/// needs the whole repo); `referenced`: other rules read this collection.
#[must_use]
pub fn judge_op(op: &PreparedOp, was: bool, holds: Option<bool>, referenced: bool) -> Judged {
    let decided = matches!(op.change, OpChange::Delete) || holds.is_some();
    let now = match op.change {
        OpChange::Delete => false,
        _ => holds.unwrap_or(was),
    };
    let change = match (&op.change, was, now) {
        _ if !decided => None,
        (OpChange::Delete, true, _) => Some(OpChange::Delete),
        (OpChange::Delete, false, _) | (_, false, false) => None,
        (OpChange::Create(cid) | OpChange::Update(cid), false, true) => {
            Some(OpChange::Create(cid.clone()))
        }
        (OpChange::Create(cid) | OpChange::Update(cid), true, true) => {
            Some(OpChange::Update(cid.clone()))
        }
        (_, true, false) => Some(OpChange::Delete),
    };
    let op_out = change.map(|change| PreparedOp {
        change,
        record: if now { op.record.clone() } else { None },
        ..op.clone()
    });
    Judged {
        refilter: !decided || (referenced && op_out.is_some()),
        op: op_out,
        in_view: now,
    }
}

/// What a live rule asked and did not know yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Query {
    Kept(String, String),
    Any(String),
}

/// Answers a rule from what is known, noting every question it could not answer.
struct Probe<'a> {
    did: &'a str,
    known: &'a HashMap<Query, bool>,
    misses: RefCell<Vec<Query>>,
}

impl Probe<'_> {
    fn ask(&self, q: Query) -> bool {
        match self.known.get(&q) {
            Some(answer) => *answer,
            None => {
                self.misses.borrow_mut().push(q);
                false
            }
        }
    }
}

impl Facts for Probe<'_> {
    fn kept(&self, collection: &Nsid, uri: &str) -> bool {
        match local_key(self.did, uri) {
            Some((c, rkey)) if c == collection.as_str() => {
                self.ask(Query::Kept(c.to_owned(), rkey.to_owned()))
            }
            _ => false,
        }
    }

    fn any_kept(&self, collection: &Nsid) -> bool {
        self.ask(Query::Any(collection.as_str().to_owned()))
    }

    fn referenced(&self, _source: usize, _value: &str) -> bool {
        // Rules using `refs(..)` are judged by a resync, never live.
        false
    }
}

/// The rule's verdict on a live record of `did`, asking the record index what it reads;
/// `overlay` holds the view changes of the commit's earlier ops, which the index does not
/// have yet. Evaluated until every question it asks is answered (each round answers what
/// the last one could not, so it ends).
///
/// # Errors
/// Store failures.
pub async fn decide_live(
    store: &Store,
    did: &str,
    rule: &Rule,
    (collection, rkey, record): (&str, &str, &Value),
    overlay: &HashMap<(String, String), bool>,
) -> Result<bool, StoreError> {
    let mut known: HashMap<Query, bool> = HashMap::new();
    loop {
        let probe = Probe {
            did,
            known: &known,
            misses: RefCell::new(Vec::new()),
        };
        let verdict = holds(rule, did, collection, rkey, record, &probe);
        let misses = probe.misses.into_inner();
        if misses.is_empty() {
            return Ok(verdict);
        }
        for q in misses {
            let answer = match &q {
                Query::Kept(c, rkey) => match overlay.get(&(c.clone(), rkey.clone())) {
                    Some(in_view) => *in_view,
                    None => store.record_cid(did, c, rkey).await?.is_some(),
                },
                Query::Any(c) => {
                    overlay.iter().any(|((oc, _), v)| oc == c && *v)
                        || store
                            .records_page(did, Some((c.clone(), String::new())), 1)
                            .await?
                            .first()
                            .is_some_and(|row| row.collection == *c)
                }
            };
            known.insert(q, answer);
        }
    }
}

/// What a resync knows about the delivered records other rules read, gathered as it
/// decides them (each collection is decided before any collection that reads it).
pub struct SnapshotFacts {
    did: String,
    kept: HashMap<String, HashSet<String>>,
    named: Vec<HashSet<String>>,
    size: usize,
}

impl SnapshotFacts {
    /// Nothing known yet about `did`.
    #[must_use]
    pub fn new(did: &str, rules: &RuleSet) -> Self {
        Self {
            did: did.to_owned(),
            kept: HashMap::new(),
            named: vec![HashSet::new(); rules.ref_sources().len()],
            size: 0,
        }
    }

    /// Notes a delivered record (`record`: its JSON, `Null` when not downloaded). Returns
    /// `false` past [`MAX_FACTS`] entries.
    pub fn note(&mut self, rules: &RuleSet, collection: &str, rkey: &str, record: &Value) -> bool {
        if !rules.is_referenced(collection) {
            return true;
        }
        if self
            .kept
            .entry(collection.to_owned())
            .or_default()
            .insert(rkey.to_owned())
        {
            self.size += 1;
        }
        let (named, size) = (&mut self.named, &mut self.size);
        rules.for_each_reference(collection, record, &mut |source, value| {
            if named[source].insert(value.to_owned()) {
                *size += 1;
            }
        });
        self.size <= MAX_FACTS
    }
}

impl Facts for SnapshotFacts {
    fn kept(&self, collection: &Nsid, uri: &str) -> bool {
        local_key(&self.did, uri).is_some_and(|(c, rkey)| {
            c == collection.as_str() && self.kept.get(c).is_some_and(|s| s.contains(rkey))
        })
    }

    fn any_kept(&self, collection: &Nsid) -> bool {
        self.kept
            .get(collection.as_str())
            .is_some_and(|s| !s.is_empty())
    }

    fn referenced(&self, source: usize, value: &str) -> bool {
        self.named.get(source).is_some_and(|s| s.contains(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(change: OpChange) -> PreparedOp {
        PreparedOp {
            collection: "app.bsky.graph.list".into(),
            rkey: "l".into(),
            change,
            record: Some("{}".into()),
        }
    }

    #[test]
    fn a_record_entering_the_view_is_a_create_and_one_leaving_it_a_delete() {
        let create = op(OpChange::Create("c1".into()));
        let update = op(OpChange::Update("c2".into()));
        let delete = op(OpChange::Delete);
        let action = |j: &Judged| j.op.as_ref().map(|o| o.change.action().as_str());
        // (op, was in view, verdict) → announced action, in view after.
        let cases = [
            (&create, false, Some(true), Some("create"), true),
            (&create, false, Some(false), None, false),
            (&update, false, Some(true), Some("create"), true),
            (&update, true, Some(true), Some("update"), true),
            (&update, true, Some(false), Some("delete"), false),
            (&update, false, Some(false), None, false),
            (&delete, true, None, Some("delete"), false),
            (&delete, false, None, None, false),
        ];
        for (o, was, holds, want, in_view) in cases {
            let j = judge_op(o, was, holds, false);
            assert_eq!(action(&j), want, "{o:?} was={was} holds={holds:?}");
            assert_eq!(j.in_view, in_view);
            assert!(!j.refilter);
            if let Some(out) = &j.op {
                assert_eq!(out.record.is_some(), in_view, "a delete carries no body");
            }
        }
    }

    #[test]
    fn an_undecided_op_or_a_change_others_read_sends_the_repo_to_resync() {
        let update = op(OpChange::Update("c2".into()));
        let j = judge_op(&update, true, None, false);
        assert_eq!(j.op, None, "nothing announced before the resync decides");
        assert!(j.refilter);
        assert!(judge_op(&update, true, Some(true), true).refilter);
        assert!(judge_op(&op(OpChange::Delete), true, None, true).refilter);
        // Nothing changed in the view: nothing others read changed either.
        assert!(!judge_op(&update, false, Some(false), true).refilter);
    }

    #[test]
    fn references_are_to_records_of_the_same_repo() {
        let did = "did:plc:me";
        assert_eq!(
            local_key(did, "at://did:plc:me/app.bsky.graph.list/3k"),
            Some(("app.bsky.graph.list", "3k"))
        );
        for other in [
            "at://did:plc:other/app.bsky.graph.list/3k",
            "at://did:plc:mee/app.bsky.graph.list/3k",
            "at://did:plc:me/app.bsky.graph.list",
            "at://did:plc:me/app.bsky.graph.list/3k/x",
            "https://did:plc:me/app.bsky.graph.list/3k",
        ] {
            assert_eq!(local_key(did, other), None, "{other}");
        }
    }
}
