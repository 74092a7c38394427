//! Which repos are tracked and which records pass: the tracking scope (dynamic, signal
//! collections, full network) and the collection filters; the live value the pipeline reads
//! (changed at runtime through the API); and the pure rules for a change: whether it widens
//! what is wanted, and how a stored runtime value and the flag settle at start-up.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tap_atproto::mst::KeyRange;
use tap_atproto::record_filter::RuleSet;
use tap_atproto::syntax::{CollectionFilter, Nsid};
use tokio::sync::watch;

use crate::config::TrackingScope;

/// The scope in force, replaced whole when the filters change at runtime. Readers take a
/// snapshot ([`current`](Self::current)) and use it for one decision, so a commit is never
/// judged half by old and half by new filters. Cheap to clone; clones share the value.
#[derive(Debug, Clone)]
pub struct LiveScope {
    tx: Arc<watch::Sender<Arc<Scope>>>,
}

impl LiveScope {
    /// Starts with `scope`.
    #[must_use]
    pub fn new(scope: Scope) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(scope))),
        }
    }

    /// The scope in force now.
    #[must_use]
    pub fn current(&self) -> Arc<Scope> {
        Arc::clone(&self.tx.borrow())
    }

    /// Puts `scope` in force for every reader at once.
    pub fn replace(&self, scope: Scope) {
        self.tx.send_replace(Arc::new(scope));
    }

    /// A receiver that wakes on every change (the crawler restarts its pass).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Scope>> {
        self.tx.subscribe()
    }
}

/// Whether `new` filters want some collection `old` did not (no filters = every collection).
#[must_use]
pub fn widens(old: &[CollectionFilter], new: &[CollectionFilter]) -> bool {
    let covers = |g: &CollectionFilter, f: &CollectionFilter| {
        let (g, f) = (g.as_str(), f.as_str());
        g == "*"
            || g == f
            || g.strip_suffix('*')
                .is_some_and(|prefix| f.starts_with(prefix))
    };
    match (old.is_empty(), new.is_empty()) {
        (true, _) => false,
        (false, true) => true,
        (false, false) => new.iter().any(|f| !old.iter().any(|g| covers(g, f))),
    }
}

/// A runtime-changeable list as stored: the flag value that seeded it and the value in
/// force. The rule at start-up ([`settle`]): the stored value survives a restart as long as
/// the flag still says what it said when the value was stored; a changed flag is the
/// operator's newer word and replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seeded {
    /// The flag's value when this was stored.
    pub seed: Vec<String>,
    /// The value in force.
    pub current: Vec<String>,
}

/// The value to use at start-up, and whether the flag replaced a stored runtime value.
#[must_use]
pub fn settle(stored: Option<Seeded>, flag: &[String]) -> (Seeded, bool) {
    match stored {
        Some(stored) if stored.seed == flag => (stored, false),
        Some(stored) => {
            let overrode = stored.current != flag;
            (
                Seeded {
                    seed: flag.to_vec(),
                    current: flag.to_vec(),
                },
                overrode,
            )
        }
        None => (
            Seeded {
                seed: flag.to_vec(),
                current: flag.to_vec(),
            },
            false,
        ),
    }
}

/// Tracking scope, collection filters and record-content rules together.
#[derive(Debug, Clone)]
pub struct Scope {
    tracking: TrackingScope,
    filters: Vec<CollectionFilter>,
    rules: Arc<RuleSet>,
}

impl Scope {
    /// From the configuration, without record-content rules.
    #[must_use]
    pub fn new(tracking: TrackingScope, filters: Vec<CollectionFilter>) -> Self {
        Self {
            tracking,
            filters,
            rules: Arc::default(),
        }
    }

    /// The record-content rules (empty: every record of a wanted collection).
    #[must_use]
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// This scope with other record-content rules.
    #[must_use]
    pub fn with_rules(&self, rules: RuleSet) -> Self {
        Self {
            rules: Arc::new(rules),
            ..self.clone()
        }
    }

