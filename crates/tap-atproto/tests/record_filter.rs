//! Record-content rules: parse errors name the rule, column and reason; evaluation follows
//! the documented semantics; and a property test checks that any rule, printed and parsed,
//! decides every record as a straightforward reference evaluator over the same rule does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use serde_json::{Value, json};
use tap_atproto::record_filter::{Facts, RuleSet, Subject, split_rules};
use tap_atproto::syntax::Nsid;

/// Facts given as sets: kept `(collection, uri)`, and the values named at each
/// `(collection, path text)` of a `refs(..)`.
#[derive(Default)]
struct SetFacts {
    kept: HashSet<(String, String)>,
    refs: HashMap<(String, String), HashSet<String>>,
    sources: Vec<(String, String)>,
}

impl SetFacts {
    fn for_rules(mut self, rules: &RuleSet) -> Self {
        self.sources = rules
            .ref_sources()
            .iter()
            .map(|(c, p)| (c.to_string(), p.to_string()))
            .collect();
        self
    }
}

impl Facts for SetFacts {
    fn kept(&self, collection: &Nsid, uri: &str) -> bool {
        self.kept
            .contains(&(collection.to_string(), uri.to_owned()))
    }
    fn any_kept(&self, collection: &Nsid) -> bool {
        self.kept.iter().any(|(c, _)| c == collection.as_str())
    }
    fn referenced(&self, source: usize, value: &str) -> bool {
        self.refs
            .get(&self.sources[source])
            .is_some_and(|values| values.contains(value))
    }
}

fn holds(rules: &RuleSet, collection: &str, record: &Value, facts: &SetFacts) -> bool {
    let subject = Subject {
        uri: "at://did:plc:me/x.y.z/1",
        rkey: "1",
        record,
    };
    rules.rule(collection).unwrap().holds(&subject, facts)
}

fn one(rule: &str) -> RuleSet {
    RuleSet::parse(&[rule]).unwrap_or_else(|e| panic!("{rule}: {e}"))
}

#[test]
fn the_go_tap_proposals_form_parses_and_matches_by_regex() {
    let rules = one(r#"app.bsky.feed.like: $.subject.uri =~ "app.bsky.feed.generator""#);
    let facts = SetFacts::default();
    let like = |uri: &str| json!({"subject": {"uri": uri, "cid": "bafy"}});
    assert!(holds(
        &rules,
        "app.bsky.feed.like",
        &like("at://did:plc:a/app.bsky.feed.generator/hot"),
        &facts
    ));
    assert!(!holds(
        &rules,
        "app.bsky.feed.like",
        &like("at://did:plc:a/app.bsky.feed.post/1"),
        &facts
    ));
    assert!(rules.rule("app.bsky.feed.post").is_none());
}

#[test]
fn paths_fan_out_over_arrays_and_a_predicate_holds_when_some_value_satisfies_it() {
    let rules = one(
        r#"app.bsky.feed.post: $.facets[*].features[*].did in ["did:plc:x", "did:plc:y"] and not $.reply exists"#,
    );
    let facts = SetFacts::default();
    let post = json!({"text": "hi", "facets": [
        {"features": [{"$type": "app.bsky.richtext.facet#link", "uri": "https://a"}]},
        {"features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:y"}]},
    ]});
    assert!(holds(&rules, "app.bsky.feed.post", &post, &facts));
    let mut reply = post.clone();
    reply["reply"] = json!({"root": {}});
    assert!(!holds(&rules, "app.bsky.feed.post", &reply, &facts));
    let other = json!({"facets": [{"features": [{"did": "did:plc:z"}]}]});
    assert!(!holds(&rules, "app.bsky.feed.post", &other, &facts));
}

