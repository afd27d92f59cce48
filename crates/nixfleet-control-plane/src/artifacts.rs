//! Getting verified artifacts: the fleet (channel-refs URL, else the build-time file),
//! the revocation list, and rollout manifests. Nothing unverified leaves this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixfleet_proto::{FleetResolved, Revocations, RolloutManifest, TrustFile};
use nixfleet_trust::verify::{self, Limits, ManifestContext, Verified, VerifyError};
use time::OffsetDateTime;

use crate::fetch::{self, FetchError, Fetched, Fetcher, Validators};
use crate::store::{SignedArtifact, MANIFEST_PREFIX};

/// Where a signed artifact comes from.
#[derive(Debug, Clone)]
pub struct UrlSource {
    pub artifact_url: String,
    pub signature_url: String,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct FileSource {
    pub artifact: PathBuf,
    pub signature: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("{origin}: {source}")]
    Verify { origin: String, source: VerifyError },
}

/// A verified fleet with the manifests that belong to it.
#[derive(Debug)]
pub struct FleetSnapshot {
    pub fleet: Verified<FleetResolved>,
    /// The fleet's raw signature (replicas publish it with the bytes).
    pub fleet_signature: Vec<u8>,
    /// Where it came from, for logs (URL or file path).
    pub origin: String,
    /// Verified manifests of this fleet, by rollout id.
    pub manifests: BTreeMap<String, Arc<Verified<RolloutManifest>>>,
    /// Their raw signatures, served to agents with the bytes.
    pub signatures: BTreeMap<String, Vec<u8>>,
    /// The same manifests as the reconciler takes them, copied once here rather than on
    /// every tick (at 100,000 hosts a copy is over a million strings).
    pub manifest_values: BTreeMap<String, RolloutManifest>,
}

impl FleetSnapshot {
    pub fn new(
        fleet: Verified<FleetResolved>,
        fleet_signature: Vec<u8>,
        origin: String,
        manifests: BTreeMap<String, Arc<Verified<RolloutManifest>>>,
        signatures: BTreeMap<String, Vec<u8>>,
    ) -> FleetSnapshot {
        let manifest_values = manifests
            .iter()
            .map(|(id, m)| (id.clone(), m.value.clone()))
            .collect();
        FleetSnapshot {
            fleet,
            fleet_signature,
            origin,
            manifests,
            signatures,
            manifest_values,
        }
    }

    pub fn signed_at(&self) -> OffsetDateTime {
        self.fleet.signed_at
    }

    /// Adds a manifest verified earlier, of a release before this one.
    pub fn keep_manifest(
        &mut self,
        id: &str,
        manifest: Arc<Verified<RolloutManifest>>,
        signature: Vec<u8>,
    ) {
        self.manifest_values
            .insert(id.to_owned(), manifest.value.clone());
        self.manifests.insert(id.to_owned(), manifest);
        self.signatures.insert(id.to_owned(), signature);
    }
}

