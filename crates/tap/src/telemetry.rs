//! Logs and metrics in one house style: JSON log lines on stdout, Prometheus metric names
//! as constants here with their descriptions, rendered at `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::LogLevel;

/// Build information, always 1, labelled with the version.
pub const BUILD_INFO: &str = "tap_build_info";

/// Events written to a consumer (WebSocket frame or webhook 2xx), resends included.
pub const EVENTS_DELIVERED: &str = "tap_events_delivered_total";
/// Events the consumer is done with (ack, fire-and-forget write, webhook 2xx).
pub const EVENTS_ACKED: &str = "tap_events_acked_total";
/// Unacked events sent again after the retry timeout.
pub const EVENTS_REDELIVERED: &str = "tap_events_redelivered_total";
/// Events queued or in flight in the outbox actor.
pub const OUTBOX_HELD: &str = "tap_outbox_events_held";
/// Age of the oldest unacked event held by the outbox actor.
pub const OUTBOX_OLDEST_UNACKED_SECONDS: &str = "tap_outbox_oldest_unacked_seconds";
/// Connected `/channel` sessions.
pub const CHANNEL_SESSIONS: &str = "tap_channel_sessions";
/// Webhook requests by outcome (`success`, `non_2xx`, `rejected`, `error`).
pub const WEBHOOK_REQUESTS: &str = "tap_webhook_requests_total";
/// Webhook retries by cause (`non_2xx`, `rejected`, `error`).
pub const WEBHOOK_RETRIES: &str = "tap_webhook_retries_total";
/// Identity fetches by outcome (`ok`, `handle_invalid`, `not_found`, `error`).
pub const IDENTITY_LOOKUPS: &str = "tap_identity_lookups_total";
/// Identity cache requests by result (`hit`, `miss`; a look-up joining one in flight is a hit).
pub const IDENTITY_CACHE: &str = "tap_identity_cache_requests_total";

/// DIDs newly added by enumeration.
pub const CRAWLER_REPOS_DISCOVERED: &str = "tap_crawler_repos_discovered_total";

/// Firehose commits that passed verification.
pub const COMMITS_VERIFIED: &str = "tap_commits_verified_total";
/// Firehose commits (and syncs) that failed verification, by reason.
pub const COMMITS_REJECTED: &str = "tap_commits_rejected_total";

/// Firehose events handled, by outcome.
pub const FIREHOSE_EVENTS: &str = "tap_firehose_events_total";
/// Firehose reconnects.
pub const FIREHOSE_RECONNECTS: &str = "tap_firehose_reconnects_total";
/// Frames that could not be decoded.
pub const FIREHOSE_BAD_FRAMES: &str = "tap_firehose_bad_frames_total";
/// Seconds between the latest event's time and now.
pub const FIREHOSE_LAG_SECONDS: &str = "tap_firehose_lag_seconds";
/// Seq of the latest frame read.
pub const FIREHOSE_LAST_SEQ: &str = "tap_firehose_last_seq";
/// Bytes downloaded, by source (`relay`, or a PDS host).
pub const BYTES_DOWNLOADED: &str = "tap_bytes_downloaded_total";
/// Record bytes downloaded, by fate (`delivered`: kept by the filters, `discarded`).
pub const RECORD_BYTES: &str = "tap_record_bytes_total";
/// Resync fetches, by kind (`full`, `since`, `sparse`, `skipped`).
pub const RESYNC_FETCHES: &str = "tap_resync_fetches_total";
/// Partial fetches (`kind`: `since`, `sparse`) refused (missing or lying blocks, bad tree)
/// and redone in full.
pub const SPARSE_FALLBACKS: &str = "tap_sparse_fallbacks_total";

/// Resyncs started.
pub const RESYNCS_STARTED: &str = "tap_resyncs_started_total";
/// Resyncs completed.
pub const RESYNCS_COMPLETED: &str = "tap_resyncs_completed_total";
/// Resyncs failed (rate limits included).
pub const RESYNCS_FAILED: &str = "tap_resyncs_failed_total";
/// Resyncs put off because their PDS host had its share already (not counted as started).
pub const RESYNCS_HOST_BUSY: &str = "tap_resyncs_host_busy_total";
/// Resync durations.
pub const RESYNC_DURATION_SECONDS: &str = "tap_resync_duration_seconds";

