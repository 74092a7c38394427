//! Record-content rules: which records of a collection are delivered, decided on the
//! record's JSON data model and on the other delivered records of the same repo.
//!
//! A rule reads `<collection>: <expression>`, the form of the record-content filters
//! proposed for the Go tap (`app.bsky.feed.like: $.subject.uri =~ "feed.generator"`),
//! extended with boolean connectives and references within the repo:
//!
//! ```text
//! expression := term ('or' term)*
//! term       := factor ('and' factor)*
//! factor     := 'not' factor | '(' expression ')' | 'kept' '(' nsid ')' | predicate
//! predicate  := operand 'exists'
//!             | operand ('==' | '!=') literal
//!             | operand '=~' string                   (regex, unanchored)
//!             | operand 'in' '[' literal (',' literal)* ']'
//!             | operand 'in' 'kept' '(' nsid ')'       (an at-uri of a delivered record)
//!             | operand 'in' 'refs' '(' nsid ',' path ')'  (named by a delivered record)
//! operand    := path | '$uri' | '$rkey'
//! path       := '$' ( '.' name | '[' '"' name '"' ']' | '[*]' | '[' digits ']' )*
//! literal    := string | integer | 'true' | 'false' | 'null'
//! ```
//!
//! A path names any number of values (`[*]` fans out over an array's items); a predicate
//! holds when **some** named value satisfies it, and `!=` is the negation of `==` (it holds
//! when no value equals the literal, a missing field included). `kept(C)` alone holds when
//! the repo has a delivered record of `C`. References are to records of the same repo.
//!
//! Rules that reference collections are evaluated after the collections they reference;
//! a cycle of references is refused when the rules are parsed. Pure: evaluation asks a
//! [`Facts`] for what it needs to know about the other records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use regex::{Regex, RegexBuilder};
use serde_json::Value;

use crate::syntax::Nsid;

/// Longest rule accepted, in bytes.
pub const MAX_RULE_BYTES: usize = 4096;
/// Most rules in one set.
pub const MAX_RULES: usize = 256;
/// Deepest nesting of parentheses and `not`.
const MAX_DEPTH: usize = 32;
/// Compiled size limit of one regex: a pattern that would exceed it is refused.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why a rule set was refused: which rule, where in it (a 1-based character column), and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule} ({text:?}), column {column}: {reason}")]
pub struct RuleError {
    /// 1-based index of the rule in the set.
    pub rule: usize,
    /// The rule as given.
    pub text: String,
    /// 1-based character column of the problem (0: the rule as a whole).
    pub column: usize,
    /// What is wrong.
    pub reason: String,
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    /// An object's field.
    Field(String),
    /// Every item of an array (every value of an object).
    All,
    /// One item of an array.
    Index(usize),
}

/// A path into a record: `$` followed by steps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path(pub Vec<Step>);

impl Path {
    /// Calls `f` with every value the path names in `root`.
    pub fn for_each<'v>(&self, root: &'v Value, f: &mut impl FnMut(&'v Value)) {
        walk(&self.0, root, f);
    }
}

fn walk<'v>(steps: &[Step], v: &'v Value, f: &mut impl FnMut(&'v Value)) {
    let Some((step, rest)) = steps.split_first() else {
        f(v);
        return;
    };
    match (step, v) {
        (Step::Field(name), Value::Object(map)) => {
            if let Some(next) = map.get(name) {
                walk(rest, next, f);
            }
        }
        (Step::All, Value::Array(items)) => items.iter().for_each(|i| walk(rest, i, f)),
        (Step::All, Value::Object(map)) => map.values().for_each(|i| walk(rest, i, f)),
        (Step::Index(n), Value::Array(items)) => {
            if let Some(next) = items.get(*n) {
                walk(rest, next, f);
            }
        }
        _ => {}
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for step in &self.0 {
            match step {
                Step::Field(name) if is_plain_name(name) => write!(f, ".{name}")?,
                Step::Field(name) => write!(f, "[{}]", Value::String(name.clone()))?,
                Step::All => f.write_str("[*]")?,
                Step::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '-'))
}

/// What a predicate tests values from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    /// Values inside the record.
    Path(Path),
    /// The record's own at-uri.
    Uri,
    /// The record's key.
    Rkey,
}

