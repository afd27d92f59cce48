//! Putting a signed release in place so that a poller never sees half of it.
//!
//! The new contents are assembled in a sibling directory (same filesystem): every file
//! the target already holds is hard-linked in (older manifests stay fetchable, a binary
//! cache served from the same root costs no copy), then the release's own files are
//! copied over them. The two directories are then exchanged in one `renameat2(2)`
//! `RENAME_EXCHANGE`, and the old one is removed. Whatever a reader opens is either
//! entirely the old release or entirely the new one; only two requests that straddle the
//! exchange (fleet.resolved.json before it, its .sig after it) see a pair that does not
//! verify, which the control plane treats as a failed poll (it keeps its last verified
//! state) and gets right on its next poll.

use std::fs;
use std::path::{Path, PathBuf};

/// The files of a release, relative to its directory. Anything else in a target is kept.
fn is_release_file(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    s.starts_with("fleet.resolved.json")
        || s.starts_with("revocations.json")
        || s.starts_with("rollouts/")
}

/// A sibling of `target` that does not exist yet.
pub fn sibling(target: &Path, what: &str) -> PathBuf {
    let parent = parent_of(target);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release".to_owned());
    let mut nonce = [0u8; 6];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    parent.join(format!(".{name}.{what}-{}", hex::encode(nonce)))
}

fn parent_of(target: &Path) -> PathBuf {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Fails, with the reason, when a release could not be put at `target`: checked before
/// anything is built or signed.
pub fn check_writable(target: &Path) -> Result<(), String> {
    match fs::symlink_metadata(target) {
        Ok(meta) if !meta.is_dir() => {
            return Err(format!(
                "{} exists and is not a directory",
                target.display()
            ))
        }
        _ => {}
    }
    let parent = parent_of(target);
    fs::create_dir_all(&parent)
        .map_err(|e| format!("could not create {}: {e}", parent.display()))?;
    let probe = sibling(target, "probe");
    fs::create_dir(&probe).map_err(|e| {
        format!(
            "could not create a directory beside {} ({}): {e}",
            target.display(),
            probe.display()
        )
    })?;
    let _ = fs::remove_dir(&probe);
    if target.is_dir() {
        let probe = target.join(format!(".nixfleet-probe-{}", std::process::id()));
        fs::write(&probe, b"")
            .map_err(|e| format!("could not write in {}: {e}", target.display()))?;
        let _ = fs::remove_file(&probe);
    }
    Ok(())
}

/// An exclusive lock on publishing to a target, held until dropped: a scheduled re-sign
/// and a CI release never interleave (a re-sign of the release before would otherwise
/// undo the one just published).
pub struct PublishLock {
    _file: fs::File,
}

/// How long to wait for another release publishing to the same target.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(900);

/// Takes the lock of `target` (`.<name>.lock` beside it), waiting up to `wait`.
pub fn lock(target: &Path, wait: std::time::Duration) -> Result<PublishLock, String> {
    use std::os::fd::AsRawFd as _;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release".to_owned());
    let path = parent_of(target).join(format!(".{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("could not open the lock {}: {e}", path.display()))?;
    let started = std::time::Instant::now();
    let mut said = false;
    loop {
        // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(PublishLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(format!("could not lock {}: {e}", path.display()));
        }
        if started.elapsed() > wait {
            return Err(format!(
                "another nixfleet release has been publishing to {} for more than {} s (lock {}); let it finish",
                target.display(),
                wait.as_secs(),
                path.display()
            ));
        }
        if !said {
            eprintln!(
                "nixfleet release: waiting for another release publishing to {}",
                target.display()
            );
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Every file under `dir`, relative to it (symlinks as files), in a stable order.
fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(rel);
            } else {
                out.push(rel);
            }
        }
    }
    Ok(out)
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    let meta = fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(from)?;
        return std::os::unix::fs::symlink(target, to);
    }
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    fs::copy(from, to).map(|_| ())
}

