//! Exponential backoff, the one doubling rule behind every retry delay: webhook attempts,
//! relay reconnects and resync retries differ only in their first step, their cap and their
//! jitter.

use std::time::Duration;

/// `first × 2^n`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure (`n = 0`).
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `n` earlier failures (0 for the first retry), without jitter. Never
    /// overflows, whatever `n`.
    #[must_use]
    pub fn base(&self, n: u32) -> Duration {
        // 2^31 times any first step already exceeds every cap used here.
        self.first.saturating_mul(1u32 << n.min(31)).min(self.max)
    }

    /// [`Self::base`] plus `seed mod jitter` (in milliseconds), so peers coming back are not
    /// hit by every retrier at once.
    #[must_use]
    pub fn with_jitter(&self, n: u32, seed: u64, jitter: Duration) -> Duration {
        let jitter_ms = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX).max(1);
        self.base(n) + Duration::from_millis(seed % jitter_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_step_up_to_the_cap_without_overflow() {
        let b = Backoff {
            first: Duration::from_secs(15),
            max: Duration::from_secs(600),
        };
        let secs: Vec<u64> = (0..8).map(|n| b.base(n).as_secs()).collect();
        assert_eq!(secs, [15, 30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(b.base(u32::MAX), b.max);
        let j = b.with_jitter(0, 1_999, Duration::from_secs(1));
        assert_eq!(j, Duration::from_millis(15_999));
    }
}
