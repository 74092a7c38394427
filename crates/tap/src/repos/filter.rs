//! Which repos are tracked and which records pass: the tracking scope (dynamic, signal
//! collections, full network) and the collection filters. Pure.

use tap_atproto::mst::KeyRange;
use tap_atproto::syntax::CollectionFilter;

use crate::config::TrackingScope;

/// Tracking scope and collection filters together.
#[derive(Debug, Clone)]
pub struct Scope {
    tracking: TrackingScope,
    filters: Vec<CollectionFilter>,
}

impl Scope {
    /// From the configuration.
    #[must_use]
    pub fn new(tracking: TrackingScope, filters: Vec<CollectionFilter>) -> Self {
        Self { tracking, filters }
    }

    /// The tracking scope.
    #[must_use]
    pub fn tracking(&self) -> &TrackingScope {
        &self.tracking
    }

    /// Whether a `#commit` for an untracked repo makes tap track it: always in full-network
    /// mode; in signal mode when any op (any action) touches a signal collection. Uses the
    /// unfiltered ops, as the Go tap does.
    pub fn tracks_on_commit<'a>(&self, mut collections: impl Iterator<Item = &'a str>) -> bool {
        match &self.tracking {
            TrackingScope::Dynamic => false,
            TrackingScope::FullNetwork => true,
            TrackingScope::SignalCollections(signals) => {
                collections.any(|c| signals.iter().any(|s| s.as_str() == c))
            }
        }
    }

    /// Whether a `#sync`, `#identity` or active `#account` for an untracked repo makes tap
    /// track it: only in full-network mode.
    #[must_use]
    pub fn tracks_on_other_events(&self) -> bool {
        self.tracking == TrackingScope::FullNetwork
    }

    /// Whether records of this collection are delivered and indexed. No filters = all.
    /// Identity events are never filtered.
    #[must_use]
    pub fn wants_collection(&self, collection: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| f.matches_str(collection))
    }

    /// The collection filters as one canonical string (sorted, comma-separated; empty for
    /// none): what a repo's last fetch is compared against before it is skipped.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut filters: Vec<&str> = self.filters.iter().map(|f| f.as_str()).collect();
        filters.sort_unstable();
        filters.dedup();
        filters.join(",")
    }

    /// The MST key ranges holding every wanted record; `None` when every collection is
    /// wanted (no filters, or `*`).
    #[must_use]
    pub fn key_ranges(&self) -> Option<Vec<KeyRange>> {
        if self.filters.is_empty() {
            return None;
        }
        self.filters
            .iter()
            .map(|f| match f.as_str() {
                "*" => None,
                // `app.bsky.*`: every collection below `app.bsky.` (the prefix keeps the dot).
                text => Some(match text.strip_suffix('*') {
                    Some(prefix) => KeyRange::prefix(prefix.as_bytes()),
                    None => KeyRange::collection(text),
                }),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tap_atproto::syntax::Nsid;

    fn filters(list: &[&str]) -> Vec<CollectionFilter> {
        list.iter().map(|f| f.parse().unwrap()).collect()
    }

    #[test]
    fn no_filters_means_every_collection() {
        let s = Scope::new(TrackingScope::Dynamic, vec![]);
        assert!(s.wants_collection("com.example.anything"));
    }

    #[test]
    fn wildcards_match_whole_segments_only() {
        let s = Scope::new(
            TrackingScope::Dynamic,
            filters(&["app.bsky.feed.post", "app.bsky.graph.*"]),
        );
        assert!(s.wants_collection("app.bsky.feed.post"));
        assert!(s.wants_collection("app.bsky.graph.follow"));
        assert!(!s.wants_collection("app.bsky.feed.like"));
        assert!(!s.wants_collection("app.bsky.graphx.follow"));
        assert!(!s.wants_collection("app.bsky.feed.postgres"));
    }

    #[test]
    fn signal_mode_tracks_commits_touching_a_signal_collection() {
        let s = Scope::new(
            TrackingScope::SignalCollections(vec![Nsid::new("com.example.profile").unwrap()]),
            vec![],
        );
        assert!(s.tracks_on_commit(["app.bsky.feed.post", "com.example.profile"].into_iter()));
        assert!(!s.tracks_on_commit(["app.bsky.feed.post"].into_iter()));
        assert!(!s.tracks_on_other_events());
    }

    #[test]
    fn full_network_tracks_everything_and_dynamic_nothing() {
        let full = Scope::new(TrackingScope::FullNetwork, vec![]);
        assert!(full.tracks_on_commit(std::iter::empty()));
        assert!(full.tracks_on_other_events());
        let dynamic = Scope::new(TrackingScope::Dynamic, vec![]);
        assert!(!dynamic.tracks_on_commit(["a.b.c"].into_iter()));
        assert!(!dynamic.tracks_on_other_events());
    }
}