/// The test a predicate applies to its operand's values.
#[derive(Debug, Clone)]
pub enum Test {
    /// Some non-null value.
    Exists,
    /// Some value equals the literal.
    Eq(Value),
    /// No value equals the literal.
    Ne(Value),
    /// Some string value matches the regex.
    Matches(Regex),
    /// Some value equals one of the literals.
    In(Vec<Value>),
    /// Some string value is the at-uri of a delivered record of the collection.
    InKept(Nsid),
    /// Some string value is named, at the path, by a delivered record of the collection
    /// (the index into [`RuleSet::ref_sources`]).
    InRefs(usize),
}

/// A rule's expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Every part holds.
    And(Vec<Expr>),
    /// Some part holds.
    Or(Vec<Expr>),
    /// The part does not hold.
    Not(Box<Expr>),
    /// The repo has a delivered record of the collection.
    AnyKept(Nsid),
    /// A predicate on the record.
    Pred(Operand, Test),
}

/// The record a rule is evaluated on.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// `at://<did>/<collection>/<rkey>`.
    pub uri: &'a str,
    /// The record key.
    pub rkey: &'a str,
    /// The record as JSON (`Value::Null` when it could not be read: only `not` and `!=`
    /// then hold).
    pub record: &'a Value,
}

/// What a rule may ask about the other records of the repo.
pub trait Facts {
    /// Whether `uri` is the at-uri of a delivered record of `collection` in this repo.
    fn kept(&self, collection: &Nsid, uri: &str) -> bool;
    /// Whether the repo has any delivered record of `collection`.
    fn any_kept(&self, collection: &Nsid) -> bool;
    /// Whether a delivered record of [`RuleSet::ref_sources`]`[source]`'s collection names
    /// `value` at its path.
    fn referenced(&self, source: usize, value: &str) -> bool;
}

/// Facts for a rule that reads no other record (or a caller that has none to give):
/// nothing is kept, nothing referenced.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFacts;

impl Facts for NoFacts {
    fn kept(&self, _: &Nsid, _: &str) -> bool {
        false
    }
    fn any_kept(&self, _: &Nsid) -> bool {
        false
    }
    fn referenced(&self, _: usize, _: &str) -> bool {
        false
    }
}

/// A rule: the collection it governs and its expression.
#[derive(Debug, Clone)]
pub struct Rule {
    collection: Nsid,
    expr: Expr,
    text: String,
    depends_on: BTreeSet<Nsid>,
}

impl Rule {
    /// The collection the rule governs.
    #[must_use]
    pub fn collection(&self) -> &Nsid {
        &self.collection
    }

    /// The rule as given (trimmed).
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The collections whose delivered records the rule reads.
    #[must_use]
    pub fn depends_on(&self) -> &BTreeSet<Nsid> {
        &self.depends_on
    }

    /// Whether `subject` is delivered.
    pub fn holds(&self, subject: &Subject<'_>, facts: &dyn Facts) -> bool {
        eval(&self.expr, subject, facts)
    }
}

