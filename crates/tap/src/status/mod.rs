//! What tap is doing, for people: live counters the pipeline stages update in memory
//! ([`Progress`]), the `/status.json` document built from them and the store
//! ([`document`]), the plain-sentence diagnoses of states that explain silence
//! ([`diagnose`]), and the sampler that turns counters into rates and logs diagnoses as
//! they start and clear ([`board`]), and the per-minute history behind the status page's
//! charts ([`history`]).

pub mod board;
pub mod diagnose;
pub mod document;
pub mod history;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
#[must_use]
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Progress counters. Writers are the pipeline stages; readers are the API, the status
/// sampler and metrics. Times are Unix milliseconds, 0 meaning "never".
#[derive(Debug)]
pub struct Progress {
    started_ms: i64,
    firehose_seq: AtomicI64,
    in_memory_events: Arc<AtomicU64>,
    firehose_connected: AtomicBool,
    /// When the firehose last connected or disconnected.
    firehose_changed_ms: AtomicI64,
    firehose_last_event_ms: AtomicI64,
    /// How far behind the network the latest event was (its `time` to its arrival).
    firehose_lag_ms: AtomicI64,
    firehose_events: AtomicU64,
    outbox_held: AtomicU64,
    /// When the oldest unacked event was appended; 0 when none is held.
    oldest_unacked_ms: AtomicI64,
    consumers: AtomicU64,
    /// When the last consumer left (or tap started without one); 0 while one is connected.
    no_consumer_since_ms: AtomicI64,
    delivered: AtomicU64,
    redelivered: AtomicU64,
    resyncs_done: AtomicU64,
    records_synced: AtomicU64,
    busy_hosts: Mutex<BTreeMap<String, u32>>,
    /// Signalled whenever a resync leaves a host, for workers waiting for room on one.
    host_freed: tokio::sync::Notify,
    enumeration: Mutex<Option<Enumeration>>,
}

/// An enumeration pass in progress (signal collections or full network).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Enumeration {
    /// What is listed: a collection NSID, or `all repos`.
    pub listing: String,
    /// DIDs listed so far in this pass.
    pub found: u64,
    /// The last DID listed, while the listing comes in DID order.
    pub last_did: Option<String>,
}

impl Enumeration {
    /// How far through the DID key space the pass is, when the listing is ordered by
    /// `did:plc` identifiers (random base32, so evenly spread): a fraction in 0..1.
    #[must_use]
    pub fn share(&self) -> Option<f64> {
        const ALPHABET: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
        let id = self.last_did.as_deref()?.strip_prefix("did:plc:")?;
        let mut share = 0.0;
        let mut scale = 1.0;
        for c in id.bytes().take(6) {
            let digit = ALPHABET.iter().position(|&a| a == c)?;
            scale /= 32.0;
            share += digit as f64 * scale;
        }
        Some(share)
    }
}

impl Default for Progress {
    fn default() -> Self {
        let now = unix_ms();
        Self {
            started_ms: now,
            firehose_seq: AtomicI64::new(0),
            in_memory_events: Arc::default(),
            firehose_connected: AtomicBool::new(false),
            firehose_changed_ms: AtomicI64::new(now),
            firehose_last_event_ms: AtomicI64::new(0),
            firehose_lag_ms: AtomicI64::new(0),
            firehose_events: AtomicU64::new(0),
            outbox_held: AtomicU64::new(0),
            oldest_unacked_ms: AtomicI64::new(0),
            consumers: AtomicU64::new(0),
            no_consumer_since_ms: AtomicI64::new(now),
            delivered: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            resyncs_done: AtomicU64::new(0),
            records_synced: AtomicU64::new(0),
            busy_hosts: Mutex::default(),
            host_freed: tokio::sync::Notify::new(),
            enumeration: Mutex::default(),
        }
    }
}

