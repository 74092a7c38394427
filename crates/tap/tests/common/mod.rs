//! Test harness: runs the real `App` in-process on 127.0.0.1:0 against a fresh database of
//! either backend. PostgreSQL tests use `TAP_TEST_POSTGRES_URL` (a server URL whose user may
//! create databases); each test gets its own database, dropped afterwards.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use tap::Config;
use tap::store::DatabaseUrl;
use tap_testkit::postgres::TestPostgres;
use tokio::sync::oneshot;

/// Which store backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: DatabaseUrl,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<TestPostgres>,
}

impl TestDb {
    /// A PostgreSQL database the test manages itself (its own cluster).
    pub fn external_postgres(url: String) -> Self {
        Self {
            url: DatabaseUrl::Postgres(url),
            backend: Backend::Postgres,
            _dir: None,
            _pg: None,
        }
    }

    /// Which backend this database is on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A fresh database, or `None` (with a notice) when PostgreSQL is not configured outside
    /// CI. Under `CI=true` a missing PostgreSQL fails the test.
    pub async fn new(backend: Backend) -> Option<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("tap.db");
                Some(Self {
                    url: DatabaseUrl::Sqlite(path.to_string_lossy().into_owned()),
                    backend,
                    _dir: Some(dir),
                    _pg: None,
                })
            }
            Backend::Postgres => {
                let pg = TestPostgres::create().await?;
                Some(Self {
                    url: DatabaseUrl::Postgres(pg.url().to_owned()),
                    backend,
                    _dir: None,
                    _pg: Some(pg),
                })
            }
        }
    }
}

/// Test defaults: loopback port 0, nothing that reaches the internet (the relay and PLC
/// point at a closed port; sync-engine tests point them at fakes).
pub fn test_config(db: &TestDb) -> Config {
    let mut cfg = Config::defaults();
    cfg.bind = "127.0.0.1:0".into();
    cfg.database = db.url.clone();
    cfg.relay_url = url::Url::parse("http://127.0.0.1:1").unwrap();
    cfg.plc_url = url::Url::parse("http://127.0.0.1:1").unwrap();
    // Handles are never looked up in public DNS/HTTPS from tests: point this at a fake
    // (`FakePlc::url()` or the localnet PDS) to verify them; here they come out handle.invalid.
    cfg.handle_resolver_url = Some(url::Url::parse("http://127.0.0.1:1").unwrap());
    // Every fake PDS and the local network live on loopback, which tap otherwise refuses
    // for hosts learned from DID documents (`netguard`; `tests/netguard.rs` tests that).
    cfg.allow_private_network = true;
    cfg
}

/// [`test_config`] without the sync engine (`--outbox-only`): for API tests that must not
/// race a resync worker claiming the repos they add.
pub fn api_only_config(db: &TestDb) -> Config {
    let mut cfg = test_config(db);
    cfg.outbox_only = true;
    cfg
}

/// A running tap.
pub struct TestTap {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub store: tap::store::Store,
    /// The producers' handle on the outbox (tests append events through it).
    pub outbox: tap::outbox::Outbox,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tap::AppError>>,
}

impl TestTap {
    pub async fn start(config: Config) -> Self {
        let app = tap::App::bind(config).await.expect("tap starts");
        let addr = app.local_addr().unwrap();
        let metrics_addr = app.metrics_addr();
        let store = app.store().clone();
        let outbox = app.outbox();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            metrics_addr,
            store,
            outbox,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests shutdown and waits for a clean stop.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("tap stops within 30 s")
            .unwrap()
            .expect("tap stops cleanly");
    }
}

/// Runs one async scenario on both backends as two tests named `<name>::sqlite` and
/// `<name>::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $scenario:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::common::TestDb::new($crate::common::Backend::Sqlite)
                    .await
                    .unwrap();
                super::$scenario(db).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(db) =
                    $crate::common::TestDb::new($crate::common::Backend::Postgres).await
                {
                    super::$scenario(db).await;
                }
            }
        }
    };
}
