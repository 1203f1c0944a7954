//! Merkle trees over key ranges (the anti-entropy design, 31n): items hash into a fixed number
//! of leaf buckets by key, each leaf is a hash of its items, and inner nodes hash their
//! children, so two replicas compare roots first and then find the differing leaves with
//! bytes proportional to the difference, not to the data. Pure: no I/O.

use serde::{Deserialize, Serialize};

use crate::ring::hash_key;

/// A complete binary tree over `2^depth` leaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleTree {
    depth: u32,
    /// Level-order nodes: `nodes[0]` is the root, leaves are the last `2^depth`.
    nodes: Vec<u64>,
}

fn mix(a: u64, b: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&a.to_le_bytes());
    buf[8..].copy_from_slice(&b.to_le_bytes());
    hash_key(&buf)
}

impl MerkleTree {
    /// Most leaves a tree may have (2^16).
    pub const MAX_DEPTH: u32 = 16;

    /// The leaf a key falls into, for a tree of `depth`.
    pub fn leaf_of(key: &[u8], depth: u32) -> usize {
        let depth = depth.min(Self::MAX_DEPTH);
        // Use the high bits: the ring's hash is well mixed, and nearby keys spread out.
        if depth == 0 {
            0
        } else {
            (hash_key(key) >> (64 - depth)) as usize
        }
    }

    /// Build from `(key, item digest)` pairs in any order. An item's digest should cover
    /// everything that makes two copies differ (e.g. version and value).
    pub fn build<'a, I>(depth: u32, items: I) -> Self
    where
        I: IntoIterator<Item = (&'a [u8], u64)>,
    {
        let depth = depth.min(Self::MAX_DEPTH);
        let leaves = 1usize << depth;
        // Leaf = sum of mixed item hashes: independent of insertion order.
        let mut leaf = vec![0u64; leaves];
        for (k, digest) in items {
            let i = Self::leaf_of(k, depth);
            leaf[i] = leaf[i].wrapping_add(mix(hash_key(k), digest));
        }
        let mut nodes = vec![0u64; 2 * leaves - 1];
        nodes[leaves - 1..].copy_from_slice(&leaf);
        for i in (0..leaves - 1).rev() {
            nodes[i] = mix(nodes[2 * i + 1], nodes[2 * i + 2]);
        }
        MerkleTree { depth, nodes }
    }

    /// Depth (leaves = 2^depth).
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// The root hash.
    pub fn root(&self) -> u64 {
        self.nodes[0]
    }

    /// The hashes of level `l` (0 is the root, `depth` the leaves), left to right; empty
    /// past the leaves.
    pub fn level(&self, l: u32) -> &[u64] {
        if l > self.depth {
            return &[];
        }
        let start = (1usize << l) - 1;
        &self.nodes[start..start + (1usize << l)]
    }

    /// The leaf hashes.
    pub fn leaves(&self) -> &[u64] {
        &self.nodes[(1usize << self.depth) - 1..]
    }

    /// Indices of the leaves whose hashes differ (both trees must have the same depth).
    pub fn diff_leaves(a: &[u64], b: &[u64]) -> Vec<usize> {
        if a.len() != b.len() {
            return (0..a.len().max(b.len())).collect();
        }
        a.iter()
            .zip(b)
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: u32, changed: Option<u32>) -> Vec<(Vec<u8>, u64)> {
        (0..n)
            .map(|i| {
                let d = if Some(i) == changed { 999 } else { i as u64 };
                (format!("k{i}").into_bytes(), d)
            })
            .collect()
    }

    #[test]
    fn equal_sets_equal_roots_and_order_does_not_matter() {
        let a = items(1000, None);
        let mut b = a.clone();
        b.reverse();
        let ta = MerkleTree::build(8, a.iter().map(|(k, d)| (k.as_slice(), *d)));
        let tb = MerkleTree::build(8, b.iter().map(|(k, d)| (k.as_slice(), *d)));
        assert_eq!(ta.root(), tb.root());
        assert!(MerkleTree::diff_leaves(ta.leaves(), tb.leaves()).is_empty());
    }

    #[test]
    fn one_change_one_leaf() {
        let a = items(1000, None);
        let b = items(1000, Some(17));
        let ta = MerkleTree::build(8, a.iter().map(|(k, d)| (k.as_slice(), *d)));
        let tb = MerkleTree::build(8, b.iter().map(|(k, d)| (k.as_slice(), *d)));
        assert_ne!(ta.root(), tb.root());
        let d = MerkleTree::diff_leaves(ta.leaves(), tb.leaves());
        assert_eq!(d, vec![MerkleTree::leaf_of(b"k17", 8)]);
        // Descending level by level finds the same leaf.
        assert_eq!(ta.level(0), &[ta.root()]);
        assert_eq!(ta.level(8), ta.leaves());
        assert!(ta.level(9).is_empty());
        let l4 = MerkleTree::diff_leaves(ta.level(4), tb.level(4));
        assert_eq!(l4, vec![d[0] >> 4]);
        // A missing item is a difference too.
        let tc = MerkleTree::build(8, a[1..].iter().map(|(k, d)| (k.as_slice(), *d)));
        assert_eq!(MerkleTree::diff_leaves(ta.leaves(), tc.leaves()).len(), 1);
        assert_eq!(
            MerkleTree::build(40, std::iter::empty()).depth(),
            MerkleTree::MAX_DEPTH
        );
    }
}
