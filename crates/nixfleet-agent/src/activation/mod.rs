//! Activation backends (SPEC.md §7): nix-store --realise, a check that every path of the
//! closure carries a pinned cache key's signature ([`signatures`]), nix-env --profile …
//! --set, then the closure's own activation: switch-to-configuration (`nixos`) or
//! nix-darwin's `activate` (`darwin`). [`nixos`] is the code both share; [`darwin`] holds
//! what differs.

pub mod darwin;
pub mod nixos;
pub mod signatures;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Standard error kept of a command whose output is bounded; the rest is read and dropped.
const MAX_STDERR: usize = 64 * 1024;

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

/// Like [`run`], but reads at most `max_stdout` bytes of standard output: a command that
/// prints more is stopped and counts as failed. Standard error is cut at 64 KiB.
pub async fn run_bounded(
    command: &mut tokio::process::Command,
    timeout: Duration,
    what: &str,
    max_stdout: usize,
) -> Result<std::process::Output, String> {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e} (is it installed and on PATH?)"))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("cannot read the output of {what}"));
    };
    let outcome = async {
        let (stdout, stderr) = tokio::try_join!(
            read_at_most(stdout, max_stdout, what),
            read_cut(stderr, MAX_STDERR, what)
        )?;
        let status = child
            .wait()
            .await
            .map_err(|e| format!("{what} failed: {e}"))?;
        Ok(std::process::Output {
            status,
            stdout,
            stderr,
        })
    };
    // On an error or the timeout the child is dropped, which kills it.
    match tokio::time::timeout(timeout, outcome).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{what} did not finish within {} s and was stopped",
            timeout.as_secs()
        )),
    }
}

/// All of `reader`, or an error as soon as it has more than `limit` bytes.
async fn read_at_most(
    reader: impl AsyncRead + Unpin,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("cannot read the output of {what}: {e}"))?;
    if buf.len() > limit {
        return Err(format!(
            "{what} printed more than {limit} bytes and was stopped"
        ));
    }
    Ok(buf)
}

/// The first `limit` bytes of `reader`; the rest is read to the end and dropped.
pub(crate) async fn read_cut(
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX);
    let error = |e: std::io::Error| format!("cannot read the errors of {what}: {e}");
    (&mut reader)
        .take(cap)
        .read_to_end(&mut buf)
        .await
        .map_err(error)?;
    tokio::io::copy(&mut reader, &mut tokio::io::sink())
        .await
        .map_err(error)?;
    Ok(buf)
}

/// The last lines of a command's stderr, for a log line or a report.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[tokio::test]
    async fn bounded_run_returns_output_within_the_bound() {
        let out = run_bounded(
            &mut sh("printf abc; echo oops >&2; exit 3"),
            Duration::from_secs(10),
            "t",
            3,
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"abc");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[tokio::test]
    async fn bounded_run_stops_a_command_that_prints_too_much() {
        let start = std::time::Instant::now();
        let err = run_bounded(&mut sh("yes"), Duration::from_secs(20), "yes", 1 << 20)
            .await
            .unwrap_err();
        assert!(err.contains("more than 1048576 bytes"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn bounded_run_cuts_stderr_without_blocking_the_command() {
        let out = run_bounded(
            &mut sh("head -c 1000000 /dev/zero >&2; printf done"),
            Duration::from_secs(20),
            "t",
            100,
        )
        .await
        .unwrap();
        assert_eq!(out.stdout, b"done");
        assert_eq!(out.stderr.len(), MAX_STDERR);
    }

    #[tokio::test]
    async fn bounded_run_stops_a_command_at_the_timeout() {
        let err = run_bounded(&mut sh("sleep 30"), Duration::from_millis(300), "sleep", 10)
            .await
            .unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }
}
