//! Bootstrap tokens (SPEC.md §4): one-shot enrollment permission signed by the org root key.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub const TOKEN_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapToken {
    pub version: u32,
    pub claims: TokenClaims,
    /// Base64 of the raw 64-byte ed25519 signature over the canonical `claims`.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenClaims {
    pub hostname: String,
    /// `SHA256:…` as `ssh-keygen -lf` prints it for the host key.
    pub expected_pubkey_fingerprint: String,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Hex, unique per token; the control plane refuses a nonce it has seen.
    pub nonce: String,
}
