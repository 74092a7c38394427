//! Jetstream v1 events: the JSON text frames of `GET /subscribe`, read into typed values
//! with every identifier checked. Jetstream sends one event per repo operation, so a
//! commit of several operations arrives as several [`Event::Commit`]s sharing one `rev`.
//!
//! Nothing here is trusted: a commit event is a claim ("this repo wrote this record with
//! this CID at this rev") that the caller proves against the PDS ([`crate::proof`]) or
//! passes on marked unverified.

use cid::Cid;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::syntax::{Did, Nsid, RecordKey, SyntaxError, Tid};

/// Largest event accepted (Jetstream's own records are capped well below this).
pub const MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;

/// Why a frame is not a Jetstream event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Larger than [`MAX_EVENT_BYTES`].
    #[error("event of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not JSON of the event shape.
    #[error("malformed event: {0}")]
    Json(String),
    /// An identifier has the wrong syntax.
    #[error("malformed event: {0}")]
    Syntax(#[from] SyntaxError),
    /// A field is missing or inconsistent with the event's kind.
    #[error("malformed event: {0}")]
    Field(&'static str),
    /// The `cid` is not a CID.
    #[error("malformed event: cid {0:?}")]
    Cid(String),
}

/// What a commit event says happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// A new record with this CID.
    Create(Cid),
    /// The record now has this CID.
    Update(Cid),
    /// The record is gone.
    Delete,
}

impl Operation {
    /// The CID claimed for the record after the operation (`None` for a delete).
    #[must_use]
    pub fn cid(&self) -> Option<&Cid> {
        match self {
            Self::Create(cid) | Self::Update(cid) => Some(cid),
            Self::Delete => None,
        }
    }
}

/// One operation of a commit, as Jetstream claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOp {
    /// The repo.
    pub did: Did,
    /// The commit's rev (shared by every operation of the commit).
    pub rev: Tid,
    /// Collection NSID.
    pub collection: Nsid,
    /// Record key.
    pub rkey: RecordKey,
    /// What happened.
    pub operation: Operation,
    /// The record as data-model JSON, as Jetstream sent it (absent for deletes).
    pub record: Option<String>,
}

impl CommitOp {
    /// The MST key of the record: `collection/rkey`.
    #[must_use]
    pub fn path(&self) -> String {
        format!("{}/{}", self.collection.as_str(), self.rkey.as_str())
    }
}

/// A Jetstream event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One operation of a commit.
    Commit(CommitOp),
    /// The account's identity (handle, DID document) may have changed.
    Identity {
        /// The account.
        did: Did,
    },
    /// The account's hosting status changed.
    Account {
        /// The account.
        did: Did,
        /// Whether the account is active.
        active: bool,
        /// Why it is not active (`takendown`, `suspended`, `deleted`, `deactivated`, …).
        status: Option<String>,
    },
    /// A kind this version does not know (still has a cursor position).
    Unknown {
        /// The repo it is about.
        did: Did,
    },
}

impl Event {
    /// The repo the event is about.
    #[must_use]
    pub fn did(&self) -> &Did {
        match self {
            Self::Commit(op) => &op.did,
            Self::Identity { did } | Self::Account { did, .. } | Self::Unknown { did } => did,
        }
    }
}

/// An event with its position in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned {
    /// Unix microseconds: the stream position (strictly increasing) and the cursor.
    pub time_us: i64,
    /// The event.
    pub event: Event,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    did: &'a str,
    time_us: i64,
    #[serde(borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    commit: Option<RawCommit<'a>>,
    #[serde(default)]
    account: Option<RawAccount>,
}

#[derive(Deserialize)]
struct RawCommit<'a> {
    #[serde(borrow)]
    rev: &'a str,
    #[serde(borrow)]
    operation: &'a str,
    #[serde(borrow)]
    collection: &'a str,
    #[serde(borrow)]
    rkey: &'a str,
    #[serde(default, borrow)]
    record: Option<&'a RawValue>,
    #[serde(default)]
    cid: Option<String>,
}

#[derive(Deserialize)]
struct RawAccount {
    active: bool,
    #[serde(default)]
    status: Option<String>,
}

