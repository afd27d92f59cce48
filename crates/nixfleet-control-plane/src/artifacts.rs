//! Getting verified artifacts: the fleet (channel-refs URL, else the build-time file),
//! the revocation list, and rollout manifests. Nothing unverified leaves this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nixfleet_proto::{
    FleetResolved, HostSetEntry, ManifestHeader, Revocations, RolloutHosts, RolloutManifest,
    TrustFile, MANIFEST_SCHEMA_V1,
};
use nixfleet_trust::hostset::{self, HostLists};
use nixfleet_trust::merkle::Tree;
use nixfleet_trust::verify::{
    self, Limits, ManifestContext, SignedManifest, Verified, VerifyError,
};
use time::OffsetDateTime;

use crate::fetch::{self, FetchError, Fetched, Fetcher, Validators};
use crate::store::{SignedArtifact, LISTS_PREFIX, MANIFEST_PREFIX};

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
    /// Verified manifests of this fleet, by rollout id: the whole plan, with `canonical`
    /// the signed bytes (for schema 2, the header).
    pub manifests: BTreeMap<String, Arc<Verified<RolloutManifest>>>,
    /// Their raw signatures, served to agents with the bytes.
    pub signatures: BTreeMap<String, Vec<u8>>,
    /// The host-set trees of the schema-2 manifests, built once at load: each host's
    /// inclusion proof is read off them (`GET /v1/rollouts/{id}/hosts/{host}`).
    pub trees: BTreeMap<String, Arc<Tree>>,
}

impl FleetSnapshot {
    pub fn new(
        fleet: Verified<FleetResolved>,
        fleet_signature: Vec<u8>,
        origin: String,
        manifests: Manifests,
    ) -> FleetSnapshot {
        let Manifests {
            verified,
            signatures,
            trees,
        } = manifests;
        FleetSnapshot {
            fleet,
            fleet_signature,
            origin,
            manifests: verified,
            signatures,
            trees,
        }
    }

    pub fn signed_at(&self) -> OffsetDateTime {
        self.fleet.signed_at
    }

    /// Adds a manifest verified earlier, of a release before this one, with its tree.
    pub fn keep_manifest(
        &mut self,
        id: &str,
        manifest: Arc<Verified<RolloutManifest>>,
        signature: Vec<u8>,
        tree: Option<Arc<Tree>>,
    ) {
        self.manifests.insert(id.to_owned(), manifest);
        self.signatures.insert(id.to_owned(), signature);
        match tree {
            Some(tree) => self.trees.insert(id.to_owned(), tree),
            None => self.trees.remove(id),
        };
    }
}

/// Verified manifests of one fleet, by rollout id, with their signatures and the trees
/// of the schema-2 ones.
#[derive(Debug, Default)]
pub struct Manifests {
    pub verified: BTreeMap<String, Arc<Verified<RolloutManifest>>>,
    pub signatures: BTreeMap<String, Vec<u8>>,
    pub trees: BTreeMap<String, Arc<Tree>>,
}

/// One manifest whose whole plan was read and checked.
pub struct Loaded {
    pub manifest: Verified<RolloutManifest>,
    pub signature: Vec<u8>,
    /// Its host-set tree; `None` for schema 1, which signs no root.
    pub tree: Option<Tree>,
}

impl Manifests {
    pub fn insert(&mut self, loaded: Loaded) {
        let id = loaded.manifest.id.clone();
        match loaded.tree {
            Some(tree) => self.trees.insert(id.clone(), Arc::new(tree)),
            None => self.trees.remove(&id),
        };
        self.signatures.insert(id.clone(), loaded.signature);
        self.verified.insert(id, Arc::new(loaded.manifest));
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

/// Loads every manifest in `dir` that verifies and belongs to `fleet`, a schema-2 one with
/// its lists (`<id>.hosts.json` and `budgets/<hostsSha256>.json` in `dir`). Manifests of
/// other releases are skipped quietly (a rollouts directory accumulates them); invalid
/// ones, and schema-2 ones whose lists are missing or do not match, are logged with the
/// reason and left out.
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
            .filter(|id| is_hex_id(id))
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
        let context = ManifestContext {
            rollout_id: Some(&id),
            fleet: Some(fleet),
        };
        let Some(header) = verify_header(&origin, &bytes, &signature, trust, now, context) else {
            continue;
        };
        let lists = match &header.value {
            SignedManifest::V1(_) => Ok(None),
            SignedManifest::V2(h) => read_lists(dir, &id, h, &limits).map(Some),
        };
        let loaded = lists.and_then(|lists| complete(&origin, header, lists.as_ref(), signature));
        keep_or_log(&mut manifests, &origin, loaded);
    }
    manifests
}

