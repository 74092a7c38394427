//! Discovering repos to track: in signal-collection mode, `listReposByCollection` on the
//! relay for each signal collection, or, with `--light-rail-url`, one listing of every
//! signal collection at once from Lightrail (the `collection` parameter repeated); in
//! full-network mode, `listRepos` (skipping inactive accounts). Found DIDs are added as
//! `pending` (existing rows untouched).
//!
//! Cursors are saved after every page, so a restart resumes a pass. A finished pass clears
//! its cursor, and passes repeat daily from the start, so repos created since are found
//! (the Go tap resumed from its last cursor forever and never saw them). Signal collections
//! added at runtime are enumerated at once; removed ones are no longer walked.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;
use tap_atproto::syntax::{Did, Nsid};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::TrackingScope;
use crate::ledger::{Ledger, Source};
use crate::repos::filter::LiveScope;
use crate::status::Progress;
use crate::status::diagnose::ALL_REPOS;
use crate::store::{Store, StoreError};
use crate::telemetry as t;

/// Time between complete passes.
pub const PASS_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// Time before retrying a failed pass.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(60);
/// Page size asked of the relay.
pub const PAGE_LIMIT: u32 = 1000;
/// Largest page body accepted.
pub const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// Per-request timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum CrawlerError {
    /// The relay could not be reached or answered badly.
    #[error("listing repos at {url} failed: {reason}")]
    Relay {
        /// The request URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Shutdown interrupted the pass.
    #[error("stopped")]
    Stopped,
}

/// What the crawler enumerates.
#[derive(Debug, Clone)]
pub struct CrawlerSettings {
    /// Relay base URL (also the cursor key).
    pub relay_url: Url,
    /// `--light-rail-url`: where signal collections are listed instead, all at once.
    pub light_rail_url: Option<Url>,
    /// The scope in force; the crawler walks nothing in dynamic mode.
    pub scope: LiveScope,
    /// Where listing pages' bytes are counted.
    pub ledger: Ledger,
    /// Where the pass in progress is shown (`/status.json`).
    pub progress: Arc<Progress>,
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    repos: Vec<ListedRepo>,
}

#[derive(Debug, Deserialize)]
struct ListedRepo {
    did: String,
    #[serde(default)]
    active: Option<bool>,
}

/// Which listing a pass walks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listing {
    /// `listRepos` on the relay.
    All,
    /// `listReposByCollection` on the relay, one collection.
    Collection(Nsid),
    /// `listReposByCollection` on Lightrail, every collection in one call per page.
    Collections(Vec<Nsid>),
}

impl Listing {
    /// The name its cursor is saved under, and its progress is shown as.
    fn name(&self) -> String {
        match self {
            Self::All => ALL_REPOS.to_owned(),
            Self::Collection(c) => c.as_str().to_owned(),
            Self::Collections(cs) => listing_name(cs),
        }
    }
}

/// The name of a Lightrail listing of `collections` (its cursor key).
#[must_use]
pub fn listing_name(collections: &[Nsid]) -> String {
    collections
        .iter()
        .map(Nsid::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// The listings a tracking scope walks.
fn listings_of(tracking: &TrackingScope, light_rail: bool) -> Vec<Listing> {
    match tracking {
        TrackingScope::Dynamic => Vec::new(),
        TrackingScope::FullNetwork => vec![Listing::All],
        TrackingScope::SignalCollections(c) if light_rail => vec![Listing::Collections(c.clone())],
        TrackingScope::SignalCollections(c) => c.iter().cloned().map(Listing::Collection).collect(),
    }
}

/// Runs passes until `stop` is cancelled: each listing of the scope daily (a minute after
/// its failure), and a listing the scope gains at runtime at once, without moving the
/// others' schedule.
pub async fn run_crawler(settings: CrawlerSettings, store: Store, stop: CancellationToken) {
    let client = match reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "Cannot build the crawler's HTTP client; enumeration is off.");
            return;
        }
    };
    let mut changes = settings.scope.subscribe();
    // When each listing of the scope is next due; a listing the scope gains is due at once.
    let light_rail = settings.light_rail_url.is_some();
    let mut due: Vec<(Listing, Instant)> =
        listings_of(changes.borrow_and_update().tracking(), light_rail)
            .into_iter()
            .map(|l| (l, Instant::now()))
            .collect();
    loop {
        for (listing, next) in &mut due {
            if *next > Instant::now() {
                continue;
            }
            match crawl(&client, &settings, listing, &store, &stop).await {
                Ok(found) => {
                    tracing::info!(?listing, found, "Finished enumerating repos.");
                    *next = Instant::now() + PASS_INTERVAL;
                }
                Err(CrawlerError::Stopped) => return,
                Err(error) => {
                    tracing::warn!(%error, ?listing, "Repo enumeration failed; retrying in a minute.");
                    settings.progress.enumeration_done();
                    *next = Instant::now() + RETRY_INTERVAL;
                }
            }
        }
        let wake = due
            .iter()
            .map(|(_, next)| *next)
            .min()
            .unwrap_or_else(|| Instant::now() + PASS_INTERVAL);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(wake) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    // The scope's owner is gone: tap is stopping.
                    stop.cancelled().await;
                    return;
                }
                let now = listings_of(changes.borrow_and_update().tracking(), light_rail);
                due = now
                    .into_iter()
                    .map(|l| {
                        let next = due
                            .iter()
                            .find(|(known, _)| *known == l)
                            .map_or_else(Instant::now, |(_, next)| *next);
                        (l, next)
                    })
                    .collect();
            }
        }
    }
}

