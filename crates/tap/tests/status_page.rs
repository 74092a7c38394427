//! The status page in real headless Chromium (Debian's package): a tap backfilling from the
//! fakes, with an admin password; what the page shows must match `/status.json`, change as
//! the backfill proceeds, look up a repo, and leave nothing in the console.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod sync_support;

use common::{TestDb, TestTap};
use serde_json::{Value, json};
use tap_testkit::chromium::Browser;
use tap_testkit::repo_builder::{RepoBuilder, TestKey};

use sync_support::{Net, did, wait_for};

const PASSWORD: &str = "s3cret";

/// Chromium, or `None` (with a notice) when it is not installed outside CI.
async fn browser() -> Option<Browser> {
    match Browser::launch().await {
        Ok(b) => Some(b),
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the browser test: {e} (./scripts/test installs chromium)");
            None
        }
        Err(e) => panic!("CI=true but the browser cannot run: {e}"),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn status(tap: &TestTap) -> Value {
    client()
        .get(tap.url("/status.json"))
        .basic_auth("admin", Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn add(tap: &TestTap, repos: &[RepoBuilder]) {
    let dids: Vec<&str> = repos.iter().map(|r| r.did().as_str()).collect();
    let resp = client()
        .post(tap.url("/repos/add"))
        .basic_auth("admin", Some(PASSWORD))
        .json(&json!({ "dids": dids }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// The number an element shows (`1,234` → 1234), `None` while it shows none.
async fn shown(browser: &mut Browser, id: &str) -> Option<u64> {
    let text = browser
        .eval(&format!(
            "document.getElementById({id:?})?.textContent ?? ''"
        ))
        .await
        .unwrap();
    text.as_str()?.replace(',', "").trim().parse().ok()
}

/// Waits until the page shows `active` repos active, then checks every number it shows
/// against `/status.json` (stable once no repo is left to sync).
async fn settled(browser: &mut Browser, tap: &TestTap, active: u64) -> Value {
    let doc = wait_for(
        &format!("{active} repos synced in /status.json"),
        || async {
            let doc = status(tap).await;
            (doc["repos"]["by_state"]["active"] == active
                && doc["backfill"]["repos_remaining"] == 0)
                .then_some(doc)
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + sync_support::WAIT;
    loop {
        let page = (
            shown(browser, "repos-active").await,
            shown(browser, "repos-total").await,
            shown(browser, "records").await,
            shown(browser, "backfill-percent").await,
            shown(browser, "backfill-remaining").await,
        );
        let want = (
            doc["repos"]["by_state"]["active"].as_u64(),
            doc["repos"]["total"].as_u64(),
            doc["repos"]["records"].as_u64(),
            doc["backfill"]["percent"].as_u64(),
            doc["backfill"]["repos_remaining"].as_u64(),
        );
        if page == want {
            return doc;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page shows {page:?}, /status.json says {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Polls `expression` (a string) in the page until `done` accepts it; returns it.
async fn page_until(
    browser: &mut Browser,
    expression: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + sync_support::WAIT;
    loop {
        let value = browser.eval(expression).await.unwrap();
        let text = value.as_str().unwrap_or_default().to_owned();
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{expression} stayed {text:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_status_json_says_as_the_backfill_proceeds() {
    let Some(mut browser) = browser().await else {
        return;
    };
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let net = Net::start().await;
    let repos: Vec<RepoBuilder> = (0..6u32)
        .map(|i| {
            RepoBuilder::with_records(
                did(80 + i),
                TestKey::k256(80 + u64::from(i)),
                80 + u64::from(i),
                25,
            )
        })
        .collect();
    for (i, repo) in repos.iter().enumerate() {
        net.host(repo, &format!("page{i}.test"), repo.car_tree_order());
    }
    let mut cfg = net.config(&db);
    cfg.admin_password = Some(PASSWORD.into());
    let tap = TestTap::start(cfg).await;

    // Without the password the page is refused like every route.
    let refused = client().get(tap.url("/")).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    browser
        .set_headers(json!({"Authorization": tap::api::basic_header("admin", PASSWORD)}))
        .await
        .unwrap();
    browser.navigate(&tap.url("/")).await.unwrap();
    page_until(
        &mut browser,
        "document.getElementById('health')?.textContent ?? ''",
        |t| !t.is_empty() && t != "…",
    )
    .await;

    add(&tap, &repos[..3]).await;
    let first = settled(&mut browser, &tap, 3).await;
    assert_eq!(first["healthy"], true, "{first}");
    let health = browser
        .eval("document.getElementById('health')?.textContent ?? ''")
        .await
        .unwrap();
    assert_eq!(health, "healthy");

    // More repos: the numbers move on.
    add(&tap, &repos[3..]).await;
    let second = settled(&mut browser, &tap, 6).await;
    assert!(second["repos"]["records"].as_u64() > first["repos"]["records"].as_u64());

    // The lookup box.
    let target = repos[4].did().as_str();
    browser
        .eval(&format!(
            "document.getElementById('lookup-did').value = {target:?}; \
             document.getElementById('lookup-form').requestSubmit(); true"
        ))
        .await
        .unwrap();
    let found = page_until(
        &mut browser,
        "document.getElementById('lookup-result')?.textContent ?? ''",
        |t| t.contains("active"),
    )
    .await;
    assert!(found.contains("page4.test"), "{found}");
    assert!(
        found.contains(&format!("records{}", repos[4].records().len())),
        "{found}"
    );
    assert_eq!(browser.errors(), &[] as &[String], "console errors");

    // A DID tap does not track (the 404 is the answer, not a page error).
    browser
        .eval(
            "document.getElementById('lookup-did').value = 'did:plc:nobodynobodynobodynobody'; \
             document.getElementById('lookup-form').requestSubmit(); true",
        )
        .await
        .unwrap();
    page_until(
        &mut browser,
        "document.getElementById('lookup-result')?.textContent ?? ''",
        |t| t == "not tracked",
    )
    .await;
    browser.close().await;
    tap.stop().await;
}