fn eval(expr: &Expr, s: &Subject<'_>, facts: &dyn Facts) -> bool {
    match expr {
        Expr::And(parts) => parts.iter().all(|p| eval(p, s, facts)),
        Expr::Or(parts) => parts.iter().any(|p| eval(p, s, facts)),
        Expr::Not(part) => !eval(part, s, facts),
        Expr::AnyKept(collection) => facts.any_kept(collection),
        Expr::Pred(operand, Test::Ne(literal)) => !any_value(operand, s, |v| v == literal),
        Expr::Pred(operand, test) => any_value(operand, s, |v| match test {
            Test::Exists => !v.is_null(),
            Test::Eq(literal) => v == literal,
            Test::Ne(_) => unreachable!("handled above"),
            Test::Matches(re) => v.as_str().is_some_and(|t| re.is_match(t)),
            Test::In(literals) => literals.contains(v),
            Test::InKept(c) => v.as_str().is_some_and(|t| facts.kept(c, t)),
            Test::InRefs(source) => v.as_str().is_some_and(|t| facts.referenced(*source, t)),
        }),
    }
}

fn any_value(operand: &Operand, s: &Subject<'_>, mut test: impl FnMut(&Value) -> bool) -> bool {
    match operand {
        Operand::Uri => test(&Value::String(s.uri.to_owned())),
        Operand::Rkey => test(&Value::String(s.rkey.to_owned())),
        Operand::Path(path) => {
            let mut found = false;
            path.for_each(s.record, &mut |v| found = found || test(v));
            found
        }
    }
}

/// A set of rules, at most one per collection, checked free of reference cycles.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: BTreeMap<String, Rule>,
    /// `(collection, path)` pairs named by `refs(..)`, indexed by [`Test::InRefs`].
    ref_sources: Vec<(Nsid, Path)>,
    /// Collections with rules that reference others, each after what it depends on.
    order: Vec<Nsid>,
    /// Collections some rule reads (asked per record, so kept rather than searched).
    referenced: BTreeSet<String>,
}

