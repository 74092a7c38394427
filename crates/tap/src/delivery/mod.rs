//! Delivery: getting released events to consumers and reporting back what they are done
//! with. Ordering is decided upstream (the outbox actor); this stage only moves frames.
//!
//! - [`websocket`]: `/channel` sessions. Every session pulls from one shared queue, so
//!   several clients shard the stream. Acks (or successful writes, fire-and-forget) flow
//!   back to the actor.
//! - [`webhook`]: a bounded pool of POST workers with capped, jittered backoff.
//! - [`nats`]: a bounded pool of JetStream publishers, done on the publish ack.

pub mod nats;
pub mod webhook;
pub mod websocket;

use std::time::Duration;

use tokio::sync::mpsc;

use crate::backoff::Backoff;

use crate::outbox::{AckMode, Delivery, Input};

/// What a delivery session needs: the shared queue of released events and the way back
/// to the outbox actor. Cheap to clone.
#[derive(Clone)]
pub struct DeliveryHub {
    /// Released events, shared by every session (MPMC).
    pub queue: async_channel::Receiver<Delivery>,
    /// Reports to the outbox actor.
    pub inputs: mpsc::Sender<Input>,
    /// When an event counts as done.
    pub ack_mode: AckMode,
    /// `--channel-timeout`: longest blocked write, and longest silence of a client.
    pub channel_timeout: std::time::Duration,
    /// Counts deliveries for the status document.
    pub progress: std::sync::Arc<crate::status::Progress>,
}

/// Longest wait between two tries of a sink (as the Go tap's webhook: 1, 2, 4, 8, 10, 10 … s).
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Delay before a sink's retry `attempt` (1-based): `min(2^(attempt-1) s, 10 s)` plus up to
/// 1 s of jitter, so a receiver coming back is not hit by every worker at once.
#[must_use]
pub fn retry_delay(attempt: u32, jitter_ms: u64) -> Duration {
    let doubling = Backoff {
        first: Duration::from_secs(1),
        max: MAX_BACKOFF,
    };
    doubling.with_jitter(attempt.saturating_sub(1), jitter_ms, Duration::from_secs(1))
}

/// Sleeps [`retry_delay`] before a sink's retry `attempt`; `false` if `stop` came first.
pub async fn wait_to_retry(attempt: u32, stop: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(retry_delay(attempt, rand::random::<u64>())) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_to_ten_seconds_with_under_a_second_of_jitter() {
        let secs: Vec<u64> = (1..=8).map(|a| retry_delay(a, 0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 10, 10, 10, 10]);
        assert_eq!(retry_delay(u32::MAX, 0), MAX_BACKOFF, "no overflow");
        assert!(retry_delay(1, 999_999) < Duration::from_secs(2));
    }
}
