//! Typed values: the type declared for a prefix, and the validators. Pure.
//!
//! A write of KEY is validated against the type of the longest declared prefix of KEY (no
//! declared prefix: any string). Types are written as text, in `dsys config schema set` and in
//! the consensus store alike:
//!
//! | type | accepts |
//! |---|---|
//! | `string` | anything (up to the value size limit) |
//! | `int`, `int:MIN..MAX`, `int:MIN..`, `int:..MAX` | a signed 64-bit decimal integer, in the inclusive range |
//! | `bool` | `true` or `false` |
//! | `duration` | a humantime duration: `250ms`, `5s`, `1h 30m` |
//! | `json` | any JSON document |
//! | `enum:A,B,C` | exactly one of the listed words |
//! | `ratelimit-rule` | a rate-limit rule as JSON, checked by the ratelimit plugin's own parser ([`Rule::parse`]) |
//!
//! `ratelimit/rules/` is declared `ratelimit-rule` by the system ([`builtin`]): the ratelimit
//! plugin of every node reads its rules there, so nothing else may be stored under it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use dsys_plugin_ratelimit::core::Rule;
use dsys_plugin_ratelimit::CONFIG_RULES_PREFIX;

/// Most words of an `enum` type.
const MAX_ENUM_WORDS: usize = 64;

/// A declared value type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueType {
    /// Any text.
    String,
    /// A signed integer within optional inclusive bounds.
    Int {
        /// Smallest accepted.
        min: Option<i64>,
        /// Largest accepted.
        max: Option<i64>,
    },
    /// `true` / `false`.
    Bool,
    /// A humantime duration.
    Duration,
    /// A JSON document.
    Json,
    /// One of these words.
    Enum(Vec<String>),
    /// A ratelimit rule (JSON), validated by the ratelimit plugin's parser.
    RatelimitRule,
}

impl ValueType {
    /// Accept `value`, or say precisely why not.
    pub fn validate(&self, value: &str) -> Result<(), String> {
        match self {
            ValueType::String => Ok(()),
            ValueType::Int { min, max } => {
                let n: i64 = value
                    .parse()
                    .map_err(|_| format!("`{}` is not an integer", shorten(value)))?;
                if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
                    return Err(format!("{n} is out of range {}", range(*min, *max)));
                }
                Ok(())
            }
            ValueType::Bool => match value {
                "true" | "false" => Ok(()),
                _ => Err(format!(
                    "`{}` is not a bool: write true or false",
                    shorten(value)
                )),
            },
            ValueType::Duration => humantime::parse_duration(value).map(|_| ()).map_err(|e| {
                format!(
                    "`{}` is not a duration ({e}): write e.g. 250ms, 5s, 1h 30m",
                    shorten(value)
                )
            }),
            ValueType::Json => serde_json::from_str::<serde_json::Value>(value)
                .map(|_| ())
                .map_err(|e| format!("not JSON: {e}")),
            ValueType::Enum(words) => {
                if words.iter().any(|w| w == value) {
                    Ok(())
                } else {
                    Err(format!(
                        "`{}` is not one of {}",
                        shorten(value),
                        words.join(", ")
                    ))
                }
            }
            ValueType::RatelimitRule => Rule::parse(value).map(|_| ()),
        }
    }
}

fn shorten(v: &str) -> String {
    match v.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &v[..i]),
        None => v.to_string(),
    }
}

fn range(min: Option<i64>, max: Option<i64>) -> String {
    let b = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    format!("{}..{}", b(min), b(max))
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueType::String => f.write_str("string"),
            ValueType::Int {
                min: None,
                max: None,
            } => f.write_str("int"),
            ValueType::Int { min, max } => write!(f, "int:{}", range(*min, *max)),
            ValueType::Bool => f.write_str("bool"),
            ValueType::Duration => f.write_str("duration"),
            ValueType::Json => f.write_str("json"),
            ValueType::Enum(w) => write!(f, "enum:{}", w.join(",")),
            ValueType::RatelimitRule => f.write_str("ratelimit-rule"),
        }
    }
}

impl FromStr for ValueType {
    type Err = String;

