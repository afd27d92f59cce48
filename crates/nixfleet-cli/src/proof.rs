//! `nixfleet verify proof`: one host's proof document checked offline (what an agent keeps
//! at `<state dir>/manifests/<rolloutId>.json`, the body of `GET
//! /v1/rollouts/{id}/hosts/{host}`): the signed schema-2 manifest in it, its freshness,
//! the inclusion proof of the entry under the signed root, and, when given, that the entry
//! is the host's and names the closure.

use std::path::{Path, PathBuf};

use nixfleet_trust::verify::{self, Limits, ManifestContext};
use time::OffsetDateTime;

use crate::commands::{id_from_file_name_with, load_trust, now_utc, rfc3339, signed_by};
use crate::{files, release, CliError};

pub struct VerifyProof {
    pub file: PathBuf,
    pub trust_file: PathBuf,
    /// The host the entry must name.
    pub host: Option<String>,
    /// The closure the entry must give it (store path or basename).
    pub closure: Option<String>,
    /// The rollout the proof must belong to; by default the id its file is named after
    /// (`<rolloutId>.json`, as the agent keeps it, or `<rolloutId>.proof.json`), else
    /// the id it names.
    pub rollout: Option<String>,
    pub now: Option<OffsetDateTime>,
}

/// The refusal of a proof that is sound but not for what was asked.
fn refused(path: &Path, detail: String) -> CliError {
    CliError::Usage(format!("{}: proof refused: {detail}", path.display()))
}

/// Verifies the proof file; returns the line printed on success.
pub fn verify_proof(args: &VerifyProof) -> Result<String, CliError> {
    let trust = load_trust(&args.trust_file)?;
    let now = args.now.unwrap_or_else(now_utc);
    let limits = Limits::default();
    let bytes = files::read_limited(&args.file, limits.host_proof_bytes)?;
    let named = id_from_file_name_with(&args.file, ".proof.json")
        .or_else(|| id_from_file_name_with(&args.file, ".json"));
    let context = ManifestContext {
        rollout_id: args.rollout.as_deref().or(named.as_deref()),
        fleet: None,
    };
    let v = verify::verify_host_proof(&bytes, &trust, now, context, &limits).map_err(|source| {
        CliError::Verify {
            path: args.file.clone(),
            source,
        }
    })?;
    let entry = &v.entry;
    if let Some(host) = &args.host {
        if &entry.hostname != host {
            return Err(refused(
                &args.file,
                format!(
                    "its entry is {}'s, not {host}'s (a neighbour's entry proves nothing about {host})",
                    entry.hostname
                ),
            ));
        }
    }
    if let Some(closure) = &args.closure {
        let want = release::normalize_closure(closure).unwrap_or_else(|| closure.clone());
        if entry.target_closure != want {
            return Err(refused(
                &args.file,
                format!(
                    "rollout {} gives {} the closure {}, not {want}",
                    v.manifest.id, entry.hostname, entry.target_closure
                ),
            ));
        }
    }
    let manifest = &v.manifest;
    let header = manifest.value.header();
    Ok(format!(
        "ok: host {} is in rollout {} ({}) signed {} by ciReleaseKey.{} for commit {}: wave {}, closure {}, channel {}, entry {} of {}",
        entry.hostname,
        manifest.id,
        header.display_name,
        rfc3339(manifest.signed_at),
        signed_by(manifest.signed_by),
        header.meta.ci_commit.as_deref().unwrap_or("?"),
        entry.wave_index,
        entry.target_closure,
        header.channel,
        v.index + 1,
        header.host_set_size,
    ))
}