/// Whether `s` is 64 hex digits: a rollout id or a budget list's hash, safe in a path.
fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The signature, freshness, id and fleet checks of a manifest of either schema; `None`
/// (logged unless it belongs to another release) when they fail.
fn verify_header(
    origin: &str,
    bytes: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    context: ManifestContext<'_>,
) -> Option<Verified<SignedManifest>> {
    match verify::verify_manifest_header(bytes, signature, trust, now, context, &Limits::default())
    {
        Ok(header) => Some(header),
        Err(VerifyError::FleetMismatch { .. }) => None,
        Err(e) => {
            tracing::warn!(manifest = %origin, error = %e, "rollout manifest refused");
            None
        }
    }
}

/// The whole plan of a verified manifest from its lists (checked against what it signs).
fn complete(
    origin: &str,
    header: Verified<SignedManifest>,
    lists: Option<&HostLists>,
    signature: Vec<u8>,
) -> Result<Loaded, SourceError> {
    let schema_2 = matches!(header.value, SignedManifest::V2(_));
    let (manifest, tree) =
        verify::complete_manifest(header, lists).map_err(|source| SourceError::Verify {
            origin: origin.to_owned(),
            source,
        })?;
    Ok(Loaded {
        manifest,
        signature,
        tree: schema_2.then_some(tree),
    })
}

fn keep_or_log(manifests: &mut Manifests, origin: &str, loaded: Result<Loaded, SourceError>) {
    match loaded {
        Ok(loaded) => manifests.insert(loaded),
        Err(e) => tracing::warn!(manifest = %origin, error = %e, "rollout manifest refused"),
    }
}

/// A file's bytes, `None` when it does not exist (the check against the manifest then
/// names what is missing).
fn read_optional(path: &Path, limit: usize) -> Result<Option<Vec<u8>>, SourceError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        _ => read_file(path, limit).map(Some),
    }
}

/// A schema-2 manifest's lists from the rollouts directory; absent files are left out.
fn read_lists(
    dir: &Path,
    id: &str,
    header: &ManifestHeader,
    limits: &Limits,
) -> Result<HostLists, SourceError> {
    let mut lists = HostLists::default();
    let path = dir.join(format!("{id}.hosts.json"));
    if let Some(bytes) = read_optional(&path, limits.host_list_bytes + 1)? {
        lists.hosts = Some(
            verify::parse_rollout_hosts(&bytes, limits).map_err(|source| SourceError::Verify {
                origin: path.display().to_string(),
                source,
            })?,
        );
    }
    for sha256 in budget_hashes(header) {
        let path = dir.join("budgets").join(format!("{sha256}.json"));
        if let Some(bytes) = read_optional(&path, limits.host_list_bytes + 1)? {
            let list = verify::parse_budget_list(&bytes, limits).map_err(|source| {
                SourceError::Verify {
                    origin: path.display().to_string(),
                    source,
                }
            })?;
            lists.budgets.insert(sha256.to_owned(), list);
        }
    }
    Ok(lists)
}

/// The distinct budget-list hashes a header commits to that can name a file.
fn budget_hashes(header: &ManifestHeader) -> std::collections::BTreeSet<&str> {
    header
        .disruption_budgets
        .iter()
        .map(|b| b.hosts_sha256.as_str())
        .filter(|sha256| is_hex_id(sha256))
        .collect()
}

/// Where a leader stores a schema-2 manifest's lists for the followers: the hosts file's
/// members plus `budgets`, `{hostsSha256: [hostname]}`. Unsigned, like the files it comes
/// from; a follower checks it against the signed header as it would those.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredLists {
    #[serde(flatten)]
    hosts: RolloutHosts,
    budgets: BTreeMap<String, Vec<String>>,
}

/// [`StoredLists`] as written, borrowed from the plan rather than copied.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StoredListsRef<'a> {
    rollout_id: &'a str,
    host_set: &'a [HostSetEntry],
    budgets: BTreeMap<String, &'a [String]>,
}

/// The lists artifact ([`LISTS_PREFIX`]) a leader publishes with a schema-2 manifest;
/// `None` for schema 1, whose lists are in the signed bytes.
pub fn lists_artifact(manifest: &Verified<RolloutManifest>) -> Option<SignedArtifact> {
    let plan = &manifest.value;
    if plan.schema_version == MANIFEST_SCHEMA_V1 {
        return None;
    }
    let body = serde_json::to_vec(&StoredListsRef {
        rollout_id: &manifest.id,
        host_set: &plan.host_set,
        budgets: plan
            .disruption_budgets
            .iter()
            .map(|b| (hostset::budget_sha256(&b.hosts), b.hosts.as_slice()))
            .collect(),
    })
    .ok()?;
    Some(SignedArtifact {
        name: format!("{LISTS_PREFIX}{}", manifest.id),
        sha256: nixfleet_trust::jcs::sha256_hex(&body),
        body,
        // The lists are checked against the manifest's signed commitments, not signed.
        signature: Vec::new(),
        signed_at: manifest.signed_at,
    })
}