#[test]
fn not_equal_holds_when_no_value_equals_the_literal_a_missing_field_included() {
    let rules = one(r#"app.bsky.feed.post: $.langs[*] != "en""#);
    let facts = SetFacts::default();
    let p = |v: Value| holds(&rules, "app.bsky.feed.post", &v, &facts);
    assert!(p(json!({"langs": ["de", "fr"]})));
    assert!(!p(json!({"langs": ["de", "en"]})));
    assert!(p(json!({"text": "no langs"})));
    // Integers, booleans and null compare as JSON values; `$["$type"]` reaches odd keys.
    let rules = one(r#"x.y.z: $.n == 3 or $.flag == true or $["$type"] == "x.y.z#v""#);
    let p = |v: Value| holds(&rules, "x.y.z", &v, &facts);
    assert!(p(json!({"n": 3})));
    assert!(!p(json!({"n": "3"})));
    assert!(p(json!({"flag": true})));
    assert!(p(json!({"$type": "x.y.z#v"})));
    assert!(!p(json!({})));
}

#[test]
fn uri_and_rkey_are_the_records_own() {
    let rules = one(r#"x.y.z: $rkey == "1" and $uri =~ "^at://did:plc:me/""#);
    assert!(holds(&rules, "x.y.z", &json!({}), &SetFacts::default()));
}

#[test]
fn the_starter_pack_rules_parse_and_order_each_collection_after_what_it_reads() {
    let rules = RuleSet::parse(&split_rules(
        "app.bsky.graph.list: $uri in refs(app.bsky.graph.starterpack, $.list); \
         app.bsky.graph.listitem: $.list in kept(app.bsky.graph.list); \
         app.bsky.actor.profile: kept(app.bsky.graph.starterpack)",
    ))
    .unwrap();
    let order: Vec<&str> = rules.dependent_order().iter().map(Nsid::as_str).collect();
    let pos = |c: &str| order.iter().position(|o| *o == c).unwrap();
    assert_eq!(order.len(), 3);
    assert!(pos("app.bsky.graph.list") < pos("app.bsky.graph.listitem"));
    assert!(rules.is_referenced("app.bsky.graph.starterpack"));
    assert!(rules.is_referenced("app.bsky.graph.list"));
    assert!(!rules.is_referenced("app.bsky.graph.listitem"));
    assert!(rules.needs_referrers("app.bsky.graph.list"));
    assert!(!rules.needs_referrers("app.bsky.graph.listitem"));

    let me = "at://did:plc:me";
    let list = format!("{me}/app.bsky.graph.list/l1");
    let mut facts = SetFacts::default().for_rules(&rules);
    let list_record = json!({"purpose": "app.bsky.graph.defs#curatelist", "name": "pack"});
    let subject = Subject {
        uri: &list,
        rkey: "l1",
        record: &list_record,
    };
    let list_rule = rules.rule("app.bsky.graph.list").unwrap();
    assert!(
        !list_rule.holds(&subject, &facts),
        "no starter pack names it yet"
    );
    let pack = json!({"list": list, "name": "pack"});
    let mut named = Vec::new();
    rules.for_each_reference("app.bsky.graph.starterpack", &pack, &mut |i, v| {
        named.push((i, v.to_owned()));
    });
    assert_eq!(named.len(), 1);
    facts
        .refs
        .entry(facts.sources[named[0].0].clone())
        .or_default()
        .insert(named[0].1.clone());
    assert!(list_rule.holds(&subject, &facts));

    let item = json!({"list": list, "subject": "did:plc:member"});
    assert!(!holds(&rules, "app.bsky.graph.listitem", &item, &facts));
    facts
        .kept
        .insert(("app.bsky.graph.list".into(), list.clone()));
    assert!(holds(&rules, "app.bsky.graph.listitem", &item, &facts));
    assert!(!holds(&rules, "app.bsky.actor.profile", &json!({}), &facts));
    facts.kept.insert((
        "app.bsky.graph.starterpack".into(),
        format!("{me}/app.bsky.graph.starterpack/p"),
    ));
    assert!(holds(&rules, "app.bsky.actor.profile", &json!({}), &facts));
}

#[test]
fn a_rule_that_does_not_parse_is_refused_with_its_column_and_reason() {
    let cases: &[(&[&str], usize, usize, &str)] = &[
        (&["app.bsky.feed.like $.a == 1"], 1, 20, "expected `:`"),
        (
            &["app.bsky.feed.like: $.a === 1"],
            1,
            27,
            "unexpected character",
        ),
        (
            &["app.bsky.feed.like: $.a == \"open"],
            1,
            28,
            "never closed",
        ),
        (
            &["app.bsky.feed.like: $.a =~ \"(\""],
            1,
            28,
            "regular expression",
        ),
        (
            &["app.bsky.feed.like: $.a ~= 1"],
            1,
            25,
            "unexpected character",
        ),
        (
            &["app.bsky.feed.like: $.a.b == 1 and"],
            1,
            35,
            "expected a path",
        ),
        (&["app.bsky.feed.like: ($.a exists"], 1, 32, "expected `)`"),
        (
            &["app.bsky.feed.like: $foo == 1"],
            1,
            21,
            "unknown variable",
        ),
        (&["nope: $.a exists"], 1, 1, "not a collection NSID"),
        (
            &[
                "a.b.c: $.x exists",
                "d.e.f: $.y exists",
                "a.b.c: $.z exists",
            ],
            3,
            1,
            "a second rule for a.b.c",
        ),
        (&["a.b.c: $.x in [1, 2"], 1, 20, "expected `,` or `]`"),
    ];
    for (rules, rule, column, reason) in cases {
        let e = RuleSet::parse(rules).expect_err(rules[0]);
        assert_eq!((e.rule, e.column), (*rule, *column), "{rules:?}: {e}");
        assert!(e.reason.contains(reason), "{rules:?}: {e}");
    }
    let e = RuleSet::parse(&[
        "a.b.c: $.x in kept(d.e.f)",
        "d.e.f: $uri in refs(a.b.c, $.y)",
    ])
    .unwrap_err();
    assert!(e.reason.contains("cycle"), "{e}");
    assert!(e.reason.contains("a.b.c → d.e.f → a.b.c"), "{e}");
    let e = RuleSet::parse(&["a.b.c: kept(a.b.c)"]).unwrap_err();
    assert!(e.reason.contains("cycle"), "{e}");
    let deep = format!("a.b.c: {}$.x exists{}", "(".repeat(40), ")".repeat(40));
    assert!(
        RuleSet::parse(&[deep])
            .unwrap_err()
            .reason
            .contains("deeper")
    );
}

#[test]
fn semicolons_split_rules_except_inside_strings() {
    assert_eq!(
        split_rules(r#" a.b.c: $.x == "1;2" ; d.e.f: $.y =~ 'a\';b' ;; "#),
        vec![r#"a.b.c: $.x == "1;2""#, r#"d.e.f: $.y =~ 'a\';b'"#]
    );
}

// ---- The property: printed, parsed and evaluated = the reference evaluator. ----

#[derive(Debug, Clone)]
enum TStep {
    Field(String),
    All,
    Index(usize),
}

#[derive(Debug, Clone)]
enum TOperand {
    Path(Vec<TStep>),
    Uri,
    Rkey,
}

#[derive(Debug, Clone)]
enum TTest {
    Exists,
    Eq(Value),
    Ne(Value),
    Re(String),
    In(Vec<Value>),
    InKept(String),
    InRefs(String, Vec<TStep>),
}

#[derive(Debug, Clone)]
enum TExpr {
    And(Vec<TExpr>),
    Or(Vec<TExpr>),
    Not(Box<TExpr>),
    AnyKept(String),
    Pred(TOperand, TTest),
}

fn path_text(steps: &[TStep]) -> String {
    let mut s = String::from("$");
    for step in steps {
        match step {
            TStep::Field(f) if f.starts_with('$') => s.push_str(&format!("[\"{f}\"]")),
            TStep::Field(f) => s.push_str(&format!(".{f}")),
            TStep::All => s.push_str("[*]"),
            TStep::Index(n) => s.push_str(&format!("[{n}]")),
        }
    }
    s
}

fn literal_text(v: &Value) -> String {
    v.to_string()
}

fn render(e: &TExpr) -> String {
    match e {
        TExpr::And(p) => format!(
            "({})",
            p.iter().map(render).collect::<Vec<_>>().join(" and ")
        ),
        TExpr::Or(p) => format!(
            "({})",
            p.iter().map(render).collect::<Vec<_>>().join(" or ")
        ),
        TExpr::Not(p) => format!("not {}", render(p)),
        TExpr::AnyKept(c) => format!("kept({c})"),
        TExpr::Pred(o, t) => {
            let o = match o {
                TOperand::Path(p) => path_text(p),
                TOperand::Uri => "$uri".into(),
                TOperand::Rkey => "$rkey".into(),
            };
            let t = match t {
                TTest::Exists => "exists".into(),
                TTest::Eq(v) => format!("== {}", literal_text(v)),
                TTest::Ne(v) => format!("!= {}", literal_text(v)),
                TTest::Re(r) => format!("=~ {}", Value::String(r.clone())),
                TTest::In(vs) => format!(
                    "in [{}]",
                    vs.iter().map(literal_text).collect::<Vec<_>>().join(", ")
                ),
                TTest::InKept(c) => format!("in kept({c})"),
                TTest::InRefs(c, p) => format!("in refs({c}, {})", path_text(p)),
            };
            format!("{o} {t}")
        }
    }
}

/// Every value a path names, by plain recursion.
fn values(steps: &[TStep], v: &Value) -> Vec<Value> {
    let Some((first, rest)) = steps.split_first() else {
        return vec![v.clone()];
    };
    let next: Vec<&Value> = match (first, v) {
        (TStep::Field(f), Value::Object(m)) => m.get(f).into_iter().collect(),
        (TStep::All, Value::Array(a)) => a.iter().collect(),
        (TStep::All, Value::Object(m)) => m.values().collect(),
        (TStep::Index(n), Value::Array(a)) => a.get(*n).into_iter().collect(),
        _ => vec![],
    };
    next.into_iter().flat_map(|n| values(rest, n)).collect()
}

struct World {
    uri: String,
    rkey: String,
    kept: HashSet<(String, String)>,
    refs: HashMap<(String, String), HashSet<String>>,
}

fn reference(e: &TExpr, record: &Value, w: &World) -> bool {
    match e {
        TExpr::And(p) => p.iter().all(|x| reference(x, record, w)),
        TExpr::Or(p) => p.iter().any(|x| reference(x, record, w)),
        TExpr::Not(p) => !reference(p, record, w),
        TExpr::AnyKept(c) => w.kept.iter().any(|(k, _)| k == c),
        TExpr::Pred(o, t) => {
            let vals = match o {
                TOperand::Path(p) => values(p, record),
                TOperand::Uri => vec![Value::String(w.uri.clone())],
                TOperand::Rkey => vec![Value::String(w.rkey.clone())],
            };
            let strs = || vals.iter().filter_map(|v| v.as_str().map(str::to_owned));
            match t {
                TTest::Exists => vals.iter().any(|v| !v.is_null()),
                TTest::Eq(l) => vals.contains(l),
                TTest::Ne(l) => !vals.contains(l),
                TTest::Re(r) => {
                    let re = regex::Regex::new(r).unwrap();
                    strs().any(|s| re.is_match(&s))
                }
                TTest::In(ls) => vals.iter().any(|v| ls.contains(v)),
                TTest::InKept(c) => strs().any(|s| w.kept.contains(&(c.clone(), s))),
                TTest::InRefs(c, p) => strs().any(|s| {
                    w.refs
                        .get(&(c.clone(), path_text(p)))
                        .is_some_and(|set| set.contains(&s))
                }),
            }
        }
    }
}

fn ref_paths(e: &TExpr) -> Vec<(String, Vec<TStep>)> {
    match e {
        TExpr::And(p) | TExpr::Or(p) => p.iter().flat_map(ref_paths).collect(),
        TExpr::Not(p) => ref_paths(p),
        TExpr::Pred(_, TTest::InRefs(c, steps)) => vec![(c.clone(), steps.clone())],
        _ => vec![],
    }
}

const URIS: [&str; 3] = [
    "at://did:plc:me/a.b.c/1",
    "at://did:plc:me/d.e.f/2",
    "at://did:plc:other/a.b.c/1",
];
const COLLECTIONS: [&str; 2] = ["a.b.c", "d.e.f"];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["x", "y", "xy", "", URIS[0], URIS[1], URIS[2]])
            .prop_map(|s| json!(s)),
        (-2i64..3).prop_map(|n| json!(n)),
        any::<bool>().prop_map(|b| json!(b)),
        Just(Value::Null),
    ]
}

fn record() -> impl Strategy<Value = Value> {
    let leaf = scalar();
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec!["a", "b", "c", "$type"]),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

fn steps() -> impl Strategy<Value = Vec<TStep>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(vec!["a", "b", "c", "$type"])
                .prop_map(|f| TStep::Field(f.to_owned())),
            Just(TStep::All),
            (0usize..3).prop_map(TStep::Index),
        ],
        0..4,
    )
}

