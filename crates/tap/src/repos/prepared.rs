//! A verified commit reduced to what tap applies and announces: filtered ops with their
//! record JSON already transcoded. The same shape is buffered durably while a repo
//! resyncs and replayed at the cutover, so both paths emit identical events.

use serde::{Deserialize, Serialize};
use tap_atproto::firehose::VerifiedCommit;
use tap_atproto::mst::OpAction;

use crate::store::{NewEvent, RecordChange};
use crate::wire::{Action, RecordEvent};

/// One operation of a prepared commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredOp", into = "StoredOp")]
pub struct PreparedOp {
    /// Collection NSID.
    pub collection: String,
    /// Record key.
    pub rkey: String,
    /// What happened, with the new record's CID.
    pub change: OpChange,
    /// The record as atproto JSON, when it decoded (create/update).
    pub record: Option<String>,
}

/// What an op did to its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpChange {
    /// A new record with this CID.
    Create(String),
    /// The record now has this CID.
    Update(String),
    /// The record is gone.
    Delete,
}

impl OpChange {
    /// The event's action.
    #[must_use]
    pub fn action(&self) -> Action {
        match self {
            Self::Create(_) => Action::Create,
            Self::Update(_) => Action::Update,
            Self::Delete => Action::Delete,
        }
    }

    /// The record's new CID; `None` for a delete.
    #[must_use]
    pub fn cid(&self) -> Option<&str> {
        match self {
            Self::Create(cid) | Self::Update(cid) => Some(cid),
            Self::Delete => None,
        }
    }
}

/// The stored (buffered) form of an op: `action` by its wire name, `cid` beside it. Kept
/// flat so buffered rows written by earlier versions read back.
#[derive(Serialize, Deserialize)]
struct StoredOp {
    collection: String,
    rkey: String,
    action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<String>,
}

impl TryFrom<StoredOp> for PreparedOp {
    type Error = String;

    fn try_from(op: StoredOp) -> Result<Self, String> {
        let change = match (op.action, op.cid) {
            (Action::Create, Some(cid)) => OpChange::Create(cid),
            (Action::Update, Some(cid)) => OpChange::Update(cid),
            (Action::Delete, _) => OpChange::Delete,
            (action, None) => {
                return Err(format!("a buffered {} op has no cid", action.as_str()));
            }
        };
        Ok(Self {
            collection: op.collection,
            rkey: op.rkey,
            change,
            record: op.record,
        })
    }
}

impl From<PreparedOp> for StoredOp {
    fn from(op: PreparedOp) -> Self {
        Self {
            action: op.change.action(),
            cid: op.change.cid().map(str::to_owned),
            collection: op.collection,
            rkey: op.rkey,
            record: op.record,
        }
    }
}

/// A record's DAG-CBOR as atproto JSON; `None` when it does not transcode (the event then
/// keeps the CID and goes without a body, as in Go).
#[must_use]
pub fn record_json(bytes: &[u8]) -> Option<String> {
    let mut json = Vec::with_capacity(bytes.len() * 2);
    tap_atproto::record_to_json(bytes, &mut json).ok()?;
    String::from_utf8(json).ok()
}

/// A commit ready to apply (or to buffer until a resync's cutover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCommit {
    /// The commit's rev.
    pub rev: String,
    /// The MST root after the commit (the next `prevData`). For a commit learned from
    /// Jetstream: the root its proofs were signed under when that is this rev's, otherwise
    /// the repo's stored root, unchanged.
    pub data: String,
    /// The MST root before the commit; `None` for a commit learned from Jetstream, which
    /// carries no `prevData`: it is applied without a chain check, its records having
    /// been proven one by one (or, with `--jetstream-verify none`, not at all).
    pub prev_data: Option<String>,
    /// Ops that pass the collection filters, in commit order.
    pub ops: Vec<PreparedOp>,
    /// The records were not checked against their repo (`--jetstream-verify none`); the
    /// events say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
}

impl PreparedCommit {
    /// Reduces a verified commit: drops ops outside the filters and transcodes records
    /// (a record that does not decode keeps its CID and goes without a body, as in Go).
    pub fn from_verified(commit: &VerifiedCommit, wants: impl Fn(&str) -> bool) -> Self {
        let ops = commit
            .ops
            .iter()
            .filter(|op| wants(op.collection.as_str()))
            .map(|op| {
                let change = match op.action {
                    OpAction::Create { cid } => OpChange::Create(cid.to_string()),
                    OpAction::Update { cid, .. } => OpChange::Update(cid.to_string()),
                    OpAction::Delete { .. } => OpChange::Delete,
                };
                let record = op.record.as_deref().and_then(record_json);
                PreparedOp {
                    collection: op.collection.as_str().to_owned(),
                    rkey: op.rkey.as_str().to_owned(),
                    change,
                    record,
                }
            })
            .collect();
        Self {
            rev: commit.rev.as_str().to_owned(),
            data: commit.data.to_string(),
            prev_data: Some(commit.prev_data.to_string()),
            ops,
            unverified: false,
        }
    }

