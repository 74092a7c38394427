//! The JSON events consumers receive: the public contract, byte-compatible with the Go tap
//! and accepted by `@atproto/tap` (original-behaviour.md §3.3).
//!
//! Events are stored without their id (the id is assigned by the store when the row is
//! written); [`frame`] splices the id in front when the event is sent. The payload is
//! `{"type":"record","record":{…}}` or `{"type":"identity","identity":{…}}`.

use std::fmt::Write as _;

use tap_atproto::atjson::push_json_str;

use crate::store::EventId;

/// What happened to a record. Serialized by its wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A new record.
    Create,
    /// A record replaced at the same path.
    Update,
    /// A record removed.
    Delete,
}

impl Action {
    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// A record event before it is stored.
#[derive(Debug, Clone, Copy)]
pub struct RecordEvent<'a> {
    /// `true` for events applied from the firehose, `false` for resync output.
    pub live: bool,
    /// Repo DID.
    pub did: &'a str,
    /// Commit rev (live) or snapshot rev (historical).
    pub rev: &'a str,
    /// Collection NSID.
    pub collection: &'a str,
    /// Record key.
    pub rkey: &'a str,
    /// What happened.
    pub action: Action,
    /// Record CID (create/update). Omitted for deletes.
    pub cid: Option<&'a str>,
    /// The record as atproto JSON (already encoded), when it decoded. Omitted for deletes.
    pub record_json: Option<&'a str>,
    /// The record was not checked against its repo (`--jetstream-verify none`): sent as
    /// `"unverified": true`, and omitted otherwise (docs/differences.md).
    pub unverified: bool,
}

/// Account status as carried by identity events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityStatus {
    /// Active account.
    Active,
    /// Taken down by a moderator.
    Takendown,
    /// Suspended.
    Suspended,
    /// Deactivated by the user.
    Deactivated,
    /// Deleted.
    Deleted,
}

impl IdentityStatus {
    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Takendown => "takendown",
            Self::Suspended => "suspended",
            Self::Deactivated => "deactivated",
            Self::Deleted => "deleted",
        }
    }
}

/// An identity event before it is stored.
#[derive(Debug, Clone, Copy)]
pub struct IdentityEvent<'a> {
    /// Repo DID.
    pub did: &'a str,
    /// A verified handle, or `handle.invalid`; never empty (decisions.md row 8).
    pub handle: &'a str,
    /// Whether the account is active.
    pub is_active: bool,
    /// Account status.
    pub status: IdentityStatus,
}

/// The handle sent when none could be verified.
pub const INVALID_HANDLE: &str = "handle.invalid";

impl RecordEvent<'_> {
    /// The stored payload (no id).
    #[must_use]
    pub fn payload(&self) -> String {
        let mut out = String::with_capacity(160 + self.record_json.map_or(0, str::len));
        out.push_str("{\"type\":\"record\",\"record\":{\"live\":");
        out.push_str(if self.live { "true" } else { "false" });
        out.push_str(",\"did\":");
        push_json_str(&mut out, self.did);
        out.push_str(",\"rev\":");
        push_json_str(&mut out, self.rev);
        out.push_str(",\"collection\":");
        push_json_str(&mut out, self.collection);
        out.push_str(",\"rkey\":");
        push_json_str(&mut out, self.rkey);
        out.push_str(",\"action\":\"");
        out.push_str(self.action.as_str());
        out.push('"');
        if self.action != Action::Delete {
            if let Some(record) = self.record_json {
                out.push_str(",\"record\":");
                out.push_str(record);
            }
            if let Some(cid) = self.cid {
                out.push_str(",\"cid\":");
                push_json_str(&mut out, cid);
            }
        }
        if self.unverified {
            out.push_str(",\"unverified\":true");
        }
        out.push_str("}}");
        out
    }
}

impl IdentityEvent<'_> {
    /// The stored payload (no id). An empty handle is sent as `handle.invalid`.
    #[must_use]
    pub fn payload(&self) -> String {
        let handle = if self.handle.is_empty() {
            INVALID_HANDLE
        } else {
            self.handle
        };
        let mut out = String::with_capacity(128);
        out.push_str("{\"type\":\"identity\",\"identity\":{\"did\":");
        push_json_str(&mut out, self.did);
        out.push_str(",\"handle\":");
        push_json_str(&mut out, handle);
        out.push_str(",\"is_active\":");
        out.push_str(if self.is_active { "true" } else { "false" });
        out.push_str(",\"status\":\"");
        out.push_str(self.status.as_str());
        out.push_str("\"}}");
        out
    }
}

