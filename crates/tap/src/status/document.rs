//! The `/status.json` document: everything a newcomer needs to tell whether tap keeps up,
//! how far the backfill is, why events are not arriving, which repos fail and where the
//! bytes go. Built by a pure function from [`Inputs`], so its arithmetic (rates, shares,
//! the ETA) is tested apart from the I/O that gathers them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::Vitals;
use super::diagnose::{self, Diagnosis, Facts, Level};
use crate::store::RepoState;

/// Everything the document is made of, gathered by [`super::board::StatusBoard`].
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The counters now.
    pub vitals: Vitals,
    /// The counters about a minute ago (rates are the difference), when sampled.
    pub earlier: Option<Vitals>,
    /// The relay URL.
    pub upstream: String,
    /// Whether tap follows the firehose (not outbox-only).
    pub follows_firehose: bool,
    /// The delivery mode's name (`websocket-ack`, `fire-and-forget`, `webhook`).
    pub delivery: &'static str,
    /// Repos per state.
    pub states: Vec<(RepoState, u64)>,
    /// Records in the index.
    pub records: u64,
    /// Events stored in the outbox, unacked.
    pub stored_events: u64,
    /// The most common failure reasons with their repo counts.
    pub errors: Vec<(String, u64)>,
    /// The byte ledger (`/stats/bandwidth`).
    pub bandwidth: Value,
    /// Bytes downloaded now and about a minute ago (rates).
    pub bytes: u64,
    /// Bytes downloaded at the `earlier` sample.
    pub bytes_earlier: u64,
    /// A stage that failed, if any.
    pub failure: Option<String>,
    /// Resync workers configured.
    pub workers: usize,
}

/// `GET /status.json`.
#[derive(Clone, Debug, Serialize)]
pub struct StatusDocument {
    /// tap's version.
    pub version: &'static str,
    /// When the document was made (Unix ms).
    pub now_ms: i64,
    /// Seconds since tap started.
    pub uptime_seconds: u64,
    /// No diagnosis at `warn` level.
    pub healthy: bool,
    /// Plain sentences for states that explain silence, warnings first.
    pub diagnoses: Vec<Diagnosis>,
    /// The relay connection.
    pub firehose: Firehose,
    /// Tracked repos.
    pub repos: Repos,
    /// How far the backfill (every repo's first sync, and resyncs) is.
    pub backfill: Backfill,
    /// Resyncs running now.
    pub resync: Resync,
    /// The enumeration pass in progress (signal collections or full network), if any.
    pub enumeration: Option<EnumerationStatus>,
    /// Delivery to consumers.
    pub outbox: OutboxStatus,
    /// Bytes downloaded: the ledger of `/stats/bandwidth`, plus the current rate.
    pub bandwidth: Bandwidth,
    /// The most common reasons repos are in `error` or `desynchronized`.
    pub errors: Vec<ErrorReason>,
}

/// The firehose part.
#[derive(Clone, Debug, Serialize)]
pub struct Firehose {
    /// Whether tap follows one (not in outbox-only mode).
    pub enabled: bool,
    /// The relay URL.
    pub upstream: String,
    /// Connected now.
    pub connected: bool,
    /// The last committed seq (the resume cursor).
    pub last_seq: i64,
    /// How far behind the network the latest event was, once one arrived.
    pub lag_seconds: Option<f64>,
    /// Seconds since the latest event, once one arrived.
    pub last_event_age_seconds: Option<f64>,
    /// Events per second over the last minute, once measured.
    pub events_per_second: Option<f64>,
}

/// The repos part.
#[derive(Clone, Debug, Serialize)]
pub struct Repos {
    /// Tracked repos.
    pub total: u64,
    /// Per state, every state present (zero when none).
    pub by_state: BTreeMap<&'static str, u64>,
    /// Records in the index.
    pub records: u64,
}

/// The backfill part.
#[derive(Clone, Debug, Serialize)]
pub struct Backfill {
    /// Repos whose sync finished (active, or in error after trying).
    pub repos_done: u64,
    /// Repos still to sync (pending, resyncing, desynchronized).
    pub repos_remaining: u64,
    /// `repos_done` as a whole percentage of all.
    pub percent: u64,
    /// Records in the repos synced since start.
    pub records_synced: u64,
    /// Repo syncs per second over the last minute.
    pub repos_per_second: Option<f64>,
    /// Records per second over the last minute.
    pub records_per_second: Option<f64>,
    /// Seconds left at that pace.
    pub eta_seconds: Option<u64>,
}

/// The resync part.
#[derive(Clone, Debug, Serialize)]
pub struct Resync {
    /// Workers configured.
    pub workers: usize,
    /// Workers fetching now.
    pub busy: u32,
    /// Fetches now, per PDS host.
    pub hosts: BTreeMap<String, u32>,
}

/// The enumeration part.
#[derive(Clone, Debug, Serialize)]
pub struct EnumerationStatus {
    /// What is listed: a collection NSID, or `all repos`.
    pub listing: String,
    /// DIDs listed so far in this pass.
    pub found: u64,
    /// How far through the DID key space, when the listing comes in `did:plc` order.
    pub percent: Option<f64>,
}

