//! The status board: gathers a [`StatusDocument`] from the live counters, the store and
//! the ledger, keeps the samples that turn counters into rates, and logs each warning
//! diagnosis when it starts and when it clears.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::diagnose::{Diagnosis, Level};
use super::document::{self, Inputs, StatusDocument};
use super::history::{self, Counters, MinuteClock, Point, Span};
use super::{Progress, Vitals};
use crate::ledger::Ledger;
use crate::shutdown::TaskFailure;
use crate::store::{Store, StoreError};

/// How often the sampler reads the counters (and re-checks the diagnoses).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The span rates are measured over.
pub const RATE_WINDOW_MS: i64 = 60_000;
/// Failure reasons listed in the document.
const TOP_ERRORS: u32 = 5;

/// One reading of the counters, with the ledger's total.
#[derive(Clone, Debug)]
struct Sample {
    vitals: Vitals,
    bytes: u64,
}

/// What the board reads and how tap is set up.
pub struct BoardSources {
    /// The state store.
    pub store: Store,
    /// The live counters.
    pub progress: Arc<Progress>,
    /// The byte ledger.
    pub ledger: Ledger,
    /// The first task that failed, if any.
    pub failure: watch::Receiver<Option<TaskFailure>>,
    /// The relay URL.
    pub upstream: String,
    /// Whether tap follows the firehose.
    pub follows_firehose: bool,
    /// The delivery mode's name.
    pub delivery: &'static str,
    /// Resync workers configured.
    pub workers: usize,
}

/// How long the store's part of the document is reused: its counts scan tables, and every
/// open status page asks every 2 s.
const STORE_FACTS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// What the document reads from the store.
#[derive(Clone, Debug)]
struct StoreFacts {
    states: Vec<(crate::store::RepoState, u64)>,
    records: u64,
    stored_events: u64,
    errors: Vec<(String, u64)>,
}

/// Builds status documents. Shared by the API and the sampler.
pub struct StatusBoard {
    sources: BoardSources,
    samples: Mutex<VecDeque<Sample>>,
    /// The store's part, while fresh. An async lock: concurrent askers wait for one read.
    facts: tokio::sync::Mutex<Option<(std::time::Instant, StoreFacts)>>,
}

impl StatusBoard {
    /// A board with no samples yet (rates are unknown until the first).
    #[must_use]
    pub fn new(sources: BoardSources) -> Self {
        Self {
            sources,
            samples: Mutex::default(),
            facts: tokio::sync::Mutex::default(),
        }
    }

    fn sample(&self) -> Sample {
        Sample {
            vitals: self.sources.progress.vitals(),
            bytes: self.sources.ledger.total(),
        }
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The document as of now.
    ///
    /// # Errors
    /// The store could not be read.
    pub async fn document(&self) -> Result<StatusDocument, StoreError> {
        let StoreFacts {
            states,
            records,
            stored_events,
            errors,
        } = self.store_facts().await?;
        let now = self.sample();
        let earlier = base_of_rates(&self.samples(), now.vitals.at_ms);
        let failure = self
            .sources
            .failure
            .borrow()
            .as_ref()
            .map(ToString::to_string);
        Ok(document::build(Inputs {
            bytes_earlier: earlier.as_ref().map_or(now.bytes, |e| e.bytes),
            earlier: earlier.map(|e| e.vitals),
            bytes: now.bytes,
            vitals: now.vitals,
            upstream: self.sources.upstream.clone(),
            follows_firehose: self.sources.follows_firehose,
            delivery: self.sources.delivery,
            states,
            records,
            stored_events,
            errors,
            bandwidth: self.sources.ledger.report(),
            failure,
            workers: self.sources.workers,
        }))
    }
}

impl StatusBoard {
    /// The chart points of `span` up to now.
    ///
    /// # Errors
    /// The store could not be read.
    pub async fn history(&self, span: Span) -> Result<Vec<Point>, StoreError> {
        let now_minute = super::unix_ms().div_euclid(60_000);
        let rows = self
            .sources
            .store
            .minutes_since(now_minute - span.minutes() + 1)
            .await?;
        Ok(history::aggregate(&rows, span, now_minute))
    }
}

impl StatusBoard {
    async fn store_facts(&self) -> Result<StoreFacts, StoreError> {
        let mut cached = self.facts.lock().await;
        if let Some((at, facts)) = cached.as_ref()
            && at.elapsed() < STORE_FACTS_TTL
        {
            return Ok(facts.clone());
        }
        let store = &self.sources.store;
        let (states, records, stored_events, errors) = tokio::try_join!(
            store.repo_states(),
            store.record_count(),
            store.outbox_count(),
            store.error_reasons(TOP_ERRORS),
        )?;
        let facts = StoreFacts {
            states,
            records,
            stored_events,
            errors,
        };
        *cached = Some((std::time::Instant::now(), facts.clone()));
        Ok(facts)
    }
}

/// Keeps a reading for later rates, forgetting those no longer needed: everything before
/// the newest reading at least a window old (the base of the rates).
fn remember(samples: &mut VecDeque<Sample>, sample: Sample) {
    let newest = sample.vitals.at_ms;
    samples.push_back(sample);
    while samples
        .get(1)
        .is_some_and(|s| newest - s.vitals.at_ms >= RATE_WINDOW_MS)
    {
        samples.pop_front();
    }
}

/// The reading rates are measured from: the newest at least a window before `now`, else
/// the oldest (a shorter span while tap is young); `None` before any.
fn base_of_rates(samples: &VecDeque<Sample>, now_ms: i64) -> Option<Sample> {
    samples
        .iter()
        .rev()
        .find(|s| now_ms - s.vitals.at_ms >= RATE_WINDOW_MS)
        .or_else(|| samples.front())
        .filter(|s| s.vitals.at_ms < now_ms)
        .cloned()
}

/// Warnings that began and warnings that ended between two sets of diagnoses, by code.
#[must_use]
pub fn transitions<'a>(
    before: &'a [Diagnosis],
    now: &'a [Diagnosis],
) -> (Vec<&'a Diagnosis>, Vec<&'a Diagnosis>) {
    let warns = |d: &'a [Diagnosis]| d.iter().filter(|d| d.level == Level::Warn);
    let started = warns(now)
        .filter(|d| !warns(before).any(|b| b.code == d.code))
        .collect();
    let cleared = warns(before)
        .filter(|b| !warns(now).any(|d| d.code == b.code))
        .collect();
    (started, cleared)
}

