//! A Merkle tree over a rollout's host set, shaped and hashed as RFC 6962 / RFC 9162 §2.1
//! (a Certificate Transparency tree): a host verifies its own entry with an inclusion
//! proof of about log2(n) hashes instead of fetching every entry.
//!
//! - leaf hash: `SHA-256(0x00 || leaf bytes)`; node hash: `SHA-256(0x01 || left || right)`
//!   (domain-separated, so a node can never pass for a leaf);
//! - shape: for n > 1 leaves, the left subtree holds the largest power of two below n
//!   leaves and the right one the rest; the empty tree's hash is `SHA-256("")`.
//!
//! The tree is built bottom-up, pairing neighbours on each level and carrying a lone last
//! node up unchanged; that is the same shape (tested against the recursive definition).

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The largest tree accepted: a proof of more hashes than a tree of this many leaves
/// needs is refused before any hashing.
pub const MAX_LEAVES: u64 = 1 << 32;

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The hash of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Every level of a tree, leaves first, so that the root and any leaf's proof are read
/// off without hashing again (a control plane serves one proof per host of a rollout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// The tree over these leaf hashes (already [`leaf_hash`]ed), in order.
    pub fn new(leaves: Vec<Hash>) -> Tree {
        let mut levels = vec![leaves];
        loop {
            let below = &levels[levels.len() - 1];
            if below.len() <= 1 {
                break;
            }
            let up: Vec<Hash> = below
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    // A lone last node is carried up unchanged.
                    _ => pair[0],
                })
                .collect();
            levels.push(up);
        }
        Tree { levels }
    }

    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn root(&self) -> Hash {
        match self.levels.last().and_then(|top| top.first()) {
            Some(root) => *root,
            None => empty_root(),
        }
    }

    /// The inclusion proof of leaf `index` (RFC 6962's audit path, bottom-up); `None` past
    /// the last leaf.
    pub fn proof(&self, index: usize) -> Option<Vec<Hash>> {
        if index >= self.len() {
            return None;
        }
        let mut proof = Vec::with_capacity(self.levels.len());
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            // A lone last node is carried up: nothing to hash with on this level.
            if let Some(sibling) = level.get(i ^ 1) {
                proof.push(*sibling);
            }
            i >>= 1;
        }
        Some(proof)
    }
}

/// Whether `proof` shows `leaf` (a [`leaf_hash`]) at `index` in a tree of `size` leaves
/// whose root is `root` (RFC 9162 §2.1.3.2). An altered leaf, proof hash, index or root
/// fails, and so does a hash added or removed. `size` and `root` must come from the same
/// signed statement: the proof alone does not pin the size (a left leaf's proof in a tree
/// of 3 also fits 4, under a root no 4-leaf tree of these leaves has).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size || size > MAX_LEAVES || proof.len() > 64 {
        return false;
    }
    let mut f = index;
    let mut s = size - 1;
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("host-{i:06}").as_bytes()))
            .collect()
    }

    /// The largest power of two below `n` (n > 1).
    fn split(n: usize) -> usize {
        1 << (usize::BITS - (n - 1).leading_zeros() - 1)
    }

    /// RFC 6962's MTH, written as the RFC defines it.
    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => empty_root(),
            1 => d[0],
            n => {
                let k = split(n);
                node_hash(&mth(&d[..k]), &mth(&d[k..]))
            }
        }
    }

    /// RFC 6962's PATH(m, D[n]), as the RFC defines it.
    fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }

    #[test]
    fn the_shape_is_rfc_6962s() {
        for n in 0..=130 {
            let d = leaves(n);
            let tree = Tree::new(d.clone());
            assert_eq!(tree.root(), mth(&d), "root of {n} leaves");
            for m in 0..n {
                assert_eq!(tree.proof(m).unwrap(), path(m, &d), "proof {m} of {n}");
            }
            assert!(tree.proof(n).is_none());
        }
    }

    #[test]
    fn known_roots() {
        // Empty tree: SHA-256 of nothing.
        assert_eq!(
            hex(&Tree::new(Vec::new()).root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // One leaf: its leaf hash, SHA-256(0x00 || "").
        assert_eq!(
            hex(&Tree::new(vec![leaf_hash(b"")]).root()),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn every_leaf_verifies_and_every_alteration_fails() {
        for n in [1usize, 2, 3, 4, 5, 7, 8, 9, 31, 33, 100] {
            let d = leaves(n);
            let tree = Tree::new(d.clone());
            let root = tree.root();
            let size = n as u64;
            for (i, leaf) in d.iter().enumerate() {
                let proof = tree.proof(i).unwrap();
                let idx = i as u64;
                assert!(verify_inclusion(leaf, idx, size, &proof, &root), "{i}/{n}");
                // Another leaf, another index, another size, another root.
                assert!(!verify_inclusion(
                    &leaf_hash(b"x"),
                    idx,
                    size,
                    &proof,
                    &root
                ));
                if n > 1 {
                    let other = (i + 1) % n;
                    assert!(!verify_inclusion(leaf, other as u64, size, &proof, &root));
                    assert!(!verify_inclusion(&d[other], idx, size, &proof, &root));
                }
                assert!(!verify_inclusion(
                    leaf,
                    idx,
                    size,
                    &proof,
                    &leaf_hash(b"root")
                ));
                assert!(!verify_inclusion(leaf, size, size, &proof, &root));
                // Each sibling altered; one dropped; one added.
                for j in 0..proof.len() {
                    let mut bad = proof.clone();
                    bad[j][0] ^= 1;
                    assert!(!verify_inclusion(leaf, idx, size, &bad, &root));
                }
                if !proof.is_empty() {
                    assert!(!verify_inclusion(leaf, idx, size, &proof[1..], &root));
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(!verify_inclusion(leaf, idx, size, &longer, &root));
            }
        }
    }

    #[test]
    fn a_node_cannot_pass_for_a_leaf() {
        // The two leaves' parent presented as a leaf of a 1-leaf tree with that root
        // verifies (it is that tree), but not as a leaf of the 2-leaf tree.
        let d = leaves(2);
        let tree = Tree::new(d.clone());
        let parent = node_hash(&d[0], &d[1]);
        assert!(!verify_inclusion(
            &leaf_hash(&[d[0], d[1]].concat()),
            0,
            2,
            &[],
            &tree.root()
        ));
        assert!(!verify_inclusion(&parent, 0, 2, &[], &tree.root()));
    }

    #[test]
    fn a_hundred_thousand_leaves() {
        let n = 100_000;
        let d = leaves(n);
        let tree = Tree::new(d.clone());
        for i in [0, 1, 65_535, 65_536, 99_998, 99_999] {
            let proof = tree.proof(i).unwrap();
            assert!(proof.len() <= 17, "{}", proof.len());
            assert!(verify_inclusion(
                &d[i],
                i as u64,
                n as u64,
                &proof,
                &tree.root()
            ));
            assert!(!verify_inclusion(
                &d[(i + 1) % n],
                i as u64,
                n as u64,
                &proof,
                &tree.root()
            ));
        }
    }
}
