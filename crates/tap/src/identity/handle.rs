//! Handle → DID, the second half of bidirectional handle verification: DNS TXT
//! `_atproto.{handle}` (skipped for `*.bsky.social`), then
//! `https://{handle}/.well-known/atproto-did`; or, when configured, a
//! `com.atproto.identity.resolveHandle` endpoint instead of both (test networks).

use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use serde::Deserialize;
use tap_atproto::resolution;
use tap_atproto::syntax::{Did, Handle};
use url::Url;

use super::did::has_disallowed_tld;
use super::fetch::{Http, Reply};

/// Largest `resolveHandle` answer accepted.
const MAX_XRPC_BYTES: usize = 64 * 1024;
/// Handles under this suffix are served by Bluesky's HTTPS endpoint, never DNS.
const DNS_SKIP_SUFFIX: &str = ".bsky.social";
/// Per-query DNS timeout and attempts: a handle lookup must not stall an identity lookup.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
const DNS_ATTEMPTS: usize = 2;

/// What resolving a handle produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HandleLookup {
    /// The handle points at this DID.
    Did(Did),
    /// The handle has no DID (no record, 404, reserved TLD).
    NotFound,
    /// Resolution failed (network, malformed answer, ambiguous records).
    Failed(String),
}

/// How handles are resolved.
#[derive(Debug, Clone)]
enum Method {
    /// DNS TXT (when a resolver could be built), then HTTPS well-known.
    Public { dns: Option<Box<TokioResolver>> },
    /// `GET {base}/xrpc/com.atproto.identity.resolveHandle?handle=…` only.
    Xrpc { base: Url },
}

/// Resolves handles to DIDs.
#[derive(Debug, Clone)]
pub(super) struct HandleResolver {
    http: Http,
    method: Method,
}

impl HandleResolver {
    /// Public resolution (DNS from the system configuration, then HTTPS). `use_dns = false`
    /// skips DNS (tests on loopback, where no resolver may be asked).
    pub(super) fn public(http: Http, use_dns: bool) -> Self {
        let dns = if use_dns {
            system_dns().map(Box::new)
        } else {
            None
        };
        Self {
            http,
            method: Method::Public { dns },
        }
    }

    /// Resolution through a `resolveHandle` endpoint only.
    pub(super) fn xrpc(http: Http, base: Url) -> Self {
        Self {
            http,
            method: Method::Xrpc { base },
        }
    }

    /// Resolves `handle` (already lower-cased) to a DID.
    pub(super) async fn resolve(&self, handle: &Handle) -> HandleLookup {
        if has_disallowed_tld(handle.as_str()) {
            return HandleLookup::NotFound;
        }
        match &self.method {
            Method::Xrpc { base } => self.resolve_xrpc(base, handle).await,
            Method::Public { dns } => {
                if let Some(dns) = dns
                    && !handle.as_str().ends_with(DNS_SKIP_SUFFIX)
                    && let HandleLookup::Did(did) = resolve_dns(dns, handle).await
                {
                    // A DNS answer is authoritative, even one naming another DID.
                    return HandleLookup::Did(did);
                }
                self.resolve_well_known(handle).await
            }
        }
    }

    async fn resolve_well_known(&self, handle: &Handle) -> HandleLookup {
        match self
            .http
            .get_https(
                handle.as_str(),
                "/.well-known/atproto-did",
                resolution::MAX_WELL_KNOWN_BYTES,
            )
            .await
        {
            Ok(Reply::Ok(body)) => match resolution::did_from_well_known(&body) {
                Ok(did) => HandleLookup::Did(did),
                Err(e) => HandleLookup::Failed(e.to_string()),
            },
            Ok(Reply::Status(404)) => HandleLookup::NotFound,
            Ok(Reply::Status(status)) => {
                HandleLookup::Failed(format!("well-known answered HTTP {status}"))
            }
            Err(e) => HandleLookup::Failed(e.to_string()),
        }
    }

