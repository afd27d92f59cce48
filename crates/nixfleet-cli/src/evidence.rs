//! `nixfleet verify evidence`: a host-signed compliance evidence file checked offline,
//! against the signed fleet (the host key it pins) and, when given, the signed release
//! (the rollout and closure it was collected on) and the host's latest evidence known to
//! the auditor (a replay of an older one is refused).

use std::path::{Path, PathBuf};

use nixfleet_proto::compliance::{ControlStatus, EvidenceRequest, MAX_EVIDENCE_BYTES};
use nixfleet_proto::FleetResolved;
use nixfleet_trust::verify::{self, Limits, Verified};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::commands::{load_trust, now_utc, verify_fleet_file, verify_manifest_file};
use crate::{files, CliError};

pub struct VerifyEvidence {
    pub file: PathBuf,
    pub fleet: PathBuf,
    pub fleet_sig: Option<PathBuf>,
    pub trust_file: PathBuf,
    /// The host the evidence must be from.
    pub host: Option<String>,
    /// The rollout manifest whose closure the evidence must have been collected on.
    pub manifest: Option<PathBuf>,
    /// Evidence of the same host already held: the file must not be older.
    pub latest: Option<PathBuf>,
    pub now: Option<OffsetDateTime>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The refusal of an evidence file that is well signed but not what it must be.
fn refused(path: &Path, detail: String) -> CliError {
    CliError::Usage(format!("{}: evidence refused: {detail}", path.display()))
}

/// Reads and verifies one evidence file against the key the fleet pins for the host it
/// names (the signature decides whether it really is that host's).
fn verified(
    path: &Path,
    fleet: &Verified<FleetResolved>,
) -> Result<Verified<EvidenceRequest>, CliError> {
    let bytes = files::read_limited(path, MAX_EVIDENCE_BYTES)?;
    let claimed: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CliError::Json {
            path: path.to_path_buf(),
            detail: format!("not compliance evidence: {e}"),
        })?;
    let hostname = claimed["evidence"]["hostname"].as_str().ok_or_else(|| CliError::Json {
        path: path.to_path_buf(),
        detail: "not compliance evidence: no evidence.hostname (save it from `nixfleet compliance evidence --host H`)".into(),
    })?;
    let host = fleet.value.hosts.get(hostname).ok_or_else(|| {
        refused(
            path,
            format!(
                "host {hostname:?} is not in the given fleet (signed {})",
                rfc3339(fleet.signed_at)
            ),
        )
    })?;
    let pubkey = host.pubkey.as_deref().ok_or_else(|| {
        refused(
            path,
            format!("the fleet pins no key for {hostname} (hosts.{hostname}.pubkey), so its evidence cannot be verified"),
        )
    })?;
    verify::verify_evidence(&bytes, hostname, pubkey, &Limits::default()).map_err(|source| {
        CliError::Verify {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Verifies the evidence file; returns the report printed on success.
pub fn verify_evidence(args: &VerifyEvidence) -> Result<String, CliError> {
    let trust = load_trust(&args.trust_file)?;
    let now = args.now.unwrap_or_else(now_utc);
    let fleet = verify_fleet_file(&args.fleet, args.fleet_sig.as_deref(), &trust, now)?;
    let v = verified(&args.file, &fleet)?;
    let e = &v.value.evidence;
    if let Some(host) = &args.host {
        if &e.hostname != host {
            return Err(refused(
                &args.file,
                format!("it is {}'s evidence, not {host}'s", e.hostname),
            ));
        }
    }
    let mut lines = Vec::new();
    if let Some(manifest) = &args.manifest {
        let m = verify_manifest_file(manifest, None, &trust, now, Some(&fleet))?;
        if let Some(rollout) = &e.rollout_id {
            if rollout != &m.id {
                return Err(refused(
                    &args.file,
                    format!(
                        "collected in rollout {rollout}, not in rollout {} of {}",
                        m.id,
                        manifest.display()
                    ),
                ));
            }
        }
        let entry = m.value.entry(&e.hostname).ok_or_else(|| {
            refused(
                &args.file,
                format!("rollout {} does not include host {}", m.id, e.hostname),
            )
        })?;
        if entry.target_closure != e.closure_hash {
            return Err(refused(
                &args.file,
                format!(
                    "collected on closure {}, but rollout {} gives {} the closure {}",
                    e.closure_hash, m.id, e.hostname, entry.target_closure
                ),
            ));
        }
        lines.push(format!(
            "release: rollout {} ({}) of commit {} gives {} this closure",
            m.id, m.value.display_name, m.value.channel_ref, e.hostname
        ));
    }
    if let Some(latest) = &args.latest {
        let l = verified(latest, &fleet)?;
        let le = &l.value.evidence;
        if le.hostname != e.hostname {
            return Err(refused(
                &args.file,
                format!(
                    "--latest {} is {}'s evidence, not {}'s",
                    latest.display(),
                    le.hostname,
                    e.hostname
                ),
            ));
        }
        if e.collected_at < le.collected_at {
            return Err(refused(
                &args.file,
                format!(
                    "replayed: collected at {}, older than the host's latest evidence collected at {} ({})",
                    rfc3339(e.collected_at),
                    rfc3339(le.collected_at),
                    latest.display()
                ),
            ));
        }
    }
    let failing = e.failing().count();
    let fingerprint = fleet
        .value
        .hosts
        .get(&e.hostname)
        .and_then(|h| h.pubkey.as_deref())
        .and_then(|k| nixfleet_trust::keys::ssh_fingerprint(k).ok())
        .unwrap_or_default();
    let mut out = vec![format!(
        "ok: compliance evidence {} of {} ({} trigger, mode {}), signed by the host key the fleet pins ({fingerprint})",
        v.id,
        e.hostname,
        serde_json::to_value(e.trigger)
            .ok()
            .and_then(|t| t.as_str().map(str::to_owned))
            .unwrap_or_default(),
        e.mode.as_str()
    )];
    out.push(format!(
        "closure {} activated {}, collected {}{}",
        e.closure_hash,
        rfc3339(e.activated_at),
        rfc3339(e.collected_at),
        e.rollout_id
            .as_deref()
            .map(|r| format!(", rollout {r}"))
            .unwrap_or_default()
    ));
    out.extend(lines);
    out.push(format!(
        "{} control(s), {} not passing",
        e.controls.len(),
        failing
    ));
    for c in &e.controls {
        let articles: Vec<String> = c
            .articles
            .iter()
            .map(|(fw, list)| format!("{fw} {}", list.join(" ")))
            .collect();
        out.push(format!(
            "  {:<5} {}  [{}]  {}",
            match c.status {
                ControlStatus::Pass => "pass",
                ControlStatus::Fail => "FAIL",
                ControlStatus::Error => "ERROR",
            },
            c.id,
            articles.join("; "),
            c.output_hash
        ));
    }
    Ok(out.join("\n"))
}
