//! Properties of the host-set tree (`nixfleet_trust::merkle`): any leaf's proof verifies
//! against the root, and any single alteration of leaf, proof, index or root fails.

use nixfleet_trust::merkle::{leaf_hash, verify_inclusion, Tree};
use proptest::prelude::*;

fn tree(n: usize, salt: u64) -> (Vec<[u8; 32]>, Tree) {
    let leaves: Vec<[u8; 32]> = (0..n)
        .map(|i| leaf_hash(format!("{salt}-{i}").as_bytes()))
        .collect();
    let tree = Tree::new(leaves.clone());
    (leaves, tree)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_proof_verifies(n in 1usize..3000, pick in any::<prop::sample::Index>(), salt in any::<u64>()) {
        let (leaves, tree) = tree(n, salt);
        let i = pick.index(n);
        let proof = tree.proof(i).unwrap();
        prop_assert!(verify_inclusion(&leaves[i], i as u64, n as u64, &proof, &tree.root()));
    }

    #[test]
    fn any_alteration_fails(
        n in 2usize..3000,
        pick in any::<prop::sample::Index>(),
        what in 0u8..4,
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        salt in any::<u64>(),
    ) {
        let (leaves, tree) = tree(n, salt);
        let i = pick.index(n);
        let mut leaf = leaves[i];
        let mut index = i as u64;
        let mut proof = tree.proof(i).unwrap();
        let mut root = tree.root();
        match what {
            0 => leaf[at.index(32)] ^= 1 << bit,
            1 => {
                let j = at.index(proof.len());
                proof[j][at.index(32)] ^= 1 << bit;
            }
            2 => index = (index + 1 + at.index(n - 1) as u64) % n as u64,
            _ => root[at.index(32)] ^= 1 << bit,
        }
        prop_assert!(!verify_inclusion(&leaf, index, n as u64, &proof, &root));
    }
}