/// The counters at one instant, as plain numbers for the pure functions of this module.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vitals {
    /// When these were read.
    pub at_ms: i64,
    /// When tap started.
    pub started_ms: i64,
    /// The firehose seq most recently committed.
    pub firehose_seq: i64,
    /// Connected to the relay now.
    pub firehose_connected: bool,
    /// When it last connected or disconnected.
    pub firehose_changed_ms: i64,
    /// When the latest event arrived (0: none yet).
    pub firehose_last_event_ms: i64,
    /// The latest event's delay behind the network.
    pub firehose_lag_ms: i64,
    /// Events received since start.
    pub firehose_events: u64,
    /// Events in the outbox's hands, unacked.
    pub outbox_held: u64,
    /// Events held in memory (a first backfill's), part of `outbox_held`'s backlog.
    pub in_memory_events: u64,
    /// When the oldest unacked event was appended (0: none).
    pub oldest_unacked_ms: i64,
    /// Connected `/channel` sessions.
    pub consumers: u64,
    /// Since when no consumer has been connected (0: one is).
    pub no_consumer_since_ms: i64,
    /// Events written to consumers since start (redeliveries included).
    pub delivered: u64,
    /// Events sent again for lack of an ack.
    pub redelivered: u64,
    /// Resyncs completed since start.
    pub resyncs_done: u64,
    /// Records those resyncs held.
    pub records_synced: u64,
    /// Resyncs running now, by PDS host.
    pub busy_hosts: BTreeMap<String, u32>,
    /// The enumeration pass in progress, if any.
    pub enumeration: Option<Enumeration>,
}

/// Holds a resync's place in [`Progress`]'s busy hosts; released on drop.
#[derive(Debug)]
pub struct BusyHost {
    progress: Arc<Progress>,
    host: String,
}

impl Drop for BusyHost {
    fn drop(&mut self) {
        let mut hosts = self.progress.hosts();
        if let Some(n) = hosts.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                hosts.remove(&self.host);
            }
        }
        drop(hosts);
        self.progress.host_freed.notify_waiters();
    }
}

impl Progress {
    /// The firehose seq most recently committed (0 before any event, or in outbox-only mode).
    #[must_use]
    pub fn firehose_seq(&self) -> i64 {
        self.firehose_seq.load(Ordering::Relaxed)
    }

    /// Events numbered but not stored (a first backfill's), not yet acked: part of the
    /// outbox backlog that `/stats/outbox-buffer` reports besides the stored rows.
    #[must_use]
    pub fn in_memory_events(&self) -> u64 {
        self.in_memory_events.load(Ordering::Relaxed)
    }

