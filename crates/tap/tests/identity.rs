//! Identity resolution against a fake PLC directory / did:web host / handle host on loopback:
//! document checks, key forms, handle verification, limits, cache lifetimes, coalescing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tap::identity::{
    Clock, ERROR_TTL, GOOD_TTL, INVALID_HANDLE, INVALID_HANDLE_TTL, Identity, IdentityError,
    IdentityOptions, ManualClock, TRANSIENT_ERROR_TTL,
};
use tap_atproto::syntax::Did;
use tap_testkit::fake_plc::{FakePlc, KeyForm, Reply, Route, did_doc, k256_key, p256_key};
use url::Url;

const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
const HANDLE: &str = "alice.test";
const PDS: &str = "https://pds.example.com";
const WAIT: Duration = Duration::from_secs(10);

fn did(s: &str) -> Did {
    Did::new(s).unwrap()
}

/// Options pointing everything at the fake: PLC at its URL, did:web and well-known requests
/// to its address, time from a manual clock.
fn options(plc: &FakePlc) -> (IdentityOptions, ManualClock) {
    let clock = ManualClock::new();
    let mut options = IdentityOptions::new(Url::parse(&plc.url()).unwrap(), 1000);
    options.loopback_web = Some(plc.addr());
    options.clock = Clock::Manual(clock.clone());
    options.request_timeout = Duration::from_secs(5);
    (options, clock)
}

fn identity(plc: &FakePlc) -> (Identity, ManualClock) {
    let (options, clock) = options(plc);
    (Identity::new(options).unwrap(), clock)
}

/// A fake serving `DID` with a Multikey K-256 key, the PDS, and `HANDLE` pointing back.
async fn good_fake() -> FakePlc {
    let plc = FakePlc::start().await;
    let key = k256_key(1);
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some(HANDLE),
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    plc.set_handle(HANDLE, DID);
    plc
}

#[tokio::test]
async fn plc_document_with_multikey_key_yields_key_pds_and_verified_handle() {
    let plc = good_fake().await;
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(ident.did.as_str(), DID);
    assert_eq!(
        ident.repo.require_signing_key().unwrap(),
        &k256_key(1).public
    );
    assert_eq!(
        ident.repo.require_pds().unwrap().as_str(),
        "https://pds.example.com/"
    );
    assert_eq!(ident.handle_or_invalid(), HANDLE);
    assert_eq!(ident.doc.also_known_as, vec![format!("at://{HANDLE}")]);
}

#[tokio::test]
async fn plc_document_with_legacy_key_types_yields_the_same_keys() {
    let plc = FakePlc::start().await;
    let (identity, _) = identity(&plc);
    for (n, key) in [k256_key(2), p256_key(3)].into_iter().enumerate() {
        let did_s = format!("did:plc:legacy{n}");
        plc.set_plc_doc(
            &did_s,
            did_doc(&did_s, None, Some((&key, KeyForm::Legacy)), Some(PDS)),
        );
        let ident = identity.resolve(&did(&did_s)).await.unwrap();
        assert_eq!(ident.repo.require_signing_key().unwrap(), &key.public);
    }
}

#[tokio::test]
async fn did_web_document_comes_from_the_hosts_well_known_path() {
    let plc = FakePlc::start().await;
    let key = p256_key(4);
    let web = "did:web:alice.example.org";
    plc.set(
        Route::WebDoc("alice.example.org".into()),
        Reply::Json(did_doc(
            web,
            Some("alice.example.org"),
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        )),
    );
    plc.set_handle("alice.example.org", web);
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(web)).await.unwrap();
    assert_eq!(ident.repo.require_signing_key().unwrap(), &key.public);
    assert_eq!(ident.handle_or_invalid(), "alice.example.org");
    assert_eq!(plc.requests(&Route::WebDoc("alice.example.org".into())), 1);
}

