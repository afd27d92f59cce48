//! The verification pipeline (SPEC.md §3): one implementation for every signed artifact.
//!
//! Steps, in order, each with its own [`VerifyError`] variant: size limit; UTF-8 + JSON
//! parse and canonicalisation of the *received* bytes; signature against the slot's
//! `current` then `previous` key; `schemaVersion`; `meta.signedAt` present; `rejectBefore`;
//! staleness; future dating; then the artifact-specific checks. Time is always an argument.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use nixfleet_proto::wire::ReportRequest;
use nixfleet_proto::{
    BootstrapToken, FleetResolved, HostProof, HostSetEntry, KeySlot, ManifestHeader, Meta,
    Revocations, RolloutManifest, TokenClaims, TrustFile, FLEET_SCHEMA_VERSION, MANIFEST_SCHEMA_V1,
    MANIFEST_SCHEMA_VERSION, REVOCATIONS_SCHEMA_VERSION, TOKEN_VERSION, TRUST_SCHEMA_VERSION,
};

use crate::hostset::{self, HostLists, HostSetError};
use crate::merkle;

use nixfleet_proto::stale_after;

use crate::jcs::{self, JcsError};
use crate::keys::{self, KeyError, PublicKey};

/// Clock skew tolerated in both directions (stale and future-dated checks).
pub use nixfleet_proto::CLOCK_SLACK;

/// Input size limits. fleet.resolved for 100,000 hosts is about 30 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub fleet_bytes: usize,
    pub manifest_bytes: usize,
    /// A schema-2 rollout's hosts file, and each budget list.
    pub host_list_bytes: usize,
    pub host_proof_bytes: usize,
    pub revocations_bytes: usize,
    pub token_bytes: usize,
    pub report_bytes: usize,
    pub evidence_bytes: usize,
    pub trust_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fleet_bytes: 64 << 20,
            manifest_bytes: 32 << 20,
            host_list_bytes: 64 << 20,
            host_proof_bytes: nixfleet_proto::manifest::MAX_HOST_PROOF_BYTES,
            revocations_bytes: 16 << 20,
            token_bytes: 16 << 10,
            report_bytes: 64 << 10,
            evidence_bytes: nixfleet_proto::compliance::MAX_EVIDENCE_BYTES,
            trust_bytes: 64 << 10,
        }
    }
}

/// What is being verified; named in every error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    Fleet,
    Manifest,
    Revocations,
    Token,
    Report,
    Evidence,
    TrustFile,
}

impl std::fmt::Display for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Artifact::Fleet => "fleet.resolved",
            Artifact::Manifest => "rollout manifest",
            Artifact::Revocations => "revocations list",
            Artifact::Token => "bootstrap token",
            Artifact::Report => "host report",
            Artifact::Evidence => "compliance evidence",
            Artifact::TrustFile => "trust file",
        })
    }
}

/// The trust slot a signature was checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    CiReleaseKey,
    OrgRootKey,
    HostKey,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::CiReleaseKey => "ciReleaseKey",
            Slot::OrgRootKey => "orgRootKey",
            Slot::HostKey => "the host's pubkey",
        })
    }
}

