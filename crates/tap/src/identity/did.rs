//! DID → DID document: `did:plc` from the PLC directory, `did:web` from the host's
//! `/.well-known/did.json`. A document is accepted only if its `id` is the DID asked for.

use tap_atproto::did_doc::DidDocument;
use tap_atproto::syntax::{Did, Handle};
use url::Url;

use super::IdentityError;
use super::fetch::{Http, Reply};

/// Largest DID document accepted (real ones are a few KiB).
pub(super) const MAX_DID_DOC_BYTES: usize = 1024 * 1024;

/// Top-level domains that are never resolved (reserved or non-public), for did:web hosts and
/// handles alike.
const DISALLOWED_TLDS: &[&str] = &[
    "local",
    "arpa",
    "invalid",
    "localhost",
    "internal",
    "example",
    "onion",
    "alt",
];

/// Whether a hostname (or handle) ends in a reserved TLD.
pub(super) fn has_disallowed_tld(host: &str) -> bool {
    host.rsplit('.')
        .next()
        .is_some_and(|tld| DISALLOWED_TLDS.iter().any(|d| tld.eq_ignore_ascii_case(d)))
}

/// Fetches and checks the DID document of `did`.
pub(super) async fn fetch_document(
    http: &Http,
    plc_url: &Url,
    did: &Did,
) -> Result<DidDocument, IdentityError> {
    let (reply, url) = match did.method() {
        "plc" => {
            let shown = format!("{}/{}", plc_url.as_str().trim_end_matches('/'), did);
            let url = Url::parse(&shown).map_err(|e| IdentityError::Transport {
                url: shown.clone(),
                message: e.to_string(),
            })?;
            (http.get(&url, MAX_DID_DOC_BYTES).await?, shown)
        }
        "web" => {
            let host = did_web_host(did)?;
            let reply = http
                .get_https(&host, "/.well-known/did.json", MAX_DID_DOC_BYTES)
                .await?;
            (reply, format!("https://{host}/.well-known/did.json"))
        }
        _ => {
            return Err(IdentityError::Unsupported {
                did: did.clone(),
                reason: "only did:plc and did:web are supported",
            });
        }
    };
    let body = match reply {
        Reply::Ok(body) => body,
        // 410 is how the PLC directory answers for a tombstoned (deleted) DID.
        Reply::Status(404 | 410) => return Err(IdentityError::NotFound { did: did.clone() }),
        Reply::Status(status) => return Err(IdentityError::Status { url, status }),
    };
    let doc = DidDocument::parse(&body).map_err(|e| IdentityError::Malformed {
        did: did.clone(),
        reason: e.to_string(),
    })?;
    if doc.id != *did {
        return Err(IdentityError::IdMismatch {
            did: did.clone(),
            found: doc.id.to_string(),
        });
    }
    Ok(doc)
}

/// The host of a `did:web`: a plain hostname, lower-cased. atproto allows neither a port
/// (`%3A`) nor a path (`:`), nor a reserved TLD.
fn did_web_host(did: &Did) -> Result<String, IdentityError> {
    let unsupported = |reason| IdentityError::Unsupported {
        did: did.clone(),
        reason,
    };
    let host = did.as_str().strip_prefix("did:web:").unwrap_or_default();
    if host.contains(':') || host.contains('%') {
        return Err(unsupported("did:web with a port or a path"));
    }
    if Handle::new(host).is_err() {
        return Err(unsupported("did:web host is not a hostname"));
    }
    if has_disallowed_tld(host) {
        return Err(unsupported("did:web host has a reserved TLD"));
    }
    Ok(host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn did(s: &str) -> Did {
        Did::new(s).unwrap()
    }

    #[test]
    fn did_web_accepts_only_plain_public_hostnames() {
        assert_eq!(
            did_web_host(&did("did:web:Example.COM")).unwrap(),
            "example.com"
        );
        for bad in [
            "did:web:example.com%3A8080",
            "did:web:example.com:user:alice",
            "did:web:localhost",
            "did:web:box.local",
            "did:web:1.2.3.4",
        ] {
            assert!(
                matches!(
                    did_web_host(&did(bad)),
                    Err(IdentityError::Unsupported { .. })
                ),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn reserved_tlds_are_recognised_case_insensitively() {
        assert!(has_disallowed_tld("alice.Internal"));
        assert!(has_disallowed_tld("x.onion"));
        assert!(!has_disallowed_tld("alice.test"));
        assert!(!has_disallowed_tld("alice.bsky.social"));
    }
}
