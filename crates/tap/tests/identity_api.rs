//! `GET /resolve/{did}` on a running tap whose PLC directory and handle resolver are a fake on
//! loopback: the regenerated document, 400 for a malformed DID, 404 for an unknown one, 500
//! when resolution fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Backend, TestDb, TestTap, test_config};
use serde_json::json;
use tap_testkit::fake_plc::{FakePlc, KeyForm, Reply, Route, did_doc, k256_key};

const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

async fn start(plc: &FakePlc) -> (TestTap, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.plc_url = url::Url::parse(&plc.url()).unwrap();
    // Handles are checked against the fake, never public DNS.
    config.handle_resolver_url = Some(url::Url::parse(&plc.url()).unwrap());
    (TestTap::start(config).await, db)
}

async fn get(tap: &TestTap, path: &str) -> (u16, String) {
    let response = reqwest::get(tap.url(path)).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_returns_the_regenerated_document_with_a_trailing_newline() {
    let plc = FakePlc::start().await;
    let key = k256_key(1);
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some("alice.test"),
            Some((&key, KeyForm::Legacy)),
            Some("https://pds.example.com"),
        ),
    );
    let (tap, _db) = start(&plc).await;
    let (status, body) = get(&tap, &format!("/resolve/{DID}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("}\n"), "{body:?}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc,
        json!({
            "id": DID,
            "alsoKnownAs": ["at://alice.test"],
            "verificationMethod": [{
                "id": format!("{DID}#atproto"),
                "type": "EcdsaSecp256k1VerificationKey2019",
                "controller": DID,
                "publicKeyMultibase": key.legacy_multibase,
            }],
            "service": [{
                "id": "#atproto_pds",
                "type": "AtprotoPersonalDataServer",
                "serviceEndpoint": "https://pds.example.com",
            }],
        })
    );
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_of_an_unknown_did_is_404() {
    let plc = FakePlc::start().await;
    let (tap, _db) = start(&plc).await;
    let (status, body) = get(&tap, "/resolve/did:plc:doesnotexist").await;
    assert_eq!(status, 404);
    assert_eq!(body, "{\"message\":\"DID not found\"}\n");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_of_a_malformed_did_is_400() {
    let plc = FakePlc::start().await;
    let (tap, _db) = start(&plc).await;
    let (status, body) = get(&tap, "/resolve/not-a-did").await;
    assert_eq!(status, 400);
    assert_eq!(body, "{\"message\":\"improperly formatted DID\"}\n");
    assert_eq!(plc.total_requests(), 0);
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_answers_500_when_the_directory_fails() {
    let plc = FakePlc::start().await;
    plc.set(Route::Plc(DID.into()), Reply::Status(502));
    let (tap, _db) = start(&plc).await;
    let (status, body) = get(&tap, &format!("/resolve/{DID}")).await;
    assert_eq!(status, 500);
    assert_eq!(body, "{\"message\":\"failed to resolve DID\"}\n");
    tap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_and_cache_hits_are_counted_in_metrics() {
    let plc = FakePlc::start().await;
    plc.set_plc_doc(
        DID,
        did_doc(DID, None, Some((&k256_key(1), KeyForm::Multikey)), None),
    );
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.plc_url = url::Url::parse(&plc.url()).unwrap();
    config.handle_resolver_url = Some(url::Url::parse(&plc.url()).unwrap());
    config.metrics_listen = Some("127.0.0.1:0".into());
    let tap = TestTap::start(config).await;
    for _ in 0..2 {
        assert_eq!(get(&tap, &format!("/resolve/{DID}")).await.0, 200);
    }
    let metrics = reqwest::get(format!("http://{}/metrics", tap.metrics_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "tap_identity_lookups_total{outcome=\"handle_invalid\"}",
        "tap_identity_cache_requests_total{result=\"miss\"}",
        "tap_identity_cache_requests_total{result=\"hit\"}",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    tap.stop().await;
}

#[test]
fn handle_resolver_url_is_read_from_flag_or_environment_and_validated() {
    use tap::config::{Environment, Invocation, parse};
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let argv = std::iter::once("tap")
            .chain(std::iter::once("run"))
            .chain(args.iter().copied());
        parse(argv, &Environment::from_pairs(env.iter().copied()))
    };
    let url_of = |invocation| match invocation {
        Ok(Invocation::Run(config)) => config.handle_resolver_url,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(url_of(run(&[], &[])), None);
    assert_eq!(
        url_of(run(
            &["--handle-resolver-url", "http://127.0.0.1:2583"],
            &[]
        ))
        .unwrap()
        .as_str(),
        "http://127.0.0.1:2583/"
    );
    assert_eq!(
        url_of(run(
            &[],
            &[("TAP_HANDLE_RESOLVER_URL", "http://127.0.0.1:2583")]
        ))
        .unwrap()
        .as_str(),
        "http://127.0.0.1:2583/"
    );
    let err = run(&["--handle-resolver-url", "ftp://x"], &[]).unwrap_err();
    assert!(err.to_string().contains("handle-resolver-url"), "{err}");
}
