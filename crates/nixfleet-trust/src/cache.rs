//! Nix binary-cache signatures: a pinned cache key (`name:base64`, as trust.json's
//! `cacheKeys` holds it) and the check of a store path's signatures against such keys.
//! A signature is ed25519 over the path's fingerprint,
//! `1;<store path>;<narHash as sha256:base32>;<narSize>;<references, full store paths,
//! sorted, comma-separated>`.

use std::collections::BTreeSet;

use base64::Engine as _;

use nixfleet_proto::Algorithm;

use crate::keys::PublicKey;
use crate::verify::parse_cache_key;

/// A pinned binary-cache key: its name (`fleet-cache-1`) and the ed25519 key.
#[derive(Debug, Clone)]
pub struct CacheKey {
    pub name: String,
    key: PublicKey,
}

impl CacheKey {
    /// Parses `name:base64` of 32 ed25519 key bytes; surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Option<CacheKey> {
        let text = text.trim();
        parse_cache_key(text)?;
        let (name, b64) = text.split_once(':')?;
        Some(CacheKey {
            name: name.to_owned(),
            key: PublicKey::from_base64(Algorithm::Ed25519, b64).ok()?,
        })
    }
}

/// The bytes a binary-cache signature of a store path is over. `references` are full
/// store paths, in any order.
pub fn fingerprint<'a>(
    path: &str,
    nar_hash: &str,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a str>,
) -> String {
    let references: BTreeSet<&str> = references.into_iter().collect();
    format!(
        "1;{path};{nar_hash};{nar_size};{}",
        references.into_iter().collect::<Vec<_>>().join(",")
    )
}

/// The name of the first key in `keys` with a valid signature (`name:base64`) among
/// `signatures` over `fingerprint`.
pub fn signed_by<'k>(
    fingerprint: &str,
    signatures: &[String],
    keys: &'k [CacheKey],
) -> Option<&'k str> {
    signatures.iter().find_map(|sig| {
        let (name, b64) = sig.split_once(':')?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        keys.iter()
            .filter(|k| k.name == name)
            .find(|k| k.key.verify(fingerprint.as_bytes(), &raw).is_ok())
            .map(|k| k.name.as_str())
    })
}