/// The manifests of `fleet` among artifacts another replica stored, verified here; a
/// schema-2 one with its stored lists, checked against its signed commitments.
pub fn stored_manifests(
    stored: &[SignedArtifact],
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Manifests {
    let limits = Limits::default();
    let mut manifests = Manifests::default();
    for a in stored {
        let Some(id) = a.name.strip_prefix(MANIFEST_PREFIX) else {
            continue;
        };
        let origin = format!("the database's {}", a.name);
        let context = ManifestContext {
            rollout_id: Some(id),
            fleet: Some(fleet),
        };
        let Some(header) = verify_header(&origin, &a.body, &a.signature, trust, now, context)
        else {
            continue;
        };
        let lists = match &header.value {
            SignedManifest::V1(_) => Ok(None),
            SignedManifest::V2(_) => stored_lists(stored, id, &limits).map(Some),
        };
        let loaded =
            lists.and_then(|lists| complete(&origin, header, lists.as_ref(), a.signature.clone()));
        keep_or_log(&mut manifests, &origin, loaded);
    }
    manifests
}

/// Rollout `id`'s stored lists; empty when none are stored.
fn stored_lists(
    stored: &[SignedArtifact],
    id: &str,
    limits: &Limits,
) -> Result<HostLists, SourceError> {
    let name = format!("{LISTS_PREFIX}{id}");
    let Some(a) = stored.iter().find(|a| a.name == name) else {
        return Ok(HostLists::default());
    };
    let shape = |detail: String| SourceError::Verify {
        origin: format!("the database's {name}"),
        source: VerifyError::HostListsShape {
            what: "stored host lists".into(),
            detail,
        },
    };
    // A hosts file and budget lists, each within the limit of one list.
    let limit = limits.host_list_bytes.saturating_mul(2);
    if a.body.len() > limit {
        return Err(shape(format!(
            "{} bytes, over the {limit}-byte limit",
            a.body.len()
        )));
    }
    let lists: StoredLists = serde_json::from_slice(&a.body).map_err(|e| shape(e.to_string()))?;
    Ok(HostLists {
        hosts: Some(lists.hosts),
        budgets: lists.budgets,
    })
}

/// The URL of a schema-2 manifest's hosts file: its URL with the trailing `.json`
/// replaced by `.hosts.json` (a query string is kept).
pub fn hosts_url(manifest_url: &str) -> String {
    let (path, query) = split_query(manifest_url);
    let stem = path.strip_suffix(".json").unwrap_or(path);
    format!("{stem}.hosts.json{query}")
}

/// The URL of budget list `sha256`: `budgets/<sha256>.json` in the manifest URL's
/// directory (a query string is kept).
pub fn budget_url(manifest_url: &str, sha256: &str) -> String {
    let (path, query) = split_query(manifest_url);
    let dir = path.rfind('/').map_or(path, |i| &path[..=i]);
    format!("{dir}budgets/{sha256}.json{query}")
}

fn split_query(url: &str) -> (&str, &str) {
    match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    }
}