fn assemble(release: &Path, target: &Path, staging: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir(staging)?;
    fs::set_permissions(staging, fs::Permissions::from_mode(0o755))?;
    if target.is_dir() {
        for rel in walk(target)? {
            link_or_copy(&target.join(&rel), &staging.join(&rel))?;
        }
    }
    for rel in walk(release)? {
        if !is_release_file(&rel) {
            continue;
        }
        let to = staging.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        // Never write through a hard link into the old release.
        let _ = fs::remove_file(&to);
        fs::copy(release.join(&rel), &to)?;
    }
    // Directories created above follow the umask; a forge serves them to anyone.
    for dir in [
        staging.join("rollouts"),
        staging.join("rollouts/budgets"),
        staging.join("rollouts/channel"),
        staging.join("rollouts/channel/budgets"),
    ] {
        if dir.is_dir() {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        }
    }
    fs::File::open(staging)?.sync_all()?;
    Ok(())
}

fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes the release in `release` (fleet.resolved.json, rollouts/, revocations.json, with
/// signatures) the contents of `target`, atomically (see the module doc). Files of
/// `target` that are not release files are kept.
pub fn publish(release: &Path, target: &Path) -> Result<(), String> {
    let staging = sibling(target, "publishing");
    let fail =
        |what: &str, e: std::io::Error| format!("could not {what} {}: {e}", target.display());
    if let Err(e) = assemble(release, target, &staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(fail("assemble the new release beside", e));
    }
    if !target.exists() {
        return fs::rename(&staging, target).map_err(|e| {
            let _ = fs::remove_dir_all(&staging);
            fail("move the new release into", e)
        });
    }
    match exchange(&staging, target) {
        Ok(()) => {
            // `staging` now holds the old release.
            let _ = fs::remove_dir_all(&staging);
            let _ = fs::File::open(parent_of(target)).and_then(|d| d.sync_all());
            Ok(())
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) =>
        {
            // No RENAME_EXCHANGE here (some network and overlay filesystems): file by file.
            let _ = fs::remove_dir_all(&staging);
            eprintln!(
                "nixfleet release: warning: {} cannot swap directories atomically ({e}); publishing file by file, manifests before the fleet",
                target.display()
            );
            publish_file_by_file(release, target).map_err(|e| fail("publish into", e))
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(fail("swap in the new release at", e))
        }
    }
}

/// Where a release file comes in [`publish_file_by_file`]'s order.
fn publish_rank(rel: &Path) -> u8 {
    let s = rel.to_string_lossy();
    let list = s.ends_with(".hosts.json") || s.contains("/budgets/");
    match () {
        _ if s.starts_with("rollouts/channel/") && list => 2,
        _ if s.starts_with("rollouts/channel/") => 3,
        _ if s.starts_with("rollouts/") && list => 0,
        _ if s.starts_with("rollouts/") => 1,
        _ if s.starts_with("revocations") => 4,
        _ if s.ends_with(".sig") => 5,
        _ => 6,
    }
}

/// Each release file renamed into place on its own, in the order that keeps every fleet a
/// poller can see backed by its manifests, and every manifest by the lists it commits to:
/// lists and manifests by id, lists and manifests by channel, the revocation list, then
/// the fleet's signature and the fleet.
fn publish_file_by_file(release: &Path, target: &Path) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = walk(release)?
        .into_iter()
        .filter(|rel| is_release_file(rel))
        .collect();
    files.sort_by_key(|rel| (publish_rank(rel), rel.clone()));
    for rel in files {
        let to = target.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = to.with_file_name(format!(".{name}.publishing-{}", std::process::id()));
        fs::copy(release.join(&rel), &tmp)?;
        fs::File::open(&tmp)?.sync_all()?;
        if let Err(e) = fs::rename(&tmp, &to) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_by_file_every_list_comes_before_the_manifest_that_commits_to_it() {
        let id = "f".repeat(64);
        let mut files: Vec<PathBuf> = [
            "fleet.resolved.json".to_owned(),
            "fleet.resolved.json.sig".to_owned(),
            "revocations.json".to_owned(),
            "rollouts/channel/stable.json".to_owned(),
            "rollouts/channel/stable.json.sig".to_owned(),
            "rollouts/channel/stable.hosts.json".to_owned(),
            format!("rollouts/channel/budgets/{}.json", "0".repeat(64)),
            format!("rollouts/{id}.json"),
            format!("rollouts/{id}.json.sig"),
            format!("rollouts/{id}.hosts.json"),
            format!("rollouts/budgets/{}.json", "0".repeat(64)),
        ]
        .into_iter()
        .map(PathBuf::from)
        .collect();
        files.sort_by_key(|rel| (publish_rank(rel), rel.clone()));
        let at = |name: &str| files.iter().position(|f| f == Path::new(name)).unwrap();
        let budgets = format!("rollouts/budgets/{}.json", "0".repeat(64));
        let hosts = format!("rollouts/{id}.hosts.json");
        let manifest = format!("rollouts/{id}.json");
        assert!(at(&budgets) < at(&manifest) && at(&hosts) < at(&manifest));
        let channel_budgets = format!("rollouts/channel/budgets/{}.json", "0".repeat(64));
        assert!(at(&channel_budgets) < at("rollouts/channel/stable.json"));
        assert!(at("rollouts/channel/stable.hosts.json") < at("rollouts/channel/stable.json"));
        assert!(at("rollouts/channel/stable.json.sig") < at("fleet.resolved.json"));
        assert_eq!(files.last().unwrap(), Path::new("fleet.resolved.json"));
    }

    #[test]
    fn publish_replaces_release_files_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let release = tmp.path().join("release");
        fs::create_dir_all(release.join("rollouts/channel")).unwrap();
        fs::write(release.join("fleet.resolved.json"), "new").unwrap();
        fs::write(release.join("rollouts/b.json"), "b").unwrap();
        fs::write(release.join("notes.txt"), "not published").unwrap();
        let target = tmp.path().join("forge");
        publish(&release, &target).unwrap();
        assert_eq!(
            fs::read_to_string(target.join("fleet.resolved.json")).unwrap(),
            "new"
        );
        assert!(!target.join("notes.txt").exists());

        fs::create_dir_all(target.join("cache")).unwrap();
        fs::write(target.join("cache/x.narinfo"), "kept").unwrap();
        fs::write(target.join("rollouts/a.json"), "old id").unwrap();
        fs::write(release.join("fleet.resolved.json"), "newer").unwrap();
        publish(&release, &target).unwrap();
        assert_eq!(
            fs::read_to_string(target.join("fleet.resolved.json")).unwrap(),
            "newer"
        );
        assert_eq!(
            fs::read_to_string(target.join("cache/x.narinfo")).unwrap(),
            "kept"
        );
        assert_eq!(
            fs::read_to_string(target.join("rollouts/a.json")).unwrap(),
            "old id"
        );
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(check_writable(&target.join("fleet.resolved.json/x")).is_err());

        let held = lock(&target, std::time::Duration::from_secs(1)).unwrap();
        let err = lock(&target, std::time::Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(err.contains("another nixfleet release"), "{err}");
        drop(held);
        lock(&target, std::time::Duration::from_secs(1)).unwrap();

        // Where directories cannot be swapped: file by file, the fleet last.
        fs::write(release.join("fleet.resolved.json"), "newest").unwrap();
        publish_file_by_file(&release, &target).unwrap();
        assert_eq!(
            fs::read_to_string(target.join("fleet.resolved.json")).unwrap(),
            "newest"
        );
        assert_eq!(
            fs::read_to_string(target.join("rollouts/b.json")).unwrap(),
            "b"
        );
    }
}
