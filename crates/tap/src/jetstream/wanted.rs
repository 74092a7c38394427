//! What tap asks Jetstream for: `wantedCollections` = the collection filters and the signal
//! collections (nothing, meaning everything, when every collection is wanted), and in
//! dynamic mode `wantedDids` = the tracked repos while they are at most
//! [`MAX_WANTED_DIDS`]. The set follows runtime filter changes and repos added or removed;
//! the reader sends each change as an `options_update`.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TrackingScope;
use crate::repos::filter::{LiveScope, Scope};
use crate::store::Store;

/// Most DIDs Jetstream accepts in `wantedDids`.
pub const MAX_WANTED_DIDS: usize = 10_000;
/// How often the DID list is read again anyway (another process sharing the database may
/// have changed it).
const REFRESH: Duration = Duration::from_secs(300);
/// Repos read per page while listing.
const PAGE: u32 = 1000;

/// The filters of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// `wantedCollections` (empty: every collection).
    pub collections: Vec<String>,
    /// `wantedDids`: `None` for every repo; `Some(empty)` when tap tracks no repo at all
    /// (then there is nothing to follow).
    pub dids: Option<Vec<String>>,
}

/// The collections to ask for under `scope`. Pure.
#[must_use]
pub fn wanted_collections(scope: &Scope) -> Vec<String> {
    let filters = scope.filters();
    if filters.is_empty() || filters.iter().any(|f| f.as_str() == "*") {
        return Vec::new();
    }
    let mut wanted: Vec<String> = filters
        .iter()
        .map(|f| f.as_str().to_owned())
        .chain(
            scope
                .signal_collections()
                .iter()
                .map(|c| c.as_str().to_owned()),
        )
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    wanted
}

/// Keeps `tx` at the wanted set until `stop`.
pub async fn run(
    scope: LiveScope,
    store: Store,
    tx: watch::Sender<Option<Wanted>>,
    stop: CancellationToken,
) {
    let mut scopes = scope.subscribe();
    let mut repos = store.repo_set_changes();
    loop {
        let current = scopes.borrow_and_update().clone();
        repos.borrow_and_update();
        let dids = match current.tracking() {
            TrackingScope::Dynamic => match tracked_dids(&store).await {
                Ok(dids) => dids,
                Err(error) => {
                    tracing::warn!(%error, "Cannot list the tracked repos for Jetstream; asking for every repo.");
                    None
                }
            },
            _ => None,
        };
        let wanted = Wanted {
            collections: wanted_collections(&current),
            dids,
        };
        tx.send_if_modified(|old| {
            let changed = old.as_ref() != Some(&wanted);
            *old = Some(wanted);
            changed
        });
        tokio::select! {
            () = stop.cancelled() => return,
            changed = scopes.changed() => if changed.is_err() { return },
            _ = repos.changed() => {}
            () = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// Every tracked DID, or `None` past [`MAX_WANTED_DIDS`].
async fn tracked_dids(store: &Store) -> Result<Option<Vec<String>>, crate::store::StoreError> {
    let mut dids = Vec::new();
    let mut after = String::new();
    loop {
        let page = store.list_repos(None, &after, PAGE).await?;
        let last = page.len() < PAGE as usize;
        for row in page {
            after = row.repo.did.to_string();
            dids.push(after.clone());
        }
        if dids.len() > MAX_WANTED_DIDS {
            return Ok(None);
        }
        if last {
            return Ok(Some(dids));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tap_atproto::syntax::CollectionFilter;

    fn scope(tracking: TrackingScope, filters: &[&str]) -> Scope {
        Scope::new(
            tracking,
            filters
                .iter()
                .map(|f| f.parse::<CollectionFilter>().unwrap())
                .collect(),
        )
    }

    #[test]
    fn filters_and_signal_collections_are_asked_for_together() {
        let signals =
            TrackingScope::SignalCollections(vec!["app.bsky.graph.starterpack".parse().unwrap()]);
        assert_eq!(
            wanted_collections(&scope(
                signals,
                &["app.bsky.actor.profile", "app.bsky.graph.*"]
            )),
            [
                "app.bsky.actor.profile",
                "app.bsky.graph.*",
                "app.bsky.graph.starterpack"
            ]
        );
    }

    #[test]
    fn wanting_every_collection_asks_for_no_collection_filter() {
        assert!(wanted_collections(&scope(TrackingScope::Dynamic, &[])).is_empty());
        assert!(wanted_collections(&scope(TrackingScope::Dynamic, &["*", "a.b.c"])).is_empty());
    }
}
