//! Headless Chromium (Debian's `chromium` package, never a downloaded build) driven over the
//! DevTools protocol: enough to load a page, run JavaScript in it, send headers with every
//! request and collect what the console reported. Host resolution is pinned so the browser
//! can reach nothing but loopback.

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long launching and each protocol command may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why the browser could not be driven.
#[derive(Debug)]
pub struct BrowserError(pub String);

impl std::fmt::Display for BrowserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BrowserError {}

fn fail(what: impl std::fmt::Display) -> BrowserError {
    BrowserError(what.to_string())
}

/// The Chromium binary: `TAP_TEST_CHROMIUM`, else `chromium` on the `PATH`.
#[must_use]
pub fn binary() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("TAP_TEST_CHROMIUM") {
        return Some(path.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    })
}

/// One headless Chromium with one page, killed on drop.
pub struct Browser {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Console errors, uncaught exceptions and error log entries, as text.
    errors: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium and opens a blank page.
    ///
    /// # Errors
    /// The binary is missing or does not start, or the protocol fails.
    pub async fn launch() -> Result<Self, BrowserError> {
        let binary = binary().ok_or_else(|| fail("chromium is not installed"))?;
        let profile = tempfile::tempdir().map_err(fail)?;
        let mut child = Command::new(&binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-domain-reliability",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-client-side-phishing-detection",
                "--no-proxy-server",
                // Nothing but loopback can be resolved, whatever the browser tries.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("{}: {e}", binary.display())))?;
        let stderr = child.stderr.take().ok_or_else(|| fail("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| fail("chromium did not announce its DevTools endpoint"))?;
        // Keep draining stderr so the browser never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(fail)?;
        let mut browser = Self {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            errors: Vec::new(),
            _profile: profile,
        };
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| fail("no session"))?
            .to_owned();
        for domain in [
            "Runtime.enable",
            "Log.enable",
            "Page.enable",
            "Network.enable",
        ] {
            browser.call(domain, json!({})).await?;
        }
        Ok(browser)
    }

    /// Sends one protocol command (to the page once attached) and waits for its result,
    /// recording console errors that arrive meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(fail)?;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| fail(format!("{method}: no answer")))?
                .ok_or_else(|| fail("the browser closed the connection"))?
                .map_err(fail)?;
            let Message::Text(text) = frame else { continue };
            let value: Value = serde_json::from_str(&text).map_err(fail)?;
            if value["id"] == id {
                if let Some(error) = value.get("error") {
                    return Err(fail(format!("{method}: {error}")));
                }
                return Ok(value["result"].clone());
            }
            self.observe(&value);
        }
    }

    fn observe(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
                self.errors
                    .push(format!("console.error: {}", params["args"]));
            }
            Some("Runtime.exceptionThrown") => {
                self.errors
                    .push(format!("exception: {}", params["exceptionDetails"]));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.errors
                    .push(format!("log: {}", params["entry"]["text"]));
            }
            _ => {}
        }
    }

    /// Sends `headers` with every request the page makes from now on.
    ///
    /// # Errors
    /// The protocol failed.
    pub async fn set_headers(&mut self, headers: Value) -> Result<(), BrowserError> {
        self.call("Network.setExtraHTTPHeaders", json!({"headers": headers}))
            .await
            .map(drop)
    }

    /// Loads `url` in the page.
    ///
    /// # Errors
    /// The protocol failed or the navigation was refused.
    pub async fn navigate(&mut self, url: &str) -> Result<(), BrowserError> {
        let result = self.call("Page.navigate", json!({"url": url})).await?;
        match result.get("errorText") {
            Some(error) => Err(fail(format!("navigating to {url}: {error}"))),
            None => Ok(()),
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    ///
    /// # Errors
    /// The protocol failed or the expression threw.
    pub async fn eval(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(details) = result.get("exceptionDetails") {
            return Err(fail(format!("{expression}: {details}")));
        }
        Ok(result["result"]["value"].clone())
    }

    /// What the page reported as errors so far (console, uncaught exceptions, log).
    #[must_use]
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Closes the browser.
    pub async fn close(mut self) {
        let _ = self.call("Browser.close", json!({})).await;
        let _ = tokio::time::timeout(TIMEOUT, self.child.wait()).await;
    }
}
