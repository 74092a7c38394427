//! Delivery: getting released events to consumers and reporting back what they are done
//! with. Ordering is decided upstream (the outbox actor); this stage only moves frames.
//!
//! - [`websocket`]: `/channel` sessions. Every session pulls from one shared queue, so
//!   several clients shard the stream. Acks (or successful writes, fire-and-forget) flow
//!   back to the actor.
//! - [`webhook`]: a bounded pool of POST workers with capped, jittered backoff.

pub mod webhook;
pub mod websocket;

use tokio::sync::mpsc;

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
