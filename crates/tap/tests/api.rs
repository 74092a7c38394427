//! The HTTP API against a running tap, on SQLite and on PostgreSQL: routes, bodies, status
//! codes and auth of original-behaviour.md §3.1–§3.2, and "bad input changes nothing".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{TestDb, TestTap, api_only_config as test_config};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ALICE: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
const BOB: &str = "did:web:bob.example.com";

async fn body_json(resp: reqwest::Response) -> Value {
    let text = resp.text().await.unwrap();
    assert!(
        text.ends_with('\n'),
        "JSON bodies end with a newline: {text:?}"
    );
    serde_json::from_str(&text).unwrap()
}

async fn post_json(tap: &TestTap, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(tap.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get(tap: &TestTap, path: &str) -> reqwest::Response {
    reqwest::get(tap.url(path)).await.unwrap()
}

async fn counts(tap: &TestTap) -> (u64, u64) {
    (
        tap.store.repo_count().await.unwrap(),
        tap.store.record_count().await.unwrap(),
    )
}

async fn add_info_stats_remove(db: TestDb) {
    let tap = TestTap::start(test_config(&db)).await;

    let resp = get(&tap, "/health").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_json(resp).await, json!({"status": "ok"}));

    let resp = post_json(&tap, "/repos/add", &json!({"dids": [ALICE, BOB]})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "");

    let resp = get(&tap, &format!("/info/{ALICE}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_json(resp).await,
        json!({"did": ALICE, "handle": "", "state": "pending", "status": "active", "rev": "", "error": "", "retries": 0, "records": 0})
    );

    let stats = [
        ("/stats/repo-count", json!({"repo_count": 2})),
        ("/stats/record-count", json!({"record_count": 0})),
        ("/stats/outbox-buffer", json!({"outbox_buffer": 0})),
        ("/stats/resync-buffer", json!({"resync_buffer": 0})),
        ("/stats/cursors", json!({"firehose": 0, "list_repos": ""})),
    ];
    for (path, want) in &stats {
        let resp = get(&tap, path).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(&body_json(resp).await, want, "{path}");
    }

    // Re-adding is insert-or-ignore: the row is untouched, no duplicate.
    let resp = post_json(&tap, "/repos/add", &json!({"dids": [ALICE]})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(counts(&tap).await.0, 2);

    let resp = post_json(
        &tap,
        "/repos/remove",
        &json!({"dids": [ALICE, "did:plc:unknownunknownunknown"]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(&tap, &format!("/info/{ALICE}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_json(resp).await, json!({"message": "repo not found"}));
    let resp = get(&tap, "/stats/repo-count").await;
    assert_eq!(body_json(resp).await, json!({"repo_count": 1}));
    tap.stop().await;
}
on_both_backends!(
    add_info_stats_remove_behave_as_specified,
    add_info_stats_remove
);

async fn bad_requests(db: TestDb) {
    let tap = TestTap::start(test_config(&db)).await;
    post_json(&tap, "/repos/add", &json!({"dids": [BOB]})).await;
    let before = counts(&tap).await;
    let client = reqwest::Client::new();

    // Empty list, missing list, null list: 400, nothing changed.
    for body in [json!({"dids": []}), json!({}), json!({"dids": null})] {
        let resp = post_json(&tap, "/repos/add", &body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let msg = body_json(resp).await["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains("no DIDs"), "{msg}");
    }
    // No body at all.
    let resp = client
        .post(tap.url("/repos/add"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // One malformed DID among good ones: 400 naming it, and the good ones are NOT added.
    for path in ["/repos/add", "/repos/remove"] {
        let resp = post_json(&tap, path, &json!({"dids": [ALICE, "not-a-did", BOB]})).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        let msg = body_json(resp).await["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains("\"not-a-did\""), "{msg}");
    }

    // Wrong types and malformed JSON: 400.
    for raw in [
        r#"{"dids": "did:plc:x"}"#,
        r#"{"dids": [1, 2]}"#,
        "{not json",
        "[]",
    ] {
        let resp = client
            .post(tap.url("/repos/add"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{raw}");
        assert!(body_json(resp).await["message"].is_string());
    }

    // Not JSON: 415.
    let resp = client
        .post(tap.url("/repos/add"))
        .header("content-type", "text/plain")
        .body(format!(r#"{{"dids": ["{ALICE}"]}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        body_json(resp).await,
        json!({"message": "Unsupported Media Type"})
    );

    // Over the body cap: 413.
    let huge = format!(
        r#"{{"dids": ["{}"]}}"#,
        "a".repeat(tap::api::MAX_BODY_BYTES + 1)
    );
    let resp = client
        .post(tap.url("/repos/add"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body_json(resp).await["message"].is_string());

    // Unknown path and wrong method: JSON 404 / 405.
    let resp = get(&tap, "/nope").await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_json(resp).await, json!({"message": "Not Found"}));
    let resp = get(&tap, "/repos/add").await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        body_json(resp).await,
        json!({"message": "Method Not Allowed"})
    );

    // A malformed DID in /info is a 400, an unknown one a 404.
    let resp = get(&tap, "/info/bogus").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = get(&tap, &format!("/info/{ALICE}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    assert_eq!(counts(&tap).await, before, "bad requests changed the store");
    tap.stop().await;
}
on_both_backends!(
    bad_requests_get_their_status_and_change_nothing,
    bad_requests
);

#[tokio::test]
async fn admin_password_guards_every_route_with_the_go_tap_401() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let mut cfg = test_config(&db);
    cfg.admin_password = Some("secret".into());
    let tap = TestTap::start(cfg).await;
    let client = reqwest::Client::new();
    for path in [
        "/health",
        "/stats/repo-count",
        "/info/did:plc:abc",
        "/nope",
        "/channel",
    ] {
        for auth in [None, Some(("admin", "wrong")), Some(("root", "secret"))] {
            let mut req = client.get(tap.url(path));
            if let Some((u, p)) = auth {
                req = req.basic_auth(u, Some(p));
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path} {auth:?}");
            assert_eq!(
                resp.headers()["www-authenticate"],
                "Basic realm=\"admin\", charset=\"UTF-8\""
            );
            assert_eq!(resp.headers()["content-type"], "application/json");
            assert_eq!(resp.text().await.unwrap(), tap::api::UNAUTHORIZED_BODY);
        }
    }
    let resp = client
        .get(tap.url("/health"))
        .header("authorization", "Basic YWRtaW46c2VjcmV0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = client
        .post(tap.url("/repos/add"))
        .basic_auth("admin", Some("secret"))
        .json(&json!({"dids": [ALICE]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    tap.stop().await;
}

#[tokio::test]
async fn metrics_listener_serves_prometheus_text() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let mut cfg = test_config(&db);
    cfg.metrics_listen = Some("127.0.0.1:0".into());
    let tap = TestTap::start(cfg).await;
    let addr = tap.metrics_addr.expect("metrics listener bound");
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.contains("tap_build_info"), "{text}");
    tap.stop().await;
}

#[tokio::test]
async fn metrics_need_the_admin_password_when_one_is_set() {
    let db = TestDb::new(common::Backend::Sqlite).await.unwrap();
    let mut cfg = test_config(&db);
    cfg.metrics_listen = Some("127.0.0.1:0".into());
    cfg.admin_password = Some("s3cret".into());
    let tap = TestTap::start(cfg).await;
    let url = format!(
        "http://{}/metrics",
        tap.metrics_addr.expect("metrics listener bound")
    );
    let client = reqwest::Client::new();
    let fetch = |password: Option<&'static str>| {
        let mut request = client.get(&url);
        if let Some(password) = password {
            request = request.basic_auth("admin", Some(password));
        }
        request.send()
    };
    assert_eq!(
        fetch(None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let wrong = fetch(Some("nope")).await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let ok = fetch(Some("s3cret")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok.text().await.unwrap().contains("tap_build_info"));
    tap.stop().await;
}

async fn restart_keeps_repos(db: TestDb) {
    let tap = TestTap::start(test_config(&db)).await;
    post_json(&tap, "/repos/add", &json!({"dids": [ALICE, BOB]})).await;
    tap.stop().await;
    let tap = TestTap::start(test_config(&db)).await;
    let resp = get(&tap, &format!("/info/{BOB}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_json(resp).await["state"], "pending");
    assert_eq!(counts(&tap).await.0, 2);
    tap.stop().await;
}
on_both_backends!(restart_keeps_every_repo_row, restart_keeps_repos);

async fn list_and_resync(db: TestDb) {
    let tap = TestTap::start(test_config(&db)).await;
    // Four repos by two: the second page is the last and must say so.
    let tracked: Vec<String> = (0..4).map(|i| format!("did:plc:repo{i}")).collect();
    post_json(&tap, "/repos/add", &json!({ "dids": tracked })).await;

    // Paging: follow the cursor until the answer has none; every repo once, in DID order.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut path = "/repos?limit=2".to_owned();
    loop {
        pages += 1;
        let resp = get(&tap, &path).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let page = body_json(resp).await;
        let repos = page["repos"].as_array().unwrap();
        assert!(repos.len() <= 2);
        for repo in repos {
            assert_eq!(repo["state"], "pending");
            assert_eq!(repo["records"], 0);
            seen.push(repo["did"].as_str().unwrap().to_owned());
        }
        match page["cursor"].as_str() {
            Some(cursor) => path = format!("/repos?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, tracked);
    assert_eq!(pages, 2, "no empty page after an exactly full one");
    let pending = body_json(get(&tap, "/repos?state=pending").await).await;
    assert_eq!(pending["repos"].as_array().unwrap().len(), 4);
    assert!(pending.get("cursor").is_none(), "{pending}");
    let active = body_json(get(&tap, "/repos?state=active").await).await;
    assert_eq!(active, json!({"repos": []}));

    let resp = post_json(
        &tap,
        "/repos/resync",
        &json!({"dids": [tracked[1], "did:plc:unknown"]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_json(resp).await,
        json!({"queued": [tracked[1]], "resyncing": [], "untracked": ["did:plc:unknown"]})
    );

    // Bad requests: 400 with a message, nothing changed.
    for path in ["/repos?state=bogus", "/repos?limit=0", "/repos?limit=many"] {
        let resp = get(&tap, path).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        assert!(body_json(resp).await["message"].is_string(), "{path}");
    }
    let resp = post_json(&tap, "/repos/resync", &json!({"dids": ["nope"]})).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(counts(&tap).await.0, 4);
    tap.stop().await;
}
on_both_backends!(
    repos_list_in_pages_and_a_resync_can_be_forced,
    list_and_resync
);
