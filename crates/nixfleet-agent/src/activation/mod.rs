//! Activation backends. `nixos` is the real one (SPEC.md §7): nix-store --realise,
//! nix-env --profile … --set, switch-to-configuration.

pub mod nixos;

use std::time::Duration;

/// Runs a command with a timeout (killing it when the time is up); returns its output or
/// a one-line reason.
pub async fn run(
    command: &mut tokio::process::Command,
    timeout: Duration,
    what: &str,
) -> Result<std::process::Output, String> {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e} (is it installed and on PATH?)"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!(
            "{what} did not finish within {} s and was stopped",
            timeout.as_secs()
        )),
    }
}

/// The last lines of a command's stderr, for a log line or a report.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