impl RuleSet {
    /// Parses rules, each `<collection>: <expression>`.
    ///
    /// # Errors
    /// The first rule that does not parse, a second rule for one collection, or a cycle of
    /// references, with the rule and column.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(RuleError {
                rule: MAX_RULES + 1,
                text: String::new(),
                column: 0,
                reason: format!("at most {MAX_RULES} rules"),
            });
        }
        let mut set = Self::default();
        for (i, text) in rules.iter().enumerate() {
            let text = text.as_ref().trim();
            let fail = |column: usize, reason: String| RuleError {
                rule: i + 1,
                text: text.to_owned(),
                column,
                reason,
            };
            let rule = Parser::rule(text, &mut set.ref_sources).map_err(|(c, r)| fail(c, r))?;
            if set.rules.contains_key(rule.collection.as_str()) {
                return Err(fail(
                    1,
                    format!(
                        "a second rule for {}: one rule per collection (combine them with `or`)",
                        rule.collection
                    ),
                ));
            }
            set.rules.insert(rule.collection.as_str().to_owned(), rule);
        }
        set.order = set.dependency_order()?;
        set.referenced = set
            .rules
            .values()
            .flat_map(|r| r.depends_on.iter().map(|d| d.as_str().to_owned()))
            .collect();
        Ok(set)
    }

    /// Whether there are no rules.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule governing `collection`, if any.
    #[must_use]
    pub fn rule(&self, collection: &str) -> Option<&Rule> {
        self.rules.get(collection)
    }

    /// The rules, by collection.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// The `(collection, path)` pairs that `refs(..)` names.
    #[must_use]
    pub fn ref_sources(&self) -> &[(Nsid, Path)] {
        &self.ref_sources
    }

    /// Collections whose rules reference other collections, ordered so each comes after
    /// every collection it depends on.
    #[must_use]
    pub fn dependent_order(&self) -> &[Nsid] {
        &self.order
    }

    /// Whether some rule reads the delivered records of `collection`.
    #[must_use]
    pub fn is_referenced(&self, collection: &str) -> bool {
        self.referenced.contains(collection)
    }

    /// Whether some `refs(..)` reads values inside `collection`'s records.
    #[must_use]
    pub fn is_ref_source(&self, collection: &str) -> bool {
        self.ref_sources
            .iter()
            .any(|(c, _)| c.as_str() == collection)
    }

    /// Whether `collection`'s rule references other collections.
    #[must_use]
    pub fn is_dependent(&self, collection: &str) -> bool {
        self.rules
            .get(collection)
            .is_some_and(|r| !r.depends_on.is_empty())
    }

    /// Whether `collection`'s rule uses `refs(..)`: it depends on records that name it,
    /// which only a look at the whole repo finds.
    #[must_use]
    pub fn needs_referrers(&self, collection: &str) -> bool {
        self.rules
            .get(collection)
            .is_some_and(|r| expr_uses_refs(&r.expr))
    }

    /// Calls `f(source, value)` for every value a delivered record of `collection` names
    /// at a `refs(..)` path (string values only).
    pub fn for_each_reference(
        &self,
        collection: &str,
        record: &Value,
        f: &mut impl FnMut(usize, &str),
    ) {
        for (i, (c, path)) in self.ref_sources.iter().enumerate() {
            if c.as_str() == collection {
                path.for_each(record, &mut |v| {
                    if let Some(s) = v.as_str() {
                        f(i, s);
                    }
                });
            }
        }
    }

    /// The rules as given, by collection.
    #[must_use]
    pub fn texts(&self) -> Vec<String> {
        self.rules.values().map(|r| r.text.clone()).collect()
    }

    /// Depth-first order of the dependent rules; a reference cycle is an error naming it.
    fn dependency_order(&self) -> Result<Vec<Nsid>, RuleError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Visiting,
            Done,
        }
        fn visit(
            set: &RuleSet,
            c: &Nsid,
            marks: &mut BTreeMap<Nsid, Mark>,
            path: &mut Vec<Nsid>,
            out: &mut Vec<Nsid>,
        ) -> Result<(), Vec<Nsid>> {
            match marks.get(c) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    let start = path.iter().position(|p| p == c).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(c.clone());
                    return Err(cycle);
                }
                None => {}
            }
            let Some(rule) = set.rules.get(c.as_str()) else {
                return Ok(()); // no rule: its records are decided by the collection filters
            };
            marks.insert(c.clone(), Mark::Visiting);
            path.push(c.clone());
            for d in &rule.depends_on {
                visit(set, d, marks, path, out)?;
            }
            path.pop();
            marks.insert(c.clone(), Mark::Done);
            if !rule.depends_on.is_empty() {
                out.push(c.clone());
            }
            Ok(())
        }
        let mut marks = BTreeMap::new();
        let mut out = Vec::new();
        for rule in self.rules.values() {
            visit(self, &rule.collection, &mut marks, &mut Vec::new(), &mut out).map_err(|cycle| {
                let first = &cycle[0];
                let names: Vec<&str> = cycle.iter().map(Nsid::as_str).collect();
                RuleError {
                    rule: 0,
                    text: self.rules[first.as_str()].text.clone(),
                    column: 0,
                    reason: format!(
                        "the rules reference each other in a cycle ({}): a record's fate would depend on itself",
                        names.join(" → ")
                    ),
                }
            })?;
        }
        Ok(out)
    }
}

fn expr_uses_refs(expr: &Expr) -> bool {
    match expr {
        Expr::And(parts) | Expr::Or(parts) => parts.iter().any(expr_uses_refs),
        Expr::Not(part) => expr_uses_refs(part),
        Expr::AnyKept(_) => false,
        Expr::Pred(_, test) => matches!(test, Test::InRefs(_)),
    }
}

/// Splits a flag value holding several rules separated by `;` (outside string literals).
#[must_use]
pub fn split_rules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == ';' => {
                out.push(std::mem::take(&mut current));
                continue;
            }
            None => {}
        }
        current.push(c);
    }
    out.push(current);
    out.into_iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect()
}

