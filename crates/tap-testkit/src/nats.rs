//! A `nats-server -js` of a test's own (Debian's `nats-server`), on a free loopback port
//! with its store in a temporary directory, that the test can stop and start again on the
//! same port and store: for what must survive a NATS restart.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running (or stopped) server. Dropping it kills the process.
pub struct NatsServer {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    ///
    /// # Errors
    /// `nats-server` is missing or does not come up within 10 s.
    pub async fn start() -> std::io::Result<Self> {
        // A free port: bound and released; the server takes it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = Self {
            port,
            store: tempfile::tempdir()?,
            child: None,
        };
        server.start_again().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: nothing is flushed on the way out).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(std::io::Error::other("nats-server did not come up in 10 s"))
    }
}
