//! Versions and the hybrid logical clock that orders them. Conflicts between concurrent
//! writes are resolved by last-write-wins on the HLC timestamp, ties broken by the
//! coordinating node's id: every replica picks the same winner, whatever the order in which
//! versions arrive. Pure: time is passed in.

use serde::{Deserialize, Serialize};

/// A hybrid logical clock timestamp: physical milliseconds plus a logical counter.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    /// Wall-clock milliseconds (never behind any timestamp seen).
    pub ms: u64,
    /// Counter within the same millisecond.
    pub logical: u32,
}

/// The clock of one node.
#[derive(Debug, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A timestamp for a local event at wall time `now_ms`: greater than every timestamp this
    /// clock has issued or observed, even if the wall clock went backwards.
    pub fn now(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.ms {
            Hlc {
                ms: now_ms,
                logical: 0,
            }
        } else {
            Hlc {
                ms: self.last.ms,
                logical: self.last.logical.saturating_add(1),
            }
        };
        self.last
    }

    /// Take a remote timestamp into account, so later local events order after it.
    pub fn observe(&mut self, remote: Hlc) {
        if remote > self.last {
            self.last = remote;
        }
    }
}

/// One version of a key: a value or a tombstone, stamped by the coordinator of the write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// When it was written.
    pub ts: Hlc,
    /// The coordinating node (breaks timestamp ties).
    pub origin: String,
    /// The value; `None` is a tombstone.
    pub value: Option<Vec<u8>>,
}

impl Version {
    /// Total order used for last-write-wins.
    pub fn key(&self) -> (Hlc, &str) {
        (self.ts, &self.origin)
    }

    /// True when `self` wins over `other`.
    pub fn newer_than(&self, other: &Version) -> bool {
        self.key() > other.key()
    }

    /// Short printable stamp.
    pub fn stamp(&self) -> String {
        format!("{}.{}@{}", self.ts.ms, self.ts.logical, self.origin)
    }

    /// A digest of everything that distinguishes two copies (for Merkle trees).
    pub fn digest(&self) -> u64 {
        let mut buf = Vec::with_capacity(32 + self.value.as_ref().map(Vec::len).unwrap_or(0));
        buf.extend_from_slice(&self.ts.ms.to_le_bytes());
        buf.extend_from_slice(&self.ts.logical.to_le_bytes());
        buf.extend_from_slice(self.origin.as_bytes());
        match &self.value {
            Some(v) => {
                buf.push(1);
                buf.extend_from_slice(v);
            }
            None => buf.push(0),
        }
        dsys_runtime::hash_key(&buf)
    }
}

/// The newest of two optional versions.
pub fn newest(a: Option<Version>, b: Option<Version>) -> Option<Version> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.newer_than(&a) { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(ms: u64, logical: u32, origin: &str, val: Option<&str>) -> Version {
        Version {
            ts: Hlc { ms, logical },
            origin: origin.into(),
            value: val.map(|s| s.as_bytes().to_vec()),
        }
    }

    #[test]
    fn clock_is_monotonic_even_when_wall_goes_back() {
        let mut c = HlcClock::default();
        let a = c.now(100);
        let b = c.now(90);
        let d = c.now(100);
        assert!(a < b && b < d);
        c.observe(Hlc {
            ms: 500,
            logical: 7,
        });
        assert!(
            c.now(100)
                > Hlc {
                    ms: 500,
                    logical: 7
                }
        );
    }

    #[test]
    fn lww_ties_broken_by_origin() {
        let a = v(5, 0, "n1", Some("a"));
        let b = v(5, 0, "n2", Some("b"));
        assert!(b.newer_than(&a));
        assert_eq!(newest(Some(a.clone()), Some(b.clone())), Some(b.clone()));
        assert_eq!(newest(Some(b.clone()), Some(a)), Some(b));
        let tomb = v(6, 0, "n1", None);
        assert!(tomb.newer_than(&v(5, 9, "n9", Some("x"))));
    }

    proptest! {
        /// Every arrival order converges on the same winner.
        #[test]
        fn merge_is_order_independent(mut vs in proptest::collection::vec((0u64..5, 0u32..3, 0u8..3), 1..12)) {
            let versions: Vec<Version> = vs.iter().map(|(m, l, o)| v(*m, *l, &format!("n{o}"), Some("x"))).collect();
            let forward = versions.iter().cloned().fold(None, |acc, x| newest(acc, Some(x)));
            vs.reverse();
            let backward = versions.iter().rev().cloned().fold(None, |acc, x| newest(acc, Some(x)));
            prop_assert_eq!(forward.map(|v| v.key().0), backward.map(|v| v.key().0));
        }
    }
}
