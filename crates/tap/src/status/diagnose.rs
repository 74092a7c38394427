//! Plain sentences for states that explain silence: the answer to "why are events not
//! arriving?" without reading logs. Pure functions of the facts a status document is built
//! from, so every threshold is tested without a running tap.

use serde::Serialize;

use super::Vitals;

/// How long the firehose may be down before it is worth saying.
pub const FIREHOSE_DOWN_MS: i64 = 60_000;
/// How long a connected firehose may go without an event (the network never does).
pub const FIREHOSE_QUIET_MS: i64 = 180_000;
/// How far behind the network the firehose may fall.
pub const FIREHOSE_BEHIND_MS: i64 = 300_000;
/// Percent of tracked repos in `error` beyond which failing repos are a warning.
pub const FAILING_PERCENT: u64 = 1;
/// How long events may wait with no consumer connected.
pub const NO_CONSUMER_MS: i64 = 60_000;
/// How old the oldest unacked event may get while a consumer is connected.
pub const ACKS_STALLED_MS: i64 = 300_000;

/// The listing name of a full-network enumeration (others are collection NSIDs).
pub const ALL_REPOS: &str = "all repos";

/// How serious a diagnosis is: `warn` makes `tap status` exit 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Worth knowing, nothing wrong (a backfill in progress).
    Info,
    /// Something keeps events from flowing or repos from syncing.
    Warn,
}

/// One diagnosis: a stable code for scripts and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// Severity.
    pub level: Level,
    /// Stable identifier (`firehose_down`, `no_consumer`, …).
    pub code: &'static str,
    /// The sentence.
    pub message: String,
}

/// What the diagnoses look at.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The live counters.
    pub vitals: &'a Vitals,
    /// Whether tap follows a firehose (not in outbox-only mode).
    pub follows_firehose: bool,
    /// Whether events wait for `/channel` consumers (not webhook mode).
    pub needs_consumer: bool,
    /// Events waiting for delivery or an ack (stored and in memory).
    pub unacked: u64,
    /// Repos per state: pending, resyncing, active, desynchronized, error.
    pub pending: u64,
    /// Repos a worker holds.
    pub resyncing: u64,
    /// Repos in sync.
    pub active: u64,
    /// Repos waiting for a resync.
    pub desynchronized: u64,
    /// Repos whose last resync failed.
    pub error: u64,
    /// The most common failure reason, when any repo failed.
    pub top_error: Option<&'a str>,
    /// A stage that failed (tap is then shutting down).
    pub failure: Option<&'a str>,
    /// Seconds the remaining backfill should take at the current pace, when known.
    pub eta_seconds: Option<u64>,
}

