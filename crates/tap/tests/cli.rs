//! The `tap` binary as a user runs it: help and version, start-up failures that exit
//! non-zero with one clear line, the default SQLite file, and graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

fn tap() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tap"));
    // Keep the user's environment from leaking into the test.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("tap did not exit within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_to_exit(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_with_deadline(&mut child, Duration::from_secs(30));
    child.wait_with_output().unwrap()
}

fn lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn version_and_help_describe_the_run_command() {
    let out = run_to_exit(tap().arg("--version"));
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tap {}", env!("CARGO_PKG_VERSION"))
    );
    let out = run_to_exit(tap().arg("--help"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("run"));
    let out = run_to_exit(tap().args(["run", "--help"]));
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in tap::config::settings::SETTINGS {
        assert!(
            help.contains(&format!("--{}", s.flag)),
            "--{} missing from help",
            s.flag
        );
        assert!(help.contains(s.envs[0]), "{} missing from help", s.envs[0]);
    }
    // Bare `tap` prints help and succeeds, like the Go tap.
    let out = run_to_exit(&mut tap());
    assert!(out.status.success());
}

#[test]
fn invalid_configuration_exits_non_zero_with_one_line_naming_the_flag() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        (
            &["run", "--relay-url=ftp://relay.example"],
            &[],
            "--relay-url",
        ),
        (
            &["run", "--no-replay", "--full-network"],
            &[],
            "--no-replay",
        ),
        (&["run"], &[("TAP_DATABASE_URL", "mysql://x/y")], "--db-url"),
        (
            &["run", "--collection-filters=app.bsky.feed*"],
            &[],
            "--collection-filters",
        ),
    ];
    for (args, envs, flag) in cases {
        let out = run_to_exit(tap().args(args).envs(envs.iter().copied()));
        assert!(!out.status.success(), "{args:?} should fail");
        let lines = lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(flag), "{lines:?}");
    }
}

#[test]
fn a_port_in_use_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let out = run_to_exit(
        tap()
            .args(["run", &format!("--bind={addr}")])
            .current_dir(dir.path()),
    );
    assert!(!out.status.success());
    let lines = lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("cannot listen on"), "{lines:?}");
    assert!(lines[0].contains(&addr.to_string()), "{lines:?}");
}

#[test]
fn an_unreachable_database_exits_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let out = run_to_exit(
        tap()
            .args([
                "run",
                "--bind=127.0.0.1:0",
                "--db-url=postgres://postgres@127.0.0.1:1/tap",
            ])
            .current_dir(dir.path()),
    );
    assert!(!out.status.success());
    let lines = lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("cannot open the database"), "{lines:?}");
}

#[test]
fn default_run_creates_tap_db_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Default database; the relay is a closed loopback port so nothing leaves the machine.
    let mut child = tap()
        .args([
            "run",
            "--bind=127.0.0.1:0",
            "--relay-url=http://127.0.0.1:1",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = rx
        .iter()
        .find(|l| l.contains("Starting tap."))
        .expect("start-up log line");
    let log: serde_json::Value = serde_json::from_str(&started).expect("logs are JSON");
    let addr = log["addr"]
        .as_str()
        .expect("start-up line carries the bound address");
    let health = reqwest::blocking_get(&format!("http://{addr}/health"));
    assert_eq!(health, r#"{"status":"ok"}"#);
    assert!(
        dir.path().join("tap.db").exists(),
        "default database ./tap.db"
    );

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    assert!(rx.iter().any(|l| l.contains("Tap stopped.")));
}

/// A `tap run` child on a free loopback port in `dir`, and the address it bound.
fn start_tap(dir: &std::path::Path, extra: &[&str]) -> (Child, String) {
    let mut child = tap()
        .args(["run", "--bind=127.0.0.1:0"])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let started = lines
        .find(|l| l.contains("Starting tap."))
        .expect("start-up log line");
    // Keep draining the log so tap never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let log: serde_json::Value = serde_json::from_str(&started).expect("logs are JSON");
    (child, log["addr"].as_str().unwrap().to_owned())
}

#[test]
fn healthcheck_exits_zero_for_a_healthy_tap_and_one_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_isolated_tap(dir.path(), "http://127.0.0.1:1");
    let url = format!("--url=http://{addr}");
    let check = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = tap();
        cmd.arg("healthcheck").arg(&url).args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_to_exit(&mut cmd)
    };

    let healthy = check(&["--admin-password=s3cret"], &[]);
    assert!(healthy.status.success(), "{:?}", lines(&healthy));
    let from_env = check(&[], &[("TAP_ADMIN_PASSWORD", "s3cret")]);
    assert!(from_env.status.success(), "{:?}", lines(&from_env));

    let wrong = check(&["--admin-password=nope"], &[]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(lines(&wrong)[0].contains("401"), "{:?}", lines(&wrong));

    child.kill().unwrap();
    child.wait().unwrap();
    let gone = check(&["--admin-password=s3cret", "--timeout=2s"], &[]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(lines(&gone)[0].contains("no answer"), "{:?}", lines(&gone));
}

mod reqwest {
    /// A tiny blocking GET over a fresh runtime (the test itself is synchronous).
    pub fn blocking_get(url: &str) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            ::reqwest::get(url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .trim()
                .to_owned()
        })
    }
}

