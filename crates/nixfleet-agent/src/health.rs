//! Health as the control plane's health gate sees it: failed units and uptime.

use std::path::Path;
use std::time::Duration;

use nixfleet_proto::wire::Health;
use serde::Deserialize;

use crate::activation::{run, tail};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthOutput {
    failed_units: u32,
}

/// Runs the health command (or counts `systemctl --failed` when systemd runs, else 0).
/// A health command that fails counts as one failed unit: unknown health is not health.
pub async fn collect(health_command: Option<&str>) -> Health {
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

fn uptime_secs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| s as u64)
        .unwrap_or(0)
}

/// This boot's id; it changes at every reboot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The system hostname.
pub fn system_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
