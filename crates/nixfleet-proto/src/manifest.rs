//! Rollout manifests (`rollouts/<rolloutId>.json` + `.sig`, SPEC.md §4): the frozen plan of
//! one rollout of one channel.

use serde::{Deserialize, Serialize};

use crate::fleet::{HealthGate, OnHealthFailure, Selector};
use crate::meta::Meta;

/// The manifest schema `nixfleet release` writes: the signed manifest commits to its host
/// set and budget lists by hash ([`ManifestHeader`]), so that a host verifies its own entry
/// with an inclusion proof instead of fetching every entry.
pub const MANIFEST_SCHEMA_VERSION: u32 = 2;

/// The schema before: the whole host set and budget lists in the signed manifest
/// ([`RolloutManifest`]). Still accepted during the transition (docs/release.md).
pub const MANIFEST_SCHEMA_V1: u32 = 1;

/// A rollout's whole plan: what schema 1 signed, and what schema 2 signs the header of plus
/// the host set and budget lists it commits to. The reconciler works on this.
///
/// `rolloutId` is the lowercase hex SHA-256 of the canonical bytes of the manifest's
/// intent (channel, hostSet, waves, healthGate, onHealthFailure, complianceFrameworks,
/// disruptionBudgets), not of `meta` or anything else a re-sign changes; see
/// `nixfleet_trust::verify::rollout_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutManifest {
    pub schema_version: u32,
    /// `<channel>@<short commit>`.
    pub display_name: String,
    pub channel: String,
    /// The CI commit the release was built from.
    pub channel_ref: String,
    /// SHA-256 of the canonical fleet.resolved this manifest was projected from.
    pub fleet_resolved_hash: String,
    /// Sorted by hostname.
    pub host_set: Vec<HostSetEntry>,
    pub waves: Vec<ManifestWave>,
    pub health_gate: HealthGate,
    pub on_health_failure: OnHealthFailure,
    #[serde(default)]
    pub compliance_frameworks: Vec<String>,
    #[serde(default)]
    pub disruption_budgets: Vec<ManifestBudget>,
    /// The channel's freshness window in minutes, signed with the plan so that an agent
    /// does not have to take the control plane's word for it.
    #[serde(default)]
    pub freshness_window: Option<u32>,
    /// The release that first carried this intent; `nixfleet release` keeps it across
    /// re-signs. Signed, but outside the identity. Null in manifests from before it.
    #[serde(default)]
    pub introduced: Option<Introduced>,
    /// The channel's compliance mode and the controls that failed hosts' static checks at
    /// release time (a `permissive` channel releases with them; `enforce` does not
    /// release). Signed, but outside the identity: the controls are checked again on the
    /// hosts. Absent in manifests from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<ManifestCompliance>,
    pub meta: Meta,
}

/// The static compliance gate's outcome for a channel, in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestCompliance {
    pub mode: crate::compliance::ComplianceMode,
    #[serde(default)]
    pub static_failures: Vec<crate::compliance::StaticFailure>,
}

/// Provenance of a rollout's intent: the commit and signing time of its first release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Introduced {
    #[serde(default)]
    pub ci_commit: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: time::OffsetDateTime,
}

impl RolloutManifest {
    /// The host-set entry for a host, if it is part of this rollout.
    pub fn entry(&self, hostname: &str) -> Option<&HostSetEntry> {
        self.host_set
            .binary_search_by(|e| e.hostname.as_str().cmp(hostname))
            .ok()
            .map(|i| &self.host_set[i])
    }

    /// When this intent was first signed: `introduced`, else this signature's time.
    pub fn first_signed_at(&self) -> Option<time::OffsetDateTime> {
        self.introduced
            .as_ref()
            .map(|i| i.signed_at)
            .or(self.meta.signed_at)
    }

    /// Whether `(hostname, waveIndex, closure)` is part of the signed plan.
    pub fn contains(&self, hostname: &str, wave_index: u32, target_closure: &str) -> bool {
        self.entry(hostname)
            .is_some_and(|e| e.wave_index == wave_index && e.target_closure == target_closure)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostSetEntry {
    pub hostname: String,
    pub wave_index: u32,
    pub target_closure: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestWave {
    pub soak_minutes: u32,
}

/// A disruption budget frozen for the rollout: the selector and the hosts it matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestBudget {
    pub selector: Selector,
    /// Sorted.
    pub hosts: Vec<String>,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub max_in_flight_pct: Option<u32>,
}

/// A schema-2 rollout manifest: what CI signs. The host set is committed by the root of a
/// Merkle tree (RFC 6962 shape, `nixfleet_trust::hostset`), each budget's frozen host list
/// by its hash; the lists themselves are in unsigned files checked against these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestHeader {
    pub schema_version: u32,
    pub display_name: String,
    pub channel: String,
    pub channel_ref: String,
    pub fleet_resolved_hash: String,
    /// Lowercase hex root of the tree over the host set's entries, sorted by hostname.
    pub host_set_root: String,
    pub host_set_size: u64,
    pub waves: Vec<ManifestWave>,
    pub health_gate: HealthGate,
    pub on_health_failure: OnHealthFailure,
    #[serde(default)]
    pub compliance_frameworks: Vec<String>,
    #[serde(default)]
    pub disruption_budgets: Vec<BudgetCommitment>,
    #[serde(default)]
    pub freshness_window: Option<u32>,
    #[serde(default)]
    pub introduced: Option<Introduced>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance: Option<ManifestCompliance>,
    pub meta: Meta,
}

/// A disruption budget in a schema-2 manifest: its frozen host list by hash. The list is
/// `budgets/<hostsSha256>.json` next to the manifest, one file per distinct list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetCommitment {
    pub selector: Selector,
    /// Lowercase hex SHA-256 of the RFC 8785 bytes of the sorted hostname array.
    pub hosts_sha256: String,
    pub hosts_count: u64,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub max_in_flight_pct: Option<u32>,
}

/// `<rolloutId>.hosts.json`, unsigned: a schema-2 rollout's host set, checked against the
/// signed root by whoever reads it (the control plane, `nixfleet verify manifest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutHosts {
    pub rollout_id: String,
    /// Sorted by hostname.
    pub host_set: Vec<HostSetEntry>,
}

/// `GET /v1/rollouts/{id}/hosts/{host}`: what a dispatched host needs to believe its
/// target, a few kilobytes whatever the fleet's size. The agent keeps it as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostProof {
    pub rollout_id: String,
    /// The signed schema-2 manifest, as published (JSON text).
    pub manifest: String,
    /// Its raw 64-byte signature, standard base64.
    pub signature: String,
    pub entry: HostSetEntry,
    /// The entry's position in the host set (sorted by hostname).
    pub index: u64,
    /// RFC 6962 audit path, bottom-up, lowercase hex.
    pub proof: Vec<String>,
}

/// The largest host proof a client reads (a header with long selectors and static
/// compliance failures, and a 32-hash path).
pub const MAX_HOST_PROOF_BYTES: usize = 256 << 10;
