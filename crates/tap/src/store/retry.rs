//! What a failed resync does to its repo: the state it goes to and when it is tried again,
//! by the class of the failure.

use std::time::Duration;

use super::{RepoState, schema};
use crate::backoff::Backoff;

/// Why a resync failed, for [`Store::mark_resync_failed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncFailure {
    /// The PDS rate-limited us: back to `desynchronized`, error cleared.
    RateLimited,
    /// A peer or the database failed in a way that may pass (timeout, 5xx, connection,
    /// busy): back to `desynchronized` with the reason, retried within seconds to minutes.
    Transient(String),
    /// A verdict on the repo (it does not verify, the PDS does not have it…): `error`, with
    /// this message, retried after the long backoff.
    Failed(String),
    /// Not a failure: the repo's PDS host already had its share of resyncs
    /// (`--resync-parallelism-per-host`), so the repo waits its turn. Back to
    /// `desynchronized` for a few seconds with its count and its message untouched (the
    /// message may be why it was queued, which the next attempt reads).
    HostBusy,
}

/// How long a repo whose host was full waits before it is claimed again, at least.
const HOST_BUSY_WAIT: Duration = Duration::from_secs(2);

/// The repo row's new values after a failed resync: what both backends write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FailedResync<'a> {
    pub state: RepoState,
    pub message: &'a str,
    pub retry_count: i64,
    pub retry_after: i64,
}

impl ResyncFailure {
    /// The row update for a repo whose stored retry count is `stored_count` and stored
    /// message `stored_message`.
    pub(super) fn row_update<'a>(
        &'a self,
        stored_count: i64,
        stored_message: &'a str,
        now_unix: i64,
        jitter_ms: u64,
    ) -> FailedResync<'a> {
        let count = schema::clamp_retry_count(stored_count);
        let failed = |state, message, retry_after| FailedResync {
            state,
            message,
            retry_count: i64::from(count.saturating_add(1)),
            retry_after,
        };
        match self {
            Self::RateLimited => failed(
                RepoState::Desynchronized,
                "",
                resync_retry_after(now_unix, count, jitter_ms),
            ),
            Self::Transient(message) => failed(
                RepoState::Desynchronized,
                message,
                transient_retry_after(now_unix, count, jitter_ms),
            ),
            Self::Failed(message) => failed(
                RepoState::Error,
                message,
                resync_retry_after(now_unix, count, jitter_ms),
            ),
            Self::HostBusy => FailedResync {
                state: RepoState::Desynchronized,
                message: stored_message,
                retry_count: i64::from(count),
                retry_after: after(now_unix, HOST_BUSY_WAIT, (jitter_ms % 3000).div_ceil(1000)),
            },
        }
    }
}

/// Delay policy of failed resyncs (original-behaviour §5): `min(2^retry_count, 60)` minutes
/// using the count before the increment, plus `jitter_ms` rounded up to whole seconds.
/// Saturates instead of overflowing for any count and clock.
fn resync_retry_after(now_unix: i64, retry_count_before: u32, jitter_ms: u64) -> i64 {
    const VERDICT: Backoff = Backoff {
        first: Duration::from_secs(60),
        max: Duration::from_secs(60 * 60),
    };
    after(
        now_unix,
        VERDICT.base(retry_count_before),
        jitter_ms.div_ceil(1000),
    )
}

/// Delay after a transient resync failure: `min(15 s × 2^retry_count, 10 min)` plus up to
/// 5 s of jitter, so a PDS or PLC blip costs seconds, not the hour a verdict may.
fn transient_retry_after(now_unix: i64, retry_count_before: u32, jitter_ms: u64) -> i64 {
    const TRANSIENT: Backoff = Backoff {
        first: Duration::from_secs(15),
        max: Duration::from_secs(10 * 60),
    };
    after(
        now_unix,
        TRANSIENT.base(retry_count_before),
        (jitter_ms % 5000).div_ceil(1000),
    )
}

/// `now_unix + delay + jitter_secs` in whole seconds, saturating.
fn after(now_unix: i64, delay: Duration, jitter_secs: u64) -> i64 {
    let whole = |secs: u64| i64::try_from(secs).unwrap_or(i64::MAX);
    now_unix
        .saturating_add(whole(delay.as_secs()))
        .saturating_add(whole(jitter_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_backoff_doubles_then_caps_at_an_hour() {
        let now = 1_000_000;
        let delays: Vec<i64> = (0..8)
            .map(|count| resync_retry_after(now, count, 0) - now)
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn a_transient_resync_failure_retries_within_seconds_and_keeps_no_verdict() {
        let now = 1_000_000;
        let delays: Vec<i64> = (0..8)
            .map(|count| transient_retry_after(now, count, 0) - now)
            .collect();
        assert_eq!(delays, [15, 30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(
            transient_retry_after(i64::MAX - 1, u32::MAX, u64::MAX),
            i64::MAX
        );
        let transient = ResyncFailure::Transient("PDS timed out".into());
        let at = |f: &ResyncFailure, count| {
            let u = f.row_update(count, "", now, 0);
            (u.state, u.message.to_owned(), u.retry_after)
        };
        assert_eq!(
            at(&transient, 0),
            (RepoState::Desynchronized, "PDS timed out".into(), now + 15)
        );
        let verdict = ResyncFailure::Failed("bad signature".into());
        assert_eq!(
            at(&verdict, 0),
            (RepoState::Error, "bad signature".into(), now + 60)
        );
        assert_eq!(
            at(&ResyncFailure::RateLimited, 1),
            (RepoState::Desynchronized, String::new(), now + 120)
        );
    }

    #[test]
    fn a_repo_whose_host_is_full_waits_seconds_and_keeps_its_count_and_reason() {
        let update = ResyncFailure::HostBusy.row_update(3, "filters widened", 1_000, 2_500);
        assert_eq!(
            update,
            FailedResync {
                state: RepoState::Desynchronized,
                message: "filters widened",
                retry_count: 3,
                retry_after: 1_000 + 2 + 3,
            }
        );
    }

    #[test]
    fn a_failed_resync_counts_one_more_failure_from_the_stored_count() {
        let verdict = ResyncFailure::Failed("bad signature".into());
        let update = verdict.row_update(2, "", 1_000, 0);
        assert_eq!(
            update,
            FailedResync {
                state: RepoState::Error,
                message: "bad signature",
                retry_count: 3,
                retry_after: 1_000 + 240,
            }
        );
        assert_eq!(
            verdict.row_update(-5, "", 0, 0).retry_count,
            1,
            "corrupt count"
        );
        assert_eq!(
            verdict.row_update(i64::MAX, "", 0, 0).retry_count,
            i64::from(u32::MAX),
            "saturates"
        );
    }

    #[test]
    fn resync_backoff_never_overflows() {
        assert_eq!(resync_retry_after(0, u32::MAX, 0), 3600);
        assert_eq!(resync_retry_after(i64::MAX - 10, 100, u64::MAX), i64::MAX);
        // Jitter is rounded up to whole seconds.
        assert_eq!(resync_retry_after(0, 0, 1), 61);
        assert_eq!(resync_retry_after(0, 0, 59_999), 120);
    }
}