/// One pass over one listing, resuming from the saved cursor. Returns DIDs seen.
async fn crawl(
    client: &reqwest::Client,
    settings: &CrawlerSettings,
    listing: &Listing,
    store: &Store,
    stop: &CancellationToken,
) -> Result<u64, CrawlerError> {
    let base = match (listing, &settings.light_rail_url) {
        (Listing::Collections(_), Some(light_rail)) => light_rail,
        _ => &settings.relay_url,
    };
    let key = base.as_str();
    let name = listing.name();
    let mut cursor = match listing {
        Listing::All => store.list_repos_cursor(key).await?,
        _ => store.collection_cursor(key, &name).await?,
    }
    .filter(|c| !c.is_empty());
    let mut found = 0u64;
    loop {
        let mut url = match listing {
            Listing::All => base.join("/xrpc/com.atproto.sync.listRepos"),
            _ => base.join("/xrpc/com.atproto.sync.listReposByCollection"),
        }
        .map_err(|e| CrawlerError::Relay {
            url: base.to_string(),
            reason: e.to_string(),
        })?;
        {
            let mut q = url.query_pairs_mut();
            match listing {
                Listing::All => {}
                Listing::Collection(c) => {
                    q.append_pair("collection", c.as_str());
                }
                Listing::Collections(cs) => {
                    for c in cs {
                        q.append_pair("collection", c.as_str());
                    }
                }
            }
            q.append_pair("limit", &PAGE_LIMIT.to_string());
            if let Some(c) = &cursor {
                q.append_pair("cursor", c);
            }
        }
        let page = tokio::select! {
            () = stop.cancelled() => return Err(CrawlerError::Stopped),
            page = fetch_page(client, &url, &settings.ledger) => page?,
        };
        let dids: Vec<String> = page
            .repos
            .into_iter()
            // Only an explicit `active: false` means inactive, as in the Go tap.
            .filter(|r| r.active != Some(false))
            .filter_map(|r| match r.did.parse::<Did>() {
                Ok(did) => Some(did.into_string()),
                Err(_) => {
                    tracing::debug!(did = %r.did, "Skipping a malformed DID from the relay.");
                    None
                }
            })
            .collect();
        found += dids.len() as u64;
        settings.progress.enumerated(&name, &dids);
        if !dids.is_empty() {
            let added = store.add_repos(&dids).await?;
            metrics::counter!(t::CRAWLER_REPOS_DISCOVERED).increment(added);
        }
        let next = page.cursor.filter(|c| !c.is_empty());
        // An end of listing (no cursor) clears the saved one: the next pass starts over.
        let saved = next.clone().unwrap_or_default();
        match listing {
            Listing::All => store.save_list_repos_cursor(key, &saved).await?,
            _ => store.save_collection_cursor(key, &name, &saved).await?,
        }
        match next {
            Some(n) if cursor_advanced(&cursor, &n) => cursor = Some(n),
            _ => {
                settings.progress.enumeration_done();
                return Ok(found);
            }
        }
    }
}

/// A relay that hands back the same cursor would loop forever; treat that as the end.
fn cursor_advanced(previous: &Option<String>, next: &str) -> bool {
    previous.as_deref() != Some(next)
}

async fn fetch_page(
    client: &reqwest::Client,
    url: &Url,
    ledger: &Ledger,
) -> Result<Page, CrawlerError> {
    let fail = |reason: String| CrawlerError::Relay {
        url: url.to_string(),
        reason,
    };
    let mut resp = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(fail(format!("status {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
        ledger.downloaded(Source::RelayListing, url.host_str(), chunk.len() as u64);
        if body.len() + chunk.len() > MAX_PAGE_BYTES {
            return Err(fail(format!("page larger than {MAX_PAGE_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| fail(format!("malformed page: {e}")))
}
