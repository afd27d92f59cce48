//! `--publish-git REMOTE:BRANCH`: the release as one commit on a branch of a git remote,
//! for control planes that fetch it from a forge's raw-file URLs. A push moves the branch
//! to a commit holding the whole release at once (the fleet never without its
//! manifests); earlier manifests stay in the tree, like in `--publish-dir`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::run;

/// A git remote (URL or path) and a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitTarget {
    pub remote: String,
    pub branch: String,
}

impl GitTarget {
    /// `REMOTE:BRANCH`; the last `:` splits (a branch name cannot hold one, an SSH or
    /// HTTPS remote can).
    pub fn parse(text: &str) -> Result<GitTarget, String> {
        let bad = || {
            format!("--publish-git {text:?} is not REMOTE:BRANCH (e.g. git@forge.example.org:ops/fleet-release.git:main)")
        };
        let (remote, branch) = text.rsplit_once(':').ok_or_else(bad)?;
        if remote.is_empty() || branch.is_empty() || branch.starts_with('/') {
            return Err(bad());
        }
        Ok(GitTarget {
            remote: remote.to_owned(),
            branch: branch.to_owned(),
        })
    }
}

fn git(dir: Option<&Path>, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new("git");
    cmd.args([
        "-c",
        "user.name=nixfleet release",
        "-c",
        "user.email=nixfleet-release@invalid",
    ]);
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
    let out = run::run(cmd, timeout).map_err(|e| e.to_string())?;
    if !out.success {
        return Err(format!(
            "git {} exited with {}: {}",
            args.first().copied().unwrap_or(""),
            out.status,
            out.last_lines(3)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether the remote answers (checked before anything is built or signed).
pub fn check(target: &GitTarget, timeout: Duration) -> Result<(), String> {
    git(None, &["ls-remote", "--heads", &target.remote], timeout)
        .map(|_| ())
        .map_err(|e| format!("cannot reach git remote {}: {e}", target.remote))
}

/// Commits the release files of `release` onto the branch and pushes; returns the commit.
pub fn publish(
    release: &Path,
    target: &GitTarget,
    message: &str,
    timeout: Duration,
) -> Result<String, String> {
    let work = super::publish::sibling(&std::env::temp_dir().join("nixfleet-publish-git"), "clone");
    let result = publish_in(release, target, message, timeout, &work);
    let _ = std::fs::remove_dir_all(&work);
    result.map_err(|e| {
        format!(
            "could not publish to {}:{}: {e}",
            target.remote, target.branch
        )
    })
}

fn publish_in(
    release: &Path,
    target: &GitTarget,
    message: &str,
    timeout: Duration,
    work: &Path,
) -> Result<String, String> {
    let work_str = work.to_string_lossy().into_owned();
    let heads = git(
        None,
        &["ls-remote", "--heads", &target.remote, &target.branch],
        timeout,
    )?;
    if heads.is_empty() {
        git(None, &["init", "-q", &work_str], timeout)?;
        git(
            Some(work),
            &["checkout", "-q", "--orphan", &target.branch],
            timeout,
        )?;
    } else {
        git(
            None,
            &[
                "clone",
                "-q",
                "--depth",
                "1",
                "--branch",
                &target.branch,
                &target.remote,
                &work_str,
            ],
            timeout,
        )?;
    }
    for name in [
        "fleet.resolved.json",
        "fleet.resolved.json.sig",
        "revocations.json",
        "revocations.json.sig",
    ] {
        let from = release.join(name);
        let to = work.join(name);
        if from.exists() {
            std::fs::copy(&from, &to).map_err(|e| format!("copy {name}: {e}"))?;
        }
    }
    copy_tree(&release.join("rollouts"), &work.join("rollouts"))
        .map_err(|e| format!("copy rollouts/: {e}"))?;
    git(Some(work), &["add", "-A"], timeout)?;
    if git(Some(work), &["status", "--porcelain"], timeout)?.is_empty() {
        return git(Some(work), &["rev-parse", "HEAD"], timeout);
    }
    git(Some(work), &["commit", "-q", "-m", message], timeout)?;
    let refspec = format!("HEAD:refs/heads/{}", target.branch);
    git(
        Some(work),
        &["push", "-q", &target.remote, &refspec],
        timeout,
    )?;
    git(Some(work), &["rev-parse", "HEAD"], timeout)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_and_branch_split_at_the_last_colon() {
        assert_eq!(
            GitTarget::parse("git@forge.example.org:ops/release.git:main").unwrap(),
            GitTarget {
                remote: "git@forge.example.org:ops/release.git".into(),
                branch: "main".into()
            }
        );
        assert_eq!(
            GitTarget::parse("/srv/git/release.git:fleet")
                .unwrap()
                .branch,
            "fleet"
        );
        for bad in ["no-branch", ":main", "remote:"] {
            assert!(GitTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
