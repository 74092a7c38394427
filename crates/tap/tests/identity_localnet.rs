//! End to end against the real PLC directory and reference PDS from the npm registry
//! (`tests/localnet/network.mjs` on loopback): `/resolve/{did}` of a created account gives its
//! key and PDS endpoint, its `.test` handle verifies through the PDS's `resolveHandle`, and a
//! handle change shows after a purge.
//!
//! Needs the localnet kit (`bash tests/localnet/setup.sh`). Without it the test prints a skip
//! notice, except under `CI=true`, where a missing kit is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod localnet;

use common::{Backend, TestDb, TestTap, test_config};
use serde_json::{Value, json};
use tap::identity::{Identity, IdentityOptions};
use tap_atproto::PublicKey;
use tap_atproto::syntax::Did;
use url::Url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_serves_a_real_accounts_key_pds_and_verified_handle() {
    let Some(mut net) = localnet::LocalNet::start(1, 0).await else {
        return;
    };
    let plc_url = Url::parse(&net.str("/plcUrl")).unwrap();
    let pds_url = Url::parse(&net.str("/pdsUrl")).unwrap();
    let pds_public = net.str("/pdsPublicUrl");
    let did = net.str("/accounts/0/did");
    let handle = net.str("/accounts/0/handle");
    let signing_key = PublicKey::from_did_key(&net.str("/accounts/0/signingKey")).unwrap();

    // 1. /resolve on a running tap.
    let db = TestDb::new(Backend::Sqlite).await.unwrap();
    let mut config = test_config(&db);
    config.plc_url = plc_url.clone();
    config.handle_resolver_url = Some(pds_url.clone());
    let tap = TestTap::start(config).await;
    let response = reqwest::get(tap.url(&format!("/resolve/{did}")))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let doc: Value = response.json().await.unwrap();
    assert_eq!(doc["id"], did.as_str());
    assert_eq!(doc["alsoKnownAs"], json!([format!("at://{handle}")]));
    let methods = doc["verificationMethod"].as_array().unwrap();
    let atproto = methods
        .iter()
        .find(|m| m["id"] == format!("{did}#atproto"))
        .expect("an #atproto verification method");
    let served = PublicKey::from_verification_method(
        atproto["type"].as_str().unwrap(),
        atproto["publicKeyMultibase"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(served, signing_key);
    let pds = doc["service"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "#atproto_pds")
        .expect("an #atproto_pds service");
    assert_eq!(pds["serviceEndpoint"], pds_public.as_str());

    // A DID the real PLC directory has never seen is a 404, not a 500.
    let missing = reqwest::get(tap.url("/resolve/did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"))
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    tap.stop().await;

    // 2. The identity API: the handle verifies through the PDS's resolveHandle.
    let identity = Identity::new(IdentityOptions {
        handle_resolver: Some(pds_url),
        ..IdentityOptions::new(plc_url, 100)
    })
    .unwrap();
    let did = Did::new(did).unwrap();
    let ident = identity.resolve(&did).await.unwrap();
    assert_eq!(ident.handle_or_invalid(), handle);
    assert_eq!(ident.repo.require_signing_key().unwrap(), &signing_key);
    assert_eq!(
        ident
            .repo
            .require_pds()
            .unwrap()
            .as_str()
            .trim_end_matches('/'),
        pds_public
    );

    // 3. A handle change reaches tap after a purge.
    net.command(json!({"cmd": "updateHandle", "did": did.as_str(), "handle": "renamed.test"}))
        .await;
    assert_eq!(
        identity.resolve(&did).await.unwrap().handle_or_invalid(),
        handle
    );
    identity.purge(&did).await;
    assert_eq!(
        identity.resolve(&did).await.unwrap().handle_or_invalid(),
        "renamed.test"
    );

    net.stop().await;
}
