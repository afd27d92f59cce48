//! Rollout manifests (`rollouts/<rolloutId>.json` + `.sig`, SPEC.md §4): the frozen plan of
//! one rollout of one channel.

use serde::{Deserialize, Serialize};

use crate::fleet::{HealthGate, OnHealthFailure, Selector};
use crate::meta::Meta;

/// The only manifest schema this build understands.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

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
