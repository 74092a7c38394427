//! How a resync gets a repo, decided before any byte is fetched: whether to ask the PDS
//! for its head first (so an unchanged repo is not downloaded again), and whether to fetch
//! the whole repo, what changed since tap's rev, or sparsely. Pure; the worker executes it.

use tap_atproto::mst::KeyRange;

use super::fetch::LatestCommit;
use crate::config::FetchStrategy;
use crate::store::RepoRow;

/// The plan for one repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    /// Ask `getLatestCommit` first.
    pub ask_head: bool,
    /// How to fetch when the head moved (or could not be learned: then in full).
    pub fetch: Fetch,
}

/// How a repo is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// The whole repo, streamed (`getRepo`).
    Full,
    /// What changed since the rev tap holds (`getRepo?since=`), every collection wanted;
    /// the rest proven unchanged from the record index.
    Since,
    /// The head's commit and only these key ranges (`getBlocks`); with `reuse`, subtrees
    /// and records the record index proves unchanged are not fetched.
    Sparse {
        /// The wanted key ranges.
        ranges: Vec<KeyRange>,
        /// Prove what did not change from the record index instead of fetching it.
        reuse: bool,
    },
}

/// Chooses the plan. `wanted`: the filters' key ranges (`None` when every collection is
/// wanted); `host_lacks_sparse`: the PDS answered a sparse call "not implemented" before;
/// `verified_copy`: tap holds the repo's complete index at a verified rev under today's
/// filters ([`holds_verified_copy`]).
///
/// `auto` fetches sparsely whenever the filters narrow the repo: the tree levels above the
/// wanted records cost a round trip each (4–6 for a large repo) but a fraction of the
/// bytes, which is what a home data cap is about (docs/benchmarks.md, "Sparse fetch"). A
/// repo tap already holds is fetched incrementally: sparsely with what the index proves
/// left out when the filters narrow it (a `since` diff would carry the new records of every
/// collection), otherwise with `getRepo?since=`, one call however deep the changes.
#[must_use]
pub fn plan(
    strategy: FetchStrategy,
    wanted: Option<Vec<KeyRange>>,
    host_lacks_sparse: bool,
    verified_copy: bool,
) -> FetchPlan {
    if strategy == FetchStrategy::Full || host_lacks_sparse {
        return FetchPlan {
            ask_head: false,
            fetch: Fetch::Full,
        };
    }
    let fetch = match (strategy, wanted) {
        (_, Some(ranges)) => Fetch::Sparse {
            ranges,
            reuse: verified_copy,
        },
        (FetchStrategy::Sparse, None) => Fetch::Sparse {
            ranges: vec![KeyRange::prefix(b"")],
            reuse: verified_copy,
        },
        (_, None) if verified_copy => Fetch::Since,
        (_, None) => Fetch::Full,
    };
    FetchPlan {
        // A sparse fetch starts from the head; otherwise it only tells whether a copy tap
        // holds is current: a first whole download would pay a round trip for nothing.
        ask_head: verified_copy || matches!(fetch, Fetch::Sparse { .. }),
        fetch,
    }
}

/// Whether tap holds a complete copy of the repo's wanted records at a verified rev, which
/// a newer commit can be compared against: only a repo whose index is complete at its
/// stored rev qualifies (`replay` marks a backfill whose events may not all have been
/// delivered: it runs again in full), and only if its last fetch was made under the same
/// collection filters (`filters`, the current
/// [`Scope::fingerprint`](crate::repos::filter::Scope::fingerprint)): widened filters need
/// the newly wanted records.
#[must_use]
pub fn holds_verified_copy(repo: &RepoRow, replay: bool, filters: &str) -> bool {
    !replay
        && repo.rev.is_some()
        && repo.prev_data.is_some()
        && repo
            .last_fetch
            .as_ref()
            .is_some_and(|f| f.filters == filters)
}

