//! A schema-2 rollout's commitments: the Merkle tree over its host set and the hashes of
//! its budgets' frozen host lists (docs/release.md "Manifest format").
//!
//! - leaf bytes: RFC 8785 bytes of `{"hostname", "targetClosure", "waveIndex"}`;
//! - leaves in host-set order (sorted by hostname, no duplicates), hashed and combined as
//!   in [`crate::merkle`];
//! - a budget list's hash: SHA-256 of the RFC 8785 bytes of its sorted hostname array.

use std::collections::BTreeMap;

use nixfleet_proto::{
    BudgetCommitment, HostSetEntry, ManifestBudget, ManifestHeader, RolloutHosts, RolloutManifest,
    MANIFEST_SCHEMA_VERSION,
};

use crate::jcs;
use crate::merkle::{self, Hash, Tree};

/// The leaf bytes of one entry.
pub fn leaf_bytes(entry: &HostSetEntry) -> Vec<u8> {
    // Keys in RFC 8785 order; hostnames and store basenames are plain ASCII, but escape
    // through serde_json anyway so that any string stays valid JSON.
    let mut out = Vec::with_capacity(96 + entry.hostname.len() + entry.target_closure.len());
    out.extend_from_slice(b"{\"hostname\":");
    out.extend_from_slice(&json_string(&entry.hostname));
    out.extend_from_slice(b",\"targetClosure\":");
    out.extend_from_slice(&json_string(&entry.target_closure));
    out.extend_from_slice(b",\"waveIndex\":");
    out.extend_from_slice(entry.wave_index.to_string().as_bytes());
    out.push(b'}');
    out
}

fn json_string(s: &str) -> Vec<u8> {
    if s.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
    {
        let mut v = Vec::with_capacity(s.len() + 2);
        v.push(b'"');
        v.extend_from_slice(s.as_bytes());
        v.push(b'"');
        v
    } else {
        // RFC 8785 string escaping is serde_json's canonical one for valid UTF-8.
        jcs::to_canonical(s).unwrap_or_default()
    }
}

pub fn leaf_hash(entry: &HostSetEntry) -> Hash {
    merkle::leaf_hash(&leaf_bytes(entry))
}

/// The tree over a host set, in its order.
pub fn tree(host_set: &[HostSetEntry]) -> Tree {
    Tree::new(host_set.iter().map(leaf_hash).collect())
}

/// SHA-256 of a budget's sorted host list, lowercase hex.
pub fn budget_sha256(hosts: &[String]) -> String {
    jcs::sha256_hex(&jcs::to_canonical(hosts).unwrap_or_default())
}

/// Why a host set or budget list does not match what the manifest signs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostSetError {
    #[error("the hosts file is for rollout {found}, not {expected}")]
    WrongRollout { expected: String, found: String },
    #[error("the host set is not sorted by hostname without duplicates (at {hostname})")]
    Unsorted { hostname: String },
    #[error("the host set has {found} entries; the manifest signs {expected}")]
    Size { expected: u64, found: u64 },
    #[error("the host set's root is {found}; the manifest signs {expected}")]
    Root { expected: String, found: String },
    #[error("budget list {sha256} is missing")]
    BudgetMissing { sha256: String },
    #[error("budget list {sha256} hashes to {found} with {count} hosts; the manifest signs {sha256} with {expected_count} (or it is not sorted)")]
    Budget {
        sha256: String,
        found: String,
        count: u64,
        expected_count: u64,
    },
}

/// Whether `host_set` is sorted by hostname with no name twice (what the tree and the
/// binary search of `RolloutManifest::entry` rely on).
pub fn check_sorted(host_set: &[HostSetEntry]) -> Result<(), HostSetError> {
    match host_set
        .windows(2)
        .find(|w| w[0].hostname.as_str() >= w[1].hostname.as_str())
    {
        Some(w) => Err(HostSetError::Unsorted {
            hostname: w[1].hostname.clone(),
        }),
        None => Ok(()),
    }
}

/// The schema-2 header of a plan: what `nixfleet release` signs.
pub fn header_of(plan: &RolloutManifest) -> ManifestHeader {
    ManifestHeader {
        schema_version: MANIFEST_SCHEMA_VERSION,
        display_name: plan.display_name.clone(),
        channel: plan.channel.clone(),
        channel_ref: plan.channel_ref.clone(),
        fleet_resolved_hash: plan.fleet_resolved_hash.clone(),
        host_set_root: hex::encode(tree(&plan.host_set).root()),
        host_set_size: plan.host_set.len() as u64,
        waves: plan.waves.clone(),
        health_gate: plan.health_gate.clone(),
        on_health_failure: plan.on_health_failure,
        compliance_frameworks: plan.compliance_frameworks.clone(),
        disruption_budgets: plan
            .disruption_budgets
            .iter()
            .map(|b| BudgetCommitment {
                selector: b.selector.clone(),
                hosts_sha256: budget_sha256(&b.hosts),
                hosts_count: b.hosts.len() as u64,
                max_in_flight: b.max_in_flight,
                max_in_flight_pct: b.max_in_flight_pct,
            })
            .collect(),
        freshness_window: plan.freshness_window,
        introduced: plan.introduced.clone(),
        compliance: plan.compliance.clone(),
        meta: plan.meta.clone(),
    }
}

