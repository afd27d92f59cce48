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
