//! Record-content rules (`--record-filters`, `PUT /record-filters`): any text parses or is
//! refused with a position inside it, never a panic; a rule set that parses evaluates on
//! any record, and parses again from the texts it reports.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tap_atproto::record_filter::{Facts, RuleSet, Subject, split_rules};
use tap_atproto::syntax::Nsid;

struct Everything;

impl Facts for Everything {
    fn kept(&self, _: &Nsid, uri: &str) -> bool {
        uri.len() % 2 == 0
    }
    fn any_kept(&self, _: &Nsid) -> bool {
        true
    }
    fn referenced(&self, source: usize, value: &str) -> bool {
        (source + value.len()) % 3 == 0
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let rules = split_rules(&text);
    match RuleSet::parse(&rules) {
        Ok(set) => {
            let again = RuleSet::parse(&set.texts()).expect("reported texts parse again");
            assert_eq!(again.texts(), set.texts());
            let record: serde_json::Value = serde_json::from_slice(data).unwrap_or_else(|_| {
                serde_json::json!({"list": "at://did:plc:a/app.bsky.graph.list/1",
                                   "a": [{"b": 1}, {"b": "x"}], "$type": "x"})
            });
            for rule in set.rules() {
                let subject = Subject { uri: "at://did:plc:a/a.b.c/1", rkey: "1", record: &record };
                let _ = rule.holds(&subject, &Everything);
            }
        }
        Err(e) => {
            assert!(e.rule <= rules.len().max(1) || e.rule == 257, "{e}");
            if e.rule > 0 && e.rule <= rules.len() {
                assert!(e.column <= rules[e.rule - 1].chars().count() + 1, "{e}");
            }
        }
    }
});
