//! Trust primitives for nixfleet: RFC 8785 canonical JSON (what gets signed) and the
//! ed25519 / ECDSA P-256 keys and raw 64-byte signatures over it.
//!
//! Pure library: no files, clock or environment. Callers pass bytes and strings in; the
//! only outside input is the OS RNG, used by key generation.

pub mod jcs;
pub mod keys;
pub mod verify;