/// Every diagnosis that holds, warnings first.
#[must_use]
pub fn diagnose(f: &Facts<'_>) -> Vec<Diagnosis> {
    let v = f.vitals;
    let now = v.at_ms;
    let mut out = Vec::new();
    let mut warn = |code, message| {
        out.push(Diagnosis {
            level: Level::Warn,
            code,
            message,
        });
    };
    if let Some(failure) = f.failure {
        warn("stage_failed", format!("{failure}; tap is shutting down"));
    }
    if f.follows_firehose {
        if !v.firehose_connected && now - v.firehose_changed_ms >= FIREHOSE_DOWN_MS {
            warn(
                "firehose_down",
                format!(
                    "firehose not connected for {}; reconnecting",
                    duration(now - v.firehose_changed_ms)
                ),
            );
        }
        let quiet_since = v.firehose_last_event_ms.max(v.firehose_changed_ms);
        if v.firehose_connected && now - quiet_since >= FIREHOSE_QUIET_MS {
            warn(
                "firehose_quiet",
                format!(
                    "firehose connected, no event for {}",
                    duration(now - quiet_since)
                ),
            );
        }
        if v.firehose_connected && v.firehose_lag_ms >= FIREHOSE_BEHIND_MS {
            warn(
                "firehose_behind",
                format!(
                    "firehose {} behind the network",
                    duration(v.firehose_lag_ms)
                ),
            );
        }
    }
    if f.needs_consumer
        && v.consumers == 0
        && f.unacked > 0
        && v.no_consumer_since_ms > 0
        && now - v.no_consumer_since_ms >= NO_CONSUMER_MS
    {
        warn(
            "no_consumer",
            format!(
                "no consumer connected for {}; {} events waiting",
                duration(now - v.no_consumer_since_ms),
                count(f.unacked)
            ),
        );
    }
    if v.consumers > 0 && v.oldest_unacked_ms > 0 && now - v.oldest_unacked_ms >= ACKS_STALLED_MS {
        warn(
            "acks_stalled",
            format!(
                "oldest unacked event is {} old with {} consumer{} connected: events are not being acked",
                duration(now - v.oldest_unacked_ms),
                v.consumers,
                if v.consumers == 1 { "" } else { "s" }
            ),
        );
    }
    if f.error > 0 {
        let most = f
            .top_error
            .map_or_else(String::new, |e| format!("; most common: {e}"));
        let message = format!(
            "{} repo{} in error{most}",
            count(f.error),
            if f.error == 1 { "" } else { "s" }
        );
        // On the open network some repos always fail (deleted accounts, dead PDSes): a
        // warning only beyond a share of what is tracked.
        let tracked = f.pending + f.resyncing + f.active + f.desynchronized + f.error;
        if f.error.saturating_mul(100) > tracked.saturating_mul(FAILING_PERCENT) {
            warn("repos_failing", message);
        } else {
            out.push(Diagnosis {
                level: Level::Info,
                code: "repos_failing",
                message,
            });
        }
    }
    if let Some(pass) = &v.enumeration {
        let share = pass.share().map_or_else(String::new, |s| {
            format!(" about {} % done,", (s * 100.0).floor())
        });
        let what = if pass.listing == ALL_REPOS {
            "full-network enumeration".to_owned()
        } else {
            format!("signal-collection pass ({})", pass.listing)
        };
        out.push(Diagnosis {
            level: Level::Info,
            code: "enumerating",
            message: format!("{what}{share} {} repos found so far", count(pass.found)),
        });
    }
    let remaining = f.pending + f.resyncing + f.desynchronized;
    if remaining > 0 {
        let total = remaining + f.active + f.error;
        let done = f.active + f.error;
        let eta = f
            .eta_seconds
            .map_or_else(String::new, |s| format!("; about {} left", duration(ms(s))));
        out.push(Diagnosis {
            level: Level::Info,
            code: "backfilling",
            message: format!(
                "backfill {} % done: {} of {} repos{eta}",
                percent(done, total),
                count(done),
                count(total)
            ),
        });
    }
    out
}

fn ms(seconds: u64) -> i64 {
    i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// `done` of `total` as a whole percentage, rounded down (100 only when all are done).
#[must_use]
pub fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 100;
    }
    u64::try_from(u128::from(done) * 100 / u128::from(total)).unwrap_or(100)
}

