//! Activation through real Nix, with the profile and the current-system link configurable
//! so that it runs on any machine with Nix installed. The `nixos` and `darwin` backends
//! share all of it (realise, signature check, profile, run directories, waiting for the
//! outcome); what differs, the closure's activation program and how it is detached, is
//! asked of [`ActivationBackend`] (see [`super::darwin`]).
//!
//! The activation (switch-to-configuration, or nix-darwin's `activate`) runs detached from
//! the agent (nixos: systemd-run when systemd is PID 1, else its own session through
//! setsid; darwin: a process group of its own, reparented to launchd) because it may
//! restart the agent. Each run has a directory under `<state dir>/switch/<run id>`; the
//! wrapper creates it with `mkdir`, which only one process can win, so a run is started
//! at most once however often the agent is killed and restarted around it. The wrapper
//! writes the exit status there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::signatures::{self, CacheKey, CacheKeyError, Verified};
use super::{run, run_bounded, tail};
use crate::config::ActivationBackend;

const STORE_DIR: &str = "/nix/store";

/// The most `nix path-info --json --recursive` may print: about 1 KiB a path, so room for
/// closures far beyond a NixOS system's few thousand paths.
const MAX_PATH_INFO_BYTES: usize = 32 << 20;

/// The wrapper around the activation (switch-to-configuration, activate): $1 = run
/// directory, the rest = command.
pub(super) const SWITCH_WRAPPER: &str = r#"d="$1"; shift
mkdir "$d" 2>/dev/null || exit 0
echo $$ > "$d/pid"
exec >"$d/log" 2>&1 </dev/null
"$@"
echo $? > "$d/status.tmp"
mv "$d/status.tmp" "$d/status"
"#;

/// How long a run directory may exist without a live wrapper process before the run counts
/// as lost (the wrapper writes its pid right after creating the directory).
const START_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RealiseError {
    /// The closure is refused: a path of it unsigned or foreign-signed (fetched or already
    /// in the local store), or the cache's copy corrupted.
    Refused(String),
    /// Anything else (cache unreachable, path missing, timeout, a cacheKeys entry that is
    /// not a key): may pass.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchStatus {
    NotStarted,
    Running,
    Exited(i32),
    /// The wrapper is gone without writing a status (killed, or the machine rebooted).
    Lost,
}

#[derive(Debug, Clone)]
pub struct System {
    pub backend: ActivationBackend,
    pub profile: PathBuf,
    pub current_system_link: PathBuf,
    pub substituters: Vec<String>,
    pub switch_lock: PathBuf,
    pub switches_dir: PathBuf,
    pub command_timeout: Duration,
    pub realise_timeout: Duration,
    pub switch_timeout: Duration,
}

pub fn store_path(closure: &str) -> PathBuf {
    Path::new(STORE_DIR).join(closure)
}

fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").exists()
}