/// Which key of a slot produced a valid signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedBy {
    Current,
    /// The rotation-grace key; worth a warning so operators finish the rotation.
    Previous,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error("{artifact} is {size} bytes, over the {limit}-byte limit; refusing to parse it (check the URL or file, or an endless download)")]
    TooLarge {
        artifact: Artifact,
        size: usize,
        limit: usize,
    },
    #[error("{artifact} is not valid JSON: {source}")]
    Parse {
        artifact: Artifact,
        source: JcsError,
    },
    #[error("{artifact} signature is {len} bytes; signatures are raw 64 bytes (check it is not base64 or DER)")]
    SignatureLength { artifact: Artifact, len: usize },
    #[error("{artifact} signature does not verify against {slot}.current or {slot}.previous; the artifact was altered, or signed by a key this trust file does not pin")]
    BadSignature { artifact: Artifact, slot: Slot },
    #[error("{slot} in the trust file is unusable: {source}")]
    TrustKey { slot: Slot, source: KeyError },
    #[error("{artifact} has schemaVersion {found}; this build understands only {supported} (upgrade nixfleet or re-sign with a supported version)")]
    UnsupportedSchema {
        artifact: Artifact,
        found: u64,
        supported: u32,
    },
    #[error("{artifact} does not have the expected shape: {detail}")]
    Shape { artifact: Artifact, detail: String },
    #[error("{artifact} has no meta.signedAt; unsigned artifacts are refused (sign it with `nixfleet release`)")]
    Unsigned { artifact: Artifact },
    #[error("{artifact} was signed at {signed_at}, before {slot}.rejectBefore {reject_before}; anything signed before the key-compromise cut-off is refused (re-sign with the new key)")]
    RejectedBefore {
        artifact: Artifact,
        slot: Slot,
        signed_at: String,
        reject_before: String,
    },
    #[error("{artifact} signed at {signed_at} is stale: older than its {window_minutes}-minute freshness window (+60 s) at {now}; CI must re-sign it (an old artifact is being replayed, or signing stopped)")]
    Stale {
        artifact: Artifact,
        signed_at: String,
        window_minutes: u64,
        now: String,
    },
    #[error("{artifact} is dated {signed_at}, more than 60 s after now ({now}); check the signer's and this machine's clocks")]
    FutureDated {
        artifact: Artifact,
        signed_at: String,
        now: String,
    },
    #[error("{artifact} has no freshness window (neither its own freshnessWindow nor its channel's); refusing it because it could be replayed forever")]
    NoFreshnessWindow { artifact: Artifact },
    #[error("rollout manifest's intent hashes to {actual}, not to its id {expected}; it was altered or served under the wrong id")]
    ManifestIdMismatch { expected: String, actual: String },
    #[error("rollout manifest belongs to fleet.resolved {manifest_fleet_hash}, but the fleet in use hashes to {fleet_hash}; a manifest from another release is refused (mix-and-match)")]
    FleetMismatch {
        manifest_fleet_hash: String,
        fleet_hash: String,
    },
    #[error("revocations list signed at {signed_at} is older than the list already applied (signed at {last_applied}); revocations never roll back")]
    RevocationsRollback {
        signed_at: String,
        last_applied: String,
    },
    #[error("bootstrap token expired at {expires_at} (now {now}); mint a new one with `nixfleet mint-token`")]
    TokenExpired { expires_at: String, now: String },
    #[error("bootstrap token is not valid before {issued_at} (now {now}); check the clocks")]
    TokenNotYetValid { issued_at: String, now: String },
    #[error("{artifact} signature field is not base64: {detail}")]
    SignatureEncoding { artifact: Artifact, detail: String },
    #[error(
        "report is for host {report_host}, but was checked against the key of {expected_host}"
    )]
    ReportHostMismatch {
        report_host: String,
        expected_host: String,
    },
    #[error("compliance evidence is for host {evidence_host}, but was checked against the key of {expected_host}; another host's evidence is refused")]
    EvidenceHostMismatch {
        evidence_host: String,
        expected_host: String,
    },
    #[error("compliance evidence of control {control} was collected at {collected_at}, before the closure was activated at {activated_at}; evidence older than the activation is refused")]
    EvidenceBeforeActivation {
        control: String,
        collected_at: String,
        activated_at: String,
    },
    #[error("rollout manifest {rollout_id} has schemaVersion 2, which commits to its host set by hash; its hosts file ({rollout_id}.hosts.json) and budget lists (budgets/<hostsSha256>.json) are needed next to it to read the whole plan")]
    HostListsMissing { rollout_id: String },
    #[error("the host lists of rollout manifest {rollout_id} do not match what it signs: {source}; they were altered, truncated, or belong to another rollout (publish the files of the same release again)")]
    HostLists {
        rollout_id: String,
        source: HostSetError,
    },
    #[error("host proof is not usable: {detail}")]
    ProofShape { detail: String },
    #[error("{what} is not usable: {detail}")]
    HostListsShape { what: String, detail: String },
    #[error("the inclusion proof of {hostname} (index {index}) does not lead to the hostSetRoot signed in rollout manifest {rollout_id}; the entry or the proof was altered, or belongs to another rollout")]
    ProofMismatch {
        hostname: String,
        index: u64,
        rollout_id: String,
    },
}

/// An artifact that passed the pipeline.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    pub value: T,
    /// The canonical bytes the signature covers, as received.
    pub canonical: Vec<u8>,
    /// Lowercase hex SHA-256 of `canonical`: names these exact signed bytes.
    pub sha256: String,
    /// The artifact's identity: `sha256`, except for a rollout manifest, whose identity is
    /// its rolloutId, the hash of its intent ([`rollout_id`]), which a re-sign keeps.
    pub id: String,
    pub signed_at: OffsetDateTime,
    pub signed_by: SignedBy,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Steps 1–3: size limit, parse + canonicalise received bytes, signature.
fn check_signed(
    artifact: Artifact,
    bytes: &[u8],
    limit: usize,
    signature: &[u8],
    slot: &KeySlot,
    slot_name: Slot,
) -> Result<(Vec<u8>, SignedBy), VerifyError> {
    within(bytes, artifact, limit)?;
    let canonical =
        jcs::canonicalize(bytes).map_err(|source| VerifyError::Parse { artifact, source })?;
    let signed_by = check_slot_signature(artifact, &canonical, signature, slot, slot_name)?;
    Ok((canonical, signed_by))
}