    async fn resolve_xrpc(&self, base: &Url, handle: &Handle) -> HandleLookup {
        #[derive(Deserialize)]
        struct Answer {
            did: Did,
        }
        let raw = format!(
            "{}/xrpc/com.atproto.identity.resolveHandle",
            base.as_str().trim_end_matches('/')
        );
        let mut url = match Url::parse(&raw) {
            Ok(url) => url,
            Err(e) => return HandleLookup::Failed(e.to_string()),
        };
        url.query_pairs_mut().append_pair("handle", handle.as_str());
        match self.http.get(&url, MAX_XRPC_BYTES).await {
            Ok(Reply::Ok(body)) => match serde_json::from_slice::<Answer>(&body) {
                Ok(answer) => HandleLookup::Did(answer.did),
                Err(e) => HandleLookup::Failed(format!("resolveHandle answer: {e}")),
            },
            // The PDS answers an unknown handle with 400 `HandleNotFound`.
            Ok(Reply::Status(400 | 404)) => HandleLookup::NotFound,
            Ok(Reply::Status(status)) => {
                HandleLookup::Failed(format!("resolveHandle answered HTTP {status}"))
            }
            Err(e) => HandleLookup::Failed(e.to_string()),
        }
    }
}

/// The system's DNS resolver, or `None` (with a warning) when it cannot be configured; handles
/// are then resolved over HTTPS only.
fn system_dns() -> Option<TokioResolver> {
    let mut builder = match TokioResolver::builder_tokio() {
        Ok(builder) => builder,
        Err(e) => {
            tracing::warn!(error = %e, "No system DNS configuration; handles resolve over HTTPS only.");
            return None;
        }
    };
    let opts = builder.options_mut();
    opts.timeout = DNS_TIMEOUT;
    opts.attempts = DNS_ATTEMPTS;
    match builder.build() {
        Ok(resolver) => Some(resolver),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot build the DNS resolver; handles resolve over HTTPS only.");
            None
        }
    }
}

/// `_atproto.{handle}` TXT → the DID of its `did=` record. Several different DIDs are an
/// error (the handle is ambiguous).
async fn resolve_dns(dns: &TokioResolver, handle: &Handle) -> HandleLookup {
    // The trailing dot makes the name fully qualified (no search-domain lookups).
    let name = format!("_atproto.{}.", handle.as_str());
    let lookup = match dns.txt_lookup(name).await {
        Ok(lookup) => lookup,
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => return HandleLookup::NotFound,
        Err(e) => return HandleLookup::Failed(format!("DNS: {e}")),
    };
    let texts = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        });
    did_from_txt(texts)
}

/// What the TXT texts name ([`resolution::did_from_txt`]), as a lookup result.
fn did_from_txt(texts: impl Iterator<Item = String>) -> HandleLookup {
    match resolution::did_from_txt(texts) {
        Ok(Some(did)) => HandleLookup::Did(did),
        Ok(None) => HandleLookup::NotFound,
        Err(e) => HandleLookup::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(items: &[&str]) -> impl Iterator<Item = String> {
        items
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn txt_records_yield_the_did_of_the_did_record() {
        assert_eq!(
            did_from_txt(texts(&["v=spf1 -all", "did=did:plc:abc"])),
            HandleLookup::Did(Did::new("did:plc:abc").unwrap())
        );
        assert_eq!(
            did_from_txt(texts(&["did=did:plc:abc", "did=did:plc:abc"])),
            HandleLookup::Did(Did::new("did:plc:abc").unwrap())
        );
    }

    #[test]
    fn txt_records_without_a_did_or_with_conflicting_dids_do_not_resolve() {
        assert_eq!(did_from_txt(texts(&["hello"])), HandleLookup::NotFound);
        assert!(matches!(
            did_from_txt(texts(&["did=did:plc:abc", "did=did:plc:xyz"])),
            HandleLookup::Failed(_)
        ));
        assert!(matches!(
            did_from_txt(texts(&["did=not a did"])),
            HandleLookup::Failed(_)
        ));
    }
}
