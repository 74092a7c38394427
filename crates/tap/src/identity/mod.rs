//! Identity: DID → (signing key, PDS endpoint, verified handle), resolved over HTTP(S)/DNS and
//! cached. The sync engine asks here for the key that signs a repo's commits and the PDS that
//! serves it; `/resolve/{did}` serves the document from the same cache.
//!
//! # Contract for callers
//!
//! - [`Identity::resolve`] returns the cached identity while it is fresh: 24 h when the
//!   handle verified, 5 min when it did not (`handle.invalid`), 2 min for a failure (failures
//!   are cached too, so a broken DID is not fetched on every event). Concurrent look-ups of
//!   one DID share a single fetch.
//! - [`Identity::resolve_repo`] / [`Identity::refresh_repo`] give the key and PDS alone,
//!   from the DID document, with no handle check: what verifying a commit and fetching a
//!   repo need, so neither waits for DNS or HTTPS handle look-ups (which can take seconds).
//!   The refresh fetches anew *now*: the one re-resolution after a signature failure, and
//!   the start of every resync. Every full look-up refreshes this cache too.
//! - [`Identity::purge`] forgets a DID.
//! - [`Identity::refresh`] fetches the whole identity anew *now*, handle check included
//!   (on `#identity` events and, apart from the fetch, for every resync).
//! - The handle of a [`ResolvedIdentity`] is either verified in both directions or
//!   [`INVALID_HANDLE`]; never empty.

mod clock;
mod did;
mod fetch;
mod handle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tap_atproto::PublicKey;
use tap_atproto::did_doc::{DidDocError, DidDocument};
use tap_atproto::syntax::{Did, Handle};
use url::Url;

pub use clock::{Clock, ManualClock};

use crate::ledger::Ledger;
use crate::telemetry;
use fetch::Http;
use handle::{HandleLookup, HandleResolver};

/// The handle reported when none is declared or it does not verify (the event format's
/// constant: identity events and `/resolve` answers say the same thing).
pub use crate::wire::INVALID_HANDLE;

/// How long an identity whose handle verified stays cached.
pub const GOOD_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long an identity whose handle did not verify stays cached (handles get fixed; check
/// again soon).
pub const INVALID_HANDLE_TTL: Duration = Duration::from_secs(5 * 60);
/// How long a failed look-up (not found included) stays cached.
pub const ERROR_TTL: Duration = Duration::from_secs(2 * 60);
/// How long a look-up that failed in a way that may pass (timeout, 5xx, connection) stays
/// cached: long enough for concurrent callers to share it, short enough that a retry
/// asks again instead of reading the failure back for minutes.
pub const TRANSIENT_ERROR_TTL: Duration = Duration::from_secs(1);
/// Default timeout of one HTTP request (the Go tap has none; a stuck PLC must not stall
/// the pipeline).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an identity could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DID does not exist (HTTP 404, or 410 for a tombstoned did:plc).
    #[error("{did} not found")]
    NotFound {
        /// The DID looked up.
        did: Did,
    },
    /// The DID is syntactically valid but cannot be an atproto account (unsupported method,
    /// did:web with a port, path or reserved TLD).
    #[error("cannot resolve {did}: {reason}")]
    Unsupported {
        /// The DID looked up.
        did: Did,
        /// Why.
        reason: &'static str,
    },
    /// A request did not complete within the timeout.
    #[error("request to {url} timed out")]
    Timeout {
        /// The URL requested.
        url: String,
    },
    /// A request failed below HTTP (connection refused, TLS, reset) or mid-body.
    #[error("request to {url} failed: {message}")]
    Transport {
        /// The URL requested.
        url: String,
        /// The cause chain.
        message: String,
    },
    /// An HTTP status other than 200, 404 and 410.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The body exceeded the size cap.
    #[error("{url} sent more than {limit} bytes")]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The cap in bytes.
        limit: usize,
    },
    /// The body is not a DID document.
    #[error("malformed DID document for {did}: {reason}")]
    Malformed {
        /// The DID looked up.
        did: Did,
        /// The parse error.
        reason: String,
    },
    /// The document describes another DID.
    #[error("DID document for {did} has id {found}")]
    IdMismatch {
        /// The DID looked up.
        did: Did,
        /// The document's `id`.
        found: String,
    },
    /// The identity has no usable `#atproto` signing key.
    #[error("{did} has no usable #atproto signing key: {reason}")]
    NoSigningKey {
        /// The DID.
        did: Did,
        /// Missing or why it does not parse.
        reason: DidDocError,
    },
    /// The identity declares no (valid http/https) `#atproto_pds` endpoint.
    #[error("{did} has no #atproto_pds endpoint")]
    NoPds {
        /// The DID.
        did: Did,
    },
    /// The resolver could not be built (TLS or system configuration).
    #[error("cannot build the identity resolver: {0}")]
    Setup(String),
}

