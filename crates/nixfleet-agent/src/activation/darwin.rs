//! What the `darwin` backend (nix-darwin under launchd) does differently from `nixos`;
//! everything else is the shared code in [`super::nixos`].
//!
//! - The activation program is the closure's `activate` (nix-darwin closures have
//!   `activate`, `activate-user` and `sw/bin`; there is no `bin/switch-to-configuration`).
//!   `activate` sets `/run/current-system` itself, like switch-to-configuration does.
//!   `activate-user` is not run: current nix-darwin does all of its work as root from
//!   `activate`, and an old per-user `activate-user` must not run as root.
//! - It is detached by a process group of its own, its shell reparented to launchd: when
//!   launchd stops or restarts the agent's job (nix-darwin's `activate` reloads changed
//!   daemons, the agent's among them), it signals the job's process group, which the
//!   activation is then no longer in. There is no systemd-run, nor a `setsid` binary.
//! - There is no switch-to-configuration lock.
//! - Health without `--health-command`: the `org.nixos.*` launchd jobs (nix-darwin's
//!   `launchd.daemons`) that are not running and whose last exit status is not 0, as
//!   `launchctl list` shows them; see [`failed_jobs`].

use std::path::{Path, PathBuf};

use super::nixos::SWITCH_WRAPPER;
use crate::config::ActivationBackend;

/// Starts the wrapper ($1 of DETACH) in the background with the rest of the arguments and
/// returns at once: the background shell's parent exits, so it is reparented (to launchd,
/// or init), and the outer shell runs in a process group of its own.
const DETACH: &str = r#"w="$1"; shift
/bin/sh -c "$w" sh "$@" </dev/null >/dev/null 2>&1 &
"#;

/// The launchd label prefix of the daemons nix-darwin declares (`launchd.labelPrefix`).
pub const LABEL_PREFIX: &str = "org.nixos.";

impl ActivationBackend {
    /// What the activation is called in log lines and errors.
    pub fn activation_name(self) -> &'static str {
        match self {
            ActivationBackend::Nixos => "switch-to-configuration",
            ActivationBackend::Darwin => "activate",
        }
    }

    /// What kind of system closure the backend activates, for errors.
    pub fn system_kind(self) -> &'static str {
        match self {
            ActivationBackend::Nixos => "NixOS",
            ActivationBackend::Darwin => "nix-darwin",
        }
    }

    /// The program that activates the closure at `closure_path`, and its arguments.
    pub fn activation_command(self, closure_path: &Path) -> (PathBuf, &'static [&'static str]) {
        match self {
            ActivationBackend::Nixos => (
                closure_path.join("bin/switch-to-configuration"),
                &["switch"],
            ),
            ActivationBackend::Darwin => (closure_path.join("activate"), &[]),
        }
    }

    /// Whether activations wait for switch-to-configuration's lock.
    pub fn uses_switch_lock(self) -> bool {
        match self {
            ActivationBackend::Nixos => true,
            ActivationBackend::Darwin => false,
        }
    }
}

/// The darwin detacher; the wrapper's arguments (run directory, program, its arguments)
/// follow.
pub(super) fn detached() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.process_group(0)
        .args(["-c", DETACH, "sh", SWITCH_WRAPPER]);
    cmd
}

/// Counts the failed jobs in `launchctl list` output (`PID<tab>Status<tab>Label` lines):
/// a job labelled `org.nixos.*` with no process (`-`) whose last exit status is not 0 (a
/// negative status is the signal that killed it). Running jobs count as healthy whatever
/// their previous exit; jobs outside nix-darwin's prefix (Apple's) are not counted.
pub fn failed_jobs(launchctl_list: &str) -> u32 {
    let n = launchctl_list
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?, fields.next()?, fields.next()?))
        })
        .filter(|(pid, status, label)| {
            label.starts_with(LABEL_PREFIX) && *pid == "-" && *status != "0"
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_jobs_counts_stopped_nix_darwin_jobs_with_a_bad_exit() {
        let list = "PID\tStatus\tLabel\n\
                    -\t0\tcom.apple.SafariHistoryServiceAgent\n\
                    -\t78\tcom.apple.something\n\
                    412\t0\torg.nixos.nix-daemon\n\
                    413\t-15\torg.nixos.nixfleet-agent\n\
                    -\t0\torg.nixos.activate-system\n\
                    -\t1\torg.nixos.backup\n\
                    -\t-9\torg.nixos.web\n";
        assert_eq!(failed_jobs(list), 2);
        assert_eq!(failed_jobs(""), 0);
        assert_eq!(failed_jobs("PID\tStatus\tLabel\n"), 0);
    }

    #[test]
    fn backends_name_their_activation_program() {
        let closure = Path::new("/nix/store/abc-system");
        let (program, args) = ActivationBackend::Darwin.activation_command(closure);
        assert_eq!(program, closure.join("activate"));
        assert!(args.is_empty());
        let (program, args) = ActivationBackend::Nixos.activation_command(closure);
        assert_eq!(program, closure.join("bin/switch-to-configuration"));
        assert_eq!(args, ["switch"]);
        assert!(!ActivationBackend::Darwin.uses_switch_lock());
    }

    #[tokio::test]
    async fn the_darwin_detacher_returns_at_once_and_the_run_outlives_it() {
        let tmp = std::env::temp_dir().join(format!("nixfleet-detach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let dir = tmp.join("run");
        let mut cmd = detached();
        cmd.arg(&dir)
            .args(["/bin/sh", "-c", "sleep 1; echo $(ps -o pgid= -p $$)"]);
        let start = std::time::Instant::now();
        let out = super::super::run(&mut cmd, std::time::Duration::from_secs(10), "detach")
            .await
            .unwrap();
        assert!(out.status.success());
        assert!(start.elapsed() < std::time::Duration::from_millis(900));
        let status = dir.join("status");
        for _ in 0..100 {
            if status.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(std::fs::read_to_string(&status).unwrap().trim(), "0");
        // Its own process group, not the test's.
        let pgid: i32 = std::fs::read_to_string(dir.join("log"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let ours = std::process::Command::new("ps")
            .args(["-o", "pgid=", "-p", &std::process::id().to_string()])
            .output()
            .unwrap();
        let ours: i32 = String::from_utf8_lossy(&ours.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_ne!(pgid, ours);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