/// Whether the PDS's head is the commit tap already holds, so nothing needs downloading.
#[must_use]
pub fn unchanged(repo: &RepoRow, replay: bool, head: &LatestCommit, filters: &str) -> bool {
    holds_verified_copy(repo, replay, filters) && repo.rev == Some(head.rev)
}

#[cfg(test)]
mod tests {
    use tap_atproto::Cid;
    use tap_atproto::syntax::Tid;

    use super::*;
    use crate::store::{AccountStatus, FetchKind, LastFetch, RepoState};

    fn posts() -> Option<Vec<KeyRange>> {
        Some(vec![KeyRange::collection("app.bsky.feed.post")])
    }

    #[test]
    fn full_never_asks_and_auto_goes_sparse_only_when_filters_narrow_the_repo() {
        use FetchStrategy::{Auto, Full, Sparse};
        let full = FetchPlan {
            ask_head: false,
            fetch: Fetch::Full,
        };
        let sparse = |reuse| FetchPlan {
            ask_head: true,
            fetch: Fetch::Sparse {
                ranges: posts().unwrap(),
                reuse,
            },
        };
        for held in [false, true] {
            assert_eq!(plan(Full, posts(), false, held), full);
            assert_eq!(plan(Full, None, false, held), full);
            assert_eq!(plan(Auto, posts(), false, held), sparse(held));
            assert_eq!(
                plan(Sparse, None, false, held).fetch,
                Fetch::Sparse {
                    ranges: vec![KeyRange::prefix(b"")],
                    reuse: held
                }
            );
            // A PDS that lacks the calls gets the whole repo, without being asked again.
            for strategy in [Auto, Sparse] {
                assert_eq!(plan(strategy, posts(), true, held), full);
            }
        }
        // Everything wanted: the whole repo the first time (no head to compare with), what
        // changed since after that.
        assert_eq!(plan(Auto, None, false, false), full);
        assert_eq!(
            plan(Auto, None, false, true),
            FetchPlan {
                ask_head: true,
                fetch: Fetch::Since
            }
        );
    }

    #[test]
    fn only_a_complete_copy_at_the_heads_rev_under_the_same_filters_is_unchanged() {
        let rev = Tid::new("3kaaaaaaaaa22").unwrap();
        let later = Tid::new("3kaaaaaaaaa23").unwrap();
        let head = LatestCommit {
            cid: tap_atproto::hash::cid_for_cbor(b"commit"),
            rev,
        };
        let repo = RepoRow {
            did: "did:plc:a".parse().unwrap(),
            state: RepoState::Resyncing,
            status: AccountStatus::Active,
            handle: None,
            rev: Some(rev),
            prev_data: Some(Cid::default().to_string()),
            error: String::new(),
            retry_count: 0,
            retry_after: 0,
            last_fetch: Some(LastFetch {
                kind: FetchKind::Sparse,
                bytes: 1,
                at: 1,
                filters: "app.bsky.feed.post".into(),
            }),
        };
        let same = "app.bsky.feed.post";
        assert!(unchanged(&repo, false, &head, same));
        assert!(
            !unchanged(&repo, true, &head, same),
            "an undelivered backfill reruns"
        );
        assert!(
            !unchanged(&repo, false, &head, "app.bsky.feed.like,app.bsky.feed.post"),
            "widened filters need the newly wanted records"
        );
        let newer = LatestCommit { rev: later, ..head };
        assert!(!unchanged(&repo, false, &newer, same));
        let never_fetched = RepoRow {
            rev: None,
            prev_data: None,
            last_fetch: None,
            ..repo.clone()
        };
        assert!(!unchanged(&never_fetched, false, &head, same));
        assert!(!holds_verified_copy(&never_fetched, false, same));
        // Synced before fetches were noted (no filters on record): not comparable.
        let unnoted = RepoRow {
            last_fetch: None,
            ..repo.clone()
        };
        assert!(!holds_verified_copy(&unnoted, false, same));
        assert!(holds_verified_copy(&repo, false, same));
    }
}