/// A tap on loopback only: a closed relay port and a fake PLC that knows no DID, so a
/// tracked repo fails its resync with a verdict.
fn start_isolated_tap(dir: &std::path::Path, plc: &str) -> (Child, String) {
    let plc = format!("--plc-url={plc}");
    start_tap(
        dir,
        &[
            "--admin-password=s3cret",
            "--relay-url=http://127.0.0.1:1",
            &plc,
        ],
    )
}

#[test]
fn status_exits_by_health_and_repos_commands_drive_the_api() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plc = rt.block_on(tap_testkit::fake_plc::FakePlc::start());
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_isolated_tap(dir.path(), &plc.url());
    let url = format!("--url=http://{addr}");
    let client = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = tap();
        cmd.args(args).arg(&url).env("TAP_ADMIN_PASSWORD", "s3cret");
        match stdin {
            None => run_to_exit(&mut cmd),
            Some(input) => {
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.as_bytes())
                    .unwrap();
                wait_with_deadline(&mut child, Duration::from_secs(30));
                child.wait_with_output().unwrap()
            }
        }
    };

    let healthy = client(&["status"], None);
    assert_eq!(healthy.status.code(), Some(0), "{:?}", lines(&healthy));
    assert!(
        lines(&healthy)[0].contains(": healthy, up "),
        "{:?}",
        lines(&healthy)
    );
    let json = client(&["status", "--json"], None);
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["healthy"], true);
    let wrong = client(&["status", "--admin-password=nope"], None);
    assert_eq!(wrong.status.code(), Some(2), "{:?}", lines(&wrong));
    assert!(lines(&wrong)[0].contains("401"), "{:?}", lines(&wrong));

    // A DID the PLC does not know: its resync fails, and status says so with exit 1.
    let ghost = "did:plc:ghostghostghostghostghost";
    let added = client(&["repos", "add", ghost], None);
    assert_eq!(added.status.code(), Some(0), "{:?}", lines(&added));
    let deadline = Instant::now() + Duration::from_secs(30);
    let unhealthy = loop {
        let out = client(&["status"], None);
        if out.status.code() == Some(1) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "never unhealthy: {:?}",
            lines(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = lines(&unhealthy);
    assert!(text[0].contains("UNHEALTHY"), "{text:?}");
    assert!(
        text.iter().any(|l| l.starts_with("  ! 1 repo in error")),
        "{text:?}"
    );

    let listed = client(&["repos", "list"], None);
    let rows = lines(&listed);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0].starts_with(&format!("{ghost}\terror\t0\t")),
        "{rows:?}"
    );
    let none = client(&["repos", "list", "--state=active"], None);
    assert!(lines(&none).is_empty(), "{:?}", lines(&none));
    let info = client(&["repos", "info", ghost], None);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["state"], "error");
    let resync = client(&["repos", "resync", ghost], None);
    let answer: serde_json::Value = serde_json::from_slice(&resync.stdout).unwrap();
    assert_eq!(answer["queued"], serde_json::json!([ghost]));

    let bad = client(&["repos", "add", "not-a-did"], None);
    assert_eq!(bad.status.code(), Some(1), "{:?}", lines(&bad));
    assert!(lines(&bad)[0].contains("400"), "{:?}", lines(&bad));
    let removed = client(&["repos", "remove"], Some(&format!("{ghost}\n\n")));
    assert_eq!(removed.status.code(), Some(0), "{:?}", lines(&removed));
    assert!(lines(&client(&["repos", "list"], None)).is_empty());

    child.kill().unwrap();
    child.wait().unwrap();
    let gone = client(&["status", "--timeout=2s"], None);
    assert_eq!(gone.status.code(), Some(2), "{:?}", lines(&gone));
    assert!(lines(&gone)[0].contains("no answer"), "{:?}", lines(&gone));
    let gone = client(&["repos", "list", "--timeout=2s"], None);
    assert_eq!(gone.status.code(), Some(2));
}

/// 10,000 connections that sent half a request head: `/health` still answers within a
/// second, and the server closes them once the header timeout passes; a connection idling
/// after a request is closed too.
#[test]
fn half_sent_requests_neither_starve_the_api_nor_stay_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HALF_OPEN: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_tap(
        dir.path(),
        &[
            "--relay-url=http://127.0.0.1:1",
            "--plc-url=http://127.0.0.1:1",
            "--http-header-timeout=3s",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: tap\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        let mut half_open = Vec::with_capacity(HALF_OPEN);
        for _ in 0..HALF_OPEN {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: tap\r\n")
                .await
                .unwrap();
            half_open.push(stream);
        }
        let started = Instant::now();
        let health = ::reqwest::Client::new()
            .get(format!("http://{addr}/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(health.status(), 200);
        assert!(took < Duration::from_secs(1), "/health took {took:?}");

        // Every half-sent connection, and the idle one, is closed by the server (EOF or
        // reset), within the timeout plus slack.
        let closed = |mut s: tokio::net::TcpStream| async move {
            let mut buf = [0u8; 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let all = futures_util::future::join_all(half_open.into_iter().map(closed));
        // (Well under the 30 s a server without this limit would default to, if any.)
        tokio::time::timeout(Duration::from_secs(15), async {
            all.await;
            closed(idle).await;
        })
        .await
        .expect("the server closes connections that send no complete request head");
    });
    child.kill().unwrap();
    child.wait().unwrap();
}