impl IdentityError {
    /// The DID does not exist: retrying will not help until something changes upstream.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// A network or server condition that may pass: timeouts, transport failures, 5xx, 408
    /// and 429. Everything else is a property of the DID or its document.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Transport { .. } => true,
            Self::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            _ => false,
        }
    }
}

/// What verifying commits and fetching repos need from an identity: its key and PDS, read
/// from the DID document alone. Resolving it never waits for a handle check, which can
/// take seconds (DNS TXT, HTTPS well-known) and is done apart.
#[derive(Debug, Clone)]
pub struct RepoIdentity {
    /// The DID.
    pub did: Did,
    /// The `#atproto` key, parsed once (Multikey or the legacy key types), or why there is
    /// none. See [`require_signing_key`](Self::require_signing_key).
    pub signing_key: Result<PublicKey, DidDocError>,
    /// The `#atproto_pds` endpoint when it is an http(s) URL.
    pub pds: Option<Url>,
}

impl RepoIdentity {
    fn from_doc(did: &Did, doc: &DidDocument) -> Self {
        let pds = doc
            .pds_endpoint()
            .and_then(|s| Url::parse(s).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        Self {
            did: did.clone(),
            signing_key: doc.atproto_key(),
            pds,
        }
    }

    /// The signing key, for commit verification.
    ///
    /// # Errors
    /// [`IdentityError::NoSigningKey`] when the document has no usable `#atproto` key.
    pub fn require_signing_key(&self) -> Result<&PublicKey, IdentityError> {
        self.signing_key
            .as_ref()
            .map_err(|reason| IdentityError::NoSigningKey {
                did: self.did.clone(),
                reason: reason.clone(),
            })
    }

    /// The PDS endpoint, for fetching the repo.
    ///
    /// # Errors
    /// [`IdentityError::NoPds`] when the document declares none.
    pub fn require_pds(&self) -> Result<&Url, IdentityError> {
        self.pds.as_ref().ok_or_else(|| IdentityError::NoPds {
            did: self.did.clone(),
        })
    }
}

/// A resolved identity, its handle checked. Immutable; shared as `Arc` from the cache.
#[derive(Debug, Clone)]
pub struct ResolvedIdentity {
    /// The DID.
    pub did: Did,
    /// The handle, lower-cased, when it is declared (`alsoKnownAs`) *and* resolves back to
    /// this DID; `None` otherwise. Use [`handle_or_invalid`](Self::handle_or_invalid) for
    /// what consumers see.
    pub handle: Option<Handle>,
    /// Key and PDS.
    pub repo: Arc<RepoIdentity>,
    /// The document as fetched (only the parts atproto uses).
    pub doc: DidDocument,
}

impl ResolvedIdentity {
    /// The verified handle, or [`INVALID_HANDLE`]. Never empty.
    #[must_use]
    pub fn handle_or_invalid(&self) -> &str {
        self.handle.as_ref().map_or(INVALID_HANDLE, Handle::as_str)
    }
}

/// How an [`Identity`] resolves and caches.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// PLC directory base URL (`--plc-url`).
    pub plc_url: Url,
    /// Most identities kept (`--ident-cache-size`).
    pub cache_capacity: u64,
    /// `--handle-resolver-url`: resolve handles with `com.atproto.identity.resolveHandle` at
    /// this base URL instead of DNS and HTTPS (test networks whose handles are not public).
    pub handle_resolver: Option<Url>,
    /// Timeout of each HTTP request.
    pub request_timeout: Duration,
    /// Time source for cache expiry ([`Clock::System`] in production).
    pub clock: Clock,
    /// **Test only.** Sends what would go to `https://{host}/…` (did:web documents, handle
    /// well-known files) over plain HTTP to this loopback address, with the original host in
    /// the `Host` header, and disables DNS. Must be a loopback address; the daemon never sets
    /// it.
    pub loopback_web: Option<SocketAddr>,
    /// Where the bytes of PLC and handle look-ups are counted.
    pub ledger: Ledger,
    /// `--allow-private-network`: `did:web` hosts and handles' well-known files may resolve
    /// to loopback and private addresses.
    pub allow_private_network: bool,
}

