//! The unsigned files beside a schema-2 manifest (docs/release.md "Manifest format"): the
//! host set, `<id>.hosts.json`, and each distinct budget list, `budgets/<sha256>.json`.
//! `nixfleet release` writes them before the signature that commits to them; `nixfleet
//! verify manifest` reads them back and the trust crate checks them against it.

use std::path::{Path, PathBuf};

use nixfleet_proto::{HostSetEntry, ManifestHeader, RolloutHosts};
use nixfleet_trust::hostset::{HostLists, HostSetError};
use nixfleet_trust::jcs;
use nixfleet_trust::verify::{self, Limits, VerifyError};

use crate::{files, CliError};

/// Where the hosts file of the manifest at `manifest` is by default: `X.json` →
/// `X.hosts.json` (so `<id>.hosts.json`, and `channel/<channel>.hosts.json`).
pub fn default_hosts_path(manifest: &Path) -> PathBuf {
    let name = manifest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".json").unwrap_or(&name);
    manifest.with_file_name(format!("{stem}.hosts.json"))
}

/// Where the budget lists of the manifest at `manifest` are by default: `budgets/` beside it.
pub fn default_budgets_dir(manifest: &Path) -> PathBuf {
    manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("budgets")
}

/// The path of one budget list in `dir`.
pub fn budget_path(dir: &Path, sha256: &str) -> PathBuf {
    dir.join(format!("{sha256}.json"))
}

/// Writes a budget list, as its RFC 8785 bytes (which hash to its name), into
/// `rollouts/budgets/` and `rollouts/channel/budgets/`.
pub fn write_budget(rollouts: &Path, sha256: &str, hosts: &[String]) -> Result<(), CliError> {
    let bytes = canonical(hosts, rollouts)?;
    for dir in [rollouts.join("budgets"), rollouts.join("channel/budgets")] {
        files::create_dir(&dir)?;
        files::write_atomic(&budget_path(&dir, sha256), &bytes, 0o644)?;
    }
    Ok(())
}

/// Writes a rollout's hosts file as `rollouts/<id>.hosts.json` and
/// `rollouts/channel/<channel>.hosts.json`.
pub fn write_hosts(
    rollouts: &Path,
    rollout_id: &str,
    channel: &str,
    host_set: &[HostSetEntry],
) -> Result<(), CliError> {
    let hosts = RolloutHosts {
        rollout_id: rollout_id.to_owned(),
        host_set: host_set.to_vec(),
    };
    let bytes = canonical(&hosts, rollouts)?;
    for path in [
        rollouts.join(format!("{rollout_id}.hosts.json")),
        rollouts
            .join("channel")
            .join(format!("{channel}.hosts.json")),
    ] {
        files::write_atomic(&path, &bytes, 0o644)?;
    }
    Ok(())
}

fn canonical<T: serde::Serialize + ?Sized>(value: &T, dir: &Path) -> Result<Vec<u8>, CliError> {
    jcs::to_canonical(value).map_err(|e| CliError::Json {
        path: dir.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Where a schema-2 manifest's lists are read from.
#[derive(Debug, Clone)]
pub struct ListPaths {
    pub hosts: PathBuf,
    pub budgets: PathBuf,
}

impl ListPaths {
    /// `hosts` and `budgets` when given, else the files beside `manifest`.
    pub fn new(manifest: &Path, hosts: Option<&Path>, budgets: Option<&Path>) -> ListPaths {
        ListPaths {
            hosts: hosts
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_hosts_path(manifest)),
            budgets: budgets
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_budgets_dir(manifest)),
        }
    }

    /// Reads the hosts file and the budget lists `header` names. A missing file is left
    /// out (the check against the header then says what is missing, see [`Self::error`]);
    /// one that cannot be read or parsed is an error naming it.
    pub fn read(&self, header: &ManifestHeader, limits: &Limits) -> Result<HostLists, CliError> {
        let mut lists = HostLists::default();
        if let Some(bytes) = read_if_present(&self.hosts, limits.host_list_bytes)? {
            lists.hosts = Some(
                verify::parse_rollout_hosts(&bytes, limits)
                    .map_err(|source| verify_error(&self.hosts, source))?,
            );
        }
        for budget in &header.disruption_budgets {
            let path = budget_path(&self.budgets, &budget.hosts_sha256);
            if lists.budgets.contains_key(&budget.hosts_sha256) {
                continue;
            }
            if let Some(bytes) = read_if_present(&path, limits.host_list_bytes)? {
                let list = verify::parse_budget_list(&bytes, limits)
                    .map_err(|source| verify_error(&path, source))?;
                lists.budgets.insert(budget.hosts_sha256.clone(), list);
            }
        }
        Ok(lists)
    }

    /// The error of a manifest at `manifest` whose lists did not complete it, naming the
    /// file at fault: the missing one, the hosts file, or the budget list.
    pub fn error(&self, manifest: &Path, source: VerifyError) -> CliError {
        let missing = |missing: PathBuf, source| CliError::MissingHostList {
            path: manifest.to_path_buf(),
            missing,
            source: Box::new(source),
        };
        match &source {
            VerifyError::HostListsMissing { .. } => missing(self.hosts.clone(), source),
            VerifyError::HostLists {
                source: HostSetError::BudgetMissing { sha256 },
                ..
            } => missing(budget_path(&self.budgets, sha256), source),
            VerifyError::HostLists {
                source: HostSetError::Budget { sha256, .. },
                ..
            } => verify_error(&budget_path(&self.budgets, sha256), source),
            VerifyError::HostLists { .. } => verify_error(&self.hosts, source),
            _ => verify_error(manifest, source),
        }
    }
}

fn verify_error(path: &Path, source: VerifyError) -> CliError {
    CliError::Verify {
        path: path.to_path_buf(),
        source,
    }
}

fn read_if_present(path: &Path, limit: usize) -> Result<Option<Vec<u8>>, CliError> {
    match files::read_limited(path, limit) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(CliError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_sit_beside_the_manifest() {
        let id = "ab".repeat(32);
        let by_id = Path::new("rel/rollouts").join(format!("{id}.json"));
        assert_eq!(
            default_hosts_path(&by_id),
            Path::new("rel/rollouts").join(format!("{id}.hosts.json"))
        );
        assert_eq!(
            default_budgets_dir(&by_id),
            Path::new("rel/rollouts/budgets")
        );
        let by_channel = Path::new("rel/rollouts/channel/stable.json");
        assert_eq!(
            default_hosts_path(by_channel),
            Path::new("rel/rollouts/channel/stable.hosts.json")
        );
        assert_eq!(
            default_budgets_dir(Path::new("m.json")),
            Path::new("./budgets")
        );
    }
}
