//! Compliance (docs/compliance.md): the probe set a closure carries, the host-signed
//! evidence an agent builds from running it, and the static results a release records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a closure carries its probe set, relative to the closure's store path. On NixOS
/// it is `environment.etc."nixfleet/compliance.json"` (the toplevel's `etc` links to the
/// etc tree), written by the agent module's `compliance` options. Because it is inside
/// the closure that CI signed, the control plane cannot change which probes run.
pub const PROBE_SET_PATH: &str = "etc/nixfleet/compliance.json";

/// The largest probe set file read, in bytes.
pub const MAX_PROBE_SET_BYTES: usize = 1 << 20;
/// The most controls in one probe set or one evidence document.
pub const MAX_CONTROLS: usize = 512;
/// The largest signed evidence document accepted, in bytes.
pub const MAX_EVIDENCE_BYTES: usize = 256 << 10;

/// What a channel's compliance does (`compliance.mode` in mkFleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComplianceMode {
    /// A failing control stops the release (static), rolls the host back (runtime) and
    /// holds wave promotion (rollout gate).
    Enforce,
    /// Failures are recorded and reported; nothing is blocked.
    Permissive,
    /// Nothing is evaluated or probed.
    Disabled,
}

impl ComplianceMode {
    /// The mode a channel's `compliance.mode` string names; unknown text is an error the
    /// caller reports (mkFleet validates it, so this is defence in depth).
    pub fn parse(text: &str) -> Option<ComplianceMode> {
        match text {
            "enforce" => Some(ComplianceMode::Enforce),
            "permissive" => Some(ComplianceMode::Permissive),
            "disabled" => Some(ComplianceMode::Disabled),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ComplianceMode::Enforce => "enforce",
            ComplianceMode::Permissive => "permissive",
            ComplianceMode::Disabled => "disabled",
        }
    }
}

/// `<closure>/etc/nixfleet/compliance.json`: what the agent runs after activating the
/// closure, and what it does with the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSet {
    pub mode: ComplianceMode,
    #[serde(default)]
    pub frameworks: Vec<String>,
    /// `lib.compliance.probesFor (controlsFor frameworks)`.
    #[serde(default)]
    pub probes: Vec<Probe>,
}

/// One control's runtime check (docs/compliance.md, "probe: the runtime check").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub id: String,
    #[serde(default)]
    pub articles: BTreeMap<String, Vec<String>>,
    /// argv; the first element an absolute path.
    pub command: Vec<String>,
    pub timeout_secs: u64,
    /// `exit0`: exit 0 is pass, exit 1 is fail, anything else is error.
    pub expect: String,
}

/// The outcome of one control on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlStatus {
    Pass,
    Fail,
    /// The check itself could not be done (timeout, signal, exit other than 0 or 1, could
    /// not start). Treated as a failure in `enforce`.
    Error,
}

impl ControlStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlStatus::Pass => "pass",
            ControlStatus::Fail => "fail",
            ControlStatus::Error => "error",
        }
    }
}

/// One control's record in an evidence document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlEvidence {
    pub id: String,
    pub status: ControlStatus,
    /// Copied from the control, so that a record stands on its own in an audit.
    #[serde(default)]
    pub articles: BTreeMap<String, Vec<String>>,
    /// `sha256:<hex>` of the probe's stdout (at most 64 KiB of it).
    pub output_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub collected_at: OffsetDateTime,
}

/// Why the probes ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvidenceTrigger {
    /// After a switch, before the confirm: the runtime gate.
    Activation,
    /// A scheduled re-run on the running closure.
    Drift,
}

/// What the host key signs: the outcome of a probe set on one host, on one closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    pub hostname: String,
    /// The rollout that delivered the closure; null for a closure not delivered by a
    /// rollout the agent knows (a drift run after a restart without state).
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// The closure the probes ran on (store path basename).
    pub closure_hash: String,
    pub boot_id: String,
    /// When the closure became the running system (the end of its switch). Every
    /// control's `collectedAt` is at or after it: evidence from before is refused.
    #[serde(with = "time::serde::rfc3339")]
    pub activated_at: OffsetDateTime,
    /// When the last probe finished; orders a host's evidence (an older one is a replay).
    #[serde(with = "time::serde::rfc3339")]
    pub collected_at: OffsetDateTime,
    pub trigger: EvidenceTrigger,
    /// The mode and frameworks of the probe set, as the closure carries them.
    pub mode: ComplianceMode,
    #[serde(default)]
    pub frameworks: Vec<String>,
    pub controls: Vec<ControlEvidence>,
}

impl Evidence {
    /// The controls that did not pass, in order.
    pub fn failing(&self) -> impl Iterator<Item = &ControlEvidence> {
        self.controls
            .iter()
            .filter(|c| c.status != ControlStatus::Pass)
    }
}

/// `POST /v1/agent/evidence` and the evidence file `nixfleet verify evidence` reads: the
/// evidence and an ed25519 signature by the host's SSH key over its canonical bytes,
/// base64, as for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceRequest {
    pub evidence: Evidence,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceResponse {
    /// The SHA-256 of the evidence's canonical bytes: its identity.
    pub evidence_id: String,
}

/// A control that failed a host's static check at release time, recorded in the signed
/// manifest of a `permissive` channel (an `enforce` channel does not release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StaticFailure {
    pub hostname: String,
    pub control: String,
    #[serde(default)]
    pub articles: BTreeMap<String, Vec<String>>,
    pub evidence: String,
}

/// What the control plane keeps of a host's latest evidence (its summary; the signed
/// document itself is stored as received, as a host event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceSummary {
    pub evidence_id: String,
    #[serde(default)]
    pub rollout_id: Option<String>,
    pub closure_hash: String,
    pub mode: ComplianceMode,
    pub trigger: EvidenceTrigger,
    #[serde(with = "time::serde::rfc3339")]
    pub collected_at: OffsetDateTime,
    pub passed: u32,
    /// The controls that did not pass: id and status.
    #[serde(default)]
    pub failing: Vec<FailingControl>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailingControl {
    pub id: String,
    pub status: ControlStatus,
}

impl ComplianceSummary {
    pub fn of(evidence: &Evidence, evidence_id: &str) -> ComplianceSummary {
        ComplianceSummary {
            evidence_id: evidence_id.to_owned(),
            rollout_id: evidence.rollout_id.clone(),
            closure_hash: evidence.closure_hash.clone(),
            mode: evidence.mode,
            trigger: evidence.trigger,
            collected_at: evidence.collected_at,
            passed: evidence
                .controls
                .iter()
                .filter(|c| c.status == ControlStatus::Pass)
                .count() as u32,
            failing: evidence
                .failing()
                .map(|c| FailingControl {
                    id: c.id.clone(),
                    status: c.status,
                })
                .collect(),
        }
    }
}
