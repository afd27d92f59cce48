//! The state dir: every write is atomic (temp file, fsync, rename, fsync of the dir), so a
//! kill -9 or a power cut leaves either the old or the new file, never half of one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nixfleet_proto::wire::{FailedTarget, ReportRequest};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::machine::Machine;

/// Failed targets kept (the oldest are dropped first); a rollout never has more than one
/// closure per host, so this covers many rollouts.
const MAX_FAILED_TARGETS: usize = 256;
/// Unacknowledged reports kept while the control plane is unreachable.
const MAX_OUTBOX: usize = 1024;
/// Rollout manifests kept in the cache (besides those of activations still on record):
/// a re-offered target is checked against its cached copy, an older one is fetched again.
pub const MAX_CACHED_MANIFESTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {detail}; check that the state dir is on a writable disk with free space")]
    Write { path: String, detail: String },
    #[error("cannot read {path}: {detail}; check its permissions")]
    Read { path: String, detail: String },
    #[error("state file {path} is corrupt ({detail}); move it aside to start from idle (the agent then re-learns its state from the running system)")]
    Corrupt { path: String, detail: String },
}

/// Writes `bytes` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let err = |e: std::io::Error| StoreError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(err)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
        file.write_all(bytes).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

/// The last confirm the control plane accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Confirmation {
    pub closure_hash: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The newest signature this host accepted for one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    #[serde(with = "time::serde::rfc3339")]
    pub signed_at: OffsetDateTime,
}

/// Everything the agent must not forget across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentState {
    pub machine: Machine,
    #[serde(default)]
    pub confirmed: Option<Confirmation>,
    #[serde(default)]
    pub failed_targets: Vec<FailedTarget>,
    /// Per channel, the newest `meta.signedAt` of a rollout manifest that passed the gate:
    /// an older one is never activated (a replayed release), whatever the control plane
    /// or a wipe of it says.
    #[serde(default)]
    pub newest_accepted: BTreeMap<String, Accepted>,
    /// Signed reports not yet acknowledged by the control plane.
    #[serde(default)]
    pub outbox: Vec<ReportRequest>,
    /// The nonce of the bootstrap token last used, so a used token is not sent again.
    #[serde(default)]
    pub enrolled_with_nonce: Option<String>,
    /// The newest signed compliance evidence, re-sent while the control plane lacks it.
    #[serde(default)]
    pub evidence: Option<crate::compliance::HeldEvidence>,
}

impl AgentState {
    pub fn record_failed(&mut self, failed: FailedTarget) {
        if !self
            .failed_targets
            .iter()
            .any(|f| f.rollout_id == failed.rollout_id && f.closure_hash == failed.closure_hash)
        {
            self.failed_targets.push(failed);
        }
        let excess = self.failed_targets.len().saturating_sub(MAX_FAILED_TARGETS);
        self.failed_targets.drain(..excess);
    }

    /// Raises the channel's high-water mark to `signed_at` (never lowers it).
    pub fn record_accepted(&mut self, channel: &str, signed_at: OffsetDateTime) {
        let mark = self
            .newest_accepted
            .entry(channel.to_owned())
            .or_insert(Accepted { signed_at });
        mark.signed_at = mark.signed_at.max(signed_at);
    }

    pub fn queue_report(&mut self, report: ReportRequest) {
        self.outbox.push(report);
        let excess = self.outbox.len().saturating_sub(MAX_OUTBOX);
        self.outbox.drain(..excess);
    }
}

