//! Table-driven tests of the rate-limiting core, read from `tests/cases/*.txt`.
//!
//! Each file is a script, one statement per line (`#` starts a comment line):
//!
//! ```text
//! rule <algorithm> limit=<n> window_ms=<n> [at=<t>]
//!     starts a new limiter, created at time t (default 0)
//! at <t> cost <c> -> allow|deny [remaining=<n>] [retry_after=<n>] [reset=<n>]
//!     calls check(t, c); the listed fields must match (`limit` always must)
//! idle at <t> -> yes|no
//!     calls is_idle(t)
//! valid <algorithm> limit=<n> window_ms=<n> -> ok|err <text>
//!     Rule::validate must succeed, or fail with a message containing <text>
//! ```
//!
//! Numbers may contain `_`, and `max` / `max-<n>` stand for `u64::MAX` / `u64::MAX - n`.
//! A parse error fails the test with `file:line`; so does every mismatch (all are
//! reported, not just the first).

use std::path::{Path, PathBuf};

use dsys_plugin_ratelimit::core::{Algorithm, Decision, Limiter, Rule};

/// One parsed statement.
enum Step {
    Rule {
        rule: Rule,
        at: u64,
    },
    Check {
        now: u64,
        cost: u64,
        allowed: bool,
        remaining: Option<u64>,
        retry_after: Option<u64>,
        reset: Option<u64>,
    },
    Idle {
        now: u64,
        idle: bool,
    },
    Valid {
        rule: Rule,
        error: Option<String>,
    },
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases")
}

fn number(s: &str) -> Result<u64, String> {
    let s = s.replace('_', "");
    let parse = |n: &str| {
        n.parse::<u64>()
            .map_err(|e| format!("bad number {n:?}: {e}"))
    };
    if s == "max" {
        Ok(u64::MAX)
    } else if let Some(n) = s.strip_prefix("max-") {
        Ok(u64::MAX - parse(n)?)
    } else {
        parse(&s)
    }
}

/// Parses `key=value` words into the fields named in `keys`, in any order.
fn fields(words: &[&str], keys: &[&str]) -> Result<Vec<Option<u64>>, String> {
    let mut values = vec![None; keys.len()];
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got {word:?}"))?;
        let i = keys
            .iter()
            .position(|k| *k == key)
            .ok_or_else(|| format!("unknown field {key:?}, expected one of {keys:?}"))?;
        if values[i].is_some() {
            return Err(format!("field {key:?} given twice"));
        }
        values[i] = Some(number(value)?);
    }
    Ok(values)
}

/// Parses `<algorithm> limit=<n> window_ms=<n> [at=<t>]` (with `at` only if `allow_at`).
fn rule(words: &[&str], allow_at: bool) -> Result<(Rule, u64), String> {
    let (algorithm, rest) = words.split_first().ok_or("missing algorithm")?;
    let algorithm: Algorithm = algorithm.parse()?;
    let keys: &[&str] = if allow_at {
        &["limit", "window_ms", "at"]
    } else {
        &["limit", "window_ms"]
    };
    let values = fields(rest, keys)?;
    let rule = Rule {
        algorithm,
        limit: values[0].ok_or("missing limit=")?,
        window_ms: values[1].ok_or("missing window_ms=")?,
    };
    Ok((rule, values.get(2).copied().flatten().unwrap_or(0)))
}

fn parse_line(line: &str) -> Result<Step, String> {
    let (lhs, rhs) = match line.split_once("->") {
        Some((l, r)) => (l, Some(r)),
        None => (line, None),
    };
    let lhs: Vec<&str> = lhs.split_whitespace().collect();
    let rhs: Vec<&str> = rhs
        .map(|r| r.split_whitespace().collect())
        .unwrap_or_default();
    match lhs.as_slice() {
        ["rule", rest @ ..] => {
            if !rhs.is_empty() || line.contains("->") {
                return Err("rule takes no `->`".into());
            }
            let (rule, at) = rule(rest, true)?;
            Ok(Step::Rule { rule, at })
        }
        ["at", now, "cost", cost] => {
            let (verdict, rest) = rhs.split_first().ok_or("missing `-> allow|deny`")?;
            let allowed = match *verdict {
                "allow" => true,
                "deny" => false,
                other => return Err(format!("expected allow or deny, got {other:?}")),
            };
            let values = fields(rest, &["remaining", "retry_after", "reset"])?;
            Ok(Step::Check {
                now: number(now)?,
                cost: number(cost)?,
                allowed,
                remaining: values[0],
                retry_after: values[1],
                reset: values[2],
            })
        }
        ["idle", "at", now] => {
            let idle = match rhs.as_slice() {
                ["yes"] => true,
                ["no"] => false,
                _ => return Err("expected `-> yes` or `-> no`".into()),
            };
            Ok(Step::Idle {
                now: number(now)?,
                idle,
            })
        }
        ["valid", rest @ ..] => {
            let (rule, _) = rule(rest, false)?;
            let error = match rhs.as_slice() {
                ["ok"] => None,
                ["err", text @ ..] if !text.is_empty() => Some(text.join(" ")),
                _ => return Err("expected `-> ok` or `-> err <text>`".into()),
            };
            Ok(Step::Valid { rule, error })
        }
        _ => Err(format!("unrecognised statement {line:?}")),
    }
}

