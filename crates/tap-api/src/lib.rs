//! What clients send to tap, decoded without I/O: the JSON bodies of `POST /repos/add`,
//! `/repos/remove`, `/repos/resync`, `PUT /collection-filters`, `/signal-collections` and
//! `/record-filters`, and the frames a `/channel` client writes. The server answers a
//! [`BodyError`] with `400` and its message; the same types serialize for a client.
//!
//! Every input here comes from the network, so every decoder is fuzzed
//! (`crates/tap-atproto/fuzz/fuzz_targets/api_bodies.rs`). The server caps bodies at 4 MiB
//! and client frames at 64 KiB before they get here.

use serde::{Deserialize, Serialize};
use tap_atproto::syntax::Did;

/// Why a body was refused, in words for the `400` answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(String);

/// `{"dids": ["did:…", …]}`: the repos a `/repos/*` call is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DidList {
    /// DIDs as sent; [`did_list`] checks them.
    #[serde(default)]
    pub dids: Option<Vec<String>>,
}

/// `{"collections": ["nsid", …]}` (indigo PR 1338's shape), for the collection filters and
/// the signal collections. Each entry is checked by the setting it is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collections {
    /// Collection NSIDs or filters as sent.
    pub collections: Vec<String>,
}

/// `{"rules": ["<collection>: <expression>", …]}`: record-content filters, parsed by
/// `tap_atproto::record_filter` when they are set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Rules as sent.
    pub rules: Vec<String>,
}

/// The DIDs of a `/repos/*` body, each one valid. As the Go tap, an empty body and an
/// absent or empty list are the same mistake.
///
/// # Errors
/// Malformed JSON, no DIDs, or a DID that does not parse (named in the message).
pub fn did_list(body: &[u8]) -> Result<Vec<Did>, BodyError> {
    let dids = if body.is_empty() {
        Vec::new()
    } else {
        let list: DidList =
            object(body).map_err(|e| BodyError(format!("invalid JSON body: {e}")))?;
        list.dids.unwrap_or_default()
    };
    if dids.is_empty() {
        return Err(BodyError(
            "no DIDs given: expected {\"dids\": [\"did:…\", …]}".into(),
        ));
    }
    dids.iter()
        .map(|raw| {
            raw.parse::<Did>()
                .map_err(|e| BodyError(format!("invalid DID {raw:?}: {e}")))
        })
        .collect()
}

/// The entries of a `{"collections": […]}` body.
///
/// # Errors
/// Anything but an object with exactly that list of strings.
pub fn collections(body: &[u8]) -> Result<Vec<String>, BodyError> {
    shaped::<Collections>(body, r#"{"collections": ["nsid", …]}"#).map(|c| c.collections)
}

/// The entries of a `{"rules": […]}` body.
///
/// # Errors
/// Anything but an object with exactly that list of strings.
pub fn rules(body: &[u8]) -> Result<Vec<String>, BodyError> {
    shaped::<Rules>(body, r#"{"rules": ["<collection>: <expression>", …]}"#).map(|r| r.rules)
}

fn shaped<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, BodyError> {
    object(body).map_err(|e| BodyError(format!("invalid body: {e}; expected {expected}")))
}

/// `T` from a JSON object, and only from one: serde would also fill a struct from an array
/// of its fields in order (`[["did:…"]]` as a DID list), which no client means and the Go
/// tap refuses.
fn object<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, String> {
    match json.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice(json).map_err(|e| e.to_string()),
        _ => Err("not a JSON object".into()),
    }
}

/// A frame from a `/channel` client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFrame {
    /// `{"type":"ack","id":N}`: the event with id `N` is done.
    Ack(u64),
    /// Any other object with a string `type` (ignored, as the Go tap does).
    Other,
}

/// The JSON of a client frame. Like the Go tap, absent fields take zero values and unknown
/// keys are ignored.
#[derive(Debug, Deserialize)]
struct RawFrame {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    id: u64,
}

/// The text of an ack for event `id`, as a client sends it.
#[must_use]
pub fn ack(id: u64) -> String {
    format!(r#"{{"type":"ack","id":{id}}}"#)
}

/// Decodes a client frame.
///
/// # Errors
/// Anything that is not an object with a string `type` and an unsigned `id`: the server
/// ends that client's session.
pub fn client_frame(bytes: &[u8]) -> Result<ClientFrame, BodyError> {
    let raw: RawFrame =
        object(bytes).map_err(|e| BodyError(format!("malformed client frame: {e}")))?;
    Ok(if raw.kind == "ack" {
        ClientFrame::Ack(raw.id)
    } else {
        ClientFrame::Other
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_did_list_is_refused_whole_for_one_bad_did_and_empty_is_a_mistake() {
        let ok = did_list(br#"{"dids":["did:plc:ewvi7nxzyoun6zhxrhs64oiz","did:web:a.example"]}"#)
            .unwrap();
        assert_eq!(ok.len(), 2);
        let bad = did_list(br#"{"dids":["did:plc:ewvi7nxzyoun6zhxrhs64oiz","nope"]}"#).unwrap_err();
        assert!(bad.to_string().contains("invalid DID \"nope\""), "{bad}");
        for empty in [&b""[..], br#"{}"#, br#"{"dids":[]}"#, br#"{"dids":null}"#] {
            let e = did_list(empty).unwrap_err();
            assert!(e.to_string().starts_with("no DIDs given"), "{e}");
        }
        assert!(
            did_list(b"{")
                .unwrap_err()
                .to_string()
                .starts_with("invalid JSON body")
        );
    }

    #[test]
    fn collections_and_rules_take_exactly_their_list() {
        assert_eq!(
            collections(br#"{"collections":["app.bsky.feed.post"]}"#).unwrap(),
            ["app.bsky.feed.post"]
        );
        let unknown = collections(br#"{"collections":[],"extra":1}"#).unwrap_err();
        assert!(
            unknown.to_string().contains("expected {\"collections\""),
            "{unknown}"
        );
        assert!(collections(br#"{"collections":[1]}"#).is_err());
        assert_eq!(
            rules(br#"{"rules":["a.b.c: true"]}"#).unwrap(),
            ["a.b.c: true"]
        );
        assert!(rules(br#"{"rules":"a.b.c: true"}"#).is_err());
        assert!(rules(br#"[["a.b.c: true"]]"#).is_err());
    }

    #[test]
    fn client_frames_are_acks_or_ignored_and_anything_else_is_malformed() {
        assert_eq!(
            client_frame(br#"{"type":"ack","id":7}"#),
            Ok(ClientFrame::Ack(7))
        );
        assert_eq!(client_frame(br#"{"type":"ack"}"#), Ok(ClientFrame::Ack(0)));
        assert_eq!(
            client_frame(br#"{"type":"hello","x":[1]}"#),
            Ok(ClientFrame::Other)
        );
        assert_eq!(client_frame(br#"{}"#), Ok(ClientFrame::Other));
        for bad in [
            &b"[]"[..],
            br#"{"type":1}"#,
            br#"{"type":"ack","id":-1}"#,
            b"ack",
        ] {
            assert!(
                client_frame(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(client_frame(ack(42).as_bytes()), Ok(ClientFrame::Ack(42)));
    }
}
