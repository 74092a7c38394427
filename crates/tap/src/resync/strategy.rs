//! How a resync gets a repo, decided before any byte is fetched: whether to ask the PDS
//! for its head first (so an unchanged repo is not downloaded again), and whether to fetch
//! sparsely. Pure; the worker executes it.

use tap_atproto::mst::KeyRange;

use super::fetch::LatestCommit;
use crate::config::FetchStrategy;
use crate::store::RepoRow;

/// The plan for one repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPlan {
    /// Ask `getLatestCommit` first.
    pub ask_head: bool,
    /// Fetch only these key ranges (with the head's commit); `None`: the whole repo.
    pub sparse: Option<Vec<KeyRange>>,
}

/// Chooses the plan. `wanted`: the filters' key ranges (`None` when every collection is
/// wanted); `host_lacks_sparse`: the PDS answered a sparse call "not implemented" before.
///
/// `auto` fetches sparsely whenever the filters narrow the repo: the tree levels above the
/// wanted records cost a round trip each (4–6 for a large repo) but a fraction of the
/// bytes, which is what a home data cap is about (docs/benchmarks.md, "Sparse fetch").
#[must_use]
pub fn plan(
    strategy: FetchStrategy,
    wanted: Option<Vec<KeyRange>>,
    host_lacks_sparse: bool,
) -> FetchPlan {
    if strategy == FetchStrategy::Full || host_lacks_sparse {
        return FetchPlan {
            ask_head: false,
            sparse: None,
        };
    }
    let sparse = match (strategy, wanted) {
        (_, Some(ranges)) => Some(ranges),
        (FetchStrategy::Sparse, None) => Some(vec![KeyRange::prefix(b"")]),
        (_, None) => None,
    };
    FetchPlan {
        ask_head: true,
        sparse,
    }
}

/// Whether the PDS's head is the commit tap already holds, so nothing needs downloading.
/// Only a repo whose index is complete at its stored rev qualifies (`replay` marks a
/// backfill whose events may not all have been delivered: it runs again in full), and only
/// if its last fetch was made under the same collection filters (`filters`, the current
/// [`Scope::fingerprint`](crate::repos::filter::Scope::fingerprint)): widened filters need
/// the newly wanted records.
#[must_use]
pub fn unchanged(repo: &RepoRow, replay: bool, head: &LatestCommit, filters: &str) -> bool {
    !replay
        && repo.prev_data.is_some()
        && repo.rev == Some(head.rev)
        && repo
            .last_fetch
            .as_ref()
            .is_some_and(|f| f.filters == filters)
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
        let whole = FetchPlan {
            ask_head: true,
            sparse: None,
        };
        assert_eq!(
            plan(Full, posts(), false),
            FetchPlan {
                ask_head: false,
                sparse: None
            }
        );
        assert_eq!(plan(Auto, None, false), whole);
        assert_eq!(
            plan(Auto, posts(), false),
            FetchPlan {
                ask_head: true,
                sparse: posts()
            }
        );
        assert_eq!(
            plan(Sparse, None, false).sparse,
            Some(vec![KeyRange::prefix(b"")])
        );
        // A PDS that lacks the calls gets the whole repo, without being asked again.
        for strategy in [Auto, Sparse] {
            assert_eq!(
                plan(strategy, posts(), true),
                FetchPlan {
                    ask_head: false,
                    sparse: None
                }
            );
        }
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
            ..repo
        };
        assert!(!unchanged(&never_fetched, false, &head, same));
    }
}
