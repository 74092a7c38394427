//! NATS JetStream delivery (`--nats-url`): each released event is published to a subject
//! derived from it (`<prefix>.record.<collection>`, `<prefix>.identity`) with
//! `Nats-Msg-Id` = the event id, and is done when JetStream acknowledges the publish. An
//! event published again after a crash carries the same id, so the server drops the repeat
//! within the stream's duplicate window. Per-repo order comes from the outbox, which
//! releases a repo's next live event only once everything before it is done; a few
//! publishers each send a batch of released events back to back, then await their acks
//! together and report the batch done in one message. A failed publish (NATS down, restarting, no answer) is
//! retried with capped backoff while its event stays in flight: the client reconnects by
//! itself, and nothing is lost meanwhile.

use std::time::Duration;

use async_nats::jetstream;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::DeliveryHub;
use crate::config::NatsTarget;
use crate::outbox::{Delivery, Input};
use crate::shutdown::Supervisor;
use crate::store::EventId;
use crate::telemetry as t;

/// Publisher tasks. Each publishes a batch of released events back to back (pipelined),
/// then waits for all their acks, and reports the batch to the outbox in one message: a
/// round trip and an actor message per batch, not per event.
pub const PUBLISHERS: usize = 4;
/// Most events in one batch (what one publisher may have in flight).
pub const BATCH: usize = 256;
/// Longest wait for JetStream's ack of one publish before it is tried again.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why NATS delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached or refused us.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// `--nats-url`.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The stream could not be found or created.
    #[error("cannot use JetStream stream {stream:?}: {reason}")]
    Stream {
        /// `--nats-stream`.
        stream: String,
        /// What failed.
        reason: String,
    },
}

/// Connects and makes sure the stream exists: created with tap's settings when missing, used
/// as configured when present.
///
/// # Errors
/// [`NatsError`].
pub async fn connect(target: &NatsTarget) -> Result<jetstream::Context, NatsError> {
    let client = async_nats::ConnectOptions::new()
        .name(concat!("tap/", env!("CARGO_PKG_VERSION")))
        .connect(target.url.as_str())
        .await
        .map_err(|e| NatsError::Connect {
            url: target.url.clone(),
            reason: e.to_string(),
        })?;
    let context = jetstream::new(client);
    let config = jetstream::stream::Config {
        name: target.stream.clone(),
        subjects: vec![format!("{}.>", target.subject_prefix)],
        max_age: target.max_age,
        duplicate_window: target.duplicate_window,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    context
        .get_or_create_stream(config)
        .await
        .map_err(|e| NatsError::Stream {
            stream: target.stream.clone(),
            reason: e.to_string(),
        })?;
    Ok(context)
}

/// The subject of an event frame: `<prefix>.record.<collection>` for a record,
/// `<prefix>.identity` for an identity event, `<prefix>.<type>` for any other. Pure.
#[must_use]
pub fn subject_for(prefix: &str, frame: &str) -> String {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        record: Option<RecordHead>,
    }
    #[derive(Deserialize)]
    struct RecordHead {
        collection: String,
    }
    match serde_json::from_str::<Head>(frame) {
        Ok(Head {
            record: Some(record),
            ..
        }) => format!("{prefix}.record.{}", record.collection),
        Ok(head) if is_token(&head.kind) => format!("{prefix}.{}", head.kind),
        // Frames are tap's own JSON; this is only reached if that ever changes.
        _ => format!("{prefix}.other"),
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Starts the publishers; they run until `stop` is cancelled.
pub fn spawn(
    context: &jetstream::Context,
    target: &NatsTarget,
    hub: &DeliveryHub,
    supervisor: &Supervisor,
    stop: &CancellationToken,
) {
    for _ in 0..PUBLISHERS {
        supervisor.spawn(
            "nats publisher",
            run_publisher(
                context.clone(),
                target.subject_prefix.clone(),
                hub.clone(),
                stop.clone(),
            ),
        );
    }
}

async fn run_publisher(
    context: jetstream::Context,
    prefix: String,
    hub: DeliveryHub,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            d = hub.queue.recv() => match d { Ok(d) => d, Err(_) => return },
        };
        batch.push(first);
        while batch.len() < BATCH {
            match hub.queue.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let ids: Vec<EventId> = batch.iter().map(|d| d.id).collect();
        // Every publish of the batch is sent before any ack is awaited.
        let mut acks = Vec::with_capacity(batch.len());
        for delivery in &batch {
            let sent = context
                .publish_with_headers(
                    subject_for(&prefix, &delivery.text),
                    msg_id(delivery),
                    bytes::Bytes::copy_from_slice(delivery.text.as_bytes()),
                )
                .await;
            acks.push(sent);
        }
        // Out now: the client would otherwise hold the tail of the batch in its buffer
        // for a while before writing it, and every ack would wait for it.
        let _ = context.client().flush().await;
        // One deadline for the whole batch: acks come in publish order, so the batch is
        // held at most ACK_TIMEOUT, not that much per event.
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut failed = Vec::new();
        for (sent, delivery) in acks.into_iter().zip(batch.drain(..)) {
            let acked = match sent {
                Ok(ack) => tokio::time::timeout_at(deadline, ack)
                    .await
                    .is_ok_and(|r| r.is_ok()),
                Err(_) => false,
            };
            if !acked {
                failed.push(delivery);
            }
        }
        // What did not go through is published one by one, retried until it does.
        for delivery in failed {
            if !publish(&context, &prefix, delivery, &stop).await {
                // Shutting down mid-retry: the events stay in the outbox for the next run.
                return;
            }
        }
        metrics::counter!(t::EVENTS_DELIVERED).increment(ids.len() as u64);
        hub.progress.delivered(ids.len() as u64);
        if hub.inputs.send(Input::Acked(ids)).await.is_err() {
            return;
        }
    }
}

/// `Nats-Msg-Id`: the event id, by which JetStream drops a republished event.
fn msg_id(delivery: &Delivery) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", delivery.id.0.to_string().as_str());
    headers
}