/// Time a producer waited for room on an internal channel, by channel.
pub const CHANNEL_SEND_WAIT_SECONDS: &str = "tap_channel_send_wait_seconds";
/// Messages queued on an internal channel after the latest send, by channel.
pub const CHANNEL_DEPTH: &str = "tap_channel_depth";

/// The Go tap's names (original-behaviour §10), kept so existing dashboards work. Each is
/// counted where the original counted it, beside tap's own metrics.
pub mod original {
    /// Every firehose frame read.
    pub const FIREHOSE_EVENTS_RECEIVED: &str = "tap_firehose_events_received_total";
    /// Firehose events applied, tracked or desynchronized (not skipped).
    pub const FIREHOSE_EVENTS_PROCESSED: &str = "tap_firehose_events_processed_total";
    /// Firehose events skipped, buffering for a resync included.
    pub const FIREHOSE_EVENTS_SKIPPED: &str = "tap_firehose_events_skipped_total";
    /// Events held in memory by the outbox.
    pub const EVENT_CACHE_SIZE: &str = "tap_event_cache_size";
    /// indigo's stream library: frames received.
    pub const REPO_STREAM_EVENTS_RECEIVED: &str = "indigo_repo_stream_events_received_total";
    /// indigo's stream library: frame bytes received.
    pub const REPO_STREAM_BYTES: &str = "indigo_repo_stream_bytes_total";
    /// indigo's identity directory: cache hits.
    pub const IDENTITY_CACHE_HITS: &str = "atproto_directory_identity_cache_hits";
    /// indigo's identity directory: cache misses.
    pub const IDENTITY_CACHE_MISSES: &str = "atproto_directory_identity_cache_misses";
}

/// Sends `msg` on a bounded channel, recording how long the sender waited for room
/// ([`CHANNEL_SEND_WAIT_SECONDS`]) and how many messages are queued after
/// ([`CHANNEL_DEPTH`]): where a slow stage holds the pipeline back.
///
/// # Errors
/// The receiver is gone.
pub async fn send_measured<T>(
    channel: &'static str,
    tx: &tokio::sync::mpsc::Sender<T>,
    msg: T,
) -> Result<(), tokio::sync::mpsc::error::SendError<T>> {
    let started = std::time::Instant::now();
    let sent = tx.send(msg).await;
    record_channel(channel, started, tx.max_capacity() - tx.capacity());
    sent
}

/// Records one send on `channel` that began at `started` and left `depth` queued.
pub fn record_channel(channel: &'static str, started: std::time::Instant, depth: usize) {
    metrics::histogram!(CHANNEL_SEND_WAIT_SECONDS, "channel" => channel)
        .record(started.elapsed().as_secs_f64());
    metrics::gauge!(CHANNEL_DEPTH, "channel" => channel).set(depth as f64);
}

/// Installs the JSON log subscriber on stdout. Later calls (tests starting several apps
/// in one process) keep the first subscriber.
pub fn init_logging(level: LogLevel) {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_target(false)
        .with_max_level(level.as_tracing())
        .with_writer(std::io::stdout)
        .try_init();
}