/// A token with its 1-based character column.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Path(Path),
    Uri,
    Rkey,
    Str(String),
    Int(i64),
    Punct(&'static str),
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Word(w) => write!(f, "`{w}`"),
            Self::Path(p) => write!(f, "path `{p}`"),
            Self::Uri => f.write_str("`$uri`"),
            Self::Rkey => f.write_str("`$rkey`"),
            Self::Str(s) => write!(f, "string {}", Value::String(s.clone())),
            Self::Int(n) => write!(f, "number {n}"),
            Self::Punct(p) => write!(f, "`{p}`"),
            Self::End => f.write_str("the end of the rule"),
        }
    }
}

type Fail = (usize, String);

fn lex(text: &str) -> Result<Vec<(usize, Tok)>, Fail> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        if let Some(p) = ["==", "!=", "=~"].into_iter().find(|p| *p == two) {
            out.push((col, Tok::Punct(p)));
            i += 2;
            continue;
        }
        if let Some(p) = ["(", ")", "[", "]", ",", ":"]
            .into_iter()
            .find(|p| p.starts_with(c))
        {
            out.push((col, Tok::Punct(p)));
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' => {
                let (s, next) = lex_string(&chars, i)?;
                out.push((col, Tok::Str(s)));
                i = next;
            }
            '$' => {
                let (tok, next) = lex_path(&chars, i)?;
                out.push((col, tok));
                i = next;
            }
            '-' | '0'..='9' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                let digits: String = chars[start..i].iter().collect();
                let n = digits
                    .parse::<i64>()
                    .map_err(|_| (col, format!("{digits:?} is not an integer")))?;
                out.push((col, Tok::Int(n)));
            }
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '-' | '_'))
                {
                    i += 1;
                }
                out.push((col, Tok::Word(chars[start..i].iter().collect())));
            }
            c => return Err((col, format!("unexpected character {c:?}"))),
        }
    }
    out.push((chars.len() + 1, Tok::End));
    Ok(out)
}

fn lex_string(chars: &[char], start: usize) -> Result<(String, usize), Fail> {
    let quote = chars[start];
    let mut s = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                let Some(&e) = chars.get(i + 1) else { break };
                s.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    other => other,
                });
                i += 2;
            }
            c if c == quote => return Ok((s, i + 1)),
            c => {
                s.push(c);
                i += 1;
            }
        }
    }
    Err((start + 1, "this string is never closed".into()))
}

fn lex_path(chars: &[char], start: usize) -> Result<(Tok, usize), Fail> {
    let word_end = |from: usize| {
        let mut j = from;
        while j < chars.len()
            && (chars[j].is_ascii_alphanumeric() || matches!(chars[j], '_' | '$' | '-'))
        {
            j += 1;
        }
        j
    };
    let after = word_end(start + 1);
    let word: String = chars[start + 1..after].iter().collect();
    match word.as_str() {
        "uri" => return Ok((Tok::Uri, after)),
        "rkey" => return Ok((Tok::Rkey, after)),
        "" => {}
        other => {
            return Err((
                start + 1,
                format!("unknown variable ${other}: a path starts `$.`, or use `$uri` or `$rkey`"),
            ));
        }
    }
    let mut steps = Vec::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            Some('.') => {
                let end = word_end(i + 1);
                if end == i + 1 {
                    return Err((i + 1, "a field name must follow `.`".into()));
                }
                steps.push(Step::Field(chars[i + 1..end].iter().collect()));
                i = end;
            }
            Some('[') => match chars.get(i + 1) {
                Some('*') if chars.get(i + 2) == Some(&']') => {
                    steps.push(Step::All);
                    i += 3;
                }
                Some('"' | '\'') => {
                    let (name, next) = lex_string(chars, i + 1)?;
                    if chars.get(next) != Some(&']') {
                        return Err((next + 1, "expected `]` after the field name".into()));
                    }
                    steps.push(Step::Field(name));
                    i = next + 1;
                }
                Some(c) if c.is_ascii_digit() => {
                    let mut j = i + 1;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    let digits: String = chars[i + 1..j].iter().collect();
                    let n = digits
                        .parse::<usize>()
                        .map_err(|_| (i + 2, format!("index {digits} is too large")))?;
                    if chars.get(j) != Some(&']') {
                        return Err((j + 1, "expected `]` after the index".into()));
                    }
                    steps.push(Step::Index(n));
                    i = j + 1;
                }
                _ => {
                    return Err((
                        i + 1,
                        "expected `[*]`, `[<index>]` or `[\"<field>\"]`".into(),
                    ));
                }
            },
            _ => break,
        }
    }
    Ok((Tok::Path(Path(steps)), i))
}

