//! Contracts shared by every nixfleet component: the signed artifacts, the trust file,
//! the bootstrap token and the agent/control-plane wire protocol (SPEC.md §2–§5).
//!
//! Serialisation rules (SPEC.md §4): camelCase field names, optional values written as
//! explicit `null`, unknown fields ignored on input.

pub mod trust;

pub use trust::{Algorithm, KeySlot, PublicKeyEntry, TrustFile, TRUST_SCHEMA_VERSION};
