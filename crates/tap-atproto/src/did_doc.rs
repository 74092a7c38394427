//! DID-document helpers: parse the JSON and extract what atproto needs — the document `id`,
//! the `#atproto` signing key, the `#atproto_pds` service endpoint and the
//! `alsoKnownAs` handle. Fetching documents is the daemon's job.

use serde::Deserialize;

use crate::crypto::{KeyError, PublicKey};
use crate::syntax::{Did, Handle};

/// Why a DID document is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DidDocError {
    /// Not JSON, or not shaped like a DID document (`id` missing or not a DID).
    #[error("malformed DID document: {0}")]
    Malformed(String),
    /// There is no `#atproto` verification method.
    #[error("no #atproto verification method")]
    NoAtprotoKey,
    /// The `#atproto` key does not parse.
    #[error("bad #atproto key: {0}")]
    BadKey(#[from] KeyError),
}

/// A verification method entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VerificationMethod {
    /// `#atproto` or `did:…#atproto`.
    pub id: String,
    /// `Multikey` or a legacy key type.
    #[serde(rename = "type")]
    pub method_type: String,
    /// The controlling DID.
    #[serde(default)]
    pub controller: Option<String>,
    /// The key.
    #[serde(rename = "publicKeyMultibase", default)]
    pub public_key_multibase: Option<String>,
}

/// A service entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Service {
    /// `#atproto_pds` or `did:…#atproto_pds`.
    pub id: String,
    /// e.g. `AtprotoPersonalDataServer`.
    #[serde(rename = "type", default)]
    pub service_type: String,
    /// A URL (a string; map-valued endpoints are ignored).
    #[serde(rename = "serviceEndpoint", default)]
    pub service_endpoint: serde_json::Value,
}

/// The parts of a DID document atproto uses. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DidDocument {
    /// The DID the document describes.
    pub id: Did,
    /// `at://handle` aliases.
    #[serde(rename = "alsoKnownAs", default)]
    pub also_known_as: Vec<String>,
    /// Keys.
    #[serde(rename = "verificationMethod", default)]
    pub verification_method: Vec<VerificationMethod>,
    /// Services.
    #[serde(default)]
    pub service: Vec<Service>,
}

impl DidDocument {
    /// Parses a DID document from JSON bytes.
    ///
    /// # Errors
    /// [`DidDocError::Malformed`] when it is not a DID document with a valid `id`.
    pub fn parse(json: &[u8]) -> Result<Self, DidDocError> {
        serde_json::from_slice(json).map_err(|e| DidDocError::Malformed(e.to_string()))
    }

    /// Roughly the bytes this document holds (its strings and service endpoints), for
    /// caches that weigh entries: a hostile document can be a thousand times the usual
    /// size.
    #[must_use]
    pub fn approx_size(&self) -> usize {
        let methods: usize = self
            .verification_method
            .iter()
            .map(|m| {
                m.id.len()
                    + m.method_type.len()
                    + m.controller.as_ref().map_or(0, String::len)
                    + m.public_key_multibase.as_ref().map_or(0, String::len)
            })
            .sum();
        let services: usize = self
            .service
            .iter()
            .map(|s| s.id.len() + s.service_type.len() + s.service_endpoint.to_string().len())
            .sum();
        self.id.as_str().len()
            + self.also_known_as.iter().map(String::len).sum::<usize>()
            + methods
            + services
    }

    fn matches_fragment(&self, id: &str, fragment: &str) -> bool {
        id == fragment || id.strip_prefix(self.id.as_str()) == Some(fragment)
    }

    /// The `#atproto` signing key.
    ///
    /// # Errors
    /// [`DidDocError`] when absent or unparseable.
    pub fn atproto_key(&self) -> Result<PublicKey, DidDocError> {
        let vm = self
            .verification_method
            .iter()
            .find(|vm| self.matches_fragment(&vm.id, "#atproto"))
            .ok_or(DidDocError::NoAtprotoKey)?;
        let mb = vm
            .public_key_multibase
            .as_deref()
            .ok_or(DidDocError::NoAtprotoKey)?;
        Ok(PublicKey::from_verification_method(&vm.method_type, mb)?)
    }

    /// The `#atproto_pds` service endpoint URL, if present and a string.
    #[must_use]
    pub fn pds_endpoint(&self) -> Option<&str> {
        self.service
            .iter()
            .find(|s| self.matches_fragment(&s.id, "#atproto_pds"))
            .and_then(|s| s.service_endpoint.as_str())
    }

    /// The first `at://` alias that is a syntactically valid handle. (Whether the handle
    /// resolves back to this DID is for the caller to check.)
    #[must_use]
    pub fn handle(&self) -> Option<Handle> {
        self.also_known_as
            .iter()
            .filter_map(|a| a.strip_prefix("at://"))
            .find_map(|h| Handle::new(h).ok())
    }
}

impl PublicKey {
    /// The `#atproto` key of a DID document (see [`DidDocument::atproto_key`]).
    ///
    /// # Errors
    /// [`DidDocError`] when absent or unparseable.
    pub fn from_did_doc(doc: &DidDocument) -> Result<Self, DidDocError> {
        doc.atproto_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_key_pds_and_handle() {
        let doc = br##"{
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
            "alsoKnownAs": ["at://atproto.com"],
            "verificationMethod": [{
                "id": "did:plc:ewvi7nxzyoun6zhxrhs64oiz#atproto",
                "type": "Multikey",
                "controller": "did:plc:ewvi7nxzyoun6zhxrhs64oiz",
                "publicKeyMultibase": "zQ3shunBKsXixLxKtC5qeSG9E4J5RkGN57im31pcTzbNQnm5w"
            }],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://enoki.us-east.host.bsky.network"}]
        }"##;
        let d = DidDocument::parse(doc).unwrap();
        assert_eq!(d.id.as_str(), "did:plc:ewvi7nxzyoun6zhxrhs64oiz");
        assert_eq!(d.handle().unwrap().as_str(), "atproto.com");
        assert_eq!(
            d.pds_endpoint(),
            Some("https://enoki.us-east.host.bsky.network")
        );
        let key = PublicKey::from_did_doc(&d).unwrap();
        assert_eq!(
            key.to_multikey(),
            "zQ3shunBKsXixLxKtC5qeSG9E4J5RkGN57im31pcTzbNQnm5w"
        );
    }

    #[test]
    fn missing_key_is_a_typed_error() {
        let d = DidDocument::parse(br#"{"id":"did:web:example.com"}"#).unwrap();
        assert_eq!(d.atproto_key(), Err(DidDocError::NoAtprotoKey));
        assert!(DidDocument::parse(br#"{"id":"nope"}"#).is_err());
    }
}