    /// Parses the forms in the module table; the inverse of [`fmt::Display`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bound = |b: &str| -> Result<Option<i64>, String> {
            if b.is_empty() {
                return Ok(None);
            }
            b.parse()
                .map(Some)
                .map_err(|_| format!("int bound `{b}` is not an integer"))
        };
        Ok(match s {
            "string" => ValueType::String,
            "int" => ValueType::Int {
                min: None,
                max: None,
            },
            "bool" => ValueType::Bool,
            "duration" => ValueType::Duration,
            "json" => ValueType::Json,
            "ratelimit-rule" => ValueType::RatelimitRule,
            _ => {
                if let Some(r) = s.strip_prefix("int:") {
                    let (lo, hi) = r
                        .split_once("..")
                        .ok_or_else(|| format!("`{s}`: write the range as int:MIN..MAX"))?;
                    let (min, max) = (bound(lo)?, bound(hi)?);
                    if let (Some(a), Some(b)) = (min, max) {
                        if a > b {
                            return Err(format!("`{s}`: the range is empty ({a} > {b})"));
                        }
                    }
                    ValueType::Int { min, max }
                } else if let Some(w) = s.strip_prefix("enum:") {
                    let words: Vec<String> = w.split(',').map(str::to_string).collect();
                    if words.iter().any(|w| w.is_empty()) || words.len() > MAX_ENUM_WORDS {
                        return Err(format!(
                            "`{s}`: write 1..={MAX_ENUM_WORDS} non-empty words as enum:A,B,C"
                        ));
                    }
                    ValueType::Enum(words)
                } else {
                    return Err(format!(
                        "unknown type `{s}`: expected string, int, int:MIN..MAX, bool, duration, \
                         json, enum:A,B,C or ratelimit-rule"
                    ));
                }
            }
        })
    }
}

/// Prefixes typed by the system, which `schema set` may not change.
pub fn builtin() -> Vec<(String, ValueType)> {
    vec![(CONFIG_RULES_PREFIX.to_string(), ValueType::RatelimitRule)]
}

/// Whether `prefix` lies in a system-typed subtree (so `schema set/del` refuse it).
pub fn is_builtin(prefix: &str) -> bool {
    builtin()
        .iter()
        .any(|(p, _)| prefix.starts_with(p.as_str()))
}

/// The type `key` is validated against: that of the longest declared prefix of `key`, the
/// built-in ones included; `None` when no prefix is declared (any string).
pub fn resolve<'a>(
    declared: &'a BTreeMap<String, ValueType>,
    key: &str,
) -> Option<(&'a str, &'a ValueType)> {
    declared
        .iter()
        .filter(|(p, _)| key.starts_with(p.as_str()))
        .max_by_key(|(p, _)| p.len())
        .map(|(p, t)| (p.as_str(), t))
}

