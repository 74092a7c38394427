//! tap: sync a chosen slice of the AT Protocol network for an application.
//!
//! Module map (data flows top to bottom; docs/architecture.md has the diagram):
//! - [`config`]: the command line and `TAP_*` environment, parsed once into types.
//! - [`app`]: wiring of every stage, task and channel; the shutdown order.
//! - [`firehose`]: the relay's `subscribeRepos`, decoded into jobs for the live workers.
//! - [`jetstream`]: or Jetstream, its per-operation claims grouped into commits and
//!   proven against each PDS (`--jetstream-url`).
//! - [`live`]: what both share: per-DID ordered workers and the cursor as a low-water mark.
//! - [`repos`]: the tracked-repo state machine (pure decisions + one transaction each).
//! - [`resync`]: whole-repo fetch, verification, diff and cutover.
//! - [`crawler`]: discovering repos to track (signal collections, full network).
//! - [`identity`]: DID → signing key, PDS and verified handle, cached.
//! - [`outbox`]: the durable event queue, per-DID ordering, acks, back-pressure.
//! - [`delivery`]: `/channel` WebSocket sessions and webhook workers.
//! - [`wire`]: the JSON events consumers receive (the public contract).
//! - [`api`]: the HTTP surface (`/health`, `/channel`, `/repos/*`, `/info`, `/stats/*`).
//! - [`store`]: SQLite and PostgreSQL state: repos, record index, outbox, cursors.
//! - [`status`]: live counters, the `/status.json` document and its diagnoses.
//! - [`remote`]: `tap healthcheck`, `tap status`, `tap repos …`: clients of a running tap.
//! - [`telemetry`]: JSON logs and Prometheus metrics.
//! - [`shutdown`]: cancellation tree and deadlines.

pub mod api;
pub mod app;
pub mod backoff;
pub mod config;
pub mod crawler;
pub mod delivery;
pub mod error;
pub mod failpoint;
pub mod firehose;
pub mod identity;
pub mod jetstream;
pub mod ledger;
pub mod live;
pub mod netguard;
pub mod outbox;
pub mod remote;
pub mod repos;
pub mod resync;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod wire;

pub use app::App;
pub use config::Config;
pub use error::AppError;
