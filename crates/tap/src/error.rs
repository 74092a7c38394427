//! Start-up and fatal errors of the whole process. Each displays as one line that says what
//! failed and where; `main` logs it and exits non-zero.

use crate::store::StoreError;

/// Why tap could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The database could not be opened or migrated.
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    /// A listener could not be bound (port in use, bad address, permission).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which server.
        what: &'static str,
        /// The address as configured.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An HTTP client could not be built (TLS roots, system configuration).
    #[error("cannot start {what}: {reason}")]
    HttpClient {
        /// Which component.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The identity resolver could not be built (TLS, system configuration).
    #[error("cannot start identity resolution: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    /// NATS delivery could not start (server unreachable, stream unusable).
    #[error(transparent)]
    Nats(#[from] crate::delivery::nats::NatsError),
    /// A long-running task panicked or stopped on its own.
    #[error("{0}")]
    Task(crate::shutdown::TaskFailure),
    /// An HTTP server task ended (panicked) while tap was running.
    #[error("{what} server failed: {reason}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// What happened to it.
        reason: String,
    },
}