    /// Record index changes of this commit.
    #[must_use]
    pub fn record_changes(&self) -> Vec<RecordChange> {
        self.ops
            .iter()
            .map(|op| match op.change.cid() {
                Some(cid) => RecordChange::Put {
                    collection: op.collection.clone(),
                    rkey: op.rkey.clone(),
                    cid: cid.to_owned(),
                },
                None => RecordChange::Delete {
                    collection: op.collection.clone(),
                    rkey: op.rkey.clone(),
                },
            })
            .collect()
    }

    /// The live record events of this commit.
    #[must_use]
    pub fn events(&self, did: &str) -> Vec<NewEvent> {
        self.ops
            .iter()
            .map(|op| NewEvent {
                live: true,
                payload: RecordEvent {
                    live: true,
                    did,
                    rev: &self.rev,
                    collection: &op.collection,
                    rkey: &op.rkey,
                    action: op.change.action(),
                    cid: op.change.cid(),
                    record_json: op.record.as_deref(),
                    unverified: self.unverified,
                }
                .payload(),
            })
            .collect()
    }
}

/// What the resync buffer holds for a repo: a commit, or the fact that a `#sync`
/// announced new data (checked at the cutover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Buffered {
    /// A verified live commit.
    Commit(PreparedCommit),
    /// A verified `#sync`.
    Sync {
        /// Its rev.
        rev: String,
        /// The data root it announced.
        data: String,
    },
    /// The repo's buffer reached its cap and later events were not kept: the snapshot
    /// being taken is stale, and the cutover sends the repo to resync again.
    Overflow,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit() -> PreparedCommit {
        PreparedCommit {
            rev: "3kabc".into(),
            data: "bafyNew".into(),
            prev_data: Some("bafyOld".into()),
            ops: vec![
                PreparedOp {
                    collection: "app.bsky.feed.post".into(),
                    rkey: "1".into(),
                    change: OpChange::Create("bafyR".into()),
                    record: Some(r#"{"text":"hi"}"#.into()),
                },
                PreparedOp {
                    collection: "app.bsky.feed.like".into(),
                    rkey: "2".into(),
                    change: OpChange::Delete,
                    record: None,
                },
            ],
            unverified: false,
        }
    }

    #[test]
    fn buffered_commits_round_trip_through_json() {
        let b = Buffered::Commit(commit());
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Buffered>(&json).unwrap(), b);
        let s = Buffered::Sync {
            rev: "r".into(),
            data: "d".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Buffered>(&json).unwrap(), s);
    }

    #[test]
    fn a_buffered_op_with_an_unknown_action_or_no_cid_is_an_error_not_a_delete() {
        let op = |action: &str, cid: Option<&str>| serde_json::json!({"collection": "a.b.c", "rkey": "1", "action": action, "cid": cid});
        let stored = serde_json::to_value(&commit().ops[0]).unwrap();
        assert_eq!(
            stored,
            op("create", Some("bafyR"))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o["collection"] = "app.bsky.feed.post".into();
                    o.insert("record".into(), r#"{"text":"hi"}"#.into());
                    serde_json::Value::Object(o)
                })
                .unwrap(),
            "the stored form is unchanged"
        );
        for bad in [op("remove", None), op("create", None), op("update", None)] {
            assert!(
                serde_json::from_value::<PreparedOp>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        let delete: PreparedOp = serde_json::from_value(op("delete", None)).unwrap();
        assert_eq!(delete.change, OpChange::Delete);
    }

    #[test]
    fn events_and_index_changes_follow_the_ops() {
        let c = commit();
        let changes = c.record_changes();
        assert!(matches!(&changes[0], RecordChange::Put { cid, .. } if cid == "bafyR"));
        assert!(matches!(&changes[1], RecordChange::Delete { rkey, .. } if rkey == "2"));
        let events = c.events("did:plc:x");
        assert!(events.iter().all(|e| e.live));
        let v: serde_json::Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(v["record"]["record"]["text"], "hi");
        assert_eq!(v["record"]["rev"], "3kabc");
        let v: serde_json::Value = serde_json::from_str(&events[1].payload).unwrap();
        assert_eq!(v["record"]["action"], "delete");
    }
}
