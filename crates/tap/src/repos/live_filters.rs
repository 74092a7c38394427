//! Changing the collection filters and signal collections of a running tap (`PUT
//! /collection-filters`, `PUT /signal-collections`): validated like the flags, stored so
//! they survive a restart, put in force for every reader at once. A widening of the
//! collection filters re-fetches the repos tap holds, in the same transaction that stores
//! it; a narrowing takes effect with the next event.

use tap_atproto::record_filter::RuleSet;
use tap_atproto::syntax::{CollectionFilter, Nsid};

use super::filter::{LiveScope, Scope, Seeded, settle, widens};
use crate::store::{Store, StoreError};

/// The setting names in the store.
const COLLECTION_FILTERS: &str = "collection_filters";
const SIGNAL_COLLECTIONS: &str = "signal_collections";
const RECORD_FILTERS: &str = "record_filters";

/// Why the repos of a widening are fetched again (their `error` until they are).
pub const WIDENED: &str = "collection filters widened: fetching the newly wanted records";

/// Why the repos are fetched again after the record-content rules changed.
pub const RULES_CHANGED: &str = "record filters changed: recomputing the delivered records";

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A value does not parse (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// Signal collections were set while tap tracks the whole network.
    #[error("tap tracks the full network (--full-network): signal collections do not apply")]
    FullNetwork,
    /// The store failed; nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Owns runtime changes of the scope. Changes are serialized.
pub struct FilterControl {
    store: Store,
    live: LiveScope,
    seeds: tokio::sync::Mutex<Seeds>,
}

/// The flag values the stored settings were seeded from.
struct Seeds {
    filters: Vec<String>,
    signals: Vec<String>,
    rules: Vec<String>,
}

fn strings<T: AsRef<str>>(items: &[T]) -> Vec<String> {
    items.iter().map(|i| i.as_ref().to_owned()).collect()
}

/// Parses `raw` like the flag does, dropping repeats; the error names the bad value.
fn parse_all<T: std::str::FromStr>(raw: &[String], what: &str) -> Result<Vec<T>, FilterError>
where
    T::Err: std::fmt::Display,
{
    let mut seen = std::collections::HashSet::new();
    raw.iter()
        .filter(|r| seen.insert(r.as_str()))
        .map(|r| {
            r.parse::<T>()
                .map_err(|e| FilterError::Invalid(format!("{r:?} is not {what}: {e}")))
        })
        .collect()
}

/// Logs what in the rules cannot take effect under the collection filters.
fn warn_rules(scope: &Scope) {
    for warning in scope.rule_warnings() {
        tracing::warn!("Record filters: {warning}.");
    }
}

impl FilterControl {
    /// Settles the stored values against the flags' (`flags`) at start-up, by
    /// [`settle`]'s rule, and stores the outcome.
    ///
    /// # Errors
    /// The store could not be read or written.
    pub async fn load(store: Store, flags: &Scope) -> Result<Self, StoreError> {
        let flag_filters = strings(flags.filters());
        let flag_signals = strings(flags.signal_collections());
        let flag_rules = flags.rules().texts();
        let filters = Self::settle_one(&store, COLLECTION_FILTERS, &flag_filters).await?;
        let signals = Self::settle_one(&store, SIGNAL_COLLECTIONS, &flag_signals).await?;
        let rules = Self::settle_one(&store, RECORD_FILTERS, &flag_rules).await?;
        let mut scope = flags.clone();
        match RuleSet::parse(&rules) {
            Ok(parsed) => scope = scope.with_rules(parsed),
            Err(error) => {
                tracing::warn!(%error, "Stored record filters unusable; the flag's apply.")
            }
        }
        match parse_all::<CollectionFilter>(&filters, "a collection filter") {
            Ok(parsed) => scope = scope.with_filters(parsed),
            Err(error) => {
                tracing::warn!(%error, "Stored collection filters unusable; the flag's apply.")
            }
        }
        match parse_all::<Nsid>(&signals, "an NSID") {
            Ok(parsed) => scope = scope.with_signal_collections(parsed),
            Err(error) => {
                tracing::warn!(%error, "Stored signal collections unusable; the flag's apply.")
            }
        }
        warn_rules(&scope);
        Ok(Self {
            store,
            live: LiveScope::new(scope),
            seeds: tokio::sync::Mutex::new(Seeds {
                filters: flag_filters,
                signals: flag_signals,
                rules: flag_rules,
            }),
        })
    }

    async fn settle_one(
        store: &Store,
        name: &str,
        flag: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let stored = match store.setting(name).await? {
            None => None,
            Some(json) => match serde_json::from_str::<Seeded>(&json) {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::warn!(%error, setting = name, "Stored setting unreadable; the flag's value applies.");
                    None
                }
            },
        };
        let (settled, overrode) = settle(stored.clone(), flag);
        if overrode {
            tracing::warn!(
                setting = name,
                flag = ?flag,
                replaced = ?stored.map(|s| s.current),
                "The flag changed since the value was set through the API; the flag's value applies."
            );
        }
        store
            .save_setting(
                name,
                &serde_json::to_string(&settled).unwrap_or_default(),
                None,
            )
            .await?;
        Ok(settled.current)
    }

    /// The scope the pipeline reads.
    #[must_use]
    pub fn live(&self) -> &LiveScope {
        &self.live
    }

    /// The collection filters in force.
    #[must_use]
    pub fn collection_filters(&self) -> Vec<String> {
        strings(self.live.current().filters())
    }

    /// The signal collections in force.
    #[must_use]
    pub fn signal_collections(&self) -> Vec<String> {
        strings(self.live.current().signal_collections())
    }

    /// Replaces the collection filters; returns them and how many repos will be fetched
    /// again for a widening.
    ///
    /// # Errors
    /// [`FilterError::Invalid`] naming a bad filter, or the store's; nothing changed then.
    pub async fn set_collection_filters(
        &self,
        raw: &[String],
    ) -> Result<(Vec<String>, u64), FilterError> {
        let filters = parse_all::<CollectionFilter>(raw, "a collection filter")?;
        let seeds = self.seeds.lock().await;
        let old = self.live.current();
        let widened = widens(old.filters(), &filters);
        let stored = Seeded {
            seed: seeds.filters.clone(),
            current: strings(&filters),
        };
        let refetch = self
            .put_in_force(
                &old,
                old.with_filters(filters),
                COLLECTION_FILTERS,
                &stored,
                widened.then_some(WIDENED),
            )
            .await?;
        tracing::info!(filters = ?stored.current, widened, refetch, "Collection filters changed.");
        Ok((stored.current, refetch))
    }

    /// Puts `new` in force and stores `stored` under `name`, marking every active repo for
    /// a re-fetch with `refetch` (a reason) in the same transaction; returns how many were
    /// marked. In force before the repos are marked: a resync finishing in between sees the
    /// new scope and fetches again (resync::worker), and none starting after the marking
    /// can use the old one. `old` is put back if the store refuses. Call with the seeds
    /// lock held.
    async fn put_in_force(
        &self,
        old: &Scope,
        new: Scope,
        name: &str,
        stored: &Seeded,
        refetch: Option<&str>,
    ) -> Result<u64, FilterError> {
        self.live.replace(new);
        let marked = self
            .store
            .save_setting(
                name,
                &serde_json::to_string(stored).unwrap_or_default(),
                refetch,
            )
            .await;
        match marked {
            Ok(n) => {
                warn_rules(&self.live.current());
                Ok(n)
            }
            Err(error) => {
                self.live.replace(old.clone());
                Err(error.into())
            }
        }
    }

    /// The record-content rules in force, as given.
    #[must_use]
    pub fn record_filters(&self) -> Vec<String> {
        self.live.current().rules().texts()
    }

    /// Replaces the record-content rules (none: every record of a wanted collection);
    /// returns them and how many repos will be fetched again to recompute what is
    /// delivered (any change does: records may start or stop matching).
    ///
    /// # Errors
    /// [`FilterError::Invalid`] naming the rule, column and reason, or the store's;
    /// nothing changed then.
    pub async fn set_record_filters(
        &self,
        raw: &[String],
    ) -> Result<(Vec<String>, u64), FilterError> {
        let rules = RuleSet::parse(raw).map_err(|e| FilterError::Invalid(e.to_string()))?;
        let seeds = self.seeds.lock().await;
        let old = self.live.current();
        let changed = old.rules().texts() != rules.texts();
        let stored = Seeded {
            seed: seeds.rules.clone(),
            current: rules.texts(),
        };
        let refetch = self
            .put_in_force(
                &old,
                old.with_rules(rules),
                RECORD_FILTERS,
                &stored,
                changed.then_some(RULES_CHANGED),
            )
            .await?;
        tracing::info!(rules = ?stored.current, refetch, "Record filters changed.");
        Ok((stored.current, refetch))
    }

    /// Replaces the signal collections (none: only repos added through the API).
    ///
    /// # Errors
    /// [`FilterError::Invalid`] naming a bad NSID, [`FilterError::FullNetwork`], or the
    /// store's; nothing changed then.
    pub async fn set_signal_collections(&self, raw: &[String]) -> Result<Vec<String>, FilterError> {
        let signals = parse_all::<Nsid>(raw, "an NSID")?;
        let seeds = self.seeds.lock().await;
        let old = self.live.current();
        if *old.tracking() == crate::config::TrackingScope::FullNetwork {
            return Err(FilterError::FullNetwork);
        }
        let stored = Seeded {
            seed: seeds.signals.clone(),
            current: strings(&signals),
        };
        self.store
            .save_setting(
                SIGNAL_COLLECTIONS,
                &serde_json::to_string(&stored).unwrap_or_default(),
                None,
            )
            .await?;
        // The seeds lock is still held: no other change can land in between.
        self.live.replace(old.with_signal_collections(signals));
        tracing::info!(signals = ?stored.current, "Signal collections changed.");
        Ok(stored.current)
    }
}