#[tokio::test]
async fn did_web_with_a_port_or_reserved_tld_is_refused_without_a_request() {
    let plc = FakePlc::start().await;
    let (identity, _) = identity(&plc);
    for web in [
        "did:web:example.com%3A8080",
        "did:web:box.local",
        "did:key:zQ3sh",
    ] {
        let err = identity.resolve(&did(web)).await.unwrap_err();
        assert!(
            matches!(err, IdentityError::Unsupported { .. }),
            "{web}: {err}"
        );
    }
    assert_eq!(plc.total_requests(), 0);
}

#[tokio::test]
async fn document_describing_another_did_is_rejected() {
    let plc = FakePlc::start().await;
    let key = k256_key(1);
    plc.set_plc_doc(
        DID,
        did_doc(
            "did:plc:someoneelse",
            None,
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    let (identity, _) = identity(&plc);
    let err = identity.resolve(&did(DID)).await.unwrap_err();
    assert!(matches!(err, IdentityError::IdMismatch { .. }), "{err}");
    assert!(!err.is_transient() && !err.is_not_found());
}

#[tokio::test]
async fn document_without_key_or_pds_resolves_but_cannot_serve_sync() {
    let plc = FakePlc::start().await;
    plc.set_plc_doc(DID, did_doc(DID, Some(HANDLE), None, None));
    plc.set_handle(HANDLE, DID);
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(ident.handle_or_invalid(), HANDLE);
    assert!(matches!(
        ident.repo.require_signing_key(),
        Err(IdentityError::NoSigningKey { .. })
    ));
    assert!(matches!(
        ident.repo.require_pds(),
        Err(IdentityError::NoPds { .. })
    ));
}

#[tokio::test]
async fn unparseable_key_is_reported_as_no_signing_key() {
    let plc = FakePlc::start().await;
    let mut doc = did_doc(
        DID,
        None,
        Some((&k256_key(1), KeyForm::Multikey)),
        Some(PDS),
    );
    doc["verificationMethod"][0]["publicKeyMultibase"] = "zNotAKey".into();
    plc.set_plc_doc(DID, doc);
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert!(matches!(
        ident.repo.require_signing_key(),
        Err(IdentityError::NoSigningKey { .. })
    ));
}

#[tokio::test]
async fn malformed_document_is_an_error() {
    let plc = FakePlc::start().await;
    plc.set(Route::Plc(DID.into()), Reply::Text("not json".into()));
    let (identity, _) = identity(&plc);
    let err = identity.resolve(&did(DID)).await.unwrap_err();
    assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
}

#[tokio::test]
async fn unknown_did_is_not_found_and_server_errors_are_transient() {
    let plc = FakePlc::start().await;
    let (identity, _) = identity(&plc);
    let missing = identity.resolve(&did(DID)).await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(!missing.is_transient());

    plc.set(Route::Plc("did:plc:gone".into()), Reply::Status(410));
    assert!(
        identity
            .resolve(&did("did:plc:gone"))
            .await
            .unwrap_err()
            .is_not_found()
    );

    plc.set(Route::Plc("did:plc:broken".into()), Reply::Status(503));
    let broken = identity.resolve(&did("did:plc:broken")).await.unwrap_err();
    assert!(broken.is_transient() && !broken.is_not_found(), "{broken}");
}

#[tokio::test]
async fn slow_server_times_out_as_a_transient_error() {
    let plc = good_fake().await;
    plc.set_delay(Route::Plc(DID.into()), Duration::from_secs(60));
    let (mut options, _) = options(&plc);
    options.request_timeout = Duration::from_millis(300);
    let identity = Identity::new(options).unwrap();
    let err = tokio::time::timeout(WAIT, identity.resolve(&did(DID)))
        .await
        .expect("the resolver's own timeout fires first")
        .unwrap_err();
    assert!(matches!(err, IdentityError::Timeout { .. }), "{err}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn oversized_streamed_document_is_refused() {
    let plc = FakePlc::start().await;
    plc.set(Route::Plc(DID.into()), Reply::Oversized(8 * 1024 * 1024));
    let (identity, _) = identity(&plc);
    let err = identity.resolve(&did(DID)).await.unwrap_err();
    assert!(matches!(err, IdentityError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn oversized_document_with_a_length_is_refused() {
    let plc = FakePlc::start().await;
    plc.set(
        Route::Plc(DID.into()),
        Reply::Text(" ".repeat(1024 * 1024 + 1)),
    );
    let (identity, _) = identity(&plc);
    let err = identity.resolve(&did(DID)).await.unwrap_err();
    assert!(matches!(err, IdentityError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn requests_carry_the_tap_user_agent() {
    let plc = good_fake().await;
    let (identity, _) = identity(&plc);
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(
        plc.last_user_agent().as_deref(),
        Some(concat!("tap/", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn handle_pointing_at_another_did_is_invalid() {
    let plc = good_fake().await;
    plc.set_handle(HANDLE, "did:plc:someoneelse");
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(ident.handle, None);
    assert_eq!(ident.handle_or_invalid(), INVALID_HANDLE);
}

#[tokio::test]
async fn handle_that_does_not_resolve_or_is_not_declared_is_invalid() {
    let plc = FakePlc::start().await;
    let key = k256_key(1);
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some(HANDLE),
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    plc.set_plc_doc(
        "did:plc:nohandle",
        did_doc(
            "did:plc:nohandle",
            None,
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    plc.set(
        Route::HandleWellKnown("broken.test".into()),
        Reply::Status(500),
    );
    plc.set_plc_doc(
        "did:plc:broken",
        did_doc(
            "did:plc:broken",
            Some("broken.test"),
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    let (identity, _) = identity(&plc);
    for d in [DID, "did:plc:nohandle", "did:plc:broken"] {
        let ident = identity.resolve(&did(d)).await.unwrap();
        assert_eq!(ident.handle_or_invalid(), INVALID_HANDLE, "{d}");
    }
}

#[tokio::test]
async fn declared_handle_is_lower_cased_before_verification() {
    let plc = FakePlc::start().await;
    let key = k256_key(1);
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some("Alice.TEST"),
            Some((&key, KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    plc.set_handle(HANDLE, DID);
    let (identity, _) = identity(&plc);
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(ident.handle_or_invalid(), HANDLE);
}

#[tokio::test]
async fn handle_resolver_override_asks_resolve_handle_instead_of_well_known() {
    let plc = good_fake().await;
    // The well-known file would say otherwise; the override must not look at it.
    plc.set(
        Route::HandleWellKnown(HANDLE.into()),
        Reply::Text("did:plc:someoneelse".into()),
    );
    let (mut options, _) = options(&plc);
    options.loopback_web = None;
    options.handle_resolver = Some(Url::parse(&plc.url()).unwrap());
    let identity = Identity::new(options).unwrap();
    let ident = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(ident.handle_or_invalid(), HANDLE);
    assert_eq!(plc.requests(&Route::ResolveHandle(HANDLE.into())), 1);
    assert_eq!(plc.requests(&Route::HandleWellKnown(HANDLE.into())), 0);

    // An unknown handle (the fake answers 400 HandleNotFound, as a PDS does) is invalid.
    plc.set_plc_doc(
        "did:plc:other",
        did_doc("did:plc:other", Some("nobody.test"), None, Some(PDS)),
    );
    let other = identity.resolve(&did("did:plc:other")).await.unwrap();
    assert_eq!(other.handle_or_invalid(), INVALID_HANDLE);
}

#[tokio::test]
async fn verified_identity_is_served_from_cache_for_24_hours() {
    let plc = good_fake().await;
    let (identity, clock) = identity(&plc);
    let route = Route::Plc(DID.into());
    identity.resolve(&did(DID)).await.unwrap();
    clock.advance(GOOD_TTL - Duration::from_secs(1));
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(plc.requests(&route), 1);
    clock.advance(Duration::from_secs(2));
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(plc.requests(&route), 2);
}

#[tokio::test]
async fn identity_with_invalid_handle_is_rechecked_after_5_minutes() {
    let plc = good_fake().await;
    plc.set_handle(HANDLE, "did:plc:someoneelse");
    let (identity, clock) = identity(&plc);
    let first = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(first.handle_or_invalid(), INVALID_HANDLE);
    // The handle is fixed upstream; the cache keeps the old answer for 5 minutes.
    plc.set_handle(HANDLE, DID);
    clock.advance(INVALID_HANDLE_TTL - Duration::from_secs(1));
    let cached = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(cached.handle_or_invalid(), INVALID_HANDLE);
    clock.advance(Duration::from_secs(2));
    let fresh = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(fresh.handle_or_invalid(), HANDLE);
}

#[tokio::test]
async fn failure_is_cached_for_2_minutes() {
    let plc = FakePlc::start().await;
    let (identity, clock) = identity(&plc);
    assert!(
        identity
            .resolve(&did(DID))
            .await
            .unwrap_err()
            .is_not_found()
    );
    // The account appears; the cached failure stands until it expires.
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            None,
            Some((&k256_key(1), KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    clock.advance(ERROR_TTL - Duration::from_secs(1));
    assert!(
        identity
            .resolve(&did(DID))
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(plc.requests(&Route::Plc(DID.into())), 1);
    clock.advance(Duration::from_secs(2));
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(plc.requests(&Route::Plc(DID.into())), 2);
}

/// Issue 10, defect 6: a PLC blip cached for two minutes made every retry of the commit
/// that needed the key fail again; a failure that may pass is asked again after a second.
#[tokio::test]
async fn a_transient_failure_is_cached_for_a_second_only() {
    let plc = good_fake().await;
    let route = Route::Plc(DID.into());
    plc.set(route.clone(), Reply::Status(503));
    let (identity, clock) = identity(&plc);
    assert!(
        identity
            .resolve(&did(DID))
            .await
            .unwrap_err()
            .is_transient()
    );
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            None,
            Some((&k256_key(1), KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    assert!(
        identity.resolve(&did(DID)).await.is_err(),
        "shared by callers within the second"
    );
    clock.advance(TRANSIENT_ERROR_TTL + Duration::from_millis(1));
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(plc.requests(&route), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_one_did_share_one_request() {
    let plc = good_fake().await;
    let (identity, _) = identity(&plc);
    let route = Route::Plc(DID.into());
    plc.hold();
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let identity = identity.clone();
            tokio::spawn(async move { identity.resolve(&did(DID)).await })
        })
        .collect();
    assert!(plc.wait_for_requests(&route, 1, WAIT).await);
    plc.release();
    for lookup in lookups {
        let ident = tokio::time::timeout(WAIT, lookup)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ident.handle_or_invalid(), HANDLE);
    }
    assert_eq!(plc.requests(&route), 1);
}

#[tokio::test]
async fn purge_makes_the_next_lookup_fetch_again() {
    let plc = good_fake().await;
    let (identity, _) = identity(&plc);
    let route = Route::Plc(DID.into());
    let first = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(
        first.repo.require_signing_key().unwrap(),
        &k256_key(1).public
    );
    // Key rotation upstream.
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some(HANDLE),
            Some((&k256_key(9), KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(plc.requests(&route), 1);
    identity.purge(&did(DID)).await;
    let rotated = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(
        rotated.repo.require_signing_key().unwrap(),
        &k256_key(9).public
    );
    assert_eq!(plc.requests(&route), 2);
}

#[tokio::test]
async fn refresh_fetches_now_and_updates_the_cache() {
    let plc = good_fake().await;
    let (identity, _) = identity(&plc);
    let route = Route::Plc(DID.into());
    identity.resolve(&did(DID)).await.unwrap();
    plc.set_plc_doc(
        DID,
        did_doc(
            DID,
            Some(HANDLE),
            Some((&k256_key(9), KeyForm::Multikey)),
            Some(PDS),
        ),
    );
    let refreshed = identity.refresh(&did(DID)).await.unwrap();
    assert_eq!(
        refreshed.repo.require_signing_key().unwrap(),
        &k256_key(9).public
    );
    let cached = identity.resolve(&did(DID)).await.unwrap();
    assert_eq!(
        cached.repo.require_signing_key().unwrap(),
        &k256_key(9).public
    );
    assert_eq!(plc.requests(&route), 2);
}

#[tokio::test]
async fn a_large_document_weighs_in_the_cache_by_its_size() {
    let plc = good_fake().await;
    let big = "did:plc:bigbigbigbigbigbigbigbigb";
    let key = k256_key(2);
    let mut doc = did_doc(big, None, Some((&key, KeyForm::Multikey)), Some(PDS));
    // ~200 KiB of aliases: a document a hostile PLC entry or did:web host could serve.
    doc["alsoKnownAs"] = serde_json::Value::Array(
        (0..2000)
            .map(|i| serde_json::json!(format!("at://{i:0>96}.example")))
            .collect(),
    );
    plc.set_plc_doc(big, doc);
    let (identity, _clock) = identity(&plc);

    identity.resolve(&did(DID)).await.unwrap();
    let ordinary = identity.cache_weight().await;
    assert!(
        (1..=2).contains(&ordinary),
        "an ordinary identity weighs 1: {ordinary}"
    );
    identity.resolve(&did(big)).await.unwrap();
    let with_big = identity.cache_weight().await - ordinary;
    assert!(
        (190..=260).contains(&with_big),
        "a ~200 KiB document weighs ~200 entries: {with_big}"
    );
}

/// 2,000 distinct did:web documents of ~1 MB each (2 GB in all, as hostile hosts could
/// serve) pass through a cache of 64 MiB worth of entries: the process's resident memory
/// grows by less than 256 MiB, where a cache bounded by count alone would hold them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_one_megabyte_did_web_documents_leave_memory_bounded() {
    use futures_util::StreamExt as _;
    const DOCS: usize = 2000;
    const BOUND: u64 = 256 << 20;
    let plc = FakePlc::start().await;
    let key = p256_key(4);
    for i in 0..DOCS {
        let host = format!("h{i}.example.org");
        let web = format!("did:web:{host}");
        plc.set(
            Route::WebDoc(host),
            Reply::Padded(
                did_doc(&web, None, Some((&key, KeyForm::Multikey)), Some(PDS)),
                1_000_000,
            ),
        );
    }
    let (mut options, _clock) = options(&plc);
    options.cache_capacity = 64 << 10;
    let identity = Identity::new(options).unwrap();
    let before = resident_bytes();
    let mut peak = before;
    let mut resolved = futures_util::stream::iter(0..DOCS)
        .map(|i| {
            let identity = identity.clone();
            async move {
                identity
                    .resolve(&did(&format!("did:web:h{i}.example.org")))
                    .await
            }
        })
        .buffer_unordered(8);
    let mut count = 0;
    while let Some(ident) = resolved.next().await {
        let ident = ident.unwrap();
        assert_eq!(ident.repo.require_signing_key().unwrap(), &key.public);
        count += 1;
        peak = peak.max(resident_bytes());
    }
    assert_eq!(count, DOCS);
    assert!(
        plc.bytes_served() > 1_900_000_000,
        "{} bytes served",
        plc.bytes_served()
    );
    let grown = peak.saturating_sub(before);
    assert!(grown < BOUND, "resident memory grew by {grown} bytes");
}

/// This process's resident set, from `/proc/self/statm` (pages of 4 KiB).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
