//! The events tap delivers, as its `/channel`, webhook and NATS modes send them.

use serde::Deserialize;

/// One event: its id (what is acked) and what happened.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    /// Stable across redeliveries.
    pub id: u64,
    /// The event itself.
    #[serde(flatten)]
    pub body: EventBody,
}

/// A record change or an identity change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EventBody {
    /// A record was created, updated or deleted.
    Record {
        /// The change.
        record: RecordEvent,
    },
    /// An account's handle or status changed (or was first seen).
    Identity {
        /// The identity.
        identity: IdentityEvent,
    },
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A new record.
    Create,
    /// A record replaced at the same path.
    Update,
    /// A record removed.
    Delete,
}

/// A record change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RecordEvent {
    /// From the firehose (`true`) or from a backfill or resync (`false`).
    pub live: bool,
    /// The repo.
    pub did: String,
    /// The commit (or snapshot) revision.
    pub rev: String,
    /// Collection NSID.
    pub collection: String,
    /// Record key.
    pub rkey: String,
    /// What happened.
    pub action: Action,
    /// The record as JSON (absent for deletes, and for a record tap could not transcode).
    #[serde(default)]
    pub record: Option<serde_json::Value>,
    /// The record's CID (absent for deletes).
    #[serde(default)]
    pub cid: Option<String>,
    /// Set when the record could not be proven (Jetstream mode without proofs).
    #[serde(default)]
    pub unverified: bool,
}

/// An account's identity.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IdentityEvent {
    /// The account.
    pub did: String,
    /// Its verified handle, or `handle.invalid`.
    pub handle: String,
    /// Whether the account is active.
    pub is_active: bool,
    /// `active`, `takendown`, `suspended`, `deactivated` or `deleted`.
    pub status: String,
}

impl Event {
    /// Reads one frame.
    ///
    /// # Errors
    /// Not an event of a known kind.
    pub fn parse(text: &str) -> Result<Self, crate::ClientError> {
        serde_json::from_str(text).map_err(|e| crate::ClientError::Event(e.to_string()))
    }

    /// The repo the event is about.
    #[must_use]
    pub fn did(&self) -> &str {
        match &self.body {
            EventBody::Record { record } => &record.did,
            EventBody::Identity { identity } => &identity.did,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_read_as_typed_events() {
        let record = Event::parse(r#"{"id":7,"type":"record","record":{"live":true,"did":"did:plc:a","rev":"3l","collection":"app.bsky.feed.post","rkey":"k","action":"create","record":{"text":"hi"},"cid":"bafy"}}"#).unwrap();
        assert_eq!(record.id, 7);
        let EventBody::Record { record: r } = &record.body else {
            panic!("a record")
        };
        assert_eq!(
            (r.action, r.live, r.cid.as_deref()),
            (Action::Create, true, Some("bafy"))
        );
        assert_eq!(r.record.as_ref().unwrap()["text"], "hi");
        let delete = Event::parse(r#"{"id":8,"type":"record","record":{"live":false,"did":"did:plc:a","rev":"3l","collection":"c.d.e","rkey":"k","action":"delete"}}"#).unwrap();
        assert_eq!(delete.did(), "did:plc:a");
        let identity = Event::parse(r#"{"id":9,"type":"identity","identity":{"did":"did:plc:a","handle":"a.test","is_active":true,"status":"active"}}"#).unwrap();
        assert!(
            matches!(identity.body, EventBody::Identity { ref identity } if identity.handle == "a.test")
        );
        assert!(Event::parse(r#"{"id":1,"type":"other"}"#).is_err());
    }
}
