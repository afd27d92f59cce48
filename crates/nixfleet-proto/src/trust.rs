//! `trust.json`: the pinned public roots (SPEC.md §2).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The only trust file schema this build understands.
pub const TRUST_SCHEMA_VERSION: u32 = 1;

/// Signature algorithms accepted for the CI release key (the org root key is ed25519 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    #[serde(rename = "ed25519")]
    Ed25519,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::EcdsaP256 => "ecdsa-p256",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ed25519" => Ok(Algorithm::Ed25519),
            "ecdsa-p256" => Ok(Algorithm::EcdsaP256),
            other => Err(format!(
                "unknown algorithm {other:?}: expected \"ed25519\" or \"ecdsa-p256\""
            )),
        }
    }
}

/// A public key as pinned in trust.json: ed25519 = raw 32 bytes, ecdsa-p256 = SEC1 point, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyEntry {
    pub algorithm: Algorithm,
    pub public: String,
}

/// One trust root with its rotation grace key and compromise switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeySlot {
    pub current: PublicKeyEntry,
    #[serde(default)]
    pub previous: Option<PublicKeyEntry>,
    /// Anything signed before this instant is refused, whichever key signed it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub reject_before: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrustFile {
    pub schema_version: u32,
    pub ci_release_key: KeySlot,
    pub org_root_key: KeySlot,
    /// Nix binary-cache public keys, `name:base64`.
    #[serde(default)]
    pub cache_keys: Vec<String>,
}