fn expr() -> impl Strategy<Value = TExpr> {
    let collection = prop::sample::select(COLLECTIONS.to_vec()).prop_map(str::to_owned);
    let operand = prop_oneof![
        4 => steps().prop_map(TOperand::Path),
        1 => Just(TOperand::Uri),
        1 => Just(TOperand::Rkey),
    ];
    let test = prop_oneof![
        Just(TTest::Exists),
        scalar().prop_map(TTest::Eq),
        scalar().prop_map(TTest::Ne),
        prop::sample::select(vec!["x", "^x$", "y$", "did:plc:me", "a\\.b"])
            .prop_map(|r| TTest::Re(r.to_owned())),
        prop::collection::vec(scalar(), 1..4).prop_map(TTest::In),
        collection.clone().prop_map(TTest::InKept),
        (collection.clone(), steps()).prop_map(|(c, p)| TTest::InRefs(c, p)),
    ];
    let leaf = prop_oneof![
        6 => (operand, test).prop_map(|(o, t)| TExpr::Pred(o, t)),
        1 => collection.prop_map(TExpr::AnyKept),
    ];
    leaf.prop_recursive(4, 32, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(TExpr::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(TExpr::Or),
            inner.prop_map(|e| TExpr::Not(Box::new(e))),
        ]
    })
}