/// Only root may start a system unit; an agent run as a user (a local trial) detaches
/// the switch itself instead.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl System {
    /// What the activation is called in log lines: switch-to-configuration or activate.
    pub fn activation_name(&self) -> &'static str {
        self.backend.activation_name()
    }

    /// The store basename the current-system link points at.
    pub fn current_closure(&self) -> Option<String> {
        let target = std::fs::read_link(&self.current_system_link).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Realises the closure from the configured substituters, trusting only `cache_keys`
    /// and requiring signatures, then checks that every path of the closure carries a
    /// valid signature by one of `cache_keys`, whether it was just fetched or was in the
    /// local store before (`require-sigs` only covers what is substituted). `Ok` only
    /// when both hold.
    pub async fn realise(
        &self,
        closure: &str,
        cache_keys: &[String],
    ) -> Result<Verified, RealiseError> {
        let keys = signatures::parse_cache_keys(cache_keys).map_err(|e| match e {
            CacheKeyError::NoKeys => RealiseError::Refused(e.to_string()),
            CacheKeyError::Invalid(_) => RealiseError::Failed(e.to_string()),
        })?;
        let path = store_path(closure);
        let mut cmd = tokio::process::Command::new("nix-store");
        cmd.arg("--realise")
            .arg(&path)
            .args(["--option", "substituters", &self.substituters.join(" ")])
            .args(["--option", "trusted-public-keys", &cache_keys.join(" ")])
            .args(["--option", "require-sigs", "true"])
            // Never build: a host only runs what the cache signed.
            .args(["--option", "max-jobs", "0"]);
        let output = run(&mut cmd, self.realise_timeout, "nix-store --realise")
            .await
            .map_err(RealiseError::Failed)?;
        if output.status.success() && path.exists() {
            return self.check_signatures(closure, &keys).await;
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = format!(
            "nix-store --realise {} from {} failed: {}",
            path.display(),
            self.substituters.join(" "),
            tail(&output.stderr)
        );
        let refused = [
            "not signed by any of the keys",
            "lacks a valid signature",
            "hash mismatch",
            "NAR hash",
        ]
        .iter()
        .any(|needle| stderr.contains(needle));
        if refused {
            Err(RealiseError::Refused(format!(
                "{detail}; the binary cache's copy is not signed by a key in cacheKeys or is corrupted"
            )))
        } else {
            Err(RealiseError::Failed(detail))
        }
    }

    /// Checks the signatures of every path of the closure as the local store records them
    /// (`nix path-info`; no substituter is asked), against `keys` only: Nix's own trusted
    /// keys, secret key files and "ultimate" (locally built) flags count for nothing.
    async fn check_signatures(
        &self,
        closure: &str,
        keys: &[CacheKey],
    ) -> Result<Verified, RealiseError> {
        let path = format!("{STORE_DIR}/{closure}");
        let mut cmd = tokio::process::Command::new("nix");
        cmd.args(["--extra-experimental-features", "nix-command"])
            .args(["path-info", "--json", "--recursive", "--sigs"])
            .args(["--option", "substituters", ""])
            .arg(&path);
        let what = "nix path-info --json --recursive";
        let output = run_bounded(&mut cmd, self.command_timeout, what, MAX_PATH_INFO_BYTES)
            .await
            .map_err(RealiseError::Failed)?;
        if !output.status.success() {
            return Err(RealiseError::Failed(format!(
                "{what} {path} failed, so the signatures of its closure cannot be checked: {}",
                tail(&output.stderr)
            )));
        }
        let infos = signatures::parse_path_info(&output.stdout)
            .map_err(|e| RealiseError::Failed(format!("{e} ({what} {path})")))?;
        signatures::check_closure(&path, &infos, keys).map_err(|e| {
            if e.refuses() {
                RealiseError::Refused(e.to_string())
            } else {
                RealiseError::Failed(e.to_string())
            }
        })
    }

    /// Points the system profile at the closure (a new generation).
    pub async fn set_profile(&self, closure: &str) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new("nix-env");
        cmd.arg("--profile")
            .arg(&self.profile)
            .arg("--set")
            .arg(store_path(closure));
        let output = run(&mut cmd, self.command_timeout, "nix-env --set").await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nix-env --profile {} --set {} failed: {}",
                self.profile.display(),
                store_path(closure).display(),
                tail(&output.stderr)
            ))
        }
    }

    /// Whether someone else holds the switch-to-configuration lock (nix-darwin has none).
    pub async fn lock_held(&self) -> bool {
        if !self.backend.uses_switch_lock() || !self.switch_lock.exists() {
            return false;
        }
        let mut cmd = tokio::process::Command::new("flock");
        cmd.args(["--nonblock", "--shared"])
            .arg(&self.switch_lock)
            .arg("true");
        match run(&mut cmd, Duration::from_secs(10), "flock").await {
            Ok(output) => !output.status.success(),
            Err(e) => {
                tracing::warn!(
                    "cannot test {}: {e}; assuming it is free",
                    self.switch_lock.display()
                );
                false
            }
        }
    }

    fn run_dir(&self, run_id: &str) -> PathBuf {
        self.switches_dir.join(run_id)
    }

    pub fn switch_status(&self, run_id: &str) -> SwitchStatus {
        let dir = self.run_dir(run_id);
        if !dir.exists() {
            return SwitchStatus::NotStarted;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("status")) {
            return SwitchStatus::Exited(text.trim().parse().unwrap_or(-1));
        }
        let alive = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(process_alive);
        if alive {
            return SwitchStatus::Running;
        }
        let young = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < START_GRACE);
        if young {
            SwitchStatus::Running
        } else {
            SwitchStatus::Lost
        }
    }

    /// Starts the closure's activation (`bin/switch-to-configuration switch`, or
    /// `activate`) detached, unless this run was started before.
    pub async fn launch_switch(&self, run_id: &str, closure: &str) -> Result<(), String> {
        if self.switch_status(run_id) != SwitchStatus::NotStarted {
            return Ok(());
        }
        let closure_path = store_path(closure);
        let (program, args) = self.backend.activation_command(&closure_path);
        if !program.exists() {
            return Err(format!(
                "{} has no {}: it is not a {} system closure; build the host's closure for this platform (or set --activation)",
                closure_path.display(),
                program.strip_prefix(&closure_path).unwrap_or(&program).display(),
                self.backend.system_kind()
            ));
        }
        let dir = self.run_dir(run_id);
        let mut cmd = match self.backend {
            ActivationBackend::Nixos => nixos_detached(run_id),
            ActivationBackend::Darwin => super::darwin::detached(),
        };
        cmd.arg(&dir).arg(&program).args(args);
        let name = self.activation_name();
        let output = run(&mut cmd, self.command_timeout, &format!("launching {name}")).await?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "could not start {}: {}",
                program.display(),
                tail(&output.stderr)
            ))
        }
    }

    /// Runs the activation of `closure` (or waits for the run already started) and checks that
    /// the current-system link points at it afterwards.
    pub async fn switch_to(&self, run_id: &str, closure: &str) -> Result<(), String> {
        self.launch_switch(run_id, closure).await?;
        let name = self.activation_name();
        let start = Instant::now();
        let status = loop {
            match self.switch_status(run_id) {
                SwitchStatus::Exited(code) => break code,
                SwitchStatus::Lost => {
                    return Err(format!(
                        "{name} of {closure} stopped without an exit status (see {})",
                        self.run_dir(run_id).join("log").display()
                    ))
                }
                SwitchStatus::NotStarted | SwitchStatus::Running => {}
            }
            if start.elapsed() > self.switch_timeout {
                return Err(format!(
                    "{name} of {closure} still runs after {} s (see {})",
                    self.switch_timeout.as_secs(),
                    self.run_dir(run_id).join("log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if status != 0 {
            let log = std::fs::read(self.run_dir(run_id).join("log")).unwrap_or_default();
            return Err(format!(
                "{name} of {closure} exited with status {status}: {}",
                tail(&log)
            ));
        }
        match self.current_closure() {
            Some(current) if current == closure => Ok(()),
            current => Err(format!(
                "after {name}, {} points at {} instead of {closure}",
                self.current_system_link.display(),
                current.as_deref().unwrap_or("nothing")
            )),
        }
    }

    /// Forgets a finished run.
    pub fn clear_run(&self, run_id: &str) {
        let _ = std::fs::remove_dir_all(self.run_dir(run_id));
    }
}

/// switch-to-configuration's detacher: a transient unit when systemd runs and the agent is
/// root, else a session of its own. The wrapper's arguments follow.
fn nixos_detached(run_id: &str) -> tokio::process::Command {
    let mut cmd = if systemd_is_pid1() && is_root() {
        let mut cmd = tokio::process::Command::new("systemd-run");
        let unit: String = run_id.chars().take(40).collect();
        cmd.arg(format!("--unit=nixfleet-switch-{unit}")).args([
            "--collect",
            "--no-block",
            "--quiet",
            "--",
        ]);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new("setsid");
        cmd.arg("--fork");
        cmd
    };
    cmd.args(["/bin/sh", "-c", SWITCH_WRAPPER, "sh"]);
    cmd
}

/// A process that exists and is not a zombie: from /proc where there is one (Linux), else
/// from `ps` (macOS).
fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self/stat").exists() {
        return std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().chars().next())
            })
            .flatten()
            .is_some_and(|state| state != 'Z' && state != 'X');
    }
    std::process::Command::new("ps")
        .args(["-o", "stat=", "-p", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().chars().next())
        .is_some_and(|state| state != 'Z')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_bogus_pid_is_not() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 1));
    }

    #[test]
    fn is_root_agrees_with_id() {
        let out = std::process::Command::new("id").arg("-u").output().unwrap();
        let uid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(is_root(), uid == "0");
    }
}
