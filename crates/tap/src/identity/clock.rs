//! The time source of the identity cache's expiry decisions, replaceable in tests.
//!
//! The cache (moka) keeps its own monotonic clock, which neither `tokio::time::pause()` nor a
//! test can move. Expiry is therefore decided here, against a [`Clock`] the caller picks; moka
//! only bounds the size (and reclaims memory on roughly the same schedule).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where "now" comes from for cache expiry.
#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system's monotonic clock (production).
    #[default]
    System,
    /// A clock that stands still until [`ManualClock::advance`] moves it (tests).
    Manual(ManualClock),
}

impl Clock {
    /// The current instant of this clock.
    #[must_use]
    pub fn now(&self) -> Instant {
        match self {
            Self::System => Instant::now(),
            Self::Manual(manual) => manual.now(),
        }
    }
}

/// A test clock: frozen at creation, moved only by [`advance`](Self::advance). Clones share
/// the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    offset: Arc<Mutex<Duration>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock standing at the current instant.
    #[must_use]
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    /// Moves the clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(PoisonError::into_inner);
        *offset = offset.saturating_add(by);
    }

    /// The clock's current instant.
    #[must_use]
    pub fn now(&self) -> Instant {
        let offset = *self.offset.lock().unwrap_or_else(PoisonError::into_inner);
        self.start + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        let other = clock.clone();
        other.advance(Duration::from_secs(90));
        assert_eq!(Clock::Manual(clock).now() - t0, Duration::from_secs(90));
    }
}