impl IdentityOptions {
    /// Production defaults for this PLC directory and cache size.
    #[must_use]
    pub fn new(plc_url: Url, cache_capacity: u64) -> Self {
        Self {
            plc_url,
            cache_capacity,
            handle_resolver: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            clock: Clock::System,
            loopback_web: None,
            ledger: Ledger::default(),
            allow_private_network: false,
        }
    }
}

/// One cache slot: a look-up's outcome and when it stops being fresh.
#[derive(Debug)]
struct Slot<T> {
    result: Result<Arc<T>, IdentityError>,
    expires_at: Instant,
    ttl: Duration,
}

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self {
            result: self.result.clone(),
            expires_at: self.expires_at,
            ttl: self.ttl,
        }
    }
}

/// Lets moka reclaim a slot's memory on its own clock, on the same schedule as the logical
/// expiry (which the [`Clock`] decides).
impl<T> Slot<T> {
    /// The slot's weight in cache entries: one per KiB begun of what the value holds
    /// (`bytes` of it), so ordinary identities weigh 1 and a failure weighs 1.
    fn weight(&self, bytes: impl Fn(&T) -> usize) -> u32 {
        let held = self.result.as_ref().map_or(0, |value| bytes(value));
        u32::try_from(held / 1024 + 1).unwrap_or(u32::MAX)
    }
}

struct SlotExpiry;