/// A body fetched from `url`; `None` on 404 (the check against the manifest then names
/// what is missing).
async fn fetch_optional(
    fetcher: &Fetcher,
    url: &str,
    token: Option<&str>,
    limit: usize,
) -> Result<Option<Vec<u8>>, SourceError> {
    match fetcher.get(url, token, None, limit).await {
        Ok(Fetched::Body { bytes, .. }) => Ok(Some(bytes.to_vec())),
        Ok(Fetched::NotModified) => Err(SourceError::Fetch(FetchError::Status {
            url: url.to_owned(),
            status: 304,
        })),
        Err(FetchError::Status { status: 404, .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A schema-2 manifest's lists next to its URL ([`hosts_url`], [`budget_url`]), with the
/// manifest's token.
async fn fetch_lists(
    fetcher: &Fetcher,
    source: &UrlSource,
    header: &ManifestHeader,
    limits: &Limits,
) -> Result<HostLists, SourceError> {
    let token = source
        .token_file
        .as_deref()
        .map(fetch::read_token)
        .transpose()?;
    let limit = limits.host_list_bytes + 1;
    let mut lists = HostLists::default();
    let url = hosts_url(&source.artifact_url);
    if let Some(bytes) = fetch_optional(fetcher, &url, token.as_deref(), limit).await? {
        lists.hosts = Some(
            verify::parse_rollout_hosts(&bytes, limits).map_err(|source| SourceError::Verify {
                origin: url,
                source,
            })?,
        );
    }
    for sha256 in budget_hashes(header) {
        let url = budget_url(&source.artifact_url, sha256);
        if let Some(bytes) = fetch_optional(fetcher, &url, token.as_deref(), limit).await? {
            let list = verify::parse_budget_list(&bytes, limits).map_err(|source| {
                SourceError::Verify {
                    origin: url,
                    source,
                }
            })?;
            lists.budgets.insert(sha256.to_owned(), list);
        }
    }
    Ok(lists)
}

/// Fetches one channel's current manifest by URL and verifies it against the fleet in use
/// (signature, freshness, and that it belongs to this fleet), a schema-2 one with its
/// lists next to it; its id is its hash.
pub async fn fetch_manifest(
    fetcher: &Fetcher,
    source: &UrlSource,
    fleet: &Verified<FleetResolved>,
    trust: &TrustFile,
    now: OffsetDateTime,
) -> Result<Loaded, SourceError> {
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
    let verify_error = |source_error| SourceError::Verify {
        origin: source.artifact_url.clone(),
        source: source_error,
    };
    let header = verify::verify_manifest_header(&bytes, &signature, trust, now, context, &limits)
        .map_err(verify_error)?;
    let lists = match &header.value {
        SignedManifest::V1(_) => None,
        SignedManifest::V2(h) => Some(fetch_lists(fetcher, source, h, &limits).await?),
    };
    complete(&source.artifact_url, header, lists.as_ref(), signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_lists_read_back_as_the_plan_holds_them() {
        let plan: RolloutManifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2, "displayName": "stable@1", "channel": "stable",
            "channelRef": "1", "fleetResolvedHash": "f",
            "hostSet": [
                {"hostname": "a", "waveIndex": 0, "targetClosure": "x-a"},
                {"hostname": "b", "waveIndex": 1, "targetClosure": "x-b"},
            ],
            "waves": [{"soakMinutes": 0}, {"soakMinutes": 0}],
            "healthGate": {"maxFailures": 0}, "onHealthFailure": "halt",
            "disruptionBudgets": [
                {"selector": {"tags": ["web"]}, "hosts": ["b"], "maxInFlight": 1},
                {"selector": {"hosts": ["b"]}, "hosts": ["b"], "maxInFlight": 1},
            ],
            "meta": {"schemaVersion": 1, "signedAt": "2026-12-04T10:00:00Z"},
        }))
        .unwrap();
        let signed_at = plan.meta.signed_at.unwrap();
        let manifest = Verified {
            value: plan.clone(),
            canonical: Vec::new(),
            sha256: "s".into(),
            id: "r".repeat(64),
            signed_at,
            signed_by: verify::SignedBy::Current,
        };
        let artifact = lists_artifact(&manifest).unwrap();
        assert_eq!(artifact.name, format!("{LISTS_PREFIX}{}", "r".repeat(64)));
        let lists = stored_lists(&[artifact], &manifest.id, &Limits::default()).unwrap();
        let hosts = lists.hosts.unwrap();
        assert_eq!(hosts.rollout_id, manifest.id);
        assert_eq!(hosts.host_set, plan.host_set);
        // One list however many budgets share it.
        let sha256 = hostset::budget_sha256(&["b".to_owned()]);
        assert_eq!(
            lists.budgets,
            BTreeMap::from([(sha256, vec!["b".to_owned()])])
        );
        let mut schema_1 = manifest;
        schema_1.value.schema_version = MANIFEST_SCHEMA_V1;
        assert!(lists_artifact(&schema_1).is_none());
    }

    #[test]
    fn list_urls_sit_next_to_the_manifest_url() {
        let url = "https://forge/raw/rollouts/channel/stable.json";
        assert_eq!(
            hosts_url(url),
            "https://forge/raw/rollouts/channel/stable.hosts.json"
        );
        assert_eq!(
            budget_url(url, "ab"),
            "https://forge/raw/rollouts/channel/budgets/ab.json"
        );
        let url = "https://forge/api/rollouts/channel/stable.json?ref=main";
        assert_eq!(
            hosts_url(url),
            "https://forge/api/rollouts/channel/stable.hosts.json?ref=main"
        );
        assert_eq!(
            budget_url(url, "ab"),
            "https://forge/api/rollouts/channel/budgets/ab.json?ref=main"
        );
    }
}
