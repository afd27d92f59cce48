//! File helpers shared by the subcommands: bounded reads and atomic writes.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::CliError;

/// Reads at most `limit` bytes; a larger file is an error rather than an allocation.
pub fn read_limited(path: &Path, limit: usize) -> Result<Vec<u8>, CliError> {
    let file = fs::File::open(path).map_err(|e| CliError::io("read", path, e))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::io("read", path, e))?;
    if bytes.len() > limit {
        return Err(CliError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

pub fn read_text(path: &Path, limit: usize) -> Result<String, CliError> {
    String::from_utf8(read_limited(path, limit)?).map_err(|_| CliError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

/// Writes via a temporary file in the same directory and a rename, so a reader never
/// sees a half-written artifact and a crash leaves the old file intact.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(CliError::io("write", path, e));
    }
    Ok(())
}

/// Creates a new file that must not exist yet (private keys are never overwritten).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                CliError::io("create", path, e)
            }
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::io("write", path, e))
}

/// Creates `path` and its missing parents for public material (0755), whatever the umask;
/// directories that exist keep their mode.
pub fn create_dir(path: &Path) -> Result<(), CliError> {
    create_dir_with_mode(path, 0o755)
}

/// Creates `path` and its missing parents for private keys (0700), whatever the umask.
pub fn create_private_dir(path: &Path) -> Result<(), CliError> {
    create_dir_with_mode(path, 0o700)
}

fn create_dir_with_mode(path: &Path, mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| CliError::io("create directory", path, e))?;
    // The mode given to mkdir is masked by the umask; set it on what was created here.
    for dir in missing {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| CliError::io("set the mode of directory", dir, e))?;
    }
    Ok(())
}

/// Creates `path`, which must not exist yet, holding `bytes` with exactly `mode` whatever
/// the umask, atomically: the file is written and synced under a temporary name in the
/// same directory, then linked into place, so a reader finds no file or the whole file,
/// and a failure leaves nothing behind. An existing `path` is never replaced. For
/// secrets that a shell redirect would leave readable by others (bootstrap tokens).
pub fn create_new_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let exists = || CliError::Exists {
        path: path.to_path_buf(),
    };
    if fs::symlink_metadata(path).is_ok() {
        return Err(exists());
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(nonce)));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| CliError::io("create", &tmp, e))?;
    let written = file
        // The mode given to open is masked by the umask; this one is not.
        .set_permissions(fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all());
    drop(file);
    let linked = written
        .map_err(|e| CliError::io("write", &tmp, e))
        .and_then(|()| {
            fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => exists(),
                _ => CliError::io("create", path, e),
            })
        });
    let _ = fs::remove_file(&tmp);
    linked?;
    // The new directory entry survives a crash too.
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}