impl<T> moka::Expiry<Did, Slot<T>> for SlotExpiry {
    fn expire_after_create(&self, _: &Did, value: &Slot<T>, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Did,
        value: &Slot<T>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// How long a failed look-up stays cached, and its metric label.
fn failure_ttl(e: &IdentityError) -> (&'static str, Duration) {
    if e.is_not_found() {
        ("not_found", ERROR_TTL)
    } else if e.is_transient() {
        ("unavailable", TRANSIENT_ERROR_TTL)
    } else {
        ("error", ERROR_TTL)
    }
}

/// The cached identity resolver. Cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    cache: moka::future::Cache<Did, Slot<ResolvedIdentity>>,
    /// Key and PDS per DID, filled by their own look-ups and by every full one.
    repos: moka::future::Cache<Did, Slot<RepoIdentity>>,
    http: Http,
    handles: HandleResolver,
    plc_url: Url,
    clock: Clock,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("plc_url", &self.inner.plc_url.as_str())
            .field("cached", &self.inner.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Builds the resolver and its (empty) cache.
    ///
    /// # Errors
    /// [`IdentityError::Setup`] when the HTTP client cannot be built, or when
    /// `loopback_web` is not a loopback address.
    pub fn new(options: IdentityOptions) -> Result<Self, IdentityError> {
        if let Some(addr) = options.loopback_web
            && !addr.ip().is_loopback()
        {
            return Err(IdentityError::Setup(format!(
                "loopback_web must be a loopback address, not {addr}"
            )));
        }
        let http = Http::new(
            options.request_timeout,
            options.loopback_web,
            options.ledger.clone(),
            &options.plc_url,
            options.allow_private_network,
        )?;
        let handles = match options.handle_resolver {
            Some(base) => HandleResolver::xrpc(http.clone(), base),
            None => HandleResolver::public(http.clone(), options.loopback_web.is_none()),
        };
        // Weighed, not counted: the capacity is in KiB-sized entries, so a hostile 1 MiB
        // document takes the room of a thousand ordinary ones.
        let cache = moka::future::Cache::builder()
            .max_capacity(options.cache_capacity)
            .weigher(|_: &Did, slot: &Slot<ResolvedIdentity>| {
                slot.weight(|i| {
                    i.doc.approx_size() + i.handle.as_ref().map_or(0, |h| h.as_str().len())
                })
            })
            .expire_after(SlotExpiry)
            .build();
        let repos = moka::future::Cache::builder()
            .max_capacity(options.cache_capacity)
            .weigher(|_: &Did, slot: &Slot<RepoIdentity>| {
                slot.weight(|r| r.pds.as_ref().map_or(0, |u| u.as_str().len()))
            })
            .expire_after(SlotExpiry)
            .build();
        Ok(Self {
            inner: Arc::new(Inner {
                cache,
                repos,
                http,
                handles,
                plc_url: options.plc_url,
                clock: options.clock,
            }),
        })
    }

    /// The weight the caches hold, in KiB-sized entries (what `--ident-cache-size` bounds
    /// for each), after pending evictions ran.
    pub async fn cache_weight(&self) -> u64 {
        self.inner.cache.run_pending_tasks().await;
        self.inner.repos.run_pending_tasks().await;
        self.inner.cache.weighted_size() + self.inner.repos.weighted_size()
    }

    /// The identity of `did`, from the cache while fresh, else fetched (concurrent callers
    /// for one DID share one fetch). Failures are cached for [`ERROR_TTL`].
    ///
    /// # Errors
    /// [`IdentityError`]: `is_not_found()` when the DID does not exist, `is_transient()` for
    /// network trouble; otherwise the DID or its document is unusable.
    pub async fn resolve(&self, did: &Did) -> Result<Arc<ResolvedIdentity>, IdentityError> {
        self.cached(&self.inner.cache, did, self.load(did)).await
    }

    /// The slot of `did` in `cache` while fresh, else what `load` stores (concurrent
    /// callers for one DID share one load).
    async fn cached<T: Send + Sync + 'static>(
        &self,
        cache: &moka::future::Cache<Did, Slot<T>>,
        did: &Did,
        load: impl std::future::Future<Output = Slot<T>>,
    ) -> Result<Arc<T>, IdentityError> {
        let now = self.inner.clock.now();
        let entry = cache
            .entry_by_ref(did)
            .or_insert_with_if(load, |slot| slot.expires_at <= now)
            .await;
        let result = if entry.is_fresh() { "miss" } else { "hit" };
        metrics::counter!(telemetry::IDENTITY_CACHE, "result" => result).increment(1);
        let original = if entry.is_fresh() {
            telemetry::original::IDENTITY_CACHE_MISSES
        } else {
            telemetry::original::IDENTITY_CACHE_HITS
        };
        metrics::counter!(original).increment(1);
        entry.into_value().result
    }

    /// The key and PDS of `did`, from the cache while fresh, else from its DID document
    /// alone: never waits for a handle check. For verifying commits and fetching repos.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub async fn resolve_repo(&self, did: &Did) -> Result<Arc<RepoIdentity>, IdentityError> {
        self.cached(&self.inner.repos, did, self.load_repo(did))
            .await
    }

    /// Fetches the key and PDS of `did` now (never joining an earlier look-up), caches and
    /// returns them: after a signature failure, and before a resync.
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub async fn refresh_repo(&self, did: &Did) -> Result<Arc<RepoIdentity>, IdentityError> {
        let slot = self.load_repo(did).await;
        self.inner.repos.insert(did.clone(), slot.clone()).await;
        slot.result
    }

    /// The PDS the cache holds for `did`, without fetching anything: a
    /// hint (where a resync would probably go), never a basis for trusting data.
    pub async fn cached_pds(&self, did: &Did) -> Option<Url> {
        let slot = self.inner.repos.get(did).await?;
        slot.result.ok()?.pds.clone()
    }

    async fn load_repo(&self, did: &Did) -> Slot<RepoIdentity> {
        let result = did::fetch_document(&self.inner.http, &self.inner.plc_url, did)
            .await
            .map(|doc| Arc::new(RepoIdentity::from_doc(did, &doc)));
        let (outcome, ttl) = match &result {
            Ok(_) => ("ok", GOOD_TTL),
            Err(e) => failure_ttl(e),
        };
        metrics::counter!(telemetry::IDENTITY_LOOKUPS, "outcome" => outcome).increment(1);
        Slot {
            result,
            expires_at: self.inner.clock.now() + ttl,
            ttl,
        }
    }