    /// What in the rules cannot take effect under the collection filters: a rule for a
    /// collection they leave out delivers nothing, and `kept(..)`/`refs(..)` of such a
    /// collection never hold (only delivered records count). Logged as warnings.
    #[must_use]
    pub fn rule_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for rule in self.rules.rules() {
            let c = rule.collection().as_str();
            if !self.wants_collection(c) {
                warnings.push(format!(
                    "the rule for {c} has no effect: the collection filters leave {c} out"
                ));
            }
            for d in rule.depends_on() {
                if !self.wants_collection(d.as_str()) {
                    warnings.push(format!(
                        "the rule for {c} reads {d}, which the collection filters leave out: nothing of it is delivered, so kept({d}) and refs({d}, ..) never hold"
                    ));
                }
            }
        }
        warnings
    }

    /// Whether records delivered under `self` must be fetched again to be right under
    /// `new`: its filters want a collection `self`'s did not, or the rules changed.
    #[must_use]
    pub fn refetch_for(&self, new: &Self) -> bool {
        widens(&self.filters, &new.filters) || self.rules.texts() != new.rules.texts()
    }

    /// The tracking scope.
    #[must_use]
    pub fn tracking(&self) -> &TrackingScope {
        &self.tracking
    }

    /// The collection filters (empty: every collection).
    #[must_use]
    pub fn filters(&self) -> &[CollectionFilter] {
        &self.filters
    }

    /// The signal collections (empty unless tracking by them).
    #[must_use]
    pub fn signal_collections(&self) -> &[Nsid] {
        match &self.tracking {
            TrackingScope::SignalCollections(c) => c,
            _ => &[],
        }
    }

    /// This scope with other collection filters.
    #[must_use]
    pub fn with_filters(&self, filters: Vec<CollectionFilter>) -> Self {
        Self {
            filters,
            ..self.clone()
        }
    }

    /// This scope tracking by other signal collections (none: dynamic mode). Full-network
    /// tracking stays as it is: it is a superset of any signal.
    #[must_use]
    pub fn with_signal_collections(&self, signals: Vec<Nsid>) -> Self {
        let tracking = match (&self.tracking, signals.is_empty()) {
            (TrackingScope::FullNetwork, _) => TrackingScope::FullNetwork,
            (_, true) => TrackingScope::Dynamic,
            (_, false) => TrackingScope::SignalCollections(signals),
        };
        Self {
            tracking,
            ..self.clone()
        }
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
    /// none), followed by the record-content rules when there are any: what a repo's last
    /// fetch is compared against before it is skipped or its index trusted.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let mut filters: Vec<&str> = self.filters.iter().map(|f| f.as_str()).collect();
        filters.sort_unstable();
        filters.dedup();
        let filters = filters.join(",");
        if self.rules.is_empty() {
            filters
        } else {
            format!("{filters}|rules:{}", self.rules.texts().join(";"))
        }
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
    fn rules_the_collection_filters_defeat_are_named_and_a_rule_change_needs_a_refetch() {
        let rules = RuleSet::parse(&[
            "app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list)",
            "app.bsky.feed.like: $.subject.uri exists",
        ])
        .unwrap();
        let scope = Scope::new(
            TrackingScope::Dynamic,
            filters(&["app.bsky.graph.listitem", "app.bsky.feed.post"]),
        )
        .with_rules(rules.clone());
        let warnings = scope.rule_warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("app.bsky.feed.like has no effect"));
        assert!(warnings[1].contains("reads app.bsky.graph.list"));
        let everything = Scope::new(TrackingScope::Dynamic, Vec::new()).with_rules(rules);
        assert!(everything.rule_warnings().is_empty());
        // The fingerprint tells a fetch under other rules apart; any rule change refetches.
        assert_ne!(
            everything.fingerprint(),
            Scope::new(TrackingScope::Dynamic, Vec::new()).fingerprint()
        );
        assert_eq!(
            Scope::new(TrackingScope::Dynamic, Vec::new()).fingerprint(),
            ""
        );
        let plain = Scope::new(TrackingScope::Dynamic, Vec::new());
        assert!(plain.refetch_for(&everything));
        assert!(everything.refetch_for(&plain));
        assert!(!everything.refetch_for(&everything.clone()));
    }

    #[test]
    fn widening_means_wanting_a_collection_that_was_not_wanted() {
        let w = |old: &[&str], new: &[&str]| widens(&filters(old), &filters(new));
        assert!(
            !w(&[], &["app.bsky.feed.post"]),
            "from everything: narrower"
        );
        assert!(w(&["app.bsky.feed.post"], &[]), "to everything: wider");
        assert!(!w(&["app.bsky.feed.post"], &["app.bsky.feed.post"]));
        assert!(w(
            &["app.bsky.feed.post"],
            &["app.bsky.feed.post", "app.bsky.feed.like"]
        ));
        assert!(
            !w(&["app.bsky.feed.*"], &["app.bsky.feed.like"]),
            "covered by a wildcard"
        );
        assert!(w(&["app.bsky.feed.like"], &["app.bsky.feed.*"]));
        assert!(!w(&["*"], &["app.bsky.graph.*"]));
        assert!(w(&["app.bsky.feed.*"], &["app.bsky.feedx.post"]));
        assert!(!w(&["a.b.c", "a.b.d"], &["a.b.d"]), "dropping one narrows");
    }

    #[test]
    fn a_runtime_value_survives_restarts_until_the_flag_changes() {
        let v = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (first, overrode) = settle(None, &v(&["a.b.c"]));
        assert_eq!(first.current, v(&["a.b.c"]));
        assert!(!overrode);
        let changed = Seeded {
            seed: v(&["a.b.c"]),
            current: v(&["a.b.c", "x.y.z"]),
        };
        let (kept, overrode) = settle(Some(changed.clone()), &v(&["a.b.c"]));
        assert_eq!(kept, changed, "same flag: the runtime change stays");
        assert!(!overrode);
        let (replaced, overrode) = settle(Some(changed), &v(&["q.r.s"]));
        assert_eq!(replaced.current, v(&["q.r.s"]), "a new flag wins");
        assert_eq!(replaced.seed, v(&["q.r.s"]));
        assert!(overrode);
    }

    #[test]
    fn a_scope_change_reaches_every_reader_at_once() {
        let live = LiveScope::new(Scope::new(TrackingScope::Dynamic, vec![]));
        let rx = live.subscribe();
        let before = live.current();
        live.replace(before.with_filters(filters(&["a.b.c"])));
        assert!(rx.has_changed().unwrap());
        assert!(!live.current().wants_collection("x.y.z"));
        assert!(
            before.wants_collection("x.y.z"),
            "a snapshot keeps its value"
        );
        let signal = live
            .current()
            .with_signal_collections(vec![Nsid::new("a.b.c").unwrap()]);
        assert!(matches!(
            signal.tracking(),
            TrackingScope::SignalCollections(_)
        ));
        assert_eq!(
            signal.with_signal_collections(vec![]).tracking(),
            &TrackingScope::Dynamic
        );
        let full = Scope::new(TrackingScope::FullNetwork, vec![]);
        assert_eq!(
            full.with_signal_collections(vec![Nsid::new("a.b.c").unwrap()])
                .tracking(),
            &TrackingScope::FullNetwork
        );
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