struct Parser<'a> {
    toks: Vec<(usize, Tok)>,
    at: usize,
    depth: usize,
    ref_sources: &'a mut Vec<(Nsid, Path)>,
    depends_on: BTreeSet<Nsid>,
}

impl<'a> Parser<'a> {
    fn rule(text: &str, ref_sources: &'a mut Vec<(Nsid, Path)>) -> Result<Rule, Fail> {
        if text.len() > MAX_RULE_BYTES {
            return Err((0, format!("longer than {MAX_RULE_BYTES} bytes")));
        }
        let mut p = Parser {
            toks: lex(text)?,
            at: 0,
            depth: 0,
            ref_sources,
            depends_on: BTreeSet::new(),
        };
        let collection = p.nsid("the collection the rule is for")?;
        p.expect(":", "`:` after the collection")?;
        let expr = p.or()?;
        if p.peek() != &Tok::End {
            return Err(p.unexpected("`and`, `or` or the end of the rule"));
        }
        Ok(Rule {
            collection,
            expr,
            text: text.to_owned(),
            depends_on: p.depends_on,
        })
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.at].1
    }

    fn column(&self) -> usize {
        self.toks[self.at].0
    }

    fn next(&mut self) -> Tok {
        let tok = self.toks[self.at].1.clone();
        if tok != Tok::End {
            self.at += 1;
        }
        tok
    }

    /// Takes the next token if `f` accepts it; otherwise an error naming what was wanted.
    fn take<T>(&mut self, wanted: &str, f: impl FnOnce(&Tok) -> Option<T>) -> Result<T, Fail> {
        match f(self.peek()) {
            Some(v) => {
                self.next();
                Ok(v)
            }
            None => Err(self.unexpected(wanted)),
        }
    }

    fn unexpected(&self, wanted: &str) -> Fail {
        (
            self.column(),
            format!("expected {wanted}, found {}", self.peek()),
        )
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(self.peek(), Tok::Word(x) if x == w)
    }

    fn expect(&mut self, punct: &str, wanted: &str) -> Result<(), Fail> {
        if matches!(self.peek(), Tok::Punct(p) if *p == punct) {
            self.next();
            Ok(())
        } else {
            Err(self.unexpected(wanted))
        }
    }

    fn nsid(&mut self, wanted: &str) -> Result<Nsid, Fail> {
        let col = self.column();
        let w = self.take(wanted, |t| match t {
            Tok::Word(w) => Some(w.clone()),
            _ => None,
        })?;
        w.parse::<Nsid>()
            .map_err(|e| (col, format!("{w:?} is not a collection NSID: {e}")))
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Fail>) -> Result<T, Fail> {
        if self.depth >= MAX_DEPTH {
            return Err((self.column(), format!("nested deeper than {MAX_DEPTH}")));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn or(&mut self) -> Result<Expr, Fail> {
        self.joined("or", Self::and, Expr::Or)
    }

    fn and(&mut self) -> Result<Expr, Fail> {
        self.joined("and", Self::factor, Expr::And)
    }

    /// `part (word part)*`: one part alone, or all of them under `join`.
    fn joined(
        &mut self,
        word: &str,
        part: fn(&mut Self) -> Result<Expr, Fail>,
        join: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, Fail> {
        let mut parts = vec![part(self)?];
        while self.is_word(word) {
            self.next();
            parts.push(part(self)?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            join(parts)
        })
    }

    fn factor(&mut self) -> Result<Expr, Fail> {
        if self.is_word("not") {
            self.next();
            return self.nested(|p| Ok(Expr::Not(Box::new(p.factor()?))));
        }
        if self.is_word("kept") {
            self.next();
            return Ok(Expr::AnyKept(self.collection_arg()?));
        }
        if matches!(self.peek(), Tok::Punct("(")) {
            self.next();
            let inner = self.nested(Self::or)?;
            self.expect(")", "`)`")?;
            return Ok(inner);
        }
        let operand = self.take(
            "a path (`$.field`), `$uri`, `$rkey`, `not`, `kept(..)` or `(`",
            |t| match t {
                Tok::Path(p) => Some(Operand::Path(p.clone())),
                Tok::Uri => Some(Operand::Uri),
                Tok::Rkey => Some(Operand::Rkey),
                _ => None,
            },
        )?;
        let op = self.take("`==`, `!=`, `=~`, `in` or `exists`", |t| match t {
            Tok::Word(w) if matches!(w.as_str(), "exists" | "in") => Some(w.clone()),
            Tok::Punct(p) if matches!(*p, "==" | "!=" | "=~") => Some((*p).to_owned()),
            _ => None,
        })?;
        let test = match op.as_str() {
            "exists" => Test::Exists,
            "==" => Test::Eq(self.literal()?),
            "!=" => Test::Ne(self.literal()?),
            "in" => self.membership()?,
            _ => {
                let col = self.column();
                let pattern = self.take("a quoted regular expression", |t| match t {
                    Tok::Str(s) => Some(s.clone()),
                    _ => None,
                })?;
                let re = RegexBuilder::new(&pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| (col, format!("not a usable regular expression: {e}")))?;
                Test::Matches(re)
            }
        };
        Ok(Expr::Pred(operand, test))
    }

    fn collection_arg(&mut self) -> Result<Nsid, Fail> {
        self.expect("(", "`(`")?;
        let c = self.nsid("a collection NSID")?;
        self.expect(")", "`)`")?;
        self.depends_on.insert(c.clone());
        Ok(c)
    }

    fn membership(&mut self) -> Result<Test, Fail> {
        if self.is_word("kept") {
            self.next();
            return Ok(Test::InKept(self.collection_arg()?));
        }
        if self.is_word("refs") {
            self.next();
            self.expect("(", "`(`")?;
            let c = self.nsid("a collection NSID")?;
            self.expect(
                ",",
                "`,` and the path the referencing records name this one at",
            )?;
            let path = self.take("a path (`$.field`)", |t| match t {
                Tok::Path(p) => Some(p.clone()),
                _ => None,
            })?;
            self.expect(")", "`)`")?;
            self.depends_on.insert(c.clone());
            let source = (c, path);
            let index = match self.ref_sources.iter().position(|s| *s == source) {
                Some(i) => i,
                None => {
                    self.ref_sources.push(source);
                    self.ref_sources.len() - 1
                }
            };
            return Ok(Test::InRefs(index));
        }
        self.expect("[", "`[`, `kept(..)` or `refs(..)`")?;
        let mut items = vec![self.literal()?];
        while matches!(self.peek(), Tok::Punct(",")) {
            self.next();
            items.push(self.literal()?);
        }
        self.expect("]", "`,` or `]`")?;
        Ok(Test::In(items))
    }

    fn literal(&mut self) -> Result<Value, Fail> {
        self.take(
            "a string, an integer, `true`, `false` or `null`",
            |t| match t {
                Tok::Str(s) => Some(Value::String(s.clone())),
                Tok::Int(n) => Some(Value::from(*n)),
                Tok::Word(w) if w == "true" => Some(Value::Bool(true)),
                Tok::Word(w) if w == "false" => Some(Value::Bool(false)),
                Tok::Word(w) if w == "null" => Some(Value::Null),
                _ => None,
            },
        )
    }
}
