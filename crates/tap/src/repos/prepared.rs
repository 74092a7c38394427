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
pub struct PreparedOp {
    /// Collection NSID.
    pub collection: String,
    /// Record key.
    pub rkey: String,
    /// `create`, `update` or `delete`.
    pub action: String,
    /// Record CID (create/update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    /// The record as atproto JSON, when it decoded (create/update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

/// A commit ready to apply (or to buffer until a resync's cutover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCommit {
    /// The commit's rev.
    pub rev: String,
    /// The MST root after the commit (the next `prevData`).
    pub data: String,
    /// The MST root before the commit.
    pub prev_data: String,
    /// Ops that pass the collection filters, in commit order.
    pub ops: Vec<PreparedOp>,
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
                let (action, cid) = match op.action {
                    OpAction::Create { cid } => ("create", Some(cid.to_string())),
                    OpAction::Update { cid, .. } => ("update", Some(cid.to_string())),
                    OpAction::Delete { .. } => ("delete", None),
                };
                let record = op.record.as_ref().and_then(|bytes| {
                    let mut json = Vec::with_capacity(bytes.len() * 2);
                    tap_atproto::record_to_json(bytes, &mut json).ok()?;
                    String::from_utf8(json).ok()
                });
                PreparedOp {
                    collection: op.collection.as_str().to_owned(),
                    rkey: op.rkey.as_str().to_owned(),
                    action: action.to_owned(),
                    cid,
                    record,
                }
            })
            .collect();
        Self {
            rev: commit.rev.as_str().to_owned(),
            data: commit.data.to_string(),
            prev_data: commit.prev_data.to_string(),
            ops,
        }
    }

    /// Record index changes of this commit.
    #[must_use]
    pub fn record_changes(&self) -> Vec<RecordChange> {
        self.ops
            .iter()
            .map(|op| match (&op.cid, op.action.as_str()) {
                (Some(cid), "create" | "update") => RecordChange::Put {
                    collection: op.collection.clone(),
                    rkey: op.rkey.clone(),
                    cid: cid.clone(),
                },
                _ => RecordChange::Delete {
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
            .map(|op| {
                let action = match op.action.as_str() {
                    "create" => Action::Create,
                    "update" => Action::Update,
                    _ => Action::Delete,
                };
                NewEvent {
                    live: true,
                    payload: RecordEvent {
                        live: true,
                        did,
                        rev: &self.rev,
                        collection: &op.collection,
                        rkey: &op.rkey,
                        action,
                        cid: op.cid.as_deref(),
                        record_json: op.record.as_deref(),
                    }
                    .payload(),
                }
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
            prev_data: "bafyOld".into(),
            ops: vec![
                PreparedOp {
                    collection: "app.bsky.feed.post".into(),
                    rkey: "1".into(),
                    action: "create".into(),
                    cid: Some("bafyR".into()),
                    record: Some(r#"{"text":"hi"}"#.into()),
                },
                PreparedOp {
                    collection: "app.bsky.feed.like".into(),
                    rkey: "2".into(),
                    action: "delete".into(),
                    cid: None,
                    record: None,
                },
            ],
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