/// The text frame sent to consumers: the payload with `"id":N` first.
#[must_use]
pub fn frame(id: EventId, payload: &str) -> String {
    let body = payload.strip_prefix('{').unwrap_or(payload);
    let mut out = String::with_capacity(payload.len() + 24);
    let _ = write!(out, "{{\"id\":{}", id.0);
    if body != "}" {
        out.push(',');
    }
    out.push_str(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn record_create_event_has_the_go_tap_shape() {
        let payload = RecordEvent {
            live: true,
            did: "did:plc:abc123",
            rev: "3kb3fge5lm32x",
            collection: "app.bsky.feed.post",
            rkey: "3kb3fge5lm32x",
            action: Action::Create,
            cid: Some("bafyreig"),
            record_json: Some(r#"{"$type":"app.bsky.feed.post","text":"Hello \"world\""}"#),
            unverified: false,
        }
        .payload();
        assert_eq!(
            parse(&frame(EventId(12345), &payload)),
            json!({"id": 12345, "type": "record", "record": {
                "live": true, "did": "did:plc:abc123", "rev": "3kb3fge5lm32x",
                "collection": "app.bsky.feed.post", "rkey": "3kb3fge5lm32x", "action": "create",
                "record": {"$type": "app.bsky.feed.post", "text": "Hello \"world\""},
                "cid": "bafyreig"}})
        );
    }

    #[test]
    fn delete_events_omit_record_and_cid() {
        let payload = RecordEvent {
            live: false,
            did: "did:plc:abc123",
            rev: "r",
            collection: "app.bsky.feed.like",
            rkey: "k",
            action: Action::Delete,
            cid: Some("ignored"),
            record_json: Some("{}"),
            unverified: false,
        }
        .payload();
        let v = parse(&frame(EventId(1), &payload));
        let rec = v["record"].as_object().unwrap();
        assert!(
            !rec.contains_key("record") && !rec.contains_key("cid"),
            "{v}"
        );
        assert_eq!(rec["action"], "delete");
        assert_eq!(rec["live"], false);
    }

    #[test]
    fn undecodable_record_keeps_its_cid() {
        let payload = RecordEvent {
            live: false,
            did: "did:plc:x",
            rev: "r",
            collection: "a.b.c",
            rkey: "k",
            action: Action::Update,
            cid: Some("bafy"),
            record_json: None,
            unverified: false,
        }
        .payload();
        let v = parse(&payload);
        assert_eq!(v["record"]["cid"], "bafy");
        assert!(v["record"].get("record").is_none());
    }

    #[test]
    fn an_unverified_record_says_so_and_a_verified_one_has_no_such_field() {
        let event = |unverified| RecordEvent {
            live: true,
            did: "did:plc:x",
            rev: "r",
            collection: "a.b.c",
            rkey: "k",
            action: Action::Create,
            cid: Some("bafy"),
            record_json: Some("{}"),
            unverified,
        };
        assert_eq!(parse(&event(true).payload())["record"]["unverified"], true);
        assert!(
            parse(&event(false).payload())["record"]
                .get("unverified")
                .is_none()
        );
    }

    #[test]
    fn identity_event_never_carries_an_empty_handle() {
        let payload = IdentityEvent {
            did: "did:plc:abc123",
            handle: "",
            is_active: false,
            status: IdentityStatus::Deactivated,
        }
        .payload();
        assert_eq!(
            parse(&frame(EventId(12346), &payload)),
            json!({"id": 12346, "type": "identity", "identity": {
                "did": "did:plc:abc123", "handle": "handle.invalid",
                "is_active": false, "status": "deactivated"}})
        );
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(parse(&s), Value::String("a\"b\\c\n\u{1}é".into()));
    }

    proptest::proptest! {
        #[test]
        fn any_string_escapes_to_json_that_reads_back_the_same(text in ".*") {
            let mut s = String::new();
            push_json_str(&mut s, &text);
            proptest::prop_assert_eq!(parse(&s), Value::String(text));
        }
    }
}
