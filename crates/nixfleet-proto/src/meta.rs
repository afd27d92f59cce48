//! The `meta` block every signed artifact carries.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::trust::Algorithm;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub schema_version: u32,
    /// Null on unsigned input; stamped by `nixfleet release`. Verifiers refuse null.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub signed_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub ci_commit: Option<String>,
    #[serde(default)]
    pub signature_algorithm: Option<Algorithm>,
}

impl Meta {
    pub fn unsigned(schema_version: u32) -> Self {
        Meta {
            schema_version,
            signed_at: None,
            ci_commit: None,
            signature_algorithm: None,
        }
    }
}

/// How far verifiers trust clocks to disagree: an artifact is stale once its freshness
/// window and this much have passed since its `signedAt`, and refused as future-dated when
/// signed more than this ahead.
pub const CLOCK_SLACK: Duration = Duration::seconds(60);

/// When an artifact signed at `signed_at` with a freshness `window` goes stale: verifiers
/// refuse it after this instant.
pub fn stale_after(signed_at: OffsetDateTime, window: Duration) -> OffsetDateTime {
    signed_at.saturating_add(window).saturating_add(CLOCK_SLACK)
}
