//! PostgreSQL as a running server does it, against throwaway clusters these tests start
//! themselves (Debian's PostgreSQL binaries; a certificate authority and server certificate
//! made with `openssl` for the test):
//! - over TLS (`hostssl` only in `pg_hba.conf`, so a plaintext connection is refused): every
//!   `sslmode` connects or is refused as libpq's would, and the refusals say why;
//! - restarted in the middle of a backfill: every record is still delivered.
//!
//! Without the binaries (or not root, so the cluster cannot be run as `postgres`) the test
//! prints a skip notice; under `CI=true` it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[macro_use]
mod common;
mod sync_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{TestDb, TestTap};
use tap::store::{Store, StoreOptions};
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Consumer, Net, did, expected};

/// A PostgreSQL cluster in a temporary directory, stopped on drop.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA (`<name>-ca.pem`) and, with `server`, a certificate it signs for `localhost` only
/// (`server.pem`, `server.key`): connecting by address is a name mismatch.
fn certificates(dir: &Path, name: &str, server: bool) {
    let p = |f: &str| dir.join(f);
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
        ])
        .arg(p(&format!("{name}-ca.key")))
        .arg("-out")
        .arg(p(&format!("{name}-ca.pem"))));
    if !server {
        return;
    }
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("san.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p(&format!("{name}-ca.pem")))
        .arg("-CAkey")
        .arg(p(&format!("{name}-ca.key")))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(p("san.ext"))
        .arg("-out")
        .arg(p("server.pem")));
}

impl Cluster {
    /// Starts a cluster that accepts connections from 127.0.0.1, only over TLS if
    /// `tls_only`; `None` when it cannot run here (and CI is not set).
    fn start(tls_only: bool) -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).max())
            .filter(|b| b.join("initdb").is_file());
        let root = rustix_is_root();
        let (Some(bin), true) = (bin, root) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but PostgreSQL's binaries or root are missing for the TLS cluster"
            );
            eprintln!("skipping: no PostgreSQL binaries, or not root");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        certificates(&certs, "trusted", true);
        certificates(&certs, "other", false);
        run(Command::new("chown")
            .arg("-R")
            .arg("postgres")
            .arg(dir.path()));
        run(Command::new("chmod").arg("755").arg(dir.path()));
        run(Command::new("chmod")
            .arg("600")
            .arg(certs.join("server.key")));
        run(as_postgres(&bin, "initdb")
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&data));
        let port = free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.path().display(),
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        );
        let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        pg_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pg_conf).unwrap();
        let hba = if tls_only { "hostssl" } else { "host" };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("{hba} all all 127.0.0.1/32 trust\n"),
        )
        .unwrap();
        let cluster = Self { dir, bin, port };
        cluster.pg_ctl("start");
        Some(cluster)
    }

    /// `pg_ctl <action>` on the cluster, waiting for it to finish.
    fn pg_ctl(&self, action: &str) {
        run(as_postgres(&self.bin, "pg_ctl")
            .args(["-w", "-m", "fast", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .arg(action));
    }

    fn cert(&self, name: &str) -> String {
        self.dir
            .path()
            .join("certs")
            .join(name)
            .to_string_lossy()
            .into_owned()
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres{query}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .output();
    }
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn open(url: &str) -> Result<Store, String> {
    Store::open(
        &tap::store::DatabaseUrl::Postgres(url.to_owned()),
        StoreOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_connects_and_checks_the_certificate_as_sslmode_says() {
    let Some(cluster) = Cluster::start(true) else {
        return;
    };
    let ca = cluster.cert("trusted-ca.pem");
    let other = cluster.cert("other-ca.pem");

    // Verified end to end: the chain to the given root and the host name. The store
    // works over it (migrations ran; a write reads back).
    let store = open(&cluster.url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    assert_eq!(
        store.add_repos(&["did:plc:tls".to_owned()]).await.unwrap(),
        1
    );
    assert!(store.get_repo("did:plc:tls").await.unwrap().is_some());
    store.close().await;

    // Encrypted without checks: `require`, and libpq's default `prefer` (the server offers
    // TLS, and only `hostssl` is allowed, so these connections are encrypted).
    for query in ["?sslmode=require", "", "?sslmode=prefer"] {
        let store = open(&cluster.url("127.0.0.1", query)).await.unwrap();
        store.close().await;
    }
    // `verify-ca` checks the chain, not the name.
    let store = open(&cluster.url("127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}")))
        .await
        .unwrap();
    store.close().await;

    // Refusals, each saying why.
    let e = open(&cluster.url("127.0.0.1", "?sslmode=disable"))
        .await
        .err()
        .unwrap();
    assert!(
        e.contains("no encryption") || e.contains("pg_hba.conf"),
        "{e}"
    );
    let e = open(&cluster.url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .err()
    .unwrap();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = open(&cluster.url(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .err()
    .unwrap();
    assert!(
        e.to_lowercase().contains("certificate"),
        "the name is checked: {e}"
    );
    let e = open(&cluster.url("localhost", "?sslmode=sometimes"))
        .await
        .err()
        .unwrap();
    assert!(e.contains("sslmode=sometimes"), "{e}");
    let e = open(&cluster.url(
        "localhost",
        "?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .err()
    .unwrap();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

/// The database restarts (`pg_ctl restart -m fast`: every connection cut, a second or so
/// down) while twenty repos are being backfilled: the pool reconnects, the failed
/// operations are retried, and every record still reaches the consumer, every repo active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_backfill_loses_nothing() {
    let Some(cluster) = Cluster::start(false) else {
        return;
    };
    let db = TestDb::external_postgres(cluster.url("127.0.0.1", "?sslmode=disable"));
    let net = Net::start().await;
    let repos: Vec<RepoBuilder> = (0..20u32)
        .map(|i| {
            RepoBuilder::with_records(
                did(300 + i),
                TestKey::k256(u64::from(300 + i)),
                u64::from(i),
                400,
            )
        })
        .collect();
    for (i, repo) in repos.iter().enumerate() {
        net.host(repo, &format!("pg{i}.test"), repo.car_tree_order());
    }
    let mut cfg = net.config(&db);
    cfg.resync_parallelism = 2;
    let tap = TestTap::start(cfg).await;
    let consumer = Consumer::connect(&tap).await;
    for repo in &repos {
        sync_support::add(&tap, repo.did()).await;
    }
    let total: usize = repos.iter().map(|r| r.records().len()).sum();
    sync_support::wait_for("the backfill under way", || async {
        (consumer.records().len() >= total / 10).then_some(())
    })
    .await;
    assert!(consumer.records().len() < total, "restarted mid-backfill");
    cluster.pg_ctl("restart");

    tap_testkit::wait::poll_until(
        "every record after the restart",
        Duration::from_secs(120),
        || async {
            let got = consumer.records();
            repos
                .iter()
                .all(|repo| {
                    let mine: Vec<serde_json::Value> = got
                        .iter()
                        .filter(|r| r["did"] == repo.did().as_str())
                        .cloned()
                        .collect();
                    let delivered = sync_support::paths_and_cids(&mine);
                    expected(repo)
                        .iter()
                        .all(|(p, c)| delivered.get(p) == Some(c))
                })
                .then_some(())
        },
    )
    .await;
    for repo in &repos {
        tap_testkit::wait::poll_until("active", Duration::from_secs(60), || async {
            (sync_support::info(&tap, repo.did()).await["state"] == "active").then_some(())
        })
        .await;
    }
    tap.stop().await;
}