/// Publishes until JetStream acknowledges; `false` if shutdown interrupted.
async fn publish(
    context: &jetstream::Context,
    prefix: &str,
    delivery: Delivery,
    stop: &CancellationToken,
) -> bool {
    let subject = subject_for(prefix, &delivery.text);
    let headers = msg_id(&delivery);
    let payload = bytes::Bytes::from(delivery.text.into_bytes());
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let sent = async {
            let ack = context
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(ACK_TIMEOUT, ack)
                .await
                .map_err(|_| "no acknowledgement in time".to_owned())?
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::select! {
            () = stop.cancelled() => return false,
            r = sent => r,
        };
        match outcome {
            Ok(ack) => {
                if ack.duplicate {
                    tracing::debug!(id = delivery.id.0, "JetStream already held this event.");
                }
                return true;
            }
            Err(error) => {
                tracing::info!(id = delivery.id.0, %error, attempt, "Publishing to NATS failed; retrying.");
            }
        }
        if !super::wait_to_retry(attempt, stop).await {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_go_under_their_collection_and_identities_under_identity() {
        let record = r#"{"id":7,"type":"record","record":{"live":true,"did":"did:plc:a","rev":"r","collection":"app.bsky.feed.post","rkey":"k","action":"create","cid":"c","record":{"text":"hi"}}}"#;
        assert_eq!(subject_for("tap", record), "tap.record.app.bsky.feed.post");
        let identity = r#"{"id":8,"type":"identity","identity":{"did":"did:plc:a","handle":"a.test","is_active":true,"status":"active"}}"#;
        assert_eq!(subject_for("x.y", identity), "x.y.identity");
        assert_eq!(subject_for("tap", r#"{"type":"a.b"}"#), "tap.other");
        assert_eq!(subject_for("tap", "not json"), "tap.other");
    }
}
