//! Trust primitives for nixfleet: RFC 8785 canonical JSON (what gets signed) and the
//! ed25519 / ECDSA P-256 keys and raw 64-byte signatures over it.
//!
//! Pure library: no clock or environment. Callers pass bytes and strings in; the only
//! outside inputs are the OS RNG, used by key generation, and `verify::read_trust_file`,
//! so that every binary reads trust.json the same way.

pub mod cache;
pub mod hostset;
pub mod jcs;
pub mod keys;
pub mod merkle;
pub mod verify;
