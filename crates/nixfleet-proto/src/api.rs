//! Operator-facing JSON (snake_case, SPEC.md §5).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// `GET /healthz`, served without a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthz {
    pub ok: bool,
    pub version: String,
    pub primed: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_tick_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub fleet_signed_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revocations_applied_at: Option<OffsetDateTime>,
    /// "single" (one control plane on SQLite), "leader" or "follower" (replicas on a
    /// shared PostgreSQL database).
    #[serde(default)]
    pub role: String,
    /// This replica's name, when replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The replica that last published a tick, when replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// False while a replica cannot reach its shared database (it answers agents 503).
    #[serde(default = "yes")]
    pub database_ok: bool,
}

fn yes() -> bool {
    true
}

/// `GET /v1/channels/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelStatus {
    pub name: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub signed_at: Option<OffsetDateTime>,
    pub ci_commit: Option<String>,
    pub freshness_window_minutes: u32,
    pub rollout_policy: String,
    pub current_rollout: Option<String>,
    pub hosts_total: u64,
    pub hosts_converged: u64,
    /// Why the channel's newest release is not rolling out, if it is not.
    #[serde(default)]
    pub waiting: Option<String>,
}

/// One host as operators see it: an entry of `GET /v1/hosts`, and the head of
/// `GET /v1/hosts/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub channel: String,
    /// The platform the fleet declares for the host (`x86_64-linux`, `aarch64-darwin`, …).
    #[serde(default)]
    pub system: Option<String>,
    /// The closure the verified fleet declares for the host.
    pub declared_closure: Option<String>,
    /// The closure the host last said it runs.
    pub current_closure: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_checkin: Option<OffsetDateTime>,
    pub online: bool,
    /// The host runs its declared closure.
    #[serde(default)]
    pub converged: bool,
    /// The newest rollout of the host's channel.
    pub rollout: Option<String>,
    /// The host's state in that rollout (`queued`, `dispatched`, `confirmWindow`,
    /// `healthy`, `soaked`, `converged`, `failed`, `rollingBack`, `reverted`).
    pub rollout_state: Option<String>,
    /// Why the host is where it is; set for every host that is not converged.
    pub waiting: Option<String>,
    /// Set while the applied revocation list refuses the host's certificate (and no
    /// certificate from a later enrollment has been seen): the host is out of the fleet.
    #[serde(default)]
    pub revoked: Option<HostRevoked>,
    /// The host's newest compliance evidence, summarised; null when none is stored.
    #[serde(default)]
    pub compliance: Option<crate::compliance::ComplianceSummary>,
}

impl HostStatus {
    /// One phrase for the host's compliance: `-` without evidence, `pass (14)`, or the
    /// controls that did not pass, `auditd-enabled fail, … (12 pass)`.
    pub fn compliance_text(&self) -> String {
        match &self.compliance {
            None => "-".to_owned(),
            Some(s) if s.failing.is_empty() => format!("pass ({})", s.passed),
            Some(s) => {
                let failing: Vec<String> = s
                    .failing
                    .iter()
                    .map(|c| format!("{} {}", c.id, c.status.as_str()))
                    .collect();
                format!("{} ({} pass)", failing.join(", "), s.passed)
            }
        }
    }
}

/// The revocation entry that keeps a host out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRevoked {
    /// Certificates from enrollments before this are refused.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    pub reason: Option<String>,
    pub revoked_by: Option<String>,
}

/// `GET /v1/hosts/{name}`: the host and its most recent events, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDetail {
    #[serde(flatten)]
    pub host: HostStatus,
    pub events: Vec<RolloutEventRecord>,
}

/// One entry of a rollout's event trail: a decision of the reconciler, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEventRecord {
    pub rollout_id: String,
    pub hostname: Option<String>,
    /// The decision (`open`, `start`, `dispatch`, `deliver`, `confirm`, `fail`, `halt`, …).
    pub kind: String,
    /// The decision as the reconciler recorded it (`reason`, `wave`, `deadline`, …).
    pub detail: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// An entry of `GET /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub rollout_id: String,
    pub channel: String,
    /// `<channel>@<short commit>`, from the signed manifest.
    pub display_name: Option<String>,
    /// The rollout state as the reconciler stores it: a name (`"converged"`) or an
    /// object naming it (`{"executing": {"wave": 1, "phase": "active"}}`).
    pub state: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// Hostname → the host's state in this rollout, in the same form as `state`.
    pub hosts: std::collections::BTreeMap<String, serde_json::Value>,
    /// The release that first carried this rollout's intent (null when its manifest is
    /// not loaded, or predates the field).
    #[serde(default)]
    pub introduced: Option<Provenance>,
    /// The newest signature of this intent the control plane serves: CI's latest re-sign.
    #[serde(default)]
    pub latest: Option<Provenance>,
}

/// Which commit a release was built from and when it was signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub ci_commit: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: OffsetDateTime,
}

/// The name of a state stored as `"name"` or `{"name": {…}}`.
pub fn state_name(state: &serde_json::Value) -> String {
    match state {
        serde_json::Value::String(name) => name.clone(),
        serde_json::Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
        other => other.to_string(),
    }
}

/// What `--event-hook` receives on stdin, one JSON object per run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEvent {
    /// `rollout_halted`, `rollout_converged` or `host_failed`.
    pub event: String,
    pub rollout_id: String,
    pub channel: Option<String>,
    pub hostname: Option<String>,
    /// The reason the reconciler gave, when it gave one.
    pub reason: Option<String>,
    /// The reconciler's decision, as in the rollout trail.
    pub detail: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// `nixfleet status --json`: the fleet as one control plane sees it. Fields are only
/// ever added, never renamed or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The control plane's URL.
    pub control_plane: String,
    /// When the CLI asked.
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    /// The control plane's version, from `/healthz`.
    pub version: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub fleet_signed_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_tick_at: Option<OffsetDateTime>,
    /// The newest rollout of each channel, by channel.
    #[serde(default)]
    pub rollouts: Vec<RolloutStatus>,
    /// Every host of the verified fleet, by name.
    pub hosts: Vec<HostStatus>,
}

/// `GET /v1/compliance[?channel=C]`: every host's newest compliance evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplianceReport {
    /// Sorted by hostname.
    pub hosts: Vec<HostCompliance>,
}

/// One host in [`ComplianceReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCompliance {
    pub hostname: String,
    pub channel: String,
    /// The channel's `compliance.mode` and `compliance.frameworks` in the signed fleet.
    pub mode: String,
    pub frameworks: Vec<String>,
    /// The agent holds newer evidence than the control plane has stored (after a wipe,
    /// until the agent sends it again).
    pub pending: bool,
    /// The newest stored evidence, summarised; null when none is stored.
    pub summary: Option<crate::compliance::ComplianceSummary>,
    /// The same evidence as the host signed it (an `EvidenceRequest`, camelCase, byte for
    /// byte what `nixfleet verify evidence` checks once written to a file); null when
    /// none is stored.
    pub evidence: Option<serde_json::Value>,
}
