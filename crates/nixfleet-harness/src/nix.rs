//! Real Nix for tests: tiny system closures built from a `/bin/sh` derivation (no
//! nixpkgs), a binary cache signed with a key from `nix-store --generate-binary-cache-key`,
//! and a test "machine" directory holding the profile and the current-system link.
//!
//! A test closure's `bin/switch-to-configuration` appends its store path to
//! `<machine>/activations`, then repoints `<machine>/current-system` at itself. The test
//! steers it with files in the machine directory, keyed by the closure's name:
//! `hang-<name>` (wait while the file exists), `fail-<name>` (exit 1 before switching),
//! `unhealthy-<name>` (the health command then reports one failed unit).

use std::path::{Path, PathBuf};
use std::process::Command;

/// What `nix` needs to run as root without a daemon, sandbox or build users.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =";

/// A nix command with the test configuration.
pub fn nix_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", NIX_CONFIG);
    cmd
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether Nix is installed (the tests need `nix-bin`).
pub fn nix_available() -> bool {
    Command::new("nix-store")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

const SYSTEM_NIX: &str = r#"{ name, script, compliance ? null }:
derivation ({
  inherit name script;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "mkdir -p $out/bin && printf '%s\n' \"$script\" | sed \"s|@out@|$out|g\" > $out/bin/switch-to-configuration && chmod +x $out/bin/switch-to-configuration && if [ -n \"$compliance\" ]; then mkdir -p $out/etc/nixfleet && printf '%s' \"$compliance\" > $out/etc/nixfleet/compliance.json; fi" ];
} // (if compliance == null then { } else { inherit compliance; }))
"#;

/// A test machine: the directory with its profile, current-system link and steering files.
pub struct Machine {
    pub dir: PathBuf,
}

impl Machine {
    pub fn new(dir: &Path) -> Machine {
        std::fs::create_dir_all(dir.join("profiles")).unwrap();
        std::fs::write(dir.join("system.nix"), SYSTEM_NIX).unwrap();
        Machine {
            dir: dir.to_path_buf(),
        }
    }

    pub fn profile(&self) -> PathBuf {
        self.dir.join("profiles/system")
    }

    pub fn current_system_link(&self) -> PathBuf {
        self.dir.join("current-system")
    }

    pub fn switch_lock(&self) -> PathBuf {
        self.dir.join("switch-to-configuration.lock")
    }

    /// The health command for the agent: one failed unit once an unhealthy closure runs.
    pub fn health_command(&self) -> String {
        let d = self.dir.display();
        format!(r#"printf '{{"failedUnits": %s}}' "$(cat {d}/failed-units 2>/dev/null || echo 0)""#)
    }

    /// Builds a system closure named `name` (e.g. `nixos-system-web-01-1`); returns its
    /// store basename. Its content names this machine's directory, so every test gets its
    /// own store paths.
    ///
    /// Built with no substituters: nothing is to be fetched, and nix-build would otherwise
    /// first try cache.nixos.org (seconds of retries per build when offline).
    pub fn build(&self, name: &str) -> String {
        self.build_with(name, None)
    }

    /// As [`Machine::build`], with `probe_set` (a compliance `ProbeSet` as JSON) at the
    /// closure's `etc/nixfleet/compliance.json`, where the NixOS module puts it.
    pub fn build_with_probes(&self, name: &str, probe_set: &str) -> String {
        self.build_with(name, Some(probe_set))
    }

    fn build_with(&self, name: &str, probe_set: Option<&str>) -> String {
        let options = ["--option", "substituters", ""];
        let script = self.switch_script(name);
        let mut cmd = nix_command("nix-build");
        cmd.arg(self.dir.join("system.nix"))
            .args(["--no-out-link", "--argstr", "name", name])
            .args(["--argstr", "script", &script])
            .args(options);
        if let Some(set) = probe_set {
            cmd.args(["--argstr", "compliance", set]);
        }
        let path = run(cmd, "nix-build of a test closure");
        Path::new(&path)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// The `bin/switch-to-configuration` of a closure named `name` on this machine
    /// (`@out@` stands for the closure's store path); see the module doc.
    pub fn switch_script(&self, name: &str) -> String {
        let d = self.dir.display();
        format!(
            r#"#!/bin/sh
echo @out@ >> {d}/activations
while [ -e {d}/hang-{name} ]; do sleep 0.1; done
if [ -e {d}/fail-{name} ]; then echo "switch-to-configuration failing on purpose" >&2; exit 1; fi
ln -sfn @out@ {d}/current-system.new && mv -T {d}/current-system.new {d}/current-system
if [ -e {d}/unhealthy-{name} ]; then echo 1 > {d}/failed-units; else echo 0 > {d}/failed-units; fi
"#
        )
    }

    /// Makes `closure` the running system as an installer would: profile and link.
    pub fn install(&self, closure: &str) {
        let mut cmd = nix_command("nix-env");
        cmd.arg("--profile")
            .arg(self.profile())
            .arg("--set")
            .arg(store_path(closure));
        run(cmd, "nix-env --set");
        std::os::unix::fs::symlink(store_path(closure), self.current_system_link()).unwrap();
    }

    /// The basename the current-system link points at.
    pub fn current(&self) -> Option<String> {
        std::fs::read_link(self.current_system_link())
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// The basename the profile points at.
    pub fn profile_target(&self) -> Option<String> {
        std::fs::canonicalize(self.profile())
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Every switch-to-configuration run so far, as store basenames, in order.
    pub fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("activations"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                Path::new(l)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .collect()
    }

    /// Creates or removes a steering file (`hang`, `fail`, `unhealthy`) for closure `name`.
    pub fn set(&self, what: &str, name: &str, on: bool) {
        let file = self.dir.join(format!("{what}-{name}"));
        if on {
            std::fs::write(file, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(file);
        }
    }
}

pub fn store_path(closure: &str) -> PathBuf {
    Path::new("/nix/store").join(closure)
}

/// Whether the path is valid (registered) in the local store.
pub fn is_valid(closure: &str) -> bool {
    let mut cmd = nix_command("nix-store");
    cmd.arg("--check-validity").arg(store_path(closure));
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Removes a path from the local store, so that it must come from a binary cache.
pub fn delete_from_store(closure: &str) {
    let mut cmd = nix_command("nix-store");
    cmd.arg("--delete").arg(store_path(closure));
    run(cmd, "nix-store --delete");
}

/// A binary cache directory (served as file:// or over HTTP by a [`crate::Forge`]) and
/// its signing key.
pub struct Cache {
    pub dir: PathBuf,
    pub secret_key: PathBuf,
    /// The public key, `name:base64`, as trust.json's cacheKeys holds it.
    pub public_key: String,
}

impl Cache {
    pub fn new(dir: &Path, key_name: &str) -> Cache {
        std::fs::create_dir_all(dir).unwrap();
        let secret_key = dir.with_extension("secret");
        let public = dir.with_extension("public");
        let mut cmd = nix_command("nix-store");
        cmd.args(["--generate-binary-cache-key", key_name])
            .arg(&secret_key)
            .arg(&public);
        run(cmd, "nix-store --generate-binary-cache-key");
        Cache {
            dir: dir.to_path_buf(),
            secret_key,
            public_key: std::fs::read_to_string(public).unwrap().trim().to_owned(),
        }
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    /// Signs the closure with `key` (this cache's or another's) and copies it in.
    pub fn push_signed_with(&self, closure: &str, key: &Path) {
        let mut cmd = nix_command("nix");
        cmd.args(["store", "sign", "--key-file"])
            .arg(key)
            .arg(store_path(closure));
        run(cmd, "nix store sign");
        self.push_unsigned(closure);
    }

    /// Signs the closure with this cache's key and copies it in.
    pub fn push(&self, closure: &str) {
        self.push_signed_with(closure, &self.secret_key);
    }

    /// Copies the closure in with whatever signatures it has (none for a local build).
    pub fn push_unsigned(&self, closure: &str) {
        let mut cmd = nix_command("nix");
        cmd.args(["copy", "--to", &self.file_url()])
            .arg(store_path(closure));
        run(cmd, "nix copy");
    }
}
