//! The `meta` block every signed artifact carries.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

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
