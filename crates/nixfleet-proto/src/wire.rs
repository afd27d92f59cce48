//! The agent ↔ control-plane protocol (SPEC.md §5), camelCase JSON over mTLS.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::token::BootstrapToken;

/// Agents send this header with their protocol major version on every request.
pub const PROTOCOL_HEADER: &str = "X-Nixfleet-Protocol";
/// The protocol major version this build speaks.
pub const PROTOCOL_MAJOR: u32 = 1;

/// Whether `s` is a rollout id: 64 lowercase hex digits (a SHA-256).
pub fn is_rollout_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `s` is a Nix store basename `<32 nix-base32 chars>-<name>`: it becomes a path
/// argument, and it is written into logs, so anything else is refused where it arrives.
pub fn is_store_basename(s: &str) -> bool {
    let Some((hash, name)) = s.split_once('-') else {
        return false;
    };
    hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eotu".contains(&b)))
        && !name.is_empty()
        && name.len() <= 211
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollRequest {
    pub token: BootstrapToken,
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollResponse {
    pub cert_pem: String,
    pub ca_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewResponse {
    pub cert_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckinRequest {
    pub hostname: String,
    pub agent_version: String,
    pub boot_id: String,
    pub current_generation: CurrentGeneration,
    /// When the agent last got a 204 confirm for its current closure.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_confirmed_at: Option<OffsetDateTime>,
    /// Closures that failed on this host; they are never activated again in that rollout.
    #[serde(default)]
    pub failed_targets: Vec<FailedTarget>,
    pub health: Health,
    /// Where the activation in flight stands; null when none is (or from agents that
    /// predate it). The control plane's activation timeout and confirm window use it.
    #[serde(default)]
    pub activation: Option<ActivationProgress>,
    /// `collectedAt` of the newest compliance evidence the agent holds; null when it has
    /// none. Ahead of what the control plane has stored, the host's compliance is pending
    /// (a wipe, or evidence on its way) and the control plane asks for it again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub compliance_evidence_at: Option<OffsetDateTime>,
}

/// An activation under way on the host, as its check-ins report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivationProgress {
    pub rollout_id: String,
    pub closure_hash: String,
    pub phase: ActivationPhase,
    /// When the phase began. For `awaitingConfirm` that is the end of the switch, where
    /// the confirm window starts on both sides.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ActivationPhase {
    /// Realising the closure from the binary cache.
    Fetching,
    /// switch-to-configuration is running.
    Switching,
    /// The switch finished; confirming.
    AwaitingConfirm,
    /// Switching back after a failed activation.
    RollingBack,
}

impl ActivationPhase {
    pub fn describe(self) -> &'static str {
        match self {
            ActivationPhase::Fetching => "fetching the closure",
            ActivationPhase::Switching => "switching",
            ActivationPhase::AwaitingConfirm => "awaiting its confirm",
            ActivationPhase::RollingBack => "rolling back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentGeneration {
    pub closure_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedTarget {
    pub rollout_id: String,
    pub closure_hash: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Null from agents that predate it; such a failure is taken as an activation failure.
    #[serde(default)]
    pub cause: Option<FailureCause>,
}

/// Why a closure failed on a host. It decides whether a later rollout may send the same
/// closure to the same host again ([`closure_blocked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureCause {
    /// Switching to it failed, or the running system was not it afterwards.
    Activation,
    /// No confirm was accepted within the confirm window (the control plane could not be
    /// reached), or the control plane answered the confirm with 410.
    ConfirmTimeout,
    /// The control plane told the host to roll back, and this host's own failed units
    /// were over the rollout's health gate: the closure is unhealthy here.
    Health,
    /// The control plane told the host to roll back: its rollout tripped the health gate
    /// (on another host, as far as this one can tell).
    RollbackSignal,
    /// Refused before activation: the manifest, its freshness, or the closure's cache
    /// signature. Says nothing about the closure itself.
    Refused,
    /// The closure's compliance probes failed or erred on this host after the switch, in
    /// `enforce` mode, so it was rolled back without a confirm.
    Compliance,
    /// A cause this build does not know (a newer agent); treated as an activation failure.
    #[serde(other)]
    Other,
}

/// The failure that keeps `closure` from being sent to a host by rollout `rollout_id`,
/// given every failure recorded on that host (SPEC.md §4: a closure that failed on a host
/// is never sent to it again by itself). Within its own rollout any failure counts; across
/// rollouts only what says something about the closure on this host does: an activation
/// or health failure at once (and a failure of unknown cause, conservatively), a confirm timeout from
/// the second one on (the first may have been the network, so one later rollout may retry).
pub fn closure_blocked<'a>(
    failed: &'a [FailedTarget],
    rollout_id: &str,
    closure: &str,
) -> Option<&'a FailedTarget> {
    let mut same: Vec<&FailedTarget> = failed
        .iter()
        .filter(|f| f.closure_hash == closure)
        .collect();
    same.sort_by(|a, b| (a.at, &a.rollout_id).cmp(&(b.at, &b.rollout_id)));
    if let Some(own) = same.iter().find(|f| f.rollout_id == rollout_id) {
        return Some(own);
    }
    let closure_level = |f: &&&FailedTarget| {
        matches!(
            f.cause,
            None | Some(
                FailureCause::Activation
                    | FailureCause::Health
                    | FailureCause::Compliance
                    | FailureCause::Other
            )
        )
    };
    if let Some(f) = same.iter().find(closure_level) {
        return Some(f);
    }
    let timeouts: Vec<&&FailedTarget> = same
        .iter()
        .filter(|f| f.cause == Some(FailureCause::ConfirmTimeout))
        .collect();
    match timeouts.as_slice() {
        [_, second, ..] => Some(second),
        _ => None,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub failed_units: u32,
    pub uptime_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckinResponse {
    #[serde(default)]
    pub target: Option<Target>,
    #[serde(default)]
    pub rollback: Option<RollbackSignal>,
    pub next_checkin_secs: u32,
    /// `collectedAt` of the newest evidence of this host the control plane has stored;
    /// null when it has none. An agent holding newer evidence sends it again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub compliance_evidence_at: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub closure_hash: String,
    pub rollout_id: String,
    pub wave_index: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: OffsetDateTime,
    pub freshness_window_secs: u64,
    pub confirm_window_secs: u64,
}

/// Sent to every host of a rollout that activated its closure when the rollout's health
/// gate trips under `rollback-and-halt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSignal {
    pub rollout_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmRequest {
    pub hostname: String,
    pub rollout_id: String,
    pub wave_index: u32,
    pub generation: Generation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Generation {
    pub closure_hash: String,
    pub boot_id: String,
}

/// A host-signed event. The signature is ed25519 by the host SSH key over the canonical
/// bytes of `report`, base64; auditors verify it offline against fleet.resolved's pubkey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRequest {
    pub report: Report,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub hostname: String,
    /// Chosen by the agent, unique per event, so that a re-sent report is stored once.
    pub report_id: String,
    pub kind: ReportKind,
    #[serde(default)]
    pub rollout_id: Option<String>,
    #[serde(default)]
    pub closure_hash: Option<String>,
    pub boot_id: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportKind {
    Activated,
    ActivationFailed,
    RolledBack,
    RollbackFailed,
    StaleTarget,
    ManifestRejected,
    ClosureRejected,
    ConfirmTimeout,
    CertificateExpired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportResponse {
    pub event_id: String,
}

/// The body of every non-2xx answer, agent and operator routes alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
