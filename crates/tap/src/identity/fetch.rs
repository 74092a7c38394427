//! The identity HTTP client: one `reqwest` client with a request timeout, a `tap/<version>`
//! User-Agent and bodies read as a stream under a byte cap (never whole, then checked).

use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{ACCEPT, HOST};
use url::Url;

use crate::ledger::{Ledger, Source};
use crate::netguard;

use super::IdentityError;

/// Connecting may take at most this long (within the overall request timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirects followed (PLC mirrors and did:web hosts may redirect; loops must end).
const MAX_REDIRECTS: usize = 5;

/// What a GET produced: a 200 body within the cap, or another status (its body discarded).
#[derive(Debug)]
pub(super) enum Reply {
    /// HTTP 200 with its body.
    Ok(Vec<u8>),
    /// Any other status.
    Status(u16),
}

/// The shared HTTP client of the identity module.
#[derive(Debug, Clone)]
pub(super) struct Http {
    /// For the PLC directory and the handle resolver the operator configured.
    client: reqwest::Client,
    /// For hosts the network names (`did:web` hosts, handles' well-known files): only
    /// public addresses unless `--allow-private-network` (crate::netguard).
    guarded: reqwest::Client,
    /// Test-only: where `https://{host}/…` requests go instead, over plain HTTP.
    loopback_web: Option<SocketAddr>,
    ledger: Ledger,
    /// Requests to this host are PLC bytes in the ledger; others are handle resolution.
    plc_host: Option<String>,
}

impl Http {
    /// Builds the client. `loopback_web` must be a loopback address (checked by the caller).
    pub(super) fn new(
        timeout: Duration,
        loopback_web: Option<SocketAddr>,
        ledger: Ledger,
        plc_url: &Url,
        allow_private_network: bool,
    ) -> Result<Self, IdentityError> {
        let builder = || {
            reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(CONNECT_TIMEOUT.min(timeout))
                .user_agent(concat!("tap/", env!("CARGO_PKG_VERSION")))
        };
        let client = builder()
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .build()
            .map_err(|e| IdentityError::Setup(error_chain(&e)))?;
        // The test-only loopback override sends web look-ups to loopback on purpose.
        let allow_private = allow_private_network || loopback_web.is_some();
        let guarded = netguard::guard(builder(), allow_private)
            .build()
            .map_err(|e| IdentityError::Setup(error_chain(&e)))?;
        Ok(Self {
            client,
            guarded,
            loopback_web,
            ledger,
            plc_host: plc_url.host_str().map(str::to_owned),
        })
    }

    /// `GET url`, reading at most `limit` bytes of a 200 body.
    pub(super) async fn get(&self, url: &Url, limit: usize) -> Result<Reply, IdentityError> {
        let request = self
            .client
            .get(url.clone())
            .header(ACCEPT, "application/json");
        let source = if url.host_str() == self.plc_host.as_deref() {
            Source::Plc
        } else {
            Source::WellKnown
        };
        self.send(
            request,
            url.as_str(),
            (source, url.host_str().unwrap_or_default()),
            limit,
        )
        .await
    }

    /// `GET https://{host}{path}` (a did:web document or a handle's well-known file), reading
    /// at most `limit` bytes. With the test-only loopback override the request goes over
    /// plain HTTP to that address, carrying `host` in the `Host` header.
    pub(super) async fn get_https(
        &self,
        host: &str,
        path: &str,
        limit: usize,
    ) -> Result<Reply, IdentityError> {
        let shown = format!("https://{host}{path}");
        let request = match self.loopback_web {
            None => {
                let url = Url::parse(&shown).map_err(|e| IdentityError::Transport {
                    url: shown.clone(),
                    message: e.to_string(),
                })?;
                self.guarded.get(url)
            }
            Some(addr) => self
                .guarded
                .get(format!("http://{addr}{path}"))
                .header(HOST, host),
        };
        self.send(request, &shown, (Source::WellKnown, host), limit)
            .await
    }

    /// Sends `request` and reads at most `limit` bytes of a 200 body, counting what it reads
    /// in the ledger under `(source, host)`.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
        (source, host): (Source, &str),
        limit: usize,
    ) -> Result<Reply, IdentityError> {
        let mut response = request.send().await.map_err(|e| classify(url, &e))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Ok(Reply::Status(status));
        }
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(IdentityError::TooLarge {
                url: url.to_owned(),
                limit,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| classify(url, &e))? {
            self.ledger
                .downloaded(source, Some(host), chunk.len() as u64);
            if body.len() + chunk.len() > limit {
                return Err(IdentityError::TooLarge {
                    url: url.to_owned(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply::Ok(body))
    }
}

fn classify(url: &str, e: &reqwest::Error) -> IdentityError {
    if e.is_timeout() {
        IdentityError::Timeout {
            url: url.to_owned(),
        }
    } else {
        IdentityError::Transport {
            url: url.to_owned(),
            message: error_chain(e),
        }
    }
}

/// An error and its causes on one line (reqwest's own message omits the cause).
fn error_chain(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