    /// Forgets `did`, so the next [`resolve`](Self::resolve) fetches it again. A look-up
    /// already in flight may still store what it fetched; when the fetch must start after
    /// the call, use [`refresh`](Self::refresh).
    pub async fn purge(&self, did: &Did) {
        self.inner.cache.invalidate(did).await;
        self.inner.repos.invalidate(did).await;
    }

    /// Fetches `did` now, caches the outcome and returns it. Unlike purge + resolve, it never
    /// joins a look-up that started before the call, so it is sure to see a document served
    /// after it began (the re-resolution after a signature failure).
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve).
    pub async fn refresh(&self, did: &Did) -> Result<Arc<ResolvedIdentity>, IdentityError> {
        let slot = self.load(did).await;
        self.inner.cache.insert(did.clone(), slot.clone()).await;
        slot.result
    }

    /// Fetches and verifies, recording the outcome and stamping the expiry; the key and
    /// PDS it read refresh their own cache too.
    async fn load(&self, did: &Did) -> Slot<ResolvedIdentity> {
        let result = self.fetch(did).await;
        let (outcome, ttl) = match &result {
            Ok(ident) if ident.handle.is_some() => ("ok", GOOD_TTL),
            Ok(_) => ("handle_invalid", INVALID_HANDLE_TTL),
            Err(e) => failure_ttl(e),
        };
        metrics::counter!(telemetry::IDENTITY_LOOKUPS, "outcome" => outcome).increment(1);
        match &result {
            Err(e) => tracing::debug!(%did, error = %e, "Identity look-up failed."),
            Ok(ident) => {
                let slot = Slot {
                    result: Ok(Arc::clone(&ident.repo)),
                    expires_at: self.inner.clock.now() + GOOD_TTL,
                    ttl: GOOD_TTL,
                };
                self.inner.repos.insert(did.clone(), slot).await;
            }
        }
        Slot {
            result: result.map(Arc::new),
            expires_at: self.inner.clock.now() + ttl,
            ttl,
        }
    }

    async fn fetch(&self, did: &Did) -> Result<ResolvedIdentity, IdentityError> {
        let doc = did::fetch_document(&self.inner.http, &self.inner.plc_url, did).await?;
        let handle = self.verified_handle(did, &doc).await;
        Ok(ResolvedIdentity {
            did: did.clone(),
            handle,
            repo: Arc::new(RepoIdentity::from_doc(did, &doc)),
            doc,
        })
    }

    /// The declared handle (first valid `at://` alias, lower-cased) if it resolves back to
    /// `did`.
    async fn verified_handle(&self, did: &Did, doc: &DidDocument) -> Option<Handle> {
        let declared = Handle::new(doc.handle()?.normalized()).ok()?;
        match self.inner.handles.resolve(&declared).await {
            HandleLookup::Did(found) if found == *did => Some(declared),
            HandleLookup::Did(found) => {
                tracing::debug!(%did, handle = %declared, %found, "Handle points at another DID.");
                None
            }
            HandleLookup::NotFound => {
                tracing::debug!(%did, handle = %declared, "Handle does not resolve.");
                None
            }
            HandleLookup::Failed(reason) => {
                tracing::debug!(%did, handle = %declared, %reason, "Handle resolution failed.");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_network_conditions_only() {
        let did = Did::new("did:plc:abc").unwrap();
        let url = "http://x".to_owned();
        assert!(IdentityError::Timeout { url: url.clone() }.is_transient());
        assert!(
            IdentityError::Status {
                url: url.clone(),
                status: 503
            }
            .is_transient()
        );
        assert!(
            IdentityError::Status {
                url: url.clone(),
                status: 429
            }
            .is_transient()
        );
        assert!(!IdentityError::Status { url, status: 403 }.is_transient());
        let not_found = IdentityError::NotFound { did };
        assert!(not_found.is_not_found() && !not_found.is_transient());
    }

    #[test]
    fn loopback_override_must_be_a_loopback_address() {
        let mut options = IdentityOptions::new(Url::parse("http://127.0.0.1:1").unwrap(), 10);
        options.loopback_web = Some("192.0.2.1:80".parse().unwrap());
        assert!(matches!(
            Identity::new(options),
            Err(IdentityError::Setup(_))
        ));
    }
}
