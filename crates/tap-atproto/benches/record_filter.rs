//! Record-content rule evaluation (criterion, wall time; pure CPU on one thread):
//! - `record_filter/regex`: PR 1255's example, `$.subject.uri =~ "app.bsky.feed.generator"`,
//!   on a parsed like.
//! - `record_filter/equality`: `$.list == "<at-uri>"` on a parsed list item.
//! - `record_filter/fan_out`: `$.facets[*].features[*].did in [3 DIDs] and not $.reply exists`
//!   on a parsed post with two facets.
//! - `record_filter/parse_and_regex`: the like's JSON text parsed, then the regex rule —
//!   what tap pays per record of a ruled collection.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benches fail loudly on broken fixtures"
)]
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use tap_atproto::record_filter::{NoFacts, RuleSet, Subject};

fn bench_rule(c: &mut Criterion, name: &str, rule: &str, record: &Value) {
    let rules = RuleSet::parse(&[rule]).unwrap();
    let rule = rules.rules().next().unwrap();
    let subject = Subject {
        uri: "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.feed.like/3kaaaaaaaaa22",
        rkey: "3kaaaaaaaaa22",
        record,
    };
    c.bench_function(&format!("record_filter/{name}"), |b| {
        b.iter(|| rule.holds(black_box(&subject), &NoFacts));
    });
}

fn benches(c: &mut Criterion) {
    let like = json!({"$type": "app.bsky.feed.like", "createdAt": "2026-12-07T00:00:00.000Z",
        "subject": {"uri": "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.feed.generator/hot",
                    "cid": "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"}});
    let item = json!({"$type": "app.bsky.graph.listitem", "createdAt": "2026-12-07T00:00:00.000Z",
        "subject": "did:plc:zyxwvutsrqponmlkjihgfedc",
        "list": "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.graph.list/3kaaaaaaaaa22"});
    let post = json!({"$type": "app.bsky.feed.post", "text": "hello @alice and https://example.com",
        "createdAt": "2026-12-07T00:00:00.000Z", "langs": ["en"], "facets": [
        {"index": {"byteStart": 6, "byteEnd": 12},
         "features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:alicealicealicealicealic"}]},
        {"index": {"byteStart": 17, "byteEnd": 36},
         "features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://example.com"}]}]});
    bench_rule(
        c,
        "regex",
        r#"app.bsky.feed.like: $.subject.uri =~ "app.bsky.feed.generator""#,
        &like,
    );
    bench_rule(
        c,
        "equality",
        r#"app.bsky.graph.listitem: $.list == "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.graph.list/3kaaaaaaaaa22""#,
        &item,
    );
    bench_rule(
        c,
        "fan_out",
        r#"app.bsky.feed.post: $.facets[*].features[*].did in ["did:plc:x", "did:plc:y", "did:plc:alicealicealicealicealic"] and not $.reply exists"#,
        &post,
    );
    let text = like.to_string();
    let rules =
        RuleSet::parse(&[r#"app.bsky.feed.like: $.subject.uri =~ "app.bsky.feed.generator""#])
            .unwrap();
    let rule = rules.rules().next().unwrap();
    c.bench_function("record_filter/parse_and_regex", |b| {
        b.iter(|| {
            let record: Value = serde_json::from_str(black_box(&text)).unwrap();
            let subject = Subject {
                uri: "at://did:plc:abcdefghijklmnopqrstuvwx/app.bsky.feed.like/3kaaaaaaaaa22",
                rkey: "3kaaaaaaaaa22",
                record: &record,
            };
            rule.holds(&subject, &NoFacts)
        });
    });
}

criterion_group!(record_filter, benches);
criterion_main!(record_filter);
