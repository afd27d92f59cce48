//! The subcommands. Each returns what it prints on success; `main` prints errors.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use nixfleet_proto::manifest::ManifestCompliance;
use nixfleet_proto::{
    Algorithm, BootstrapToken, FleetResolved, Introduced, KeySlot, Meta, PublicKeyEntry,
    Revocations, TokenClaims, TrustFile, REVOCATIONS_SCHEMA_VERSION, TOKEN_VERSION,
    TRUST_SCHEMA_VERSION,
};
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey, PublicKey};
use nixfleet_trust::verify::{self, Limits, ManifestContext, SignedBy, SignedManifest, Verified};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::compliance_gate;
use crate::files;
use crate::host_lists::{self, ListPaths};
use crate::pipeline::{PipelineError, Stage};
use crate::release::{self, ManifestSchema, Stamp};
use crate::signer::Signer;
use crate::CliError;

const KEY_FILE_LIMIT: usize = 64 << 10;
const INPUT_LIMIT: usize = 64 << 20;

/// Seconds precision: signed timestamps are compared across machines and shown to people.
pub fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn json_error(path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Json {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CliError> {
    let bytes = files::read_limited(path, INPUT_LIMIT)?;
    serde_json::from_slice(&bytes).map_err(|e| json_error(path, e))
}

/// Reads and checks a trust file the way every nixfleet binary does.
pub fn load_trust(path: &Path) -> Result<TrustFile, CliError> {
    Ok(verify::read_trust_file(path, &Limits::default())?)
}

pub fn load_private_key(path: &Path) -> Result<PrivateKey, CliError> {
    let text = files::read_text(path, KEY_FILE_LIMIT)?;
    PrivateKey::from_pem(&text).map_err(|source| CliError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// `nixfleet keygen`: writes a PKCS#8 PEM private key (mode 0600), returns the public key.
pub fn keygen(algorithm: Algorithm, out: &Path) -> Result<String, CliError> {
    let key = PrivateKey::generate(algorithm);
    let pem = key.to_pkcs8_pem().map_err(|source| CliError::Key {
        path: out.to_path_buf(),
        source,
    })?;
    files::write_new(out, pem.as_bytes(), 0o600)?;
    Ok(key.public_key().to_base64())
}

/// `nixfleet derive-pubkey`: the base64 public key of a private key file.
pub fn derive_pubkey(path: &Path) -> Result<String, CliError> {
    Ok(load_private_key(path)?.public_key().to_base64())
}

/// Parses a base64 public key, inferring the algorithm from its length when not given
/// (32 bytes: ed25519; 33, 64 or 65 bytes: a P-256 point).
pub fn parse_public(
    what: &str,
    text: &str,
    algorithm: Option<Algorithm>,
) -> Result<PublicKeyEntry, CliError> {
    let algorithm = match algorithm {
        Some(a) => a,
        None => {
            let len = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map(|b| b.len())
                .unwrap_or(0);
            if len == 32 {
                Algorithm::Ed25519
            } else {
                Algorithm::EcdsaP256
            }
        }
    };
    let key =
        PublicKey::from_base64(algorithm, text.trim()).map_err(|source| CliError::PublicKey {
            what: what.to_owned(),
            source,
        })?;
    Ok(key.to_entry())
}

pub struct TrustInit {
    pub ci_release_key: String,
    pub ci_release_key_algorithm: Option<Algorithm>,
    pub previous_ci_release_key: Option<String>,
    pub org_root_key: String,
    pub cache_keys: Vec<String>,
    pub out: PathBuf,
}

/// `nixfleet trust init`: writes a schemaVersion 1 trust file (mode 0644).
pub fn trust_init(args: &TrustInit) -> Result<String, CliError> {
    let org = parse_public(
        "--org-root-key",
        &args.org_root_key,
        Some(Algorithm::Ed25519),
    )?;
    let trust = TrustFile {
        schema_version: TRUST_SCHEMA_VERSION,
        ci_release_key: KeySlot {
            current: parse_public(
                "--ci-release-key",
                &args.ci_release_key,
                args.ci_release_key_algorithm,
            )?,
            previous: args
                .previous_ci_release_key
                .as_deref()
                .map(|k| parse_public("--previous-ci-release-key", k, None))
                .transpose()?,
            reject_before: None,
        },
        org_root_key: KeySlot {
            current: org,
            previous: None,
            reject_before: None,
        },
        cache_keys: args.cache_keys.clone(),
    };
    for key in &trust.cache_keys {
        if verify::parse_cache_key(key).is_none() {
            return Err(CliError::Usage(format!(
                "--cache-key {key:?} is not NAME:BASE64 (the public key `nix-store --generate-binary-cache-key` writes)"
            )));
        }
    }
    let mut text = serde_json::to_string_pretty(&trust).map_err(|e| json_error(&args.out, e))?;
    text.push('\n');
    files::write_atomic(&args.out, text.as_bytes(), 0o644)?;
    Ok(format!(
        "wrote {} (ciReleaseKey {}, {} cache key(s))",
        args.out.display(),
        trust.ci_release_key.current.algorithm,
        trust.cache_keys.len()
    ))
}

pub struct ReleaseArgs {
    pub fleet: PathBuf,
    pub closures: PathBuf,
    pub ci_commit: String,
    pub signer: Signer,
    pub out: PathBuf,
    pub trust_file: Option<PathBuf>,
    pub signed_at: Option<OffsetDateTime>,
    pub manifest_schema: ManifestSchema,
}

/// Signs canonical bytes once and writes them to each path, with `path.sig` beside it.
fn write_signed(paths: &[&Path], canonical: &[u8], signer: &Signer) -> Result<(), CliError> {
    let sig = signer.sign(canonical)?;
    for path in paths {
        files::write_atomic(path, canonical, 0o644)?;
        let mut sig_path = path.as_os_str().to_owned();
        sig_path.push(".sig");
        files::write_atomic(Path::new(&sig_path), &sig, 0o644)?;
    }
    Ok(())
}

fn canonical_of<T: serde::Serialize>(value: &T, path: &Path) -> Result<Vec<u8>, CliError> {
    jcs::to_canonical(value).map_err(|e| json_error(path, e))
}

fn canonical_manifest(manifest: &SignedManifest, path: &Path) -> Result<Vec<u8>, CliError> {
    match manifest {
        SignedManifest::V1(m) => canonical_of(m, path),
        SignedManifest::V2(h) => canonical_of(h, path),
    }
}

/// `nixfleet release`: validate, resolve, stamp, sign; returns the summary and warnings.
pub fn release(args: &ReleaseArgs) -> Result<(String, Vec<String>), CliError> {
    release_with_compliance(args, None)
}

/// `nixfleet release --compliance-results FILE`: the same, through the static compliance
/// gate first (an enforce channel with a failed control is refused with exit code 12,
/// nothing written); each gated channel's manifest records the outcome. Without a file,
/// a manifest keeps what an earlier release of the same intent recorded (a re-sign).
pub fn release_with_compliance(
    args: &ReleaseArgs,
    compliance_results: Option<&Path>,
) -> Result<(String, Vec<String>), CliError> {
    let fleet: FleetResolved = read_json(&args.fleet)?;
    let closures: BTreeMap<String, String> = read_json(&args.closures)?;
    let results: Option<compliance_gate::Results> =
        compliance_results.map(read_json).transpose()?;
    let trust = args.trust_file.as_deref().map(load_trust).transpose()?;
    let stamp = Stamp {
        ci_commit: args.ci_commit.clone(),
        signed_at: args.signed_at.unwrap_or_else(now_utc),
        algorithm: args.signer.algorithm(),
    };
    let resolved = release::resolve(fleet, &closures, &stamp).map_err(CliError::Fleet)?;
    let fleet = resolved.fleet;
    let mut warnings = resolved.warnings;
    // Before anything is written: a refused release leaves --out as it was.
    let gate = match &results {
        Some(results) => {
            let decision = compliance_gate::decide(&fleet, results).map_err(|e| {
                let message = match &e {
                    compliance_gate::GateError::Refused(_) => e.to_string(),
                    _ => format!(
                        "{}: {e}; nothing was signed",
                        compliance_results.unwrap_or(Path::new("")).display()
                    ),
                };
                CliError::Pipeline(PipelineError {
                    stage: Stage::Compliance,
                    message,
                })
            })?;
            warnings.extend(decision.warnings);
            Some(decision.channels)
        }
        None => None,
    };

    files::create_dir(&args.out.join("rollouts").join("channel"))?;
    let fleet_path = args.out.join("fleet.resolved.json");
    let fleet_canonical = canonical_of(&fleet, &fleet_path)?;
    let fleet_hash = jcs::sha256_hex(&fleet_canonical);
    write_signed(&[&fleet_path], &fleet_canonical, &args.signer)?;

    let mut lines = vec![format!(
        "fleet.resolved.json  {} host(s), {} channel(s), signed {} for {}, sha256 {fleet_hash}",
        fleet.hosts.len(),
        fleet.channels.len(),
        rfc3339(stamp.signed_at),
        stamp.ci_commit,
    )];
    let rollouts = args.out.join("rollouts");
    let plans = release::manifests(&fleet, &fleet_hash);
    let schema = args.manifest_schema;
    if schema == ManifestSchema::V2 {
        // Before any manifest that commits to them; each distinct list once.
        for (sha256, hosts) in release::budget_lists(&plans) {
            host_lists::write_budget(&rollouts, &sha256, hosts)?;
        }
    }
    let mut written = Vec::new();
    for plan in &plans {
        let mut manifest = schema.signed_form(plan);
        let rollout_id = verify::rollout_id(&canonical_manifest(&manifest, &args.out)?)
            .map_err(|e| json_error(&args.out, e))?;
        let path = rollouts.join(format!("{rollout_id}.json"));
        // A re-sign of an unchanged intent keeps the provenance of its first release, and
        // (without new results) what the gate recorded for it: the closures are the same.
        let earlier = earlier_manifest(&path, &rollout_id);
        let introduced = earlier.as_ref().and_then(introduction_of);
        let compliance = match &gate {
            Some(channels) => channels.get(&plan.channel).cloned(),
            None => earlier.and_then(|m| m.compliance),
        };
        stamp_provenance(&mut manifest, introduced, compliance);
        let canonical = canonical_manifest(&manifest, &args.out)?;
        if schema == ManifestSchema::V2 {
            // Before the signature: a reader never finds a signed header without its lists.
            host_lists::write_hosts(&rollouts, &rollout_id, &plan.channel, &plan.host_set)?;
        }
        // Also under the channel's name, for control planes that fetch the current
        // manifest of each channel by URL (the id cannot be known before the bytes).
        let by_channel = rollouts
            .join("channel")
            .join(format!("{}.json", plan.channel));
        write_signed(&[&path, &by_channel], &canonical, &args.signer)?;
        lines.push(format!(
            "rollouts/{rollout_id}.json  {}: {} host(s) in {} wave(s){}",
            plan.display_name,
            plan.host_set.len(),
            plan.waves.len(),
            match schema {
                ManifestSchema::V1 => ", schema 1",
                ManifestSchema::V2 => "",
            }
        ));
        written.push(path);
    }

    // Self-check: a release that does not verify against the pinned roots must not ship.
    if let Some(trust) = &trust {
        let now = now_utc().max(stamp.signed_at);
        let verified = verify_fleet_file(&fleet_path, None, trust, now)?;
        for path in &written {
            verify_manifest_file(path, None, trust, now, Some(&verified))?;
        }
        lines.push(format!(
            "verified against {}",
            args.trust_file
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    Ok((lines.join("\n"), warnings))
}

/// What a release carries over from an earlier manifest of the same intent: the members
/// both schemas share.
#[derive(serde::Deserialize)]
struct Earlier {
    #[serde(default)]
    introduced: Option<Introduced>,
    #[serde(default)]
    compliance: Option<ManifestCompliance>,
    meta: Meta,
}

/// The manifest already at `path` (either schema) when it carries the same intent;
/// anything unreadable is ignored (this release then counts as the first).
fn earlier_manifest(path: &Path, rollout_id: &str) -> Option<Earlier> {
    let bytes = std::fs::read(path).ok()?;
    if verify::rollout_id(&bytes).ok()? != rollout_id {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Sets what is signed but outside the identity: the first release of the intent (kept
/// as this release's when there is none) and the compliance gate's record.
fn stamp_provenance(
    manifest: &mut SignedManifest,
    introduced: Option<Introduced>,
    compliance: Option<ManifestCompliance>,
) {
    let (first, record) = match manifest {
        SignedManifest::V1(m) => (&mut m.introduced, &mut m.compliance),
        SignedManifest::V2(h) => (&mut h.introduced, &mut h.compliance),
    };
    if let Some(introduced) = introduced {
        *first = Some(introduced);
    }
    *record = compliance;
}

/// The provenance of an earlier manifest of the same intent.
fn introduction_of(earlier: &Earlier) -> Option<Introduced> {
    earlier.introduced.clone().or_else(|| {
        earlier.meta.signed_at.map(|signed_at| Introduced {
            ci_commit: earlier.meta.ci_commit.clone(),
            signed_at,
        })
    })
}

pub struct RevocationsSignArgs {
    pub input: PathBuf,
    pub signer: Signer,
    pub out: PathBuf,
    pub ci_commit: Option<String>,
    pub signed_at: Option<OffsetDateTime>,
}

/// `nixfleet revocations sign`: stamps `meta` and writes `DIR/revocations.json` + `.sig`.
pub fn revocations_sign(args: &RevocationsSignArgs) -> Result<String, CliError> {
    let mut list: Revocations = read_json(&args.input)?;
    if list.schema_version != REVOCATIONS_SCHEMA_VERSION {
        return Err(json_error(
            &args.input,
            format!(
                "schemaVersion {} is not supported; write {REVOCATIONS_SCHEMA_VERSION}",
                list.schema_version
            ),
        ));
    }
    let signed_at = args.signed_at.unwrap_or_else(now_utc);
    list.meta.schema_version = REVOCATIONS_SCHEMA_VERSION;
    list.meta.signed_at = Some(signed_at);
    list.meta.signature_algorithm = Some(args.signer.algorithm());
    if args.ci_commit.is_some() {
        list.meta.ci_commit = args.ci_commit.clone();
    }
    list.revocations.sort_by(|a, b| {
        a.hostname
            .cmp(&b.hostname)
            .then(a.not_before.cmp(&b.not_before))
    });
    files::create_dir(&args.out)?;
    let path = args.out.join("revocations.json");
    let canonical = canonical_of(&list, &path)?;
    write_signed(&[&path], &canonical, &args.signer)?;
    Ok(format!(
        "revocations.json  {} revocation(s), signed {}",
        list.revocations.len(),
        rfc3339(signed_at)
    ))
}

fn sig_path_for(path: &Path, sig: Option<&Path>) -> PathBuf {
    sig.map(Path::to_path_buf).unwrap_or_else(|| {
        let mut p = path.as_os_str().to_owned();
        p.push(".sig");
        PathBuf::from(p)
    })
}

fn read_artifact(
    path: &Path,
    sig: Option<&Path>,
    limit: usize,
) -> Result<(Vec<u8>, Vec<u8>), CliError> {
    let bytes = files::read_limited(path, limit)?;
    // A signature file larger than this is certainly not one; the pipeline names the length.
    let signature = files::read_limited(&sig_path_for(path, sig), 4096)?;
    Ok((bytes, signature))
}

pub(crate) fn signed_by(v: SignedBy) -> &'static str {
    match v {
        SignedBy::Current => "current",
        SignedBy::Previous => "previous (rotation grace: finish the key rotation)",
    }
}

pub fn verify_fleet_file(
    path: &Path,
    sig: Option<&Path>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Result<Verified<FleetResolved>, CliError> {
    let limits = Limits::default();
    let (bytes, signature) = read_artifact(path, sig, limits.fleet_bytes)?;
    verify::verify_fleet(&bytes, &signature, trust, now, &limits).map_err(|source| {
        CliError::Verify {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The rollout id a manifest file is named after, if it is named `<64 hex>.json`.
fn id_from_file_name(path: &Path) -> Option<String> {
    id_from_file_name_with(path, ".json")
}

/// The rollout id a file is named after, if it is named `<64 hex><suffix>`.
pub(crate) fn id_from_file_name_with(path: &Path, suffix: &str) -> Option<String> {
    let stem = path.file_name()?.to_str()?.strip_suffix(suffix)?;
    (stem.len() == 64
        && stem
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then(|| stem.to_owned())
}

/// Verifies the manifest at `path` and reads its whole plan: a schema-2 manifest's lists
/// from beside it (see [`verify_manifest_with_lists`]).
pub fn verify_manifest_file(
    path: &Path,
    sig: Option<&Path>,
    trust: &TrustFile,
    now: OffsetDateTime,
    fleet: Option<&Verified<FleetResolved>>,
) -> Result<Verified<nixfleet_proto::RolloutManifest>, CliError> {
    let lists = ListPaths::new(path, None, None);
    verify_manifest_with_lists(path, sig, &lists, trust, now, fleet)
}

/// Verifies the manifest at `path` (named `<rolloutId>.json`, the id is checked too) and,
/// for schema 2, the hosts file and budget lists at `lists` against what it signs.
pub fn verify_manifest_with_lists(
    path: &Path,
    sig: Option<&Path>,
    lists: &ListPaths,
    trust: &TrustFile,
    now: OffsetDateTime,
    fleet: Option<&Verified<FleetResolved>>,
) -> Result<Verified<nixfleet_proto::RolloutManifest>, CliError> {
    let limits = Limits::default();
    let (bytes, signature) = read_artifact(path, sig, limits.manifest_bytes)?;
    let rollout_id = id_from_file_name(path);
    let context = ManifestContext {
        rollout_id: rollout_id.as_deref(),
        fleet,
    };
    let header = verify::verify_manifest_header(&bytes, &signature, trust, now, context, &limits)
        .map_err(|source| CliError::Verify {
        path: path.to_path_buf(),
        source,
    })?;
    let read = match &header.value {
        SignedManifest::V1(_) => None,
        SignedManifest::V2(h) => Some(lists.read(h, &limits)?),
    };
    verify::complete_manifest(header, read.as_ref())
        .map(|(plan, _)| plan)
        .map_err(|source| lists.error(path, source))
}

pub enum VerifyTarget {
    Fleet,
    Manifest {
        fleet: Option<PathBuf>,
        fleet_sig: Option<PathBuf>,
        /// The schema-2 hosts file; `<FILE stem>.hosts.json` by default.
        hosts: Option<PathBuf>,
        /// The schema-2 budget lists; `budgets/` beside FILE by default.
        budgets: Option<PathBuf>,
    },
    Revocations {
        last_applied: Option<OffsetDateTime>,
    },
    Token,
    /// A host-signed report, checked against the host key the signed fleet pins.
    Report {
        fleet: PathBuf,
        fleet_sig: Option<PathBuf>,
    },
}

/// `nixfleet verify …`: the one-line summary of a valid artifact.
pub fn verify_artifact(
    target: &VerifyTarget,
    path: &Path,
    sig: Option<&Path>,
    trust_file: &Path,
    now: Option<OffsetDateTime>,
) -> Result<String, CliError> {
    let trust = load_trust(trust_file)?;
    let now = now.unwrap_or_else(now_utc);
    let limits = Limits::default();
    Ok(match target {
        VerifyTarget::Fleet => {
            let v = verify_fleet_file(path, sig, &trust, now)?;
            format!(
                "ok: fleet.resolved signed {} by ciReleaseKey.{} for commit {}: {} host(s), {} channel(s), sha256 {}",
                rfc3339(v.signed_at),
                signed_by(v.signed_by),
                v.value.meta.ci_commit.as_deref().unwrap_or("?"),
                v.value.hosts.len(),
                v.value.channels.len(),
                v.sha256
            )
        }
        VerifyTarget::Manifest {
            fleet,
            fleet_sig,
            hosts,
            budgets,
        } => {
            let fleet = fleet
                .as_deref()
                .map(|f| verify_fleet_file(f, fleet_sig.as_deref(), &trust, now))
                .transpose()?;
            let lists = ListPaths::new(path, hosts.as_deref(), budgets.as_deref());
            let v = verify_manifest_with_lists(path, sig, &lists, &trust, now, fleet.as_ref())?;
            let first = match &v.value.introduced {
                Some(i) => format!(
                    ", intent first released {} for commit {}",
                    rfc3339(i.signed_at),
                    i.ci_commit.as_deref().unwrap_or("?")
                ),
                None => String::new(),
            };
            let lists = match v.value.schema_version {
                nixfleet_proto::MANIFEST_SCHEMA_V1 => "",
                _ => ", host set and budget lists match the signed hashes",
            };
            format!(
                "ok: rollout {} ({}) signed {} by ciReleaseKey.{} for commit {}{first}: {} host(s) in {} wave(s){lists}{}",
                v.id,
                v.value.display_name,
                rfc3339(v.signed_at),
                signed_by(v.signed_by),
                v.value.meta.ci_commit.as_deref().unwrap_or("?"),
                v.value.host_set.len(),
                v.value.waves.len(),
                if fleet.is_some() {
                    ", belongs to the given fleet"
                } else {
                    ""
                }
            )
        }
        VerifyTarget::Revocations { last_applied } => {
            let (bytes, signature) = read_artifact(path, sig, limits.revocations_bytes)?;
            let v =
                verify::verify_revocations(&bytes, &signature, &trust, now, *last_applied, &limits)
                    .map_err(|source| CliError::Verify {
                        path: path.to_path_buf(),
                        source,
                    })?;
            format!(
                "ok: revocations signed {} by ciReleaseKey.{}: {} revocation(s)",
                rfc3339(v.signed_at),
                signed_by(v.signed_by),
                v.value.revocations.len()
            )
        }
        VerifyTarget::Report { fleet, fleet_sig } => {
            let fleet = verify_fleet_file(fleet, fleet_sig.as_deref(), &trust, now)?;
            let bytes = files::read_limited(path, limits.report_bytes)?;
            let bad = |detail: String| CliError::Usage(format!("{}: {detail}", path.display()));
            // The host it claims to be from picks the key; the signature then decides.
            let claimed: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("not a report (JSON: {e})")))?;
            let hostname = claimed["report"]["hostname"]
                .as_str()
                .ok_or_else(|| bad("not a report: no report.hostname".to_owned()))?;
            let host = fleet.value.hosts.get(hostname).ok_or_else(|| {
                bad(format!(
                    "host {hostname:?} is not in the given fleet (signed {})",
                    rfc3339(fleet.signed_at)
                ))
            })?;
            let pubkey = host.pubkey.as_deref().ok_or_else(|| {
                bad(format!(
                    "the fleet pins no key for {hostname} (hosts.{hostname}.pubkey), so its reports cannot be verified"
                ))
            })?;
            let v = verify::verify_report(&bytes, hostname, pubkey, &limits).map_err(|source| {
                CliError::Verify {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            let r = &v.value.report;
            format!(
                "ok: {} report {} from {} at {}{}{}, signed by the host key the fleet pins ({})",
                serde_json::to_value(r.kind)
                    .ok()
                    .and_then(|k| k.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                r.report_id,
                r.hostname,
                rfc3339(r.at),
                r.rollout_id
                    .as_deref()
                    .map(|id| format!(" for rollout {id}"))
                    .unwrap_or_default(),
                r.closure_hash
                    .as_deref()
                    .map(|c| format!(", closure {c}"))
                    .unwrap_or_default(),
                nixfleet_trust::keys::ssh_fingerprint(pubkey).unwrap_or_default()
            )
        }
        VerifyTarget::Token => {
            let bytes = files::read_limited(path, limits.token_bytes)?;
            let v = verify::verify_token(&bytes, &trust, now, &limits).map_err(|source| {
                CliError::Verify {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            format!(
                "ok: bootstrap token for {} ({}) signed by orgRootKey.{}, valid until {}",
                v.value.hostname,
                v.value.expected_pubkey_fingerprint,
                signed_by(v.signed_by),
                rfc3339(v.value.expires_at)
            )
        }
    })
}

pub enum TokenKey {
    Line(String),
    File(PathBuf),
    Fingerprint(String),
}

pub struct MintToken {
    pub hostname: String,
    pub key: TokenKey,
    pub org_root_key: PathBuf,
    pub validity_hours: u32,
}

/// `nixfleet mint-token`: the bootstrap token JSON.
pub fn mint_token(args: &MintToken) -> Result<String, CliError> {
    let fingerprint = match &args.key {
        TokenKey::Line(line) => ssh_fingerprint("--pubkey", line)?,
        TokenKey::File(path) => {
            let line = files::read_text(path, KEY_FILE_LIMIT)?;
            ssh_fingerprint(&path.display().to_string(), &line)?
        }
        TokenKey::Fingerprint(fp) => {
            let valid = fp
                .strip_prefix("SHA256:")
                .map(|b| {
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(b)
                        .is_ok_and(|d| d.len() == 32)
                })
                .unwrap_or(false);
            if !valid {
                return Err(CliError::Usage(format!(
                    "--fingerprint {fp:?} is not an OpenSSH SHA256 fingerprint (`ssh-keygen -lf KEY.pub` prints SHA256:…)"
                )));
            }
            fp.clone()
        }
    };
    if args.validity_hours == 0 {
        return Err(CliError::Usage(
            "--validity-hours must be at least 1".into(),
        ));
    }
    let key = load_private_key(&args.org_root_key)?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(CliError::Usage(format!(
            "{} is a {} key; the org root key is ed25519",
            args.org_root_key.display(),
            key.algorithm()
        )));
    }
    let issued_at = now_utc();
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let claims = TokenClaims {
        hostname: args.hostname.clone(),
        expected_pubkey_fingerprint: fingerprint,
        issued_at,
        expires_at: issued_at + Duration::hours(i64::from(args.validity_hours)),
        nonce: hex::encode(nonce),
    };
    let canonical = canonical_of(&claims, &args.org_root_key)?;
    let token = BootstrapToken {
        version: TOKEN_VERSION,
        claims,
        signature: base64::engine::general_purpose::STANDARD.encode(key.sign(&canonical)),
    };
    serde_json::to_string_pretty(&token).map_err(|e| json_error(&args.org_root_key, e))
}

/// `nixfleet mint-token --out FILE`: a bootstrap token is a secret until it is used, so
/// it goes into a new file of mode 0600 whatever the umask, written atomically; an
/// existing file is never replaced. Returns the line to print.
pub fn write_token(path: &Path, token: &str) -> Result<String, CliError> {
    let parsed: BootstrapToken = serde_json::from_str(token).map_err(|e| json_error(path, e))?;
    files::create_new_atomic(path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(format!(
        "wrote {} (mode 0600): bootstrap token for {}, valid until {}",
        path.display(),
        parsed.claims.hostname,
        rfc3339(parsed.claims.expires_at)
    ))
}

fn ssh_fingerprint(what: &str, line: &str) -> Result<String, CliError> {
    keys::ssh_fingerprint(line.trim()).map_err(|source| CliError::PublicKey {
        what: what.to_owned(),
        source,
    })
}

/// `nixfleet canonicalize`: RFC 8785 form of stdin.
pub fn canonicalize(mut input: impl Read) -> Result<Vec<u8>, CliError> {
    let mut bytes = Vec::new();
    let stdin = Path::new("<stdin>");
    input
        .by_ref()
        .take(INPUT_LIMIT as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::io("read", stdin, e))?;
    if bytes.len() > INPUT_LIMIT {
        return Err(CliError::TooLarge {
            path: stdin.to_path_buf(),
            limit: INPUT_LIMIT,
        });
    }
    jcs::canonicalize(&bytes).map_err(|e| json_error(stdin, e))
}