/// Samples the counters every [`SAMPLE_EVERY`] until `stop`, logging warnings as they
/// start and clear.
pub async fn run_sampler(board: Arc<StatusBoard>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before: Vec<Diagnosis> = Vec::new();
    let mut minutes = MinuteClock::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let sample = board.sample();
        let lag = if sample.vitals.firehose_connected {
            sample.vitals.firehose_lag_ms
        } else {
            0
        };
        if let Some(row) = minutes.tick(Counters::of(&sample.vitals, sample.bytes), lag)
            && let Err(error) = board.sources.store.save_minute(row).await
        {
            tracing::debug!(%error, "Status history minute not saved.");
        }
        remember(&mut board.samples(), sample);
        let now = match board.document().await {
            Ok(doc) => doc.diagnoses,
            Err(error) => {
                tracing::debug!(%error, "Status sample could not read the store.");
                continue;
            }
        };
        let (started, cleared) = transitions(&before, &now);
        for d in started {
            tracing::warn!(code = d.code, "{}", d.message);
        }
        for d in cleared {
            tracing::warn!(code = d.code, "Cleared: {}", d.message);
        }
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Sample {
        Sample {
            vitals: Vitals {
                at_ms: ms,
                ..Vitals::default()
            },
            bytes: 0,
        }
    }

    fn warn(code: &'static str, message: &str) -> Diagnosis {
        Diagnosis {
            level: Level::Warn,
            code,
            message: message.into(),
        }
    }

    #[test]
    fn rates_are_measured_from_the_newest_reading_a_window_old() {
        let samples: VecDeque<Sample> = [0, 10_000, 20_000, 70_000].map(at).into();
        let base = |now| base_of_rates(&samples, now).map(|s| s.vitals.at_ms);
        assert_eq!(base(80_000), Some(20_000));
        assert_eq!(base(60_000), Some(0));
        assert_eq!(base(30_000), Some(0), "young: the oldest reading");
        assert_eq!(base(0), None, "no span, no rate");
        assert_eq!(base_of_rates(&VecDeque::new(), 5).map(|s| s.bytes), None);
    }

    #[test]
    fn the_sampler_forgets_readings_older_than_the_base_of_the_rates() {
        let mut samples = VecDeque::new();
        for ms in (0..=200_000).step_by(10_000) {
            remember(&mut samples, at(ms));
        }
        let kept: Vec<i64> = samples.iter().map(|s| s.vitals.at_ms).collect();
        assert_eq!(kept.first(), Some(&140_000));
        assert_eq!(kept.last(), Some(&200_000));
    }

    #[test]
    fn warnings_are_logged_once_when_they_start_and_once_when_they_clear() {
        let a = warn("firehose_down", "firehose not connected for 1 min");
        let a_later = warn("firehose_down", "firehose not connected for 2 min");
        let b = warn("no_consumer", "no consumer");
        let info = Diagnosis {
            level: Level::Info,
            code: "backfilling",
            message: "backfill 5 % done".into(),
        };
        let (started, cleared) = transitions(&[], std::slice::from_ref(&a));
        assert_eq!((started.len(), cleared.len()), (1, 0));
        let (first, second) = ([a.clone()], [a_later, info.clone()]);
        let (started, cleared) = transitions(&first, &second);
        assert!(
            started.is_empty() && cleared.is_empty(),
            "same code: no news"
        );
        let before = [a.clone(), info];
        let (started, cleared) = transitions(&before, std::slice::from_ref(&b));
        assert_eq!(started, [&b]);
        assert_eq!(cleared, [&a]);
    }
}
