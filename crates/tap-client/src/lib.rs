//! A client for [tap](https://github.com/example/tap-rs): the events it delivers as Rust
//! types, a `/channel` consumer, its admin API, and the check of its webhook signatures.
//!
//! ```no_run
//! use tap_client::{Channel, Event};
//!
//! # async fn run() -> Result<(), tap_client::ClientError> {
//! let channel = Channel::new("http://127.0.0.1:2480".parse().unwrap(), Some("s3cret".into()));
//! channel
//!     .consume(
//!         |event: Event| async move {
//!             println!("{} {:?}", event.id, event.body);
//!             Ok::<(), std::convert::Infallible>(()) // acked once this returns Ok
//!         },
//!         std::future::pending::<()>(),
//!     )
//!     .await
//! # }
//! ```
//!
//! Delivery is at least once: an event is acked only after the handler returned `Ok`, and
//! one whose ack did not reach tap (the connection dropped, tap restarted) comes again, so
//! handlers should be idempotent (an event's `id` is stable).

mod admin;
mod channel;
mod event;
pub mod webhook;

pub use admin::Admin;
pub use channel::Channel;
pub use event::{Action, Event, EventBody, IdentityEvent, RecordEvent};

/// What went wrong talking to tap.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL given cannot be used.
    #[error("bad tap URL: {0}")]
    Url(String),
    /// tap refused the credentials (401): retrying will not help.
    #[error("tap refused the admin password")]
    Unauthorized,
    /// tap answered an API call with an error status.
    #[error("tap answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its body.
        message: String,
    },
    /// The request failed on the way.
    #[error("request to tap failed: {0}")]
    Http(#[from] reqwest::Error),
    /// A frame from tap was not an event this client knows.
    #[error("unreadable event: {0}")]
    Event(String),
}