/// Paths inside the state dir.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// Creates the state dir (mode 0700) and its subdirectories.
    pub fn open(root: &Path) -> Result<StateDir, StoreError> {
        let dir = StateDir {
            root: root.to_path_buf(),
        };
        for d in [dir.root.clone(), dir.manifests(), dir.switches()] {
            std::fs::create_dir_all(&d).map_err(|e| StoreError::Write {
                path: d.display().to_string(),
                detail: e.to_string(),
            })?;
        }
        std::fs::set_permissions(&dir.root, std::fs::Permissions::from_mode(0o700)).map_err(
            |e| StoreError::Write {
                path: dir.root.display().to_string(),
                detail: e.to_string(),
            },
        )?;
        Ok(dir)
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("cert.pem")
    }

    pub fn manifests(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// One directory per switch-to-configuration run (see `activation`).
    pub fn switches(&self) -> PathBuf {
        self.root.join("switch")
    }

    pub fn load(&self) -> Result<AgentState, StoreError> {
        let path = self.state_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
            Err(e) => Err(StoreError::Read {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
        }
    }

    pub fn save(&self, state: &AgentState) -> Result<(), StoreError> {
        let path = self.state_file();
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Write {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        write_atomic(&path, &bytes, 0o600)
    }

    /// The cached manifest and signature of a rollout, if fetched before.
    pub fn cached_manifest(&self, rollout_id: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let base = self.manifests().join(rollout_id);
        let manifest = std::fs::read(base.with_extension("json")).ok()?;
        let signature = std::fs::read(base.with_extension("sig")).ok()?;
        Some((manifest, signature))
    }

    /// Caches a verified manifest; the signature is written last, so a manifest without
    /// its signature is never taken for a cached one.
    pub fn cache_manifest(
        &self,
        rollout_id: &str,
        manifest: &[u8],
        signature: &[u8],
    ) -> Result<(), StoreError> {
        let base = self.manifests().join(rollout_id);
        write_atomic(&base.with_extension("json"), manifest, 0o644)?;
        write_atomic(&base.with_extension("sig"), signature, 0o644)
    }

    /// Deletes all but the `newest` most recently cached manifests, never one of `keep`
    /// (the rollouts of activations still on record). Returns how many were deleted.
    pub fn prune_manifests(&self, keep: &[&str], newest: usize) -> usize {
        let Ok(entries) = std::fs::read_dir(self.manifests()) else {
            return 0;
        };
        let mut cached: Vec<(std::time::SystemTime, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?.to_owned();
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, id))
            })
            .collect();
        cached.sort_by(|a, b| b.cmp(a));
        let mut deleted = 0;
        for (_, id) in cached.into_iter().skip(newest) {
            if keep.contains(&id.as_str()) {
                continue;
            }
            let base = self.manifests().join(&id);
            // The signature first: a manifest without one is never taken for cached.
            let _ = std::fs::remove_file(base.with_extension("sig"));
            if std::fs::remove_file(base.with_extension("json")).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_missing_file_is_idle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("s")).unwrap();
        assert_eq!(dir.load().unwrap(), AgentState::default());
        let state = AgentState {
            enrolled_with_nonce: Some("n".into()),
            ..AgentState::default()
        };
        dir.save(&state).unwrap();
        assert_eq!(dir.load().unwrap(), state);
        let mode = std::fs::metadata(dir.state_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupt_state_file_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        std::fs::write(dir.state_file(), b"{not json").unwrap();
        let e = dir.load().unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn the_manifest_cache_keeps_the_newest_and_those_still_on_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for i in 0..6u64 {
            let id = format!("r{i}");
            dir.cache_manifest(&id, b"{}", b"sig").unwrap();
            // Oldest first, a minute apart, whatever the file system's clock resolution.
            let t = base + std::time::Duration::from_secs(60 * i);
            std::fs::File::options()
                .write(true)
                .open(dir.manifests().join(format!("{id}.json")))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        assert_eq!(dir.prune_manifests(&["r0"], 3), 2);
        for (id, kept) in [
            ("r0", true),
            ("r1", false),
            ("r2", false),
            ("r3", true),
            ("r4", true),
            ("r5", true),
        ] {
            assert_eq!(dir.cached_manifest(id).is_some(), kept, "{id}");
            assert_eq!(
                dir.manifests().join(format!("{id}.sig")).exists(),
                kept,
                "{id}.sig"
            );
        }
        assert_eq!(dir.prune_manifests(&["r0"], 3), 0);
    }

    #[test]
    fn failed_targets_are_deduplicated() {
        let mut state = AgentState::default();
        let f = FailedTarget {
            rollout_id: "r".into(),
            closure_hash: "c".into(),
            reason: "x".into(),
            at: OffsetDateTime::UNIX_EPOCH,
            cause: None,
        };
        state.record_failed(f.clone());
        state.record_failed(f);
        assert_eq!(state.failed_targets.len(), 1);
    }
}
