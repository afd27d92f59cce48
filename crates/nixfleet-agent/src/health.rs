//! Health as the control plane's health gate sees it: failed units and uptime.

use std::path::Path;
use std::time::Duration;

use nixfleet_proto::wire::Health;
use serde::Deserialize;

use crate::activation::{darwin, run, tail};
use crate::config::ActivationBackend;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthOutput {
    failed_units: u32,
}

/// Runs the health command (or, without one, counts `systemctl --failed` when systemd runs
/// (nixos), the failed nix-darwin launchd jobs (darwin), else 0). A health command that
/// fails counts as one failed unit: unknown health is not health.
pub async fn collect(health_command: Option<&str>, backend: ActivationBackend) -> Health {
    let failed_units = match health_command {
        Some(command) => {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.args(["-c", command]);
            match run(&mut cmd, Duration::from_secs(30), "the health command").await {
                Ok(out) if out.status.success() => {
                    match serde_json::from_slice::<HealthOutput>(&out.stdout) {
                        Ok(h) => h.failed_units,
                        Err(e) => {
                            tracing::warn!("health command {command:?} printed no {{\"failedUnits\": N}} ({e}); counting 1 failed unit");
                            1
                        }
                    }
                }
                Ok(out) => {
                    tracing::warn!(
                        "health command {command:?} exited with {}: {}; counting 1 failed unit",
                        out.status,
                        tail(&out.stderr)
                    );
                    1
                }
                Err(e) => {
                    tracing::warn!("{e}; counting 1 failed unit");
                    1
                }
            }
        }
        None if backend == ActivationBackend::Darwin => launchd_failed_jobs("launchctl").await,
        None if Path::new("/run/systemd/system").exists() => {
            let mut cmd = tokio::process::Command::new("systemctl");
            cmd.args([
                "list-units",
                "--failed",
                "--plain",
                "--no-legend",
                "--no-pager",
            ]);
            match run(&mut cmd, Duration::from_secs(30), "systemctl --failed").await {
                Ok(out) if out.status.success() => {
                    let n = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .count();
                    u32::try_from(n).unwrap_or(u32::MAX)
                }
                _ => {
                    tracing::warn!("systemctl --failed did not answer; counting 1 failed unit");
                    1
                }
            }
        }
        None => 0,
    };
    Health {
        failed_units,
        uptime_secs: uptime_secs(),
    }
}

/// The failed launchd jobs as [`darwin::failed_jobs`] counts them from `<launchctl> list`;
/// one when launchctl does not answer.
pub async fn launchd_failed_jobs(launchctl: &str) -> u32 {
    let mut cmd = tokio::process::Command::new(launchctl);
    cmd.arg("list");
    match run(&mut cmd, Duration::from_secs(30), "launchctl list").await {
        Ok(out) if out.status.success() => {
            darwin::failed_jobs(&String::from_utf8_lossy(&out.stdout))
        }
        Ok(out) => {
            tracing::warn!(
                "launchctl list exited with {}: {}; counting 1 failed unit",
                out.status,
                tail(&out.stderr)
            );
            1
        }
        Err(e) => {
            tracing::warn!("{e}; counting 1 failed unit");
            1
        }
    }
}

/// `sysctl -n <name>`, trimmed; None where there is no sysctl or no such name.
fn sysctl(name: &str) -> Option<String> {
    std::process::Command::new("sysctl")
        .args(["-n", name])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Seconds since boot: /proc/uptime (Linux), else macOS's `kern.boottime`.
fn uptime_secs() -> u64 {
    let proc = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| s as u64);
    proc.or_else(|| {
        let booted = boottime_secs(&sysctl("kern.boottime")?)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        Some(now.saturating_sub(booted))
    })
    .unwrap_or(0)
}

/// The seconds of macOS's `kern.boottime` (`{ sec = 1733300000, usec = 12 } Wed Dec …`).
fn boottime_secs(text: &str) -> Option<u64> {
    let rest = &text[text.find("sec =")? + "sec =".len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// This boot's id; it changes at every reboot (macOS: `kern.bootsessionuuid`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .or_else(|| sysctl("kern.bootsessionuuid"))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The system hostname (macOS: `kern.hostname`, without a domain).
pub fn system_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            sysctl("kern.hostname")
                .and_then(|h| h.split('.').next().map(str::to_owned))
                .filter(|h| !h.is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_of_macos_sysctl_output() {
        assert_eq!(
            boottime_secs("{ sec = 1733300000, usec = 12 } Wed Dec  4 08:13:20 2024"),
            Some(1_733_300_000)
        );
        assert_eq!(boottime_secs("garbage"), None);
    }

    /// A stand-in `launchctl` (Linux has none): the darwin backend's default health
    /// counts its stopped org.nixos.* jobs that exited non-zero.
    #[tokio::test]
    async fn darwin_health_without_a_command_counts_failed_launchd_jobs() {
        let dir = std::env::temp_dir().join(format!("nixfleet-launchctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stub = dir.join("launchctl");
        std::fs::write(
            &stub,
            "#!/bin/sh\n[ \"$1\" = list ] || exit 2\nprintf 'PID\\tStatus\\tLabel\\n-\\t78\\torg.nixos.web\\n12\\t0\\torg.nixos.nix-daemon\\n-\\t1\\tcom.apple.x\\n'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(launchd_failed_jobs(stub.to_str().unwrap()).await, 1);
        // No launchctl: unknown health counts as one failed unit.
        assert_eq!(
            launchd_failed_jobs(dir.join("missing").to_str().unwrap()).await,
            1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