fn read_file(path: &Path, limit: usize) -> Result<Vec<u8>, SourceError> {
    use std::io::Read;
    let file_error = |detail: String| SourceError::File {
        path: path.display().to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| file_error(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(e.to_string()))?;
    // Oversize files are left for the pipeline, which names the limit.
    Ok(bytes)
}

/// Fetches an artifact and its signature; `None` when the artifact is unchanged.
pub async fn fetch_pair(
    fetcher: &Fetcher,
    source: &UrlSource,
    validators: Option<&Validators>,
    limit: usize,
) -> Result<Option<(Vec<u8>, Vec<u8>, Validators)>, SourceError> {
    let token = source
        .token_file
        .as_deref()
        .map(fetch::read_token)
        .transpose()?;
    let (bytes, validators) = match fetcher
        .get(
            &source.artifact_url,
            token.as_deref(),
            validators,
            limit + 1,
        )
        .await?
    {
        Fetched::NotModified => return Ok(None),
        Fetched::Body { bytes, validators } => (bytes, validators),
    };
    let signature = match fetcher
        .get(&source.signature_url, token.as_deref(), None, 4096)
        .await?
    {
        Fetched::Body { bytes, .. } => bytes,
        Fetched::NotModified => {
            return Err(SourceError::Fetch(FetchError::Status {
                url: source.signature_url.clone(),
                status: 304,
            }))
        }
    };
    Ok(Some((bytes.to_vec(), signature.to_vec(), validators)))
}

pub fn read_pair(source: &FileSource, limit: usize) -> Result<(Vec<u8>, Vec<u8>), SourceError> {
    Ok((
        read_file(&source.artifact, limit + 1)?,
        read_file(&source.signature, 4096)?,
    ))
}

pub fn verify_fleet(
    origin: &str,
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Result<Verified<FleetResolved>, SourceError> {
    verify::verify_fleet(bytes, signature, trust, now, &Limits::default()).map_err(|source| {
        SourceError::Verify {
            origin: origin.to_owned(),
            source,
        }
    })
}

pub fn verify_revocations(
    origin: &str,
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    last_applied: Option<OffsetDateTime>,
) -> Result<Verified<Revocations>, SourceError> {
    verify::verify_revocations(
        bytes,
        signature,
        trust,
        now,
        last_applied,
        &Limits::default(),
    )
    .map_err(|source| SourceError::Verify {
        origin: origin.to_owned(),
        source,
    })
}

/// Loads every manifest in `dir` that verifies and belongs to `fleet`. Manifests of other
/// releases are skipped quietly (a rollouts directory accumulates them); invalid ones are
/// logged with the reason.
/// Verified manifests and their signatures, by rollout id.
pub type Manifests = (
    BTreeMap<String, Arc<Verified<RolloutManifest>>>,
    BTreeMap<String, Vec<u8>>,
);

pub fn load_manifests(
    dir: &Path,
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Manifests {
    let mut manifests = Manifests::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "rollouts directory unreadable; no manifests loaded");
            return manifests;
        }
    };
    let limits = Limits::default();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
        else {
            continue;
        };
        let sig_path = path.with_extension("json.sig");
        let pair = read_pair(
            &FileSource {
                artifact: path.clone(),
                signature: sig_path,
            },
            limits.manifest_bytes,
        );
        let (bytes, signature) = match pair {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "rollout manifest skipped");
                continue;
            }
        };
        let origin = path.display().to_string();
        add_manifest(
            &mut manifests,
            &origin,
            &id,
            &bytes,
            signature,
            fleet,
            trust,
            now,
        );
    }
    manifests
}

/// The manifests of `fleet` among artifacts another replica stored, verified here.
pub fn stored_manifests(
    stored: &[SignedArtifact],
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Manifests {
    let mut manifests = Manifests::default();
    for a in stored {
        if let Some(id) = a.name.strip_prefix(MANIFEST_PREFIX) {
            let origin = format!("the database's {}", a.name);
            let signature = a.signature.clone();
            add_manifest(
                &mut manifests,
                &origin,
                id,
                &a.body,
                signature,
                fleet,
                trust,
                now,
            );
        }
    }
    manifests
}

/// Verifies rollout `id`'s manifest against `fleet` and adds it. One of another release
/// is skipped quietly; an invalid one is logged with the reason.
#[allow(clippy::too_many_arguments)]
fn add_manifest(
    (out, signatures): &mut Manifests,
    origin: &str,
    id: &str,
    bytes: &[u8],
    signature: Vec<u8>,
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) {
    let context = ManifestContext {
        rollout_id: Some(id),
        fleet: Some(fleet),
    };
    match verify::verify_manifest(bytes, &signature, trust, now, context, &Limits::default()) {
        Ok(v) => {
            signatures.insert(id.to_owned(), signature);
            out.insert(id.to_owned(), Arc::new(v));
        }
        Err(VerifyError::FleetMismatch { .. }) => {}
        Err(e) => {
            tracing::warn!(manifest = %origin, error = %e, "rollout manifest refused");
        }
    }
}

/// Fetches one channel's current manifest by URL and verifies it against the fleet in use
/// (signature, freshness, and that it belongs to this fleet); its id is its hash.
pub async fn fetch_manifest(
    fetcher: &Fetcher,
    source: &UrlSource,
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Result<(Verified<RolloutManifest>, Vec<u8>), SourceError> {
    let limits = Limits::default();
    let Some((bytes, signature, _)) =
        fetch_pair(fetcher, source, None, limits.manifest_bytes).await?
    else {
        return Err(SourceError::Fetch(FetchError::Status {
            url: source.artifact_url.clone(),
            status: 304,
        }));
    };
    let context = ManifestContext {
        rollout_id: None,
        fleet: Some(fleet),
    };
    let manifest = verify::verify_manifest(&bytes, &signature, trust, now, context, &limits)
        .map_err(|source_error| SourceError::Verify {
            origin: source.artifact_url.clone(),
            source: source_error,
        })?;
    Ok((manifest, signature))
}
