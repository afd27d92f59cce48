//! `revocations.json` (SPEC.md §4): authoritative list of revoked host certificates.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::meta::Meta;

/// The only revocations schema this build understands.
pub const REVOCATIONS_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocations {
    pub schema_version: u32,
    pub revocations: Vec<Revocation>,
    /// Minutes after `signedAt` during which the list is current; null means it does not
    /// expire. Set it when CI re-signs the list on a schedule, so that a frozen list is
    /// refused.
    #[serde(default)]
    pub freshness_window: Option<u32>,
    pub meta: Meta,
}

/// A client certificate for `hostname` whose notBefore is earlier than `notBefore` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub hostname: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub revoked_by: Option<String>,
}
