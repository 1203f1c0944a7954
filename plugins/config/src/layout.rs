//! Where config keeps things in the consensus store, and which keys are acceptable. Pure.
//!
//! ```text
//! config/kv/KEY                     the current value of KEY (absent once deleted)
//! config/seq/KEY                    writes to KEY so far: its version is the count, and
//!                                   every write compares it, so writes to KEY are serialized
//! config/hist/KEY#NNNNNNNNNNNNNNNNNNNN   one history entry per write (JSON [`Entry`]); its
//!                                   create revision is the revision of the write
//! config/schema/PREFIX              the declared type of the values under PREFIX
//! ```
//!
//! A write is one consensus transaction over the first three, so the value, the counter and
//! the history entry change together at one revision. Keys use `[A-Za-z0-9_.:-]` segments
//! separated by `/`, so `#` can separate a key from its history sequence number.

use serde::{Deserialize, Serialize};

/// Everything config stores in consensus is under this prefix.
pub const ROOT: &str = "config/";
/// Current values.
pub const VALUES: &str = "config/kv/";
/// Per-key write counters.
pub const SEQ: &str = "config/seq/";
/// History entries.
pub const HISTORY: &str = "config/hist/";
/// Declared types.
pub const SCHEMA: &str = "config/schema/";
/// Separates a key from its history sequence number.
const HISTORY_SEP: char = '#';

/// Longest key (and prefix).
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value (a history entry holds the value and the one before it).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The consensus key of KEY's current value.
pub fn value_key(key: &str) -> String {
    format!("{VALUES}{key}")
}

/// The consensus key of KEY's write counter.
pub fn seq_key(key: &str) -> String {
    format!("{SEQ}{key}")
}

/// The consensus prefix of KEY's history entries (and of no other key's).
pub fn history_prefix(key: &str) -> String {
    format!("{HISTORY}{key}{HISTORY_SEP}")
}

/// The consensus key of KEY's `n`th history entry (zero-padded: key order is write order).
pub fn history_key(key: &str, n: u64) -> String {
    format!("{HISTORY}{key}{HISTORY_SEP}{n:020}")
}

/// The consensus prefix of the history entries of every key under PREFIX.
pub fn history_watch_prefix(prefix: &str) -> String {
    format!("{HISTORY}{prefix}")
}

/// (KEY, n) of a history entry's consensus key.
pub fn parse_history_key(k: &str) -> Option<(&str, u64)> {
    let (key, n) = k.strip_prefix(HISTORY)?.rsplit_once(HISTORY_SEP)?;
    Some((key, n.parse().ok()?))
}

/// The consensus key of PREFIX's declared type.
pub fn schema_key(prefix: &str) -> String {
    format!("{SCHEMA}{prefix}")
}

fn check_chars(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_KEY_BYTES {
        return Err(format!(
            "{what} is {} bytes; at most {MAX_KEY_BYTES}",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/')))
    {
        return Err(format!(
            "{what} `{s}` holds {c:?}: use letters, digits, `_ . : -` and `/` between segments"
        ));
    }
    if s.starts_with('/') || s.contains("//") {
        return Err(format!("{what} `{s}` has an empty segment"));
    }
    Ok(())
}

/// A key: 1..=256 bytes of `/`-separated non-empty segments of `[A-Za-z0-9_.:-]`.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    check_chars("key", key)?;
    if key.ends_with('/') {
        return Err(format!("key `{key}` ends with `/` (that is a prefix)"));
    }
    Ok(())
}

/// A prefix: like a key, but may be empty (everything) and may end with `/`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    check_chars("prefix", prefix)
}

/// A value: at most [`MAX_VALUE_BYTES`].
pub fn check_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "the value is {} bytes; at most {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    Ok(())
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Set the value.
    Put,
    /// Removed the key.
    Delete,
}

/// One history entry, as stored (JSON) under [`history_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Put or delete.
    pub op: Op,
    /// The value after the write (`None` after a delete).
    pub value: Option<String>,
    /// The value before it (`None` if the key did not exist).
    pub prev: Option<String>,
    /// Wall-clock time of the write on the node that made it, ms since the Unix epoch.
    pub time_ms: u64,
    /// Who wrote: the node that took the request, and the caller kind.
    pub by: String,
    /// For a rollback: the revision whose value it restored.
    pub rollback_of: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_and_prefixes() {
        for ok in ["a", "ratelimit/rules/api", "svc.db:port", "A-b_c/d.e"] {
            assert_eq!(check_key(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/a", "a//b", "a/", "a#1", "a b", "ü", &"x".repeat(257)] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert_eq!(check_prefix(""), Ok(()));
        assert_eq!(check_prefix("ratelimit/"), Ok(()));
        assert!(check_prefix("a#").is_err());
    }

    #[test]
    fn history_prefix_of_a_key_matches_no_other_key() {
        let a = history_prefix("a");
        assert!(history_key("a", 1).starts_with(&a));
        assert!(!history_key("a/b", 1).starts_with(&a));
        assert!(!history_key("ab", 1).starts_with(&a));
        // ... while a watch prefix covers keys under it, as a key prefix does.
        assert!(history_key("ab", 1).starts_with(&history_watch_prefix("a")));
    }

    proptest! {
        #[test]
        fn history_keys_round_trip_and_sort_by_sequence(
            key in "[a-z]{1,5}(/[a-z0-9.:_-]{1,5}){0,3}", n in 1u64..u64::MAX, m in 1u64..u64::MAX
        ) {
            prop_assert_eq!(check_key(&key), Ok(()));
            let k = history_key(&key, n);
            prop_assert_eq!(parse_history_key(&k), Some((key.as_str(), n)));
            prop_assert_eq!(k.cmp(&history_key(&key, m)), n.cmp(&m));
        }
    }
}