fn check_slot_signature(
    artifact: Artifact,
    canonical: &[u8],
    signature: &[u8],
    slot: &KeySlot,
    slot_name: Slot,
) -> Result<SignedBy, VerifyError> {
    if signature.len() != keys::SIGNATURE_LEN {
        return Err(VerifyError::SignatureLength {
            artifact,
            len: signature.len(),
        });
    }
    let key = |entry| {
        PublicKey::from_entry(entry).map_err(|source| VerifyError::TrustKey {
            slot: slot_name,
            source,
        })
    };
    if key(&slot.current)?.verify(canonical, signature).is_ok() {
        return Ok(SignedBy::Current);
    }
    if let Some(previous) = &slot.previous {
        if key(previous)?.verify(canonical, signature).is_ok() {
            return Ok(SignedBy::Previous);
        }
    }
    Err(VerifyError::BadSignature {
        artifact,
        slot: slot_name,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaProbe {
    schema_version: Option<serde_json::Value>,
}

/// The `schemaVersion` of canonical bytes, for artifacts with more than one accepted.
fn schema_of(artifact: Artifact, canonical: &[u8]) -> Result<u64, VerifyError> {
    let probe: SchemaProbe = serde_json::from_slice(canonical).map_err(|e| VerifyError::Shape {
        artifact,
        detail: e.to_string(),
    })?;
    match probe.schema_version {
        Some(serde_json::Value::Number(n)) => Ok(n.as_u64().unwrap_or(u64::MAX)),
        _ => Err(VerifyError::Shape {
            artifact,
            detail: "schemaVersion is missing or not a number".into(),
        }),
    }
}

/// Step 4, then the typed parse.
fn check_schema<T: DeserializeOwned>(
    artifact: Artifact,
    canonical: &[u8],
    supported: u32,
) -> Result<T, VerifyError> {
    let shape = |e: serde_json::Error| VerifyError::Shape {
        artifact,
        detail: e.to_string(),
    };
    let probe: SchemaProbe = serde_json::from_slice(canonical).map_err(shape)?;
    match probe.schema_version {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(supported)) => {}
        Some(serde_json::Value::Number(n)) => {
            return Err(VerifyError::UnsupportedSchema {
                artifact,
                found: n.as_u64().unwrap_or(u64::MAX),
                supported,
            })
        }
        _ => {
            return Err(VerifyError::Shape {
                artifact,
                detail: "schemaVersion is missing or not a number".into(),
            })
        }
    }
    serde_json::from_slice(canonical).map_err(shape)
}

/// Steps 5–8 on `meta`: signed, not before the compromise cut-off, fresh, not future-dated.
fn check_time(
    artifact: Artifact,
    meta: &Meta,
    slot: &KeySlot,
    slot_name: Slot,
    freshness_window_minutes: Option<u32>,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, VerifyError> {
    let signed_at = meta.signed_at.ok_or(VerifyError::Unsigned { artifact })?;
    check_reject_before(artifact, signed_at, slot, slot_name)?;
    if let Some(window) = freshness_window_minutes {
        if now > stale_after(signed_at, Duration::minutes(i64::from(window))) {
            return Err(VerifyError::Stale {
                artifact,
                signed_at: rfc3339(signed_at),
                window_minutes: u64::from(window),
                now: rfc3339(now),
            });
        }
    }
    if signed_at - now > CLOCK_SLACK {
        return Err(VerifyError::FutureDated {
            artifact,
            signed_at: rfc3339(signed_at),
            now: rfc3339(now),
        });
    }
    Ok(signed_at)
}

fn check_reject_before(
    artifact: Artifact,
    signed_at: OffsetDateTime,
    slot: &KeySlot,
    slot_name: Slot,
) -> Result<(), VerifyError> {
    match slot.reject_before {
        Some(cutoff) if signed_at < cutoff => Err(VerifyError::RejectedBefore {
            artifact,
            slot: slot_name,
            signed_at: rfc3339(signed_at),
            reject_before: rfc3339(cutoff),
        }),
        _ => Ok(()),
    }
}

/// Verifies `fleet.resolved.json` against `ciReleaseKey`. The fleet is one signature over
/// every channel, so it goes stale with the shortest channel freshness window.
pub fn verify_fleet(
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    limits: &Limits,
) -> Result<Verified<FleetResolved>, VerifyError> {
    let artifact = Artifact::Fleet;
    let slot = &trust.ci_release_key;
    let (canonical, signed_by) = check_signed(
        artifact,
        bytes,
        limits.fleet_bytes,
        signature,
        slot,
        Slot::CiReleaseKey,
    )?;
    let value: FleetResolved = check_schema(artifact, &canonical, FLEET_SCHEMA_VERSION)?;
    let window = value.freshness_window_minutes();
    if window.is_none() {
        return Err(VerifyError::NoFreshnessWindow { artifact });
    }
    let signed_at = check_time(artifact, &value.meta, slot, Slot::CiReleaseKey, window, now)?;
    let sha256 = jcs::sha256_hex(&canonical);
    Ok(Verified {
        id: sha256.clone(),
        sha256,
        value,
        canonical,
        signed_at,
        signed_by,
    })
}

/// What a manifest is expected to be: both checks are optional so that an auditor can
/// verify a manifest file on its own. The control plane passes both; the agent, which
/// holds no fleet, passes the rollout id of its target.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManifestContext<'a> {
    /// The rollout id it was fetched under (URL, file name, or a check-in target).
    pub rollout_id: Option<&'a str>,
    /// The verified fleet it is used with.
    pub fleet: Option<&'a Verified<FleetResolved>>,
}

/// A rollout manifest whose signature, freshness, id and fleet binding passed: the whole
/// plan (schema 1) or the header that commits to it (schema 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedManifest {
    V1(RolloutManifest),
    V2(ManifestHeader),
}

impl SignedManifest {
    pub fn channel(&self) -> &str {
        match self {
            SignedManifest::V1(m) => &m.channel,
            SignedManifest::V2(h) => &h.channel,
        }
    }

    pub fn health_gate(&self) -> &nixfleet_proto::HealthGate {
        match self {
            SignedManifest::V1(m) => &m.health_gate,
            SignedManifest::V2(h) => &h.health_gate,
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            SignedManifest::V1(m) => &m.meta,
            SignedManifest::V2(h) => &h.meta,
        }
    }

    /// The header of either schema (for schema 1, computed from its host set).
    pub fn header(&self) -> ManifestHeader {
        match self {
            SignedManifest::V1(m) => {
                let mut h = hostset::header_of(m);
                h.schema_version = m.schema_version;
                h
            }
            SignedManifest::V2(h) => h.clone(),
        }
    }
}

/// Verifies a rollout manifest of either schema against `ciReleaseKey`: signature,
/// schema, freshness (its own signed `freshnessWindow`, else its channel's in the fleet it
/// is used with), id, fleet binding. A schema-2 manifest's lists are not read here.
pub fn verify_manifest_header(
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    context: ManifestContext<'_>,
    limits: &Limits,
) -> Result<Verified<SignedManifest>, VerifyError> {
    let artifact = Artifact::Manifest;
    let slot = &trust.ci_release_key;
    let (canonical, signed_by) = check_signed(
        artifact,
        bytes,
        limits.manifest_bytes,
        signature,
        slot,
        Slot::CiReleaseKey,
    )?;
    let value = match schema_of(artifact, &canonical)? {
        v if v == u64::from(MANIFEST_SCHEMA_V1) => {
            SignedManifest::V1(check_schema(artifact, &canonical, MANIFEST_SCHEMA_V1)?)
        }
        _ => SignedManifest::V2(check_schema(artifact, &canonical, MANIFEST_SCHEMA_VERSION)?),
    };
    let channel = value.channel().to_owned();
    let (own_window, fleet_hash) = match &value {
        SignedManifest::V1(m) => (m.freshness_window, &m.fleet_resolved_hash),
        SignedManifest::V2(h) => (h.freshness_window, &h.fleet_resolved_hash),
    };
    let window = own_window.or_else(|| {
        context
            .fleet
            .and_then(|f| f.value.channels.get(&channel))
            .map(|c| c.freshness_window)
    });
    if window.is_none() {
        return Err(VerifyError::NoFreshnessWindow { artifact });
    }
    let signed_at = check_time(
        artifact,
        value.meta(),
        slot,
        Slot::CiReleaseKey,
        window,
        now,
    )?;
    let sha256 = jcs::sha256_hex(&canonical);
    let id = rollout_id(&canonical).map_err(|source| VerifyError::Parse { artifact, source })?;
    if let Some(expected) = context.rollout_id {
        if expected != id {
            return Err(VerifyError::ManifestIdMismatch {
                expected: expected.to_owned(),
                actual: id,
            });
        }
    }
    if let Some(fleet) = context.fleet {
        if *fleet_hash != fleet.sha256 {
            return Err(VerifyError::FleetMismatch {
                manifest_fleet_hash: fleet_hash.clone(),
                fleet_hash: fleet.sha256.clone(),
            });
        }
    }
    Ok(Verified {
        value,
        canonical,
        sha256,
        id,
        signed_at,
        signed_by,
    })
}

/// The whole plan of a verified manifest: schema 1 as signed; schema 2 from `lists`,
/// each checked against what the header signs. `canonical` stays the signed bytes.
pub fn complete_manifest(
    verified: Verified<SignedManifest>,
    lists: Option<&HostLists>,
) -> Result<(Verified<RolloutManifest>, merkle::Tree), VerifyError> {
    let Verified {
        value,
        canonical,
        sha256,
        id,
        signed_at,
        signed_by,
    } = verified;
    let (plan, tree) = match value {
        SignedManifest::V1(m) => {
            let tree = hostset::tree(&m.host_set);
            hostset::check_sorted(&m.host_set).map_err(|source| VerifyError::HostLists {
                rollout_id: id.clone(),
                source,
            })?;
            (m, tree)
        }
        SignedManifest::V2(header) => {
            let Some(hosts) = lists.and_then(|l| l.hosts.as_ref()) else {
                return Err(VerifyError::HostListsMissing { rollout_id: id });
            };
            let budgets = lists.map(|l| &l.budgets).cloned().unwrap_or_default();
            hostset::assemble(&id, &header, hosts, &budgets).map_err(|source| {
                VerifyError::HostLists {
                    rollout_id: id.clone(),
                    source,
                }
            })?
        }
    };
    Ok((
        Verified {
            value: plan,
            canonical,
            sha256,
            id,
            signed_at,
            signed_by,
        },
        tree,
    ))
}

/// Verifies a rollout manifest and reads its whole plan ([`verify_manifest_header`], then
/// [`complete_manifest`]).
pub fn verify_manifest(
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    context: ManifestContext<'_>,
    lists: Option<&HostLists>,
    limits: &Limits,
) -> Result<Verified<RolloutManifest>, VerifyError> {
    let header = verify_manifest_header(bytes, signature, trust, now, context, limits)?;
    complete_manifest(header, lists).map(|(plan, _)| plan)
}

/// Parses a rollout's hosts file (`<rolloutId>.hosts.json`) under the size limit; it is
/// checked against the signed root by [`complete_manifest`].
pub fn parse_rollout_hosts(
    bytes: &[u8],
    limits: &Limits,
) -> Result<nixfleet_proto::RolloutHosts, VerifyError> {
    parse_list(bytes, limits, "rollout hosts file")
}

/// Parses one budget list (`budgets/<sha256>.json`, a JSON array of hostnames).
pub fn parse_budget_list(bytes: &[u8], limits: &Limits) -> Result<Vec<String>, VerifyError> {
    parse_list(bytes, limits, "budget list")
}

/// Refuses input over its limit before anything parses it.
fn within(bytes: &[u8], artifact: Artifact, limit: usize) -> Result<(), VerifyError> {
    if bytes.len() > limit {
        return Err(VerifyError::TooLarge {
            artifact,
            size: bytes.len(),
            limit,
        });
    }
    Ok(())
}

fn parse_list<T: DeserializeOwned>(
    bytes: &[u8],
    limits: &Limits,
    what: &str,
) -> Result<T, VerifyError> {
    within(bytes, Artifact::Manifest, limits.host_list_bytes)?;
    serde_json::from_slice(bytes).map_err(|e| VerifyError::HostListsShape {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// A host's target as its rollout's signed manifest gives it, shown by an inclusion proof.
#[derive(Debug, Clone)]
pub struct VerifiedEntry {
    pub manifest: Verified<SignedManifest>,
    pub entry: HostSetEntry,
    pub index: u64,
}

/// Verifies a host proof document (`GET /v1/rollouts/{id}/hosts/{host}`, or the copy an
/// agent kept): the manifest as [`verify_manifest_header`] does, then that the proof
/// leads from the entry to the signed root. Which host, closure and wave the entry must
/// name is the caller's check. A schema-1 manifest carries no root and is refused here.
pub fn verify_host_proof(
    bytes: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    context: ManifestContext<'_>,
    limits: &Limits,
) -> Result<VerifiedEntry, VerifyError> {
    within(bytes, Artifact::Manifest, limits.host_proof_bytes)?;
    let shape = |detail: String| VerifyError::ProofShape { detail };
    let doc: HostProof = serde_json::from_slice(bytes).map_err(|e| shape(e.to_string()))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(doc.signature.as_bytes())
        .map_err(|e| shape(format!("signature is not base64: {e}")))?;
    let context = ManifestContext {
        rollout_id: context.rollout_id.or(Some(&doc.rollout_id)),
        ..context
    };
    let manifest = verify_manifest_header(
        doc.manifest.as_bytes(),
        &signature,
        trust,
        now,
        context,
        limits,
    )?;
    let SignedManifest::V2(header) = &manifest.value else {
        return Err(shape(
            "its manifest has schemaVersion 1, which carries no host-set root; fetch the whole manifest instead".into(),
        ));
    };
    let root: merkle::Hash = decode_hash(&header.host_set_root)
        .ok_or_else(|| shape("the signed hostSetRoot is not 64 hex digits".into()))?;
    let mut path = Vec::with_capacity(doc.proof.len());
    for h in &doc.proof {
        path.push(
            decode_hash(h)
                .ok_or_else(|| shape(format!("proof hash {h:?} is not 64 hex digits")))?,
        );
    }
    let leaf = hostset::leaf_hash(&doc.entry);
    if !merkle::verify_inclusion(&leaf, doc.index, header.host_set_size, &path, &root) {
        return Err(VerifyError::ProofMismatch {
            hostname: doc.entry.hostname,
            index: doc.index,
            rollout_id: manifest.id,
        });
    }
    Ok(VerifiedEntry {
        manifest,
        entry: doc.entry,
        index: doc.index,
    })
}

fn decode_hash(s: &str) -> Option<merkle::Hash> {
    let mut out = [0u8; 32];
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The members of a rollout manifest that make up its intent: what the hosts get and how.
/// Never `meta`, `displayName`, `channelRef`, `fleetResolvedHash`, `freshnessWindow` or
/// `schemaVersion`: a re-sign, or a commit that changes nothing for this channel, keeps
/// the id (SPEC.md §4, docs/release.md "Rollout identity").
/// Schema 1 names its hosts in `hostSet`, schema 2 by `hostSetRoot` and `hostSetSize`
/// (and its budgets by hash): either way the id commits to every host's target.
pub const ROLLOUT_INTENT_MEMBERS: [&str; 9] = [
    "channel",
    "hostSet",
    "hostSetRoot",
    "hostSetSize",
    "waves",
    "healthGate",
    "onHealthFailure",
    "complianceFrameworks",
    "disruptionBudgets",
];

/// A manifest's rolloutId: lowercase hex SHA-256 of the canonical JSON object holding only
/// the [`ROLLOUT_INTENT_MEMBERS`] present in `manifest` (its bytes as received).
pub fn rollout_id(manifest: &[u8]) -> Result<String, JcsError> {
    jcs::canonical_members(manifest, &ROLLOUT_INTENT_MEMBERS).map(|intent| jcs::sha256_hex(&intent))
}

/// The freshness window of a revocation list that sets none: seven days. CI re-signs the
/// list at least that often (docs/revoke.md).
pub const DEFAULT_REVOCATIONS_FRESHNESS_MINUTES: u32 = 7 * 24 * 60;

/// Verifies `revocations.json` against `ciReleaseKey`. `last_applied` is the `signedAt` of
/// the list already applied: an older list is refused, the same one is accepted again.
pub fn verify_revocations(
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    last_applied: Option<OffsetDateTime>,
    limits: &Limits,
) -> Result<Verified<Revocations>, VerifyError> {
    let artifact = Artifact::Revocations;
    let slot = &trust.ci_release_key;
    let (canonical, signed_by) = check_signed(
        artifact,
        bytes,
        limits.revocations_bytes,
        signature,
        slot,
        Slot::CiReleaseKey,
    )?;
    let value: Revocations = check_schema(artifact, &canonical, REVOCATIONS_SCHEMA_VERSION)?;
    // Without a window an old list could be replayed forever to lift a revocation.
    let window = value
        .freshness_window
        .or(Some(DEFAULT_REVOCATIONS_FRESHNESS_MINUTES));
    let signed_at = check_time(artifact, &value.meta, slot, Slot::CiReleaseKey, window, now)?;
    if let Some(last) = last_applied {
        if signed_at < last {
            return Err(VerifyError::RevocationsRollback {
                signed_at: rfc3339(signed_at),
                last_applied: rfc3339(last),
            });
        }
    }
    let sha256 = jcs::sha256_hex(&canonical);
    Ok(Verified {
        id: sha256.clone(),
        sha256,
        value,
        canonical,
        signed_at,
        signed_by,
    })
}

/// Canonical bytes of one member of a JSON object, taken from the received bytes.
fn canonical_member(
    artifact: Artifact,
    bytes: &[u8],
    limit: usize,
    member: &str,
) -> Result<(Vec<u8>, serde_json::Value), VerifyError> {
    within(bytes, artifact, limit)?;
    let canonical =
        jcs::canonicalize(bytes).map_err(|source| VerifyError::Parse { artifact, source })?;
    let whole: serde_json::Value =
        serde_json::from_slice(&canonical).map_err(|e| VerifyError::Shape {
            artifact,
            detail: e.to_string(),
        })?;
    let part = whole.get(member).ok_or_else(|| VerifyError::Shape {
        artifact,
        detail: format!("missing field `{member}`"),
    })?;
    let part_canonical =
        jcs::to_canonical(part).map_err(|source| VerifyError::Parse { artifact, source })?;
    Ok((part_canonical, whole))
}

/// An ed25519 signature (base64) by the host SSH key `host_pubkey_line` over `canonical`.
fn check_host_signature(
    artifact: Artifact,
    canonical: &[u8],
    signature: &str,
    host_pubkey_line: &str,
) -> Result<(), VerifyError> {
    let key = keys::parse_ssh_ed25519_public(host_pubkey_line).map_err(|source| {
        VerifyError::TrustKey {
            slot: Slot::HostKey,
            source,
        }
    })?;
    let signature = decode_signature(artifact, signature)?;
    if signature.len() != keys::SIGNATURE_LEN {
        return Err(VerifyError::SignatureLength {
            artifact,
            len: signature.len(),
        });
    }
    key.verify(canonical, &signature)
        .map_err(|_| VerifyError::BadSignature {
            artifact,
            slot: Slot::HostKey,
        })
}

fn decode_signature(artifact: Artifact, text: &str) -> Result<Vec<u8>, VerifyError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| VerifyError::SignatureEncoding {
            artifact,
            detail: e.to_string(),
        })
}

/// Verifies a bootstrap token (its JSON bytes as received) against `orgRootKey`: the
/// signature over the canonical `claims`, `rejectBefore`, and the validity interval.
/// Nonce replay and the fingerprint/hostname binding are the enrolling server's checks.
pub fn verify_token(
    bytes: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    limits: &Limits,
) -> Result<Verified<TokenClaims>, VerifyError> {
    let artifact = Artifact::Token;
    let (canonical, whole) = canonical_member(artifact, bytes, limits.token_bytes, "claims")?;
    let token: BootstrapToken = serde_json::from_value(whole).map_err(|e| VerifyError::Shape {
        artifact,
        detail: e.to_string(),
    })?;
    let signature = decode_signature(artifact, &token.signature)?;
    let slot = &trust.org_root_key;
    let signed_by = check_slot_signature(artifact, &canonical, &signature, slot, Slot::OrgRootKey)?;
    if token.version != TOKEN_VERSION {
        return Err(VerifyError::UnsupportedSchema {
            artifact,
            found: u64::from(token.version),
            supported: TOKEN_VERSION,
        });
    }
    let claims = token.claims;
    check_reject_before(artifact, claims.issued_at, slot, Slot::OrgRootKey)?;
    if claims.issued_at - now > CLOCK_SLACK {
        return Err(VerifyError::TokenNotYetValid {
            issued_at: rfc3339(claims.issued_at),
            now: rfc3339(now),
        });
    }
    if now > claims.expires_at {
        return Err(VerifyError::TokenExpired {
            expires_at: rfc3339(claims.expires_at),
            now: rfc3339(now),
        });
    }
    let sha256 = jcs::sha256_hex(&canonical);
    Ok(Verified {
        id: sha256.clone(),
        sha256,
        signed_at: claims.issued_at,
        value: claims,
        canonical,
        signed_by,
    })
}

/// Verifies a host-signed report (the `ReportRequest` JSON bytes as received) against the
/// host's SSH public key line from fleet.resolved.
pub fn verify_report(
    bytes: &[u8],
    hostname: &str,
    host_pubkey_line: &str,
    limits: &Limits,
) -> Result<Verified<ReportRequest>, VerifyError> {
    let artifact = Artifact::Report;
    let (canonical, whole) = canonical_member(artifact, bytes, limits.report_bytes, "report")?;
    let request: ReportRequest = serde_json::from_value(whole).map_err(|e| VerifyError::Shape {
        artifact,
        detail: e.to_string(),
    })?;
    if request.report.hostname != hostname {
        return Err(VerifyError::ReportHostMismatch {
            report_host: request.report.hostname,
            expected_host: hostname.to_owned(),
        });
    }
    check_host_signature(artifact, &canonical, &request.signature, host_pubkey_line)?;
    let sha256 = jcs::sha256_hex(&canonical);
    Ok(Verified {
        id: sha256.clone(),
        sha256,
        signed_at: request.report.at,
        value: request,
        canonical,
        signed_by: SignedBy::Current,
    })
}

/// Verifies a host-signed compliance evidence document (`EvidenceRequest` bytes as
/// received) against the host's SSH ed25519 public key line from fleet.resolved: the
/// size, the signature over the canonical bytes of `evidence`, the host name, the shape
/// (closure hash, unique control ids, `sha256:` output hashes, at most
/// [`nixfleet_proto::compliance::MAX_CONTROLS`] controls), and that nothing in it was
/// collected before the activation it claims to follow. Replays (older than the host's
/// latest) are the caller's to refuse: only it knows the latest.
pub fn verify_evidence(
    bytes: &[u8],
    hostname: &str,
    host_pubkey_line: &str,
    limits: &Limits,
) -> Result<Verified<nixfleet_proto::compliance::EvidenceRequest>, VerifyError> {
    use nixfleet_proto::compliance::{EvidenceRequest, MAX_CONTROLS};
    let artifact = Artifact::Evidence;
    let (canonical, whole) = canonical_member(artifact, bytes, limits.evidence_bytes, "evidence")?;
    let request: EvidenceRequest =
        serde_json::from_value(whole).map_err(|e| VerifyError::Shape {
            artifact,
            detail: e.to_string(),
        })?;
    check_host_signature(artifact, &canonical, &request.signature, host_pubkey_line)?;
    let evidence = &request.evidence;
    if evidence.hostname != hostname {
        return Err(VerifyError::EvidenceHostMismatch {
            evidence_host: evidence.hostname.clone(),
            expected_host: hostname.to_owned(),
        });
    }
    let shape = |detail: String| VerifyError::Shape { artifact, detail };
    if !nixfleet_proto::wire::is_store_basename(&evidence.closure_hash) {
        return Err(shape(format!(
            "closureHash {:?} is not a store path basename",
            evidence.closure_hash
        )));
    }
    if evidence
        .rollout_id
        .as_deref()
        .is_some_and(|id| !nixfleet_proto::wire::is_rollout_id(id))
    {
        return Err(shape(
            "rolloutId must be null or 64 lowercase hex digits".into(),
        ));
    }
    if evidence.controls.len() > MAX_CONTROLS {
        return Err(shape(format!(
            "{} controls, over the limit of {MAX_CONTROLS}",
            evidence.controls.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for control in &evidence.controls {
        if control.id.is_empty()
            || control.id.len() > 128
            || !control
                .id
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        {
            return Err(shape(format!(
                "control id {:?} is not a control id",
                control.id
            )));
        }
        if !seen.insert(control.id.as_str()) {
            return Err(shape(format!("control {} appears twice", control.id)));
        }
        let hash_ok = control
            .output_hash
            .strip_prefix("sha256:")
            .is_some_and(nixfleet_proto::wire::is_rollout_id);
        if !hash_ok {
            return Err(shape(format!(
                "control {}: outputHash must be sha256:<64 hex digits>",
                control.id
            )));
        }
        if control.collected_at < evidence.activated_at {
            return Err(VerifyError::EvidenceBeforeActivation {
                control: control.id.clone(),
                collected_at: rfc3339(control.collected_at),
                activated_at: rfc3339(evidence.activated_at),
            });
        }
        if control.collected_at > evidence.collected_at {
            return Err(shape(format!(
                "control {} was collected at {}, after the evidence's collectedAt {}",
                control.id,
                rfc3339(control.collected_at),
                rfc3339(evidence.collected_at)
            )));
        }
    }
    if evidence.collected_at < evidence.activated_at {
        return Err(VerifyError::EvidenceBeforeActivation {
            control: "(the evidence as a whole)".into(),
            collected_at: rfc3339(evidence.collected_at),
            activated_at: rfc3339(evidence.activated_at),
        });
    }
    let sha256 = jcs::sha256_hex(&canonical);
    Ok(Verified {
        id: sha256.clone(),
        sha256,
        signed_at: request.evidence.collected_at,
        value: request,
        canonical,
        signed_by: SignedBy::Current,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrustFileError {
    #[error("trust file {path} cannot be read: {detail}; every nixfleet binary needs its pinned trust roots (create it with `nixfleet trust init`)")]
    Unreadable { path: String, detail: String },
    #[error("trust file {path} is writable by group or others (mode {mode:o}); anyone who can write it can replace the trust roots: chmod go-w {path}")]
    Writable { path: String, mode: u32 },
    #[error(
        "trust file {path} is {size} bytes, over the {limit}-byte limit; is it the right file?"
    )]
    TooLarge {
        path: String,
        size: usize,
        limit: usize,
    },
    #[error("trust file {path} is not a valid trust.json: {detail}")]
    Invalid { path: String, detail: String },
    #[error("trust file {path} has schemaVersion {found}; this build understands only {TRUST_SCHEMA_VERSION}")]
    UnsupportedSchema { path: String, found: u64 },
    #[error("trust file {path}: orgRootKey must be ed25519, found {found}")]
    OrgRootNotEd25519 {
        path: String,
        found: nixfleet_proto::Algorithm,
    },
    #[error("trust file {path}: cache key {key:?} is not `name:base64-of-32-bytes` as `nix-store --generate-binary-cache-key` writes the public half")]
    CacheKey { path: String, key: String },
    #[error("trust file {path}: {slot} is unusable: {source}")]
    Key {
        path: String,
        slot: &'static str,
        source: KeyError,
    },
}

/// Reads and checks trust.json from disk. The one file access in this crate: every binary
/// must treat the trust file identically (missing, unreadable, writable by others).
pub fn read_trust_file(
    path: &std::path::Path,
    limits: &Limits,
) -> Result<TrustFile, TrustFileError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let name = path.display().to_string();
    let unreadable = |e: std::io::Error| TrustFileError::Unreadable {
        path: name.clone(),
        detail: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mode = file.metadata().map_err(unreadable)?.permissions().mode();
    let mut bytes = Vec::new();
    file.take(limits.trust_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    check_trust_file(&name, &bytes, mode, limits)
}

/// Checks trust.json as read from disk: its permission bits (`mode` from the file's
/// metadata), schema version, and that every pinned key parses. `path` is for messages.
pub fn check_trust_file(
    path: &str,
    bytes: &[u8],
    mode: u32,
    limits: &Limits,
) -> Result<TrustFile, TrustFileError> {
    if mode & 0o022 != 0 {
        return Err(TrustFileError::Writable {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    if bytes.len() > limits.trust_bytes {
        return Err(TrustFileError::TooLarge {
            path: path.to_owned(),
            size: bytes.len(),
            limit: limits.trust_bytes,
        });
    }
    let invalid = |detail: String| TrustFileError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let probe: SchemaProbe = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    match probe.schema_version.as_ref().and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(TRUST_SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(TrustFileError::UnsupportedSchema {
                path: path.to_owned(),
                found,
            })
        }
        None => return Err(invalid("schemaVersion is missing or not a number".into())),
    }
    let trust: TrustFile = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let slots: [(&'static str, &KeySlot); 2] = [
        ("ciReleaseKey", &trust.ci_release_key),
        ("orgRootKey", &trust.org_root_key),
    ];
    for (name, slot) in slots {
        for entry in std::iter::once(&slot.current).chain(slot.previous.as_ref()) {
            PublicKey::from_entry(entry).map_err(|source| TrustFileError::Key {
                path: path.to_owned(),
                slot: name,
                source,
            })?;
        }
    }
    for entry in std::iter::once(&trust.org_root_key.current).chain(&trust.org_root_key.previous) {
        if entry.algorithm != nixfleet_proto::Algorithm::Ed25519 {
            return Err(TrustFileError::OrgRootNotEd25519 {
                path: path.to_owned(),
                found: entry.algorithm,
            });
        }
    }
    for key in &trust.cache_keys {
        if parse_cache_key(key).is_none() {
            return Err(TrustFileError::CacheKey {
                path: path.to_owned(),
                key: key.clone(),
            });
        }
    }
    Ok(trust)
}

/// Splits a Nix binary-cache public key `name:base64` into its name and 32 key bytes.
pub fn parse_cache_key(key: &str) -> Option<(&str, [u8; 32])> {
    let (name, b64) = key.split_once(':')?;
    if name.is_empty() {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((name, bytes.try_into().ok()?))
}