/// Parses `path`, panicking with `file:line` on the first parse error.
fn parse_file(path: &Path) -> Vec<(usize, Step)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: cannot read: {e}", path.display()));
    let mut steps = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Ok(step) => steps.push((i + 1, step)),
            Err(e) => panic!("{}:{}: parse error: {e}", path.display(), i + 1),
        }
    }
    steps
}

/// Compares `actual` with the expected fields, describing every difference.
fn mismatches(
    actual: &Decision,
    rule: &Rule,
    allowed: bool,
    expected: [(&str, Option<u64>, u64); 3],
) -> Vec<String> {
    let mut out = Vec::new();
    if actual.allowed != allowed {
        out.push(format!("expected allowed={allowed}"));
    }
    if actual.limit != rule.limit {
        out.push(format!("expected limit={}", rule.limit));
    }
    for (name, want, got) in expected {
        if let Some(want) = want {
            if want != got {
                out.push(format!("expected {name}={want}"));
            }
        }
    }
    out
}

/// Runs every statement of the file `name` and returns the number run.
fn run_file(name: &str) -> usize {
    let path = cases_dir().join(name);
    let steps = parse_file(&path);
    let mut failures = Vec::new();
    let mut current: Option<(Rule, Limiter)> = None;
    for (line, step) in &steps {
        let at = format!("{}:{line}", path.display());
        match step {
            Step::Rule { rule, at } => {
                current = Some((rule.clone(), Limiter::new(rule, *at)));
            }
            Step::Check {
                now,
                cost,
                allowed,
                remaining,
                retry_after,
                reset,
            } => {
                let Some((rule, limiter)) = current.as_mut() else {
                    panic!("{at}: parse error: `at` before any `rule`");
                };
                let d = limiter.check(*now, *cost);
                let problems = mismatches(
                    &d,
                    rule,
                    *allowed,
                    [
                        ("remaining", *remaining, d.remaining),
                        ("retry_after", *retry_after, d.retry_after_ms),
                        ("reset", *reset, d.reset_ms),
                    ],
                );
                if !problems.is_empty() {
                    failures.push(format!("{at}: {}, got {d:?}", problems.join(", ")));
                }
            }
            Step::Idle { now, idle } => {
                let Some((_, limiter)) = current.as_ref() else {
                    panic!("{at}: parse error: `idle` before any `rule`");
                };
                let got = limiter.is_idle(*now);
                if got != *idle {
                    failures.push(format!("{at}: expected is_idle={idle}, got {got}"));
                }
            }
            Step::Valid { rule, error } => match (rule.validate(), error) {
                (Ok(()), None) => {}
                (Err(e), Some(text)) if e.contains(text.as_str()) => {}
                (got, _) => failures.push(format!("{at}: expected {error:?}, got {got:?}")),
            },
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
    steps.len()
}

/// Every data file, each run by its own test below.
const FILES: [&str; 5] = [
    "token_bucket.txt",
    "fixed_window.txt",
    "sliding_log.txt",
    "sliding_counter.txt",
    "validate.txt",
];

#[test]
fn token_bucket() {
    assert!(run_file("token_bucket.txt") >= 12);
}

#[test]
fn fixed_window() {
    assert!(run_file("fixed_window.txt") >= 12);
}

#[test]
fn sliding_log() {
    assert!(run_file("sliding_log.txt") >= 12);
}

#[test]
fn sliding_counter() {
    assert!(run_file("sliding_counter.txt") >= 12);
}

#[test]
fn validate() {
    assert!(run_file("validate.txt") > 0);
}

/// A new file in `tests/cases/` must be added to [`FILES`] (and given a test),
/// so that no file is silently skipped.
#[test]
fn every_file_is_run() {
    let mut found: Vec<String> = std::fs::read_dir(cases_dir())
        .expect("tests/cases exists")
        .map(|entry| entry.expect("readable entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".txt"))
        .collect();
    found.sort();
    let mut known: Vec<String> = FILES.iter().map(|f| f.to_string()).collect();
    known.sort();
    assert_eq!(found, known);
}

/// The parser rejects malformed lines rather than skipping them.
#[test]
fn parser_rejects_malformed_lines() {
    for bad in [
        "at 0 cost 1",
        "at 0 cost 1 -> maybe",
        "at 0 cost x -> allow",
        "at 0 cost 1 -> allow remaining",
        "at 0 cost 1 -> allow remain=1",
        "at 0 cost 1 -> allow remaining=1 remaining=1",
        "rule leaky_bucket limit=1 window_ms=1",
        "rule token_bucket limit=1",
        "rule token_bucket limit=1 window_ms=1 -> ok",
        "idle at 0 -> maybe",
        "valid token_bucket limit=1 window_ms=1 -> err",
        "check 0 1",
    ] {
        assert!(parse_line(bad).is_err(), "accepted {bad:?}");
    }
}