fn world() -> impl Strategy<Value = (HashSet<(String, String)>, Vec<(String, String, Value)>)> {
    (
        prop::collection::hash_set(
            (
                prop::sample::select(COLLECTIONS.to_vec()).prop_map(str::to_owned),
                prop::sample::select(URIS.to_vec()).prop_map(str::to_owned),
            ),
            0..4,
        ),
        // Delivered records of the referenced collections, which name values at paths.
        prop::collection::vec(
            (
                prop::sample::select(COLLECTIONS.to_vec()).prop_map(str::to_owned),
                prop::sample::select(vec!["uri", "list"]).prop_map(str::to_owned),
                record(),
            ),
            0..3,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn a_printed_and_parsed_rule_decides_as_the_reference_evaluator_does(
        e in expr(),
        rec in record(),
        (kept, referrers) in world(),
    ) {
        let text = format!("x.y.z: {}", render(&e));
        let rules = RuleSet::parse(&[&text]).map_err(|err| TestCaseError::fail(format!("{text}: {err}")))?;
        // What `refs(C, p)` sees: the values the referrers of C name at p, computed apart
        // for the library (by its parsed sources) and for the reference (by plain recursion).
        let mut lib_refs: HashMap<(String, String), HashSet<String>> = HashMap::new();
        for (c, p) in rules.ref_sources() {
            let set = lib_refs.entry((c.to_string(), p.to_string())).or_default();
            for (_, _, body) in referrers.iter().filter(|(rc, _, _)| rc == c.as_str()) {
                p.for_each(body, &mut |v| { if let Some(s) = v.as_str() { set.insert(s.to_owned()); } });
            }
        }
        let mut ref_refs: HashMap<(String, String), HashSet<String>> = HashMap::new();
        for (c, steps) in ref_paths(&e) {
            let set = ref_refs.entry((c.clone(), path_text(&steps))).or_default();
            for (_, _, body) in referrers.iter().filter(|(rc, _, _)| *rc == c) {
                set.extend(values(&steps, body).iter().filter_map(|v| v.as_str().map(str::to_owned)));
            }
        }
        let facts = SetFacts { kept: kept.clone(), refs: lib_refs, ..SetFacts::default() }.for_rules(&rules);
        let w = World { uri: URIS[0].to_owned(), rkey: "1".to_owned(), kept, refs: ref_refs };
        let subject = Subject { uri: &w.uri, rkey: &w.rkey, record: &rec };
        let got = rules.rule("x.y.z").unwrap().holds(&subject, &facts);
        prop_assert_eq!(got, reference(&e, &rec, &w), "{}", text);
    }
}