/// The process-wide Prometheus recorder (installed once) and its handle for rendering.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Buckets as the Go tap: 0.1 s doubling, 12 buckets (without them the exporter
            // renders histograms as summaries).
            let buckets: Vec<f64> = (0..12).map(|i| 0.1 * f64::from(1u32 << i)).collect();
            // Channel waits: 10 µs to ~5 s, ×4.
            let waits: Vec<f64> = (0..10).map(|i| 1e-5 * f64::from(1u32 << (2 * i))).collect();
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(RESYNC_DURATION_SECONDS.to_owned()),
                    &buckets,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            CHANNEL_SEND_WAIT_SECONDS.to_owned(),
                        ),
                        &waits,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a test harness); the
            // handle then renders an empty registry, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(BUILD_INFO, "Always 1; labelled with the tap version.");
    metrics::describe_counter!(
        EVENTS_DELIVERED,
        "Events written to a consumer, resends included."
    );
    metrics::describe_counter!(EVENTS_ACKED, "Events the consumer is done with.");
    metrics::describe_counter!(
        EVENTS_REDELIVERED,
        "Unacked events sent again after the retry timeout."
    );
    metrics::describe_gauge!(OUTBOX_HELD, "Events queued or in flight in the outbox.");
    metrics::describe_gauge!(
        OUTBOX_OLDEST_UNACKED_SECONDS,
        "Age of the oldest unacked event."
    );
    metrics::describe_gauge!(CHANNEL_SESSIONS, "Connected /channel sessions.");
    metrics::describe_counter!(WEBHOOK_REQUESTS, "Webhook requests by outcome.");
    metrics::describe_counter!(WEBHOOK_RETRIES, "Webhook retries by cause.");
    metrics::describe_counter!(IDENTITY_LOOKUPS, "Identity fetches by outcome.");
    metrics::describe_counter!(IDENTITY_CACHE, "Identity cache requests by result.");
    metrics::describe_counter!(CRAWLER_REPOS_DISCOVERED, "DIDs newly added by enumeration.");
    metrics::describe_counter!(
        COMMITS_VERIFIED,
        "Firehose commits that passed verification."
    );
    metrics::describe_counter!(
        COMMITS_REJECTED,
        "Firehose commits that failed verification, by reason."
    );
    metrics::describe_counter!(FIREHOSE_EVENTS, "Firehose events handled, by outcome.");
    metrics::describe_counter!(FIREHOSE_RECONNECTS, "Firehose reconnects.");
    metrics::describe_counter!(FIREHOSE_BAD_FRAMES, "Frames that could not be decoded.");
    metrics::describe_gauge!(
        FIREHOSE_LAG_SECONDS,
        "Seconds between the latest event's time and now."
    );
    metrics::describe_gauge!(FIREHOSE_LAST_SEQ, "Seq of the latest frame read.");
    metrics::describe_counter!(BYTES_DOWNLOADED, "Bytes downloaded, by source.");
    metrics::describe_counter!(
        RESYNC_FETCHES,
        "Resync fetches, by kind: full, since, sparse, skipped."
    );
    metrics::describe_counter!(
        SPARSE_FALLBACKS,
        "Partial fetches, by kind (since, sparse), refused (missing or lying blocks, bad tree) and redone in full."
    );
    metrics::describe_counter!(
        RECORD_BYTES,
        "Record bytes downloaded, by fate: delivered (kept by the filters) or discarded."
    );
    metrics::describe_counter!(RESYNCS_STARTED, "Resyncs started.");
    metrics::describe_counter!(RESYNCS_COMPLETED, "Resyncs completed.");
    metrics::describe_counter!(RESYNCS_FAILED, "Resyncs failed, rate limits included.");
    metrics::describe_counter!(
        RESYNCS_HOST_BUSY,
        "Resyncs put off because their PDS host had --resync-parallelism-per-host already."
    );
    metrics::describe_histogram!(RESYNC_DURATION_SECONDS, "Resync durations.");
    metrics::describe_histogram!(
        CHANNEL_SEND_WAIT_SECONDS,
        "Time a producer waited for room on an internal channel, by channel."
    );
    metrics::describe_gauge!(
        CHANNEL_DEPTH,
        "Messages queued on an internal channel after the latest send, by channel."
    );
    metrics::describe_counter!(
        original::FIREHOSE_EVENTS_RECEIVED,
        "Firehose frames read (the Go tap's name)."
    );
    metrics::describe_counter!(
        original::FIREHOSE_EVENTS_PROCESSED,
        "Firehose events applied, tracked or desynchronized (the Go tap's name)."
    );
    metrics::describe_counter!(
        original::FIREHOSE_EVENTS_SKIPPED,
        "Firehose events skipped or buffered (the Go tap's name)."
    );
    metrics::describe_gauge!(
        original::EVENT_CACHE_SIZE,
        "Events held in memory by the outbox (the Go tap's name)."
    );
    metrics::describe_counter!(
        original::REPO_STREAM_EVENTS_RECEIVED,
        "Firehose frames received (indigo's name)."
    );
    metrics::describe_counter!(
        original::REPO_STREAM_BYTES,
        "Firehose bytes received (indigo's name)."
    );
    metrics::describe_counter!(
        original::IDENTITY_CACHE_HITS,
        "Identity cache hits (indigo's name)."
    );
    metrics::describe_counter!(
        original::IDENTITY_CACHE_MISSES,
        "Identity cache misses (indigo's name)."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}