/// The delivery part.
#[derive(Clone, Debug, Serialize)]
pub struct OutboxStatus {
    /// The delivery mode.
    pub mode: &'static str,
    /// Events not yet acked (stored, and a first backfill's held in memory).
    pub unacked: u64,
    /// Events the outbox holds in memory, queued or sent and awaiting an ack.
    pub in_flight: u64,
    /// Age of the oldest unacked event in flight.
    pub oldest_unacked_seconds: Option<f64>,
    /// `/channel` sessions connected.
    pub consumers: u64,
    /// Events written to consumers per second over the last minute.
    pub delivered_per_second: Option<f64>,
    /// Events written since start (redeliveries included).
    pub delivered: u64,
    /// Events sent again for lack of an ack, since start.
    pub redeliveries: u64,
}

/// The bandwidth part.
#[derive(Clone, Debug, Serialize)]
pub struct Bandwidth {
    /// Bytes per second downloaded over the last minute.
    pub bytes_per_second: Option<f64>,
    /// The ledger.
    pub ledger: Value,
}

/// One failure reason.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorReason {
    /// The reason as stored.
    pub reason: String,
    /// Repos failing with it.
    pub repos: u64,
}

/// Change per second between two readings `dt_ms` apart; `None` without a span.
fn rate(now: u64, before: u64, dt_ms: i64) -> Option<f64> {
    (dt_ms > 0).then(|| now.saturating_sub(before) as f64 * 1000.0 / dt_ms as f64)
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// Builds the document.
#[must_use]
pub fn build(inputs: Inputs) -> StatusDocument {
    let v = &inputs.vitals;
    let count = |state: RepoState| {
        inputs
            .states
            .iter()
            .filter(|(s, _)| *s == state)
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let by_state: BTreeMap<&'static str, u64> = [
        RepoState::Pending,
        RepoState::Resyncing,
        RepoState::Active,
        RepoState::Desynchronized,
        RepoState::Error,
    ]
    .into_iter()
    .map(|s| (s.as_str(), count(s)))
    .collect();
    let total: u64 = by_state.values().sum();
    let remaining =
        count(RepoState::Pending) + count(RepoState::Resyncing) + count(RepoState::Desynchronized);
    let done = total - remaining;

    let dt = inputs.earlier.as_ref().map_or(0, |e| v.at_ms - e.at_ms);
    let earlier = inputs.earlier.clone().unwrap_or_else(|| v.clone());
    let repos_per_second = rate(v.resyncs_done, earlier.resyncs_done, dt);
    let eta_seconds = match repos_per_second {
        _ if remaining == 0 => Some(0),
        Some(r) if r > 0.0 => Some((remaining as f64 / r).ceil() as u64),
        _ => None,
    };
    let unacked = inputs.stored_events + v.in_memory_events;
    let top_error = inputs.errors.first().map(|(reason, _)| reason.as_str());
    let diagnoses = diagnose::diagnose(&Facts {
        vitals: v,
        follows_firehose: inputs.follows_firehose,
        needs_consumer: inputs.delivery != "webhook",
        unacked,
        pending: count(RepoState::Pending),
        resyncing: count(RepoState::Resyncing),
        active: count(RepoState::Active),
        desynchronized: count(RepoState::Desynchronized),
        error: count(RepoState::Error),
        top_error,
        failure: inputs.failure.as_deref(),
        eta_seconds: eta_seconds.filter(|_| remaining > 0),
    });
    StatusDocument {
        version: env!("CARGO_PKG_VERSION"),
        now_ms: v.at_ms,
        uptime_seconds: u64::try_from((v.at_ms - v.started_ms).max(0) / 1000).unwrap_or(0),
        healthy: diagnoses.iter().all(|d| d.level != Level::Warn),
        firehose: Firehose {
            enabled: inputs.follows_firehose,
            upstream: inputs.upstream,
            connected: v.firehose_connected,
            last_seq: v.firehose_seq,
            lag_seconds: (v.firehose_last_event_ms > 0).then(|| seconds(v.firehose_lag_ms)),
            last_event_age_seconds: (v.firehose_last_event_ms > 0)
                .then(|| seconds(v.at_ms - v.firehose_last_event_ms)),
            events_per_second: rate(v.firehose_events, earlier.firehose_events, dt),
        },
        repos: Repos {
            total,
            by_state,
            records: inputs.records,
        },
        backfill: Backfill {
            repos_done: done,
            repos_remaining: remaining,
            percent: diagnose::percent(done, total),
            records_synced: v.records_synced,
            repos_per_second,
            records_per_second: rate(v.records_synced, earlier.records_synced, dt),
            eta_seconds,
        },
        resync: Resync {
            workers: inputs.workers,
            busy: v.busy_hosts.values().sum(),
            hosts: v.busy_hosts.clone(),
        },
        enumeration: v.enumeration.as_ref().map(|e| EnumerationStatus {
            listing: e.listing.clone(),
            found: e.found,
            percent: e.share().map(|s| (s * 1000.0).floor() / 10.0),
        }),
        outbox: OutboxStatus {
            mode: inputs.delivery,
            unacked,
            in_flight: v.outbox_held,
            oldest_unacked_seconds: (v.oldest_unacked_ms > 0)
                .then(|| seconds(v.at_ms - v.oldest_unacked_ms)),
            consumers: v.consumers,
            delivered_per_second: rate(v.delivered, earlier.delivered, dt),
            delivered: v.delivered,
            redeliveries: v.redelivered,
        },
        bandwidth: Bandwidth {
            bytes_per_second: rate(inputs.bytes, inputs.bytes_earlier, dt),
            ledger: inputs.bandwidth,
        },
        diagnoses,
        errors: inputs
            .errors
            .into_iter()
            .map(|(reason, repos)| ErrorReason { reason, repos })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn inputs() -> Inputs {
        let vitals = Vitals {
            at_ms: NOW,
            started_ms: NOW - 3_600_000,
            firehose_connected: true,
            firehose_changed_ms: NOW - 3_000_000,
            firehose_last_event_ms: NOW - 500,
            firehose_lag_ms: 1_250,
            firehose_events: 7_000,
            delivered: 900,
            resyncs_done: 130,
            records_synced: 26_000,
            consumers: 1,
            in_memory_events: 40,
            ..Vitals::default()
        };
        let earlier = Vitals {
            at_ms: NOW - 60_000,
            firehose_events: 1_000,
            delivered: 300,
            resyncs_done: 10,
            records_synced: 2_000,
            ..vitals.clone()
        };
        Inputs {
            vitals,
            earlier: Some(earlier),
            upstream: "wss://relay.example".into(),
            follows_firehose: true,
            delivery: "websocket-ack",
            states: vec![
                (RepoState::Active, 120),
                (RepoState::Error, 10),
                (RepoState::Pending, 236),
                (RepoState::Resyncing, 4),
            ],
            records: 30_000,
            stored_events: 60,
            errors: vec![("PDS answered 404".into(), 8), ("timeout".into(), 2)],
            bandwidth: serde_json::json!({"total": 1}),
            bytes: 6_000_000,
            bytes_earlier: 0,
            failure: None,
            workers: 8,
        }
    }

    #[test]
    fn rates_are_the_change_over_the_sampled_span() {
        let doc = build(inputs());
        assert_eq!(doc.firehose.events_per_second, Some(100.0));
        assert_eq!(doc.outbox.delivered_per_second, Some(10.0));
        assert_eq!(doc.backfill.repos_per_second, Some(2.0));
        assert_eq!(doc.backfill.records_per_second, Some(400.0));
        assert_eq!(doc.bandwidth.bytes_per_second, Some(100_000.0));
        assert_eq!(doc.firehose.lag_seconds, Some(1.25));
        assert_eq!(doc.firehose.last_event_age_seconds, Some(0.5));
        assert_eq!(doc.uptime_seconds, 3600);
    }

    #[test]
    fn the_backfill_share_and_eta_follow_from_the_states_and_the_pace() {
        let doc = build(inputs());
        assert_eq!(doc.repos.total, 370);
        assert_eq!(
            doc.repos.by_state["desynchronized"], 0,
            "every state is listed"
        );
        assert_eq!(doc.backfill.repos_done, 130);
        assert_eq!(doc.backfill.repos_remaining, 240);
        assert_eq!(doc.backfill.percent, 35);
        assert_eq!(
            doc.backfill.eta_seconds,
            Some(120),
            "240 repos at 2 per second"
        );
        assert_eq!(doc.outbox.unacked, 100, "stored and in memory");
        // Warnings about failing repos; the backfill is information.
        assert!(!doc.healthy);
        let codes: Vec<_> = doc.diagnoses.iter().map(|d| d.code).collect();
        assert_eq!(codes, ["repos_failing", "backfilling"]);
        assert!(
            doc.diagnoses[0]
                .message
                .ends_with("most common: PDS answered 404")
        );
        assert!(doc.diagnoses[1].message.ends_with("about 2 min left"));
    }

    #[test]
    fn without_a_sample_or_progress_rates_and_eta_are_unknown_not_zero() {
        let mut i = inputs();
        i.earlier = None;
        let doc = build(i.clone());
        assert_eq!(doc.firehose.events_per_second, None);
        assert_eq!(doc.backfill.eta_seconds, None);
        i.earlier = Some(Vitals {
            at_ms: NOW - 60_000,
            ..i.vitals.clone()
        });
        let doc = build(i.clone());
        assert_eq!(doc.backfill.repos_per_second, Some(0.0));
        assert_eq!(doc.backfill.eta_seconds, None, "no pace, no estimate");
        i.states = vec![(RepoState::Active, 5)];
        let doc = build(i);
        assert_eq!(doc.backfill.eta_seconds, Some(0));
        assert_eq!(doc.backfill.percent, 100);
        assert!(doc.healthy);
        assert_eq!(doc.diagnoses, []);
    }
}
