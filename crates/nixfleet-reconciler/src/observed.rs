//! What the reconciler is told besides the signed artifacts: agent attestations, the
//! stored rollout records, and the control plane's settings.

use std::collections::BTreeMap;
use std::sync::Arc;

use nixfleet_proto::compliance::ComplianceSummary;
use nixfleet_proto::wire::{ActivationProgress, FailedTarget};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::stored::StoredState;

/// Everything observed so far. `hosts` is what agents attest at check-in and comes back
/// by itself after a database wipe; `stored` is the reconciler's own soft state, written
/// only through [`crate::apply`], and may be empty (a wipe): the reconciler rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observed {
    /// When the control plane started collecting attestations (process start). A host
    /// not seen since then is unknown, which holds its wave back, until `offlineAfterSecs`
    /// have passed; after that it counts as offline. Without this a restart would look
    /// like the whole fleet going offline and waves would promote over unknown hosts.
    #[serde(with = "time::serde::rfc3339")]
    pub attestations_since: OffsetDateTime,
    /// Latest attestation per hostname. Shared, so that a tick's copy of 100,000
    /// attestations is 100,000 pointers.
    #[serde(default)]
    pub hosts: BTreeMap<String, Arc<Attestation>>,
    #[serde(default)]
    pub stored: StoredState,
}

/// The latest check-in of one host, plus what the control plane answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    /// Last check-in or confirm; drives online/offline.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// `currentGeneration.closureHash` of the last check-in.
    #[serde(default)]
    pub current_closure: Option<String>,
    /// When the agent last got a 204 for `current_closure`. The control plane also sets
    /// it (with `current_closure`) when it accepts a confirm: a confirm is an attestation.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_confirmed_at: Option<OffsetDateTime>,
    /// Closures that failed on this host, per rollout.
    #[serde(default)]
    pub failed_targets: Vec<FailedTarget>,
    /// `health.failedUnits` of the last check-in (for `current_closure`).
    #[serde(default)]
    pub failed_units: u32,
    /// When `failed_units` was reported. A confirm carries no health, so a host that has
    /// just confirmed has no health report for its new closure until it checks in again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub health_at: Option<OffsetDateTime>,
    /// The last check-in answer that carried a target. Control-plane memory, not the
    /// agent's word: lost on a wipe, which only means the host is dispatched again.
    #[serde(default)]
    pub delivered: Option<Delivery>,
    /// The activation in flight, as the last check-in reported it.
    #[serde(default)]
    pub activation: Option<ActivationProgress>,
    /// The host's newest verified compliance evidence, summarised.
    #[serde(default)]
    pub compliance: Option<ComplianceSummary>,
    /// `complianceEvidenceAt` of the last check-in: the newest evidence the agent holds.
    /// Newer than `compliance` (or with none stored), the host's compliance is pending.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub compliance_claimed_at: Option<OffsetDateTime>,
}

/// A check-in answer carried the target of `rolloutId` at `at`; the confirm deadline runs
/// from then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub rollout_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Control-plane settings the decisions depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// How long an agent has to confirm once its switch has finished
    /// (`--confirm-window-secs`; also sent to the agent as `confirmWindowSecs`).
    pub confirm_window_secs: u64,
    /// How long a host has, from delivery of its target, to fetch the closure and finish
    /// the switch (`--activation-timeout-secs`). Its confirm is due at most
    /// `activationTimeoutSecs + confirmWindowSecs` after delivery, and a confirm window
    /// after the switch when the agent reports when that was. A host that still reports
    /// fetching or switching after this long is failed. 0: the confirm window runs from
    /// delivery.
    #[serde(default)]
    pub activation_timeout_secs: u64,
    /// A host not seen for longer than this is offline: it is not dispatched and does not
    /// hold its wave back.
    pub offline_after_secs: u64,
    /// How long after a host's deadline it is failed for want of a confirm. Replicas set
    /// this: a confirm another replica took before the deadline may still be on its way
    /// through the database. A single control plane fails the host at the deadline (0).
    #[serde(default)]
    pub late_confirm_grace_secs: u64,
}