    /// The counter behind [`in_memory_events`](Self::in_memory_events), for the outbox
    /// actor (its only writer).
    #[must_use]
    pub fn in_memory_events_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.in_memory_events)
    }

    /// Records the firehose position.
    pub fn set_firehose_seq(&self, seq: i64) {
        self.firehose_seq.store(seq, Ordering::Relaxed);
    }

    /// The relay connection went up or down.
    pub fn set_firehose_connected(&self, connected: bool) {
        if self.firehose_connected.swap(connected, Ordering::Relaxed) != connected {
            self.firehose_changed_ms.store(unix_ms(), Ordering::Relaxed);
        }
    }

    /// A firehose event arrived, `lag_ms` behind the network when its time is known.
    pub fn firehose_event(&self, lag_ms: Option<i64>) {
        self.firehose_events.fetch_add(1, Ordering::Relaxed);
        self.firehose_last_event_ms
            .store(unix_ms(), Ordering::Relaxed);
        if let Some(lag) = lag_ms {
            self.firehose_lag_ms.store(lag.max(0), Ordering::Relaxed);
        }
    }

    /// The outbox actor's view after each input: events held, when the oldest was
    /// appended, and connected sessions.
    pub fn set_outbox(&self, held: u64, oldest_appended_ms: Option<i64>, consumers: u64) {
        self.outbox_held.store(held, Ordering::Relaxed);
        self.oldest_unacked_ms
            .store(oldest_appended_ms.unwrap_or(0), Ordering::Relaxed);
        let before = self.consumers.swap(consumers, Ordering::Relaxed);
        if consumers == 0 && before > 0 {
            self.no_consumer_since_ms
                .store(unix_ms(), Ordering::Relaxed);
        } else if consumers > 0 {
            self.no_consumer_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// `n` events were written to consumers.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` unacked events are sent again.
    pub fn redelivered(&self, n: u64) {
        self.redelivered.fetch_add(n, Ordering::Relaxed);
    }

    /// A resync finished with `records` records.
    pub fn resync_done(&self, records: u64) {
        self.resyncs_done.fetch_add(1, Ordering::Relaxed);
        self.records_synced.fetch_add(records, Ordering::Relaxed);
    }

    /// A resync takes a place on `host` until the guard drops, if fewer than `limit`
    /// hold one (`--resync-parallelism-per-host`); `None` when the host is full. Checked and
    /// taken under one lock, so two workers cannot both take the last place.
    #[must_use]
    pub fn try_resync_on(self: &Arc<Self>, host: &str, limit: u32) -> Option<BusyHost> {
        let mut hosts = self.hosts();
        let held = hosts.entry(host.to_owned()).or_insert(0);
        if *held >= limit.max(1) {
            return None;
        }
        *held += 1;
        Some(BusyHost {
            progress: Arc::clone(self),
            host: host.to_owned(),
        })
    }

    /// Whether `host` has `limit` resyncs already (a look, not a reservation).
    #[must_use]
    pub fn host_full(&self, host: &str, limit: u32) -> bool {
        self.hosts().get(host).is_some_and(|n| *n >= limit.max(1))
    }

    /// Resolves when a resync next leaves a host.
    pub async fn host_freed(&self) {
        self.host_freed.notified().await;
    }

    /// An enumeration page of `listing` listed `dids` (in the relay's order).
    pub fn enumerated(&self, listing: &str, dids: &[String]) {
        let mut current = self
            .enumeration
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pass = current.get_or_insert_with(Enumeration::default);
        if pass.listing != listing {
            *pass = Enumeration {
                listing: listing.to_owned(),
                ..Enumeration::default()
            };
        }
        pass.found += dids.len() as u64;
        // The key-space estimate holds only while the listing is in DID order.
        let first = pass.found == dids.len() as u64;
        let ordered = dids.windows(2).all(|w| w[0] < w[1])
            && match (&pass.last_did, dids.first()) {
                (Some(last), Some(next)) => last < next,
                _ => first,
            };
        pass.last_did = if ordered { dids.last().cloned() } else { None };
    }

    /// The enumeration pass ended.
    pub fn enumeration_done(&self) {
        *self
            .enumeration
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.busy_hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every counter, read now.
    #[must_use]
    pub fn vitals(&self) -> Vitals {
        let get = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let count = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Vitals {
            at_ms: unix_ms(),
            started_ms: self.started_ms,
            firehose_seq: get(&self.firehose_seq),
            firehose_connected: self.firehose_connected.load(Ordering::Relaxed),
            firehose_changed_ms: get(&self.firehose_changed_ms),
            firehose_last_event_ms: get(&self.firehose_last_event_ms),
            firehose_lag_ms: get(&self.firehose_lag_ms),
            firehose_events: count(&self.firehose_events),
            outbox_held: count(&self.outbox_held),
            in_memory_events: count(&self.in_memory_events),
            oldest_unacked_ms: get(&self.oldest_unacked_ms),
            consumers: count(&self.consumers),
            no_consumer_since_ms: get(&self.no_consumer_since_ms),
            delivered: count(&self.delivered),
            redelivered: count(&self.redelivered),
            resyncs_done: count(&self.resyncs_done),
            records_synced: count(&self.records_synced),
            busy_hosts: self.hosts().clone(),
            enumeration: self
                .enumeration
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordered_plc_listing_tells_how_far_through_the_key_space_it_is() {
        let progress = Progress::default();
        let page = |ids: &[&str]| {
            ids.iter()
                .map(|i| format!("did:plc:{i}"))
                .collect::<Vec<_>>()
        };
        progress.enumerated("app.example.x", &page(&["2aaaaa", "aaaaaa"]));
        let pass = progress.vitals().enumeration.unwrap();
        assert_eq!(pass.found, 2);
        let share = pass.share().unwrap();
        assert!((share - 6.0 / 31.0).abs() < 0.001, "{share}"); // 0.aaaa… in base 32
        progress.enumerated("app.example.x", &page(&["qaaaaa", "zzzzzz"]));
        let pass = progress.vitals().enumeration.unwrap();
        assert_eq!(pass.found, 4);
        assert!(pass.share().unwrap() > 0.999);
        // Out of order: no estimate rather than a wrong one.
        progress.enumerated("app.example.x", &page(&["baaaaa"]));
        assert_eq!(progress.vitals().enumeration.unwrap().share(), None);
        // A new listing starts over; a web DID has no key-space position.
        progress.enumerated("all repos", &["did:web:a.example".to_owned()]);
        let pass = progress.vitals().enumeration.unwrap();
        assert_eq!(
            (pass.listing.as_str(), pass.found, pass.share()),
            ("all repos", 1, None)
        );
        progress.enumeration_done();
        assert_eq!(progress.vitals().enumeration, None);
    }
}