/// Reads one Jetstream text frame.
///
/// # Errors
/// [`EventError`] for anything that is not a well-formed event.
pub fn parse_event(text: &str) -> Result<Positioned, EventError> {
    if text.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(text.len()));
    }
    let raw: RawEvent<'_> =
        serde_json::from_str(text).map_err(|e| EventError::Json(e.to_string()))?;
    let did = Did::new(raw.did)?;
    if raw.time_us <= 0 {
        return Err(EventError::Field("time_us must be positive"));
    }
    let event = match raw.kind {
        "commit" => {
            let c = raw
                .commit
                .ok_or(EventError::Field("commit event without commit"))?;
            let cid = || -> Result<Cid, EventError> {
                let text = c
                    .cid
                    .as_deref()
                    .ok_or(EventError::Field("commit without cid"))?;
                Cid::try_from(text).map_err(|_| EventError::Cid(text.to_owned()))
            };
            let operation = match c.operation {
                "create" => Operation::Create(cid()?),
                "update" => Operation::Update(cid()?),
                "delete" => Operation::Delete,
                _ => return Err(EventError::Field("unknown commit operation")),
            };
            let record = match (&operation, c.record) {
                (Operation::Delete, _) => None,
                (_, Some(r)) if r.get().starts_with('{') => Some(r.get().to_owned()),
                (_, _) => return Err(EventError::Field("create or update without a record")),
            };
            Event::Commit(CommitOp {
                did,
                rev: Tid::new(c.rev)?,
                collection: Nsid::new(c.collection)?,
                rkey: RecordKey::new(c.rkey)?,
                operation,
                record,
            })
        }
        "identity" => Event::Identity { did },
        "account" => {
            let a = raw
                .account
                .ok_or(EventError::Field("account event without account"))?;
            Event::Account {
                did,
                active: a.active,
                status: a.status,
            }
        }
        _ => Event::Unknown { did },
    };
    Ok(Positioned {
        time_us: raw.time_us,
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";

    #[test]
    fn a_create_reads_with_its_record_and_cid() {
        let text = format!(
            r#"{{"did":"did:plc:abc","time_us":1725911162329308,"kind":"commit","commit":{{"rev":"3l3qo2vutsw2b","operation":"create","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b","record":{{"$type":"app.bsky.feed.like","subject":{{"cid":"x","uri":"at://did:plc:x/app.bsky.feed.post/1"}}}},"cid":"{CID}"}}}}"#
        );
        let p = parse_event(&text).unwrap();
        assert_eq!(p.time_us, 1_725_911_162_329_308);
        let Event::Commit(op) = p.event else {
            panic!("not a commit")
        };
        assert_eq!(op.path(), "app.bsky.feed.like/3l3qo2vuowo2b");
        assert_eq!(op.operation.cid().unwrap().to_string(), CID);
        assert!(op.record.unwrap().contains("app.bsky.feed.like"));
    }

    #[test]
    fn a_delete_needs_no_record_or_cid() {
        let text = r#"{"did":"did:plc:abc","time_us":5,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"delete","collection":"app.bsky.graph.follow","rkey":"3l3qo2vuowo2b"}}"#;
        let Event::Commit(op) = parse_event(text).unwrap().event else {
            panic!("not a commit")
        };
        assert_eq!(op.operation, Operation::Delete);
        assert_eq!(op.record, None);
    }

    #[test]
    fn account_and_identity_events_read() {
        let account = r#"{"did":"did:plc:abc","time_us":7,"kind":"account","account":{"active":false,"did":"did:plc:abc","seq":1,"time":"2024-09-09T19:46:02.102Z","status":"takendown"}}"#;
        assert_eq!(
            parse_event(account).unwrap().event,
            Event::Account {
                did: Did::new("did:plc:abc").unwrap(),
                active: false,
                status: Some("takendown".into())
            }
        );
        let identity = r#"{"did":"did:plc:abc","time_us":8,"kind":"identity","identity":{"did":"did:plc:abc","handle":"a.test","seq":2,"time":"2024-09-09T19:46:02.102Z"}}"#;
        assert!(matches!(
            parse_event(identity).unwrap().event,
            Event::Identity { .. }
        ));
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let cases = [
            ("not json", "malformed"),
            (r#"{"did":"nope","time_us":1,"kind":"identity"}"#, "did"),
            (
                r#"{"did":"did:plc:a","time_us":0,"kind":"identity"}"#,
                "time_us",
            ),
            (
                r#"{"did":"did:plc:a","time_us":1,"kind":"commit"}"#,
                "without commit",
            ),
            (
                r#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"a.b.c","rkey":"x","record":{}}}"#,
                "without cid",
            ),
            (
                r#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"update","collection":"a.b.c","rkey":"x","cid":"zzz","record":{}}}"#,
                "cid",
            ),
            (
                r#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"nope","operation":"delete","collection":"a.b.c","rkey":"x"}}"#,
                "tid",
            ),
            (
                r#"{"did":"did:plc:a","time_us":1,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"a.b.c","rkey":"x","cid":"bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm","record":[1]}}"#,
                "record",
            ),
        ];
        for (text, needle) in cases {
            let error = parse_event(text).unwrap_err().to_string().to_lowercase();
            assert!(error.contains(needle), "{text}: {error}");
        }
        let huge = "x".repeat(MAX_EVENT_BYTES + 1);
        assert!(matches!(parse_event(&huge), Err(EventError::TooLarge(_))));
    }
}
