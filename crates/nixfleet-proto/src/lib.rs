//! Contracts shared by every nixfleet component: the signed artifacts, the trust file,
//! the bootstrap token and the agent/control-plane wire protocol (SPEC.md §2–§5).
//!
//! Serialisation rules (SPEC.md §4): camelCase field names, optional values written as
//! explicit `null`, unknown fields ignored on input. Operator-facing JSON (`api`) is
//! snake_case. This crate holds types and the selector semantics only; it does no I/O.

pub mod api;
pub mod compliance;
pub mod fleet;
pub mod manifest;
pub mod meta;
pub mod revocations;
pub mod token;
pub mod trust;
pub mod wire;

pub use fleet::{
    Channel, ChannelEdge, Compliance, DisruptionBudget, Edge, FailedUnitsGate, FleetResolved,
    HealthGate, Host, OnHealthFailure, PolicyWave, ResolvedWave, RolloutPolicy, Selector,
    FLEET_SCHEMA_VERSION,
};
pub use manifest::{
    BudgetCommitment, HostProof, HostSetEntry, Introduced, ManifestBudget, ManifestHeader,
    ManifestWave, RolloutHosts, RolloutManifest, MANIFEST_SCHEMA_V1, MANIFEST_SCHEMA_VERSION,
};
pub use meta::{stale_after, Meta, CLOCK_SLACK};
pub use revocations::{Revocation, Revocations, REVOCATIONS_SCHEMA_VERSION};
pub use token::{BootstrapToken, TokenClaims, TOKEN_VERSION};
pub use trust::{Algorithm, KeySlot, PublicKeyEntry, TrustFile, TRUST_SCHEMA_VERSION};