/// The unsigned lists a schema-2 manifest commits to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLists {
    pub hosts: Option<RolloutHosts>,
    /// Budget lists by their SHA-256.
    pub budgets: BTreeMap<String, Vec<String>>,
}

/// The plan of a verified schema-2 header, from the lists it commits to; every list is
/// checked against the header first. Also returns the host set's tree.
pub fn assemble(
    rollout_id: &str,
    header: &ManifestHeader,
    hosts: &RolloutHosts,
    budgets: &BTreeMap<String, Vec<String>>,
) -> Result<(RolloutManifest, Tree), HostSetError> {
    if hosts.rollout_id != rollout_id {
        return Err(HostSetError::WrongRollout {
            expected: rollout_id.to_owned(),
            found: hosts.rollout_id.clone(),
        });
    }
    check_sorted(&hosts.host_set)?;
    if hosts.host_set.len() as u64 != header.host_set_size {
        return Err(HostSetError::Size {
            expected: header.host_set_size,
            found: hosts.host_set.len() as u64,
        });
    }
    let tree = tree(&hosts.host_set);
    let root = hex::encode(tree.root());
    if root != header.host_set_root {
        return Err(HostSetError::Root {
            expected: header.host_set_root.clone(),
            found: root,
        });
    }
    let mut disruption_budgets = Vec::with_capacity(header.disruption_budgets.len());
    for b in &header.disruption_budgets {
        let list = budgets
            .get(&b.hosts_sha256)
            .ok_or_else(|| HostSetError::BudgetMissing {
                sha256: b.hosts_sha256.clone(),
            })?;
        let found = budget_sha256(list);
        let sorted = list.windows(2).all(|w| w[0] < w[1]);
        if found != b.hosts_sha256 || list.len() as u64 != b.hosts_count || !sorted {
            return Err(HostSetError::Budget {
                sha256: b.hosts_sha256.clone(),
                found,
                count: list.len() as u64,
                expected_count: b.hosts_count,
            });
        }
        disruption_budgets.push(ManifestBudget {
            selector: b.selector.clone(),
            hosts: list.clone(),
            max_in_flight: b.max_in_flight,
            max_in_flight_pct: b.max_in_flight_pct,
        });
    }
    let plan = RolloutManifest {
        schema_version: header.schema_version,
        display_name: header.display_name.clone(),
        channel: header.channel.clone(),
        channel_ref: header.channel_ref.clone(),
        fleet_resolved_hash: header.fleet_resolved_hash.clone(),
        host_set: hosts.host_set.clone(),
        waves: header.waves.clone(),
        health_gate: header.health_gate.clone(),
        on_health_failure: header.on_health_failure,
        compliance_frameworks: header.compliance_frameworks.clone(),
        disruption_budgets,
        freshness_window: header.freshness_window,
        introduced: header.introduced.clone(),
        compliance: header.compliance.clone(),
        meta: header.meta.clone(),
    };
    Ok((plan, tree))
}

/// The proof document of `hostname` in a rollout: the signed manifest text and raw
/// signature as published, the host's entry, its index and its audit path. `None` when
/// the host is not in `host_set` (sorted, the one `tree` was built over).
pub fn host_proof(
    rollout_id: &str,
    manifest: &str,
    signature: &[u8],
    host_set: &[HostSetEntry],
    tree: &Tree,
    hostname: &str,
) -> Option<nixfleet_proto::HostProof> {
    use base64::Engine as _;
    let index = host_set
        .binary_search_by(|e| e.hostname.as_str().cmp(hostname))
        .ok()?;
    let proof = tree.proof(index)?;
    Some(nixfleet_proto::HostProof {
        rollout_id: rollout_id.to_owned(),
        manifest: manifest.to_owned(),
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
        entry: host_set[index].clone(),
        index: index as u64,
        proof: proof.iter().map(hex::encode).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(h: &str, w: u32) -> HostSetEntry {
        HostSetEntry {
            hostname: h.into(),
            wave_index: w,
            target_closure: format!("pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-nixos-system-{h}"),
        }
    }

    #[test]
    fn leaf_bytes_are_the_entrys_canonical_json() {
        for e in [entry("web-01", 3), entry("we\"ird\\name\u{e9}\n", 0)] {
            assert_eq!(leaf_bytes(&e), jcs::to_canonical(&e).unwrap());
        }
    }

    #[test]
    fn unsorted_or_duplicate_host_sets_are_refused() {
        assert!(check_sorted(&[entry("a", 0), entry("b", 0)]).is_ok());
        assert!(check_sorted(&[entry("b", 0), entry("a", 0)]).is_err());
        assert!(check_sorted(&[entry("a", 0), entry("a", 1)]).is_err());
    }
}
