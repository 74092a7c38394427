//! The subcommands that talk to a running tap over its HTTP API: `tap healthcheck`,
//! `tap status` and `tap repos …`. One small client, the same auth as any API caller, and
//! exit codes scripts can rely on.

pub mod healthcheck;
pub mod repos;
pub mod status;

use serde_json::Value;
use url::Url;

use crate::api::basic_header;
use crate::config::Remote;

/// Why a request to tap did not give an answer the command can use.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No answer: connection refused, timeout, DNS…
    #[error("{url}: no answer: {reason}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why there was no answer.
        reason: String,
    },
    /// tap answered with an error status.
    #[error("{url}: {status}: {message}")]
    Refused {
        /// What was asked.
        url: String,
        /// The HTTP status.
        status: u16,
        /// tap's `message`, or the start of the body.
        message: String,
    },
    /// tap answered something that is not what the API documents.
    #[error("{url}: unexpected answer: {reason}")]
    BadAnswer {
        /// What was asked.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl RemoteError {
    /// Whether the command could not talk to tap at all (unreachable, wrong password, not
    /// a tap) rather than tap refusing the request: exit status 2 instead of 1.
    #[must_use]
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::BadAnswer { .. } => true,
            Self::Refused { status, .. } => *status == 401,
        }
    }
}

/// An HTTP client for one tap.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    authorization: Option<String>,
}

impl Client {
    /// A client for `remote`.
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(remote: &Remote) -> Result<Self, RemoteError> {
        let http = reqwest::Client::builder()
            .timeout(remote.timeout)
            .build()
            .map_err(|e| RemoteError::Unreachable {
                url: remote.url.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base: remote.url.clone(),
            authorization: remote
                .admin_password
                .as_ref()
                .map(|p| basic_header("admin", p)),
        })
    }

    fn url(&self, path: &str) -> Result<Url, RemoteError> {
        self.base.join(path).map_err(|e| RemoteError::BadAnswer {
            url: format!("{}{path}", self.base),
            reason: e.to_string(),
        })
    }

    /// GETs `path` (with its query) and returns the JSON answer.
    ///
    /// # Errors
    /// See [`RemoteError`].
    pub async fn get(&self, path: &str) -> Result<Value, RemoteError> {
        let url = self.url(path)?;
        let request = self.http.get(url.clone());
        self.send(url, request)
            .await?
            .ok_or_else(|| RemoteError::BadAnswer {
                url: path.to_owned(),
                reason: "empty body".into(),
            })
    }

    /// POSTs `body` as JSON to `path`; the JSON answer, `None` for an empty one.
    ///
    /// # Errors
    /// See [`RemoteError`].
    pub async fn post(&self, path: &str, body: &Value) -> Result<Option<Value>, RemoteError> {
        let url = self.url(path)?;
        let request = self.http.post(url.clone()).json(body);
        self.send(url, request).await
    }

    async fn send(
        &self,
        url: Url,
        mut request: reqwest::RequestBuilder,
    ) -> Result<Option<Value>, RemoteError> {
        if let Some(auth) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let unreachable = |e: reqwest::Error| RemoteError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.text().await.map_err(unreachable)?;
        let parsed = if body.trim().is_empty() {
            None
        } else {
            Some(
                serde_json::from_str::<Value>(&body).map_err(|e| RemoteError::BadAnswer {
                    url: url.to_string(),
                    reason: format!("{status}: not JSON: {e}"),
                })?,
            )
        };
        if status.is_success() {
            return Ok(parsed);
        }
        let message = parsed
            .as_ref()
            .and_then(|v| v["message"].as_str())
            .map_or_else(|| body.chars().take(200).collect(), str::to_owned);
        Err(RemoteError::Refused {
            url: url.to_string(),
            status: status.as_u16(),
            message,
        })
    }
}

/// Runs `f` on a fresh single-threaded runtime: the subcommands are one-shot programs.
///
/// # Errors
/// The runtime could not start, or `f`'s error.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(f)
}
