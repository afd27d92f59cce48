//! Real Nix for the demo: tiny system closures (a `/bin/sh` derivation, no nixpkgs)
//! whose `switch-to-configuration` only repoints a link inside the demo directory, and a
//! binary cache signed with a key from `nix-store --generate-binary-cache-key`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::run;
use super::DemoError;

const NIX_TIMEOUT: Duration = Duration::from_secs(120);

/// The configuration every nix command of the demo (and its agents) runs with: what the
/// user has, plus `nix-command`; as root, also no sandbox and no build users, so that Nix
/// works without a daemon (Debian's nix-bin).
pub fn nix_config() -> String {
    let mut config = std::env::var("NIX_CONFIG").unwrap_or_default();
    if !config.is_empty() {
        config.push('\n');
    }
    config.push_str("experimental-features = nix-command");
    if is_root() {
        config.push_str("\nsandbox = false\nbuild-users-group =");
    }
    config
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Signing store paths and using a binary cache of one's own are privileged in Nix: a
/// failure as a normal user most likely means that Nix does not trust the user.
fn trust_hint(e: DemoError) -> DemoError {
    match e {
        DemoError::Command { what, detail } if !is_root() => DemoError::Command {
            what,
            detail: format!(
                "{detail}\n(as a normal user, Nix must trust you for this: add your user to \
                 trusted-users in /etc/nix/nix.conf and restart nix-daemon, or run the demo as root)"
            ),
        },
        other => other,
    }
}

fn nix(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", nix_config());
    cmd
}

/// Whether Nix is usable here; the error says what is missing.
pub fn check_installed() -> Result<String, DemoError> {
    for program in ["nix-store", "nix-build", "nix-env", "nix"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()));
        if !found {
            return Err(DemoError::NoNix {
                detail: format!("{program} is not on PATH"),
            });
        }
    }
    let version = run(
        nix("nix-store").arg("--version"),
        "nix-store --version",
        Duration::from_secs(20),
    )
    .map_err(|e| DemoError::NoNix {
        detail: e.to_string(),
    })?;
    Ok(version.trim().to_owned())
}

pub fn store_path(closure: &str) -> PathBuf {
    Path::new("/nix/store").join(closure)
}

/// One closure per (machine directory, name): its activation repoints
/// `<machine>/current-system` and records itself in `<machine>/activations`.
pub struct ClosureSpec {
    pub machine: PathBuf,
    pub name: String,
}

/// Builds every closure in one `nix-build`; returns name → store basename.
pub fn build(
    nix_file: &Path,
    specs: &[ClosureSpec],
) -> Result<BTreeMap<String, String>, DemoError> {
    let mut text = String::from("let mk = name: script: derivation {\n  inherit name script;\n  system = builtins.currentSystem;\n  builder = \"/bin/sh\";\n  PATH = \"/bin:/usr/bin\";\n  args = [ \"-c\" \"mkdir -p $out/bin && printf '%s\\n' \\\"$script\\\" | sed \\\"s|@out@|$out|g\\\" > $out/bin/switch-to-configuration && chmod +x $out/bin/switch-to-configuration\" ];\n};\nin {\n");
    for spec in specs {
        let d = spec.machine.display();
        let script = format!(
            "#!/bin/sh\necho @out@ >> {d}/activations\nln -sfn @out@ {d}/current-system.new && mv -T {d}/current-system.new {d}/current-system\n"
        );
        text.push_str(&format!(
            "  {:?} = mk {:?} {:?};\n",
            spec.name, spec.name, script
        ));
    }
    text.push_str("}\n");
    if let Some(parent) = nix_file.parent() {
        std::fs::create_dir_all(parent).map_err(|e| DemoError::io("create", parent, e))?;
    }
    std::fs::write(nix_file, text).map_err(|e| DemoError::io("write", nix_file, e))?;
    // No substituters: nothing is to be fetched, and cache.nixos.org would be tried first.
    let out = run(
        nix("nix-build")
            .arg(nix_file)
            .args(["--no-out-link", "--option", "substituters", ""]),
        "nix-build of the demo closures",
        NIX_TIMEOUT,
    )?;
    let mut built = BTreeMap::new();
    for line in out.lines() {
        let Some(base) = Path::new(line.trim()).file_name() else {
            continue;
        };
        let base = base.to_string_lossy().into_owned();
        if let Some(spec) = specs
            .iter()
            .find(|s| base.ends_with(&format!("-{}", s.name)))
        {
            built.insert(spec.name.clone(), base);
        }
    }
    if built.len() != specs.len() {
        return Err(DemoError::Command {
            what: "nix-build of the demo closures".into(),
            detail: format!("expected {} store paths, got:\n{out}", specs.len()),
        });
    }
    Ok(built)
}

/// A binary cache directory and its key pair.
pub struct Cache {
    pub dir: PathBuf,
    pub secret_key: PathBuf,
    /// `name:base64`, as trust.json's cacheKeys holds it.
    pub public_key: String,
}

impl Cache {
    /// Uses the key pair in `key_dir` (made with nix-store when missing).
    pub fn new(dir: &Path, key_dir: &Path, key_name: &str) -> Result<Cache, DemoError> {
        std::fs::create_dir_all(dir).map_err(|e| DemoError::io("create", dir, e))?;
        let secret_key = key_dir.join("cache.secret");
        let public = key_dir.join("cache.public");
        if !secret_key.exists() || !public.exists() {
            run(
                nix("nix-store")
                    .args(["--generate-binary-cache-key", key_name])
                    .arg(&secret_key)
                    .arg(&public),
                "nix-store --generate-binary-cache-key",
                NIX_TIMEOUT,
            )?;
        }
        let public_key = std::fs::read_to_string(&public)
            .map_err(|e| DemoError::io("read", &public, e))?
            .trim()
            .to_owned();
        Ok(Cache {
            dir: dir.to_path_buf(),
            secret_key,
            public_key,
        })
    }

    /// Signs the closures with the cache key and copies them into the cache.
    pub fn push(&self, closures: &[&str]) -> Result<(), DemoError> {
        let paths: Vec<PathBuf> = closures.iter().map(|c| store_path(c)).collect();
        run(
            nix("nix")
                .args(["store", "sign", "--key-file"])
                .arg(&self.secret_key)
                .args(&paths),
            "nix store sign",
            NIX_TIMEOUT,
        )
        .map_err(trust_hint)?;
        run(
            nix("nix")
                .args(["copy", "--to", &format!("file://{}", self.dir.display())])
                .args(&paths),
            "nix copy to the demo cache",
            NIX_TIMEOUT,
        )
        .map_err(trust_hint)?;
        Ok(())
    }
}

/// Removes closures from the local store, so that the agents must fetch them from the
/// signed cache. Returns false when Nix keeps them (they are still in use).
pub fn delete(closures: &[&str]) -> bool {
    let paths: Vec<PathBuf> = closures.iter().map(|c| store_path(c)).collect();
    run(
        nix("nix-store").arg("--delete").args(&paths),
        "nix-store --delete",
        NIX_TIMEOUT,
    )
    .is_ok()
}

/// Makes `closure` the machine's running system as an installer would.
pub fn install(profile: &Path, link: &Path, closure: &str) -> Result<(), DemoError> {
    run(
        nix("nix-env")
            .arg("--profile")
            .arg(profile)
            .arg("--set")
            .arg(store_path(closure)),
        "nix-env --set of the first system",
        NIX_TIMEOUT,
    )?;
    std::os::unix::fs::symlink(store_path(closure), link)
        .map_err(|e| DemoError::io("create the link", link, e))
}