/// A duration for people: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
#[must_use]
pub fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A count with thousands separators: `48,120`.
#[must_use]
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const MIN: i64 = 60_000;

    fn live() -> Vitals {
        Vitals {
            at_ms: NOW,
            started_ms: NOW - 60 * MIN,
            firehose_connected: true,
            firehose_changed_ms: NOW - 30 * MIN,
            firehose_last_event_ms: NOW - 1000,
            firehose_lag_ms: 800,
            consumers: 1,
            ..Vitals::default()
        }
    }

    fn facts(v: &Vitals) -> Facts<'_> {
        Facts {
            vitals: v,
            follows_firehose: true,
            needs_consumer: true,
            unacked: 0,
            pending: 0,
            resyncing: 0,
            active: 10,
            desynchronized: 0,
            error: 0,
            top_error: None,
            failure: None,
            eta_seconds: None,
        }
    }

    fn codes(d: &[Diagnosis]) -> Vec<&'static str> {
        d.iter().map(|d| d.code).collect()
    }

    #[test]
    fn a_healthy_tap_has_nothing_to_say() {
        let v = live();
        assert_eq!(diagnose(&facts(&v)), []);
    }

    #[test]
    fn a_firehose_down_for_a_minute_is_said_with_how_long() {
        let mut v = live();
        v.firehose_connected = false;
        v.firehose_changed_ms = NOW - 59_000;
        assert_eq!(diagnose(&facts(&v)), [], "a reconnect is not news");
        v.firehose_changed_ms = NOW - 3 * MIN;
        let d = diagnose(&facts(&v));
        assert_eq!(codes(&d), ["firehose_down"]);
        assert_eq!(
            d[0].message,
            "firehose not connected for 3 min; reconnecting"
        );
        assert_eq!(d[0].level, Level::Warn);
    }

    #[test]
    fn a_connected_but_silent_firehose_is_said_after_three_minutes() {
        let mut v = live();
        v.firehose_last_event_ms = NOW - 3 * MIN;
        let d = diagnose(&facts(&v));
        assert_eq!(d[0].message, "firehose connected, no event for 3 min");
        // Freshly reconnected: the silence counts from the connection.
        v.firehose_changed_ms = NOW - MIN;
        assert_eq!(diagnose(&facts(&v)), []);
        // Outbox-only mode follows no firehose.
        v.firehose_changed_ms = NOW - 10 * MIN;
        let mut f = facts(&v);
        f.follows_firehose = false;
        assert_eq!(diagnose(&f), []);
    }

    #[test]
    fn a_firehose_far_behind_the_network_is_said() {
        let mut v = live();
        v.firehose_lag_ms = 12 * MIN;
        let d = diagnose(&facts(&v));
        assert_eq!(d[0].message, "firehose 12 min behind the network");
    }

    #[test]
    fn events_waiting_with_no_consumer_are_said_with_their_count() {
        let mut v = live();
        v.consumers = 0;
        v.no_consumer_since_ms = NOW - 12 * MIN;
        let mut f = facts(&v);
        assert_eq!(diagnose(&f), [], "nothing waiting, nothing to say");
        f.unacked = 48_120;
        let d = diagnose(&f);
        assert_eq!(
            d[0].message,
            "no consumer connected for 12 min; 48,120 events waiting"
        );
        f.needs_consumer = false;
        assert_eq!(diagnose(&f), [], "a webhook needs no consumer");
    }

    #[test]
    fn a_consumer_that_does_not_ack_is_said() {
        let mut v = live();
        v.oldest_unacked_ms = NOW - 4 * MIN;
        assert_eq!(diagnose(&facts(&v)), []);
        v.oldest_unacked_ms = NOW - 7 * MIN;
        v.consumers = 2;
        let d = diagnose(&facts(&v));
        assert_eq!(codes(&d), ["acks_stalled"]);
        assert!(
            d[0].message
                .starts_with("oldest unacked event is 7 min old with 2 consumers")
        );
    }

    #[test]
    fn failing_repos_name_the_most_common_reason() {
        let v = live();
        let mut f = facts(&v);
        f.error = 37;
        f.top_error = Some("PDS answered 404");
        let d = diagnose(&f);
        assert_eq!(
            d[0].message,
            "37 repos in error; most common: PDS answered 404"
        );
        f.error = 1;
        f.top_error = None;
        assert_eq!(diagnose(&f)[0].message, "1 repo in error");
        assert_eq!(diagnose(&f)[0].level, Level::Warn, "1 of 11");
        // A few failures among many tracked repos are the open network's normal.
        f.active = 2_000;
        f.error = 20;
        assert_eq!(diagnose(&f)[0].level, Level::Info, "1 %");
        f.error = 21;
        assert_eq!(diagnose(&f)[0].level, Level::Warn, "over 1 %");
    }

    #[test]
    fn a_backfill_in_progress_is_information_with_its_share_and_time_left() {
        let v = live();
        let mut f = facts(&v);
        f.pending = 1500;
        f.resyncing = 4;
        f.desynchronized = 96;
        f.active = 1100;
        f.error = 0;
        f.eta_seconds = Some(200);
        let d = diagnose(&f);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].level, Level::Info);
        assert_eq!(
            d[0].message,
            "backfill 40 % done: 1,100 of 2,700 repos; about 3 min left"
        );
    }

    #[test]
    fn an_enumeration_in_progress_says_how_far_it_is() {
        let mut v = live();
        v.enumeration = Some(super::super::Enumeration {
            listing: "app.bsky.graph.starterpack".into(),
            found: 12_000,
            last_did: Some("did:plc:m2345".into()),
        });
        let d = diagnose(&facts(&v));
        assert_eq!(d[0].level, Level::Info);
        assert_eq!(
            d[0].message,
            "signal-collection pass (app.bsky.graph.starterpack) about 56 % done, 12,000 repos found so far"
        );
        v.enumeration = Some(super::super::Enumeration {
            listing: ALL_REPOS.into(),
            found: 5,
            last_did: None,
        });
        assert_eq!(
            diagnose(&facts(&v))[0].message,
            "full-network enumeration 5 repos found so far"
        );
    }

    #[test]
    fn a_failed_stage_comes_first() {
        let mut v = live();
        v.firehose_connected = false;
        v.firehose_changed_ms = NOW - 5 * MIN;
        let mut f = facts(&v);
        f.failure = Some("task firehose stopped: boom");
        assert_eq!(codes(&diagnose(&f)), ["stage_failed", "firehose_down"]);
    }

    #[test]
    fn durations_counts_and_percentages_read_naturally() {
        assert_eq!(duration(-5), "0 s");
        assert_eq!(duration(59_999), "59 s");
        assert_eq!(duration(60_000), "1 min");
        assert_eq!(duration(3_600_000 + 5 * MIN), "1 h 5 min");
        assert_eq!(duration(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(48_120), "48,120");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(999, 1000), 99);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }
}