/// Extra shape rules for keys under a built-in prefix: a rule is `ratelimit/rules/NAME`.
pub fn check_builtin_key(key: &str) -> Result<(), String> {
    if let Some(name) = key.strip_prefix(CONFIG_RULES_PREFIX) {
        if name.contains('/') {
            return Err(format!(
                "`{key}`: a rate-limit rule is {CONFIG_RULES_PREFIX}NAME, one segment"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> ValueType {
        s.parse().expect(s)
    }

    #[test]
    fn validators_accept_and_refuse() {
        let cases: &[(&str, &str, bool)] = &[
            ("string", "", true),
            ("string", "anything at all", true),
            ("int", "-42", true),
            ("int", "4.2", false),
            ("int", "", false),
            ("int", "99999999999999999999", false),
            ("int:1..10", "1", true),
            ("int:1..10", "10", true),
            ("int:1..10", "0", false),
            ("int:1..10", "11", false),
            ("int:0..", "123456", true),
            ("int:0..", "-1", false),
            ("int:..5", "-100", true),
            ("int:..5", "6", false),
            ("bool", "true", true),
            ("bool", "false", true),
            ("bool", "yes", false),
            ("bool", "True", false),
            ("duration", "250ms", true),
            ("duration", "1h 30m", true),
            ("duration", "5", false),
            ("duration", "soon", false),
            ("json", r#"{"a":[1,2]}"#, true),
            ("json", "3", true),
            ("json", "{a:1}", false),
            ("enum:red,green", "green", true),
            ("enum:red,green", "blue", false),
            (
                "ratelimit-rule",
                r#"{"algorithm":"token_bucket","limit":10,"window_ms":60000}"#,
                true,
            ),
            (
                "ratelimit-rule",
                r#"{"algorithm":"token_bucket","limit":0,"window_ms":60000}"#,
                false,
            ),
            (
                "ratelimit-rule",
                r#"{"algorithm":"sliding_log","limit":100001,"window_ms":1}"#,
                false,
            ),
            ("ratelimit-rule", "10 per minute", false),
        ];
        for (ty, v, ok) in cases {
            let r = t(ty).validate(v);
            assert_eq!(r.is_ok(), *ok, "{ty} {v:?}: {r:?}");
        }
        let e = t("int:1..10").validate("11").expect_err("out of range");
        assert_eq!(e, "11 is out of range 1..10");
        let e = t("ratelimit-rule")
            .validate(r#"{"algorithm":"token_bucket","limit":0,"window_ms":1}"#)
            .expect_err("limit 0");
        assert!(e.contains("limit must be between 1"), "{e}");
    }

    #[test]
    fn type_specs_parse_and_refuse() {
        for bad in [
            "",
            "integer",
            "int:",
            "int:5..1",
            "int:a..",
            "enum:",
            "enum:a,,b",
        ] {
            assert!(bad.parse::<ValueType>().is_err(), "{bad}");
        }
        assert_eq!(
            t("int:-5.."),
            ValueType::Int {
                min: Some(-5),
                max: None
            }
        );
    }

    #[test]
    fn longest_declared_prefix_wins() {
        let d: BTreeMap<String, ValueType> = [
            ("".to_string(), t("string")),
            ("svc/".into(), t("json")),
            ("svc/db/port".into(), t("int:1..65535")),
        ]
        .into_iter()
        .collect();
        assert_eq!(resolve(&d, "svc/db/port").map(|x| x.0), Some("svc/db/port"));
        assert_eq!(
            resolve(&d, "svc/db/portal").map(|x| x.0),
            Some("svc/db/port")
        );
        assert_eq!(resolve(&d, "svc/x").map(|x| x.0), Some("svc/"));
        assert_eq!(resolve(&d, "other").map(|x| x.0), Some(""));
        assert!(resolve(&BTreeMap::new(), "k").is_none());
        assert!(is_builtin("ratelimit/rules/"));
        assert!(is_builtin("ratelimit/rules/api"));
        assert!(!is_builtin("ratelimit/"));
        assert!(check_builtin_key("ratelimit/rules/a/b").is_err());
        assert!(check_builtin_key("ratelimit/rules/a").is_ok());
    }

    fn any_type() -> impl Strategy<Value = ValueType> {
        prop_oneof![
            Just(ValueType::String),
            (any::<Option<i64>>(), any::<Option<i64>>()).prop_map(|(a, b)| {
                let (min, max) = match (a, b) {
                    (Some(a), Some(b)) if a > b => (Some(b), Some(a)),
                    x => x,
                };
                ValueType::Int { min, max }
            }),
            Just(ValueType::Bool),
            Just(ValueType::Duration),
            Just(ValueType::Json),
            prop::collection::vec("[a-z0-9_]{1,8}", 1..5).prop_map(ValueType::Enum),
            Just(ValueType::RatelimitRule),
        ]
    }

    proptest! {
        /// Every type prints as a spec that parses back to it.
        #[test]
        fn specs_round_trip(ty in any_type()) {
            prop_assert_eq!(ty.to_string().parse::<ValueType>(), Ok(ty));
        }

        /// No value panics a validator.
        #[test]
        fn validators_never_panic(ty in any_type(), v in any::<String>()) {
            let _ = ty.validate(&v);
        }

        /// An int is accepted exactly when it parses and lies in the range.
        #[test]
        fn int_range_is_inclusive(
            a in -1000i64..1000, b in -1000i64..1000, n in -2000i64..2000
        ) {
            let (min, max) = (a.min(b), a.max(b));
            let ty = ValueType::Int { min: Some(min), max: Some(max) };
            prop_assert_eq!(ty.validate(&n.to_string()).is_ok(), (min..=max).contains(&n));
        }

        /// A ratelimit-rule is accepted exactly when the ratelimit parser accepts it.
        #[test]
        fn ratelimit_rule_is_the_ratelimit_parser(
            alg in prop::sample::select(vec!["token_bucket", "fixed_window", "sliding_log", "sliding_counter", "nope"]),
            limit in prop_oneof![Just(0u64), 1u64..200_000, Just(1_000_001)],
            window in prop_oneof![Just(0u64), 1u64..100_000_000],
        ) {
            let v = format!(r#"{{"algorithm":"{alg}","limit":{limit},"window_ms":{window}}}"#);
            prop_assert_eq!(
                ValueType::RatelimitRule.validate(&v).is_ok(),
                Rule::parse(&v).is_ok()
            );
        }
    }
}
