//! The reconciler's stored soft state (the `rollouts` and `host_rollout_state` tables).
//! All of it can be lost: [`crate::reconcile`] rebuilds it from attestations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::host::HostState;
use crate::rollout::RolloutState;

/// Rollout records by rolloutId.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredState {
    #[serde(default)]
    pub rollouts: BTreeMap<String, RolloutRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    pub channel: String,
    pub state: RolloutState,
    /// When the rollout was opened; the latest opened rollout is its channel's current one.
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: OffsetDateTime,
    /// When `state` was entered.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Hosts that have left Queued, by hostname. A host without a record is Queued.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub state: HostState,
    /// When `state` was entered.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// When this rollout dispatched the host, if it did.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub dispatched_at: Option<OffsetDateTime>,
    /// When the host confirmed the target: the soak clock. Also tells whether the host
    /// activated the target in this rollout (a confirm older than the manifest means the
    /// host already ran that closure, and a rollback must not touch it).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub confirmed_at: Option<OffsetDateTime>,
}

impl RolloutRecord {
    pub(crate) fn opened(channel: &str, now: OffsetDateTime) -> Self {
        RolloutRecord {
            channel: channel.to_owned(),
            state: RolloutState::Pending { reason: None },
            opened_at: now,
            since: now,
            hosts: BTreeMap::new(),
        }
    }
}
