//! Running external commands (nix, git, push and sign hooks) with a timeout and bounded
//! output: a hung build must not hang CI, and a chatty one must not exhaust memory.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// At most this much of a command's standard output is kept (nix eval of a large fleet).
pub const STDOUT_LIMIT: usize = 64 << 20;
/// The last this-many bytes of standard error are kept, to quote in an error.
pub const STDERR_TAIL: usize = 16 << 10;

/// What a finished command left.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    /// `exit status 1`, `killed by signal 9`, …
    pub status: String,
    pub stdout: Vec<u8>,
    /// Whether stdout went over [`STDOUT_LIMIT`] (the rest was read and dropped).
    pub stdout_truncated: bool,
    pub stderr_tail: String,
}

impl Output {
    /// The last few lines of stderr, for a one-sentence error.
    pub fn last_lines(&self, n: usize) -> String {
        let lines: Vec<&str> = self
            .stderr_tail
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
        if tail.is_empty() {
            "no output on stderr".to_owned()
        } else {
            tail
        }
    }
}

/// Why a command did not produce an [`Output`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {secs} s and was killed (raise the timeout if it is legitimately slow){}", tail_suffix(.stderr_tail))]
    Timeout {
        program: String,
        secs: u64,
        stderr_tail: String,
    },
    #[error("waiting for {program} failed: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

fn tail_suffix(tail: &str) -> String {
    let last = tail.lines().rev().find(|l| !l.trim().is_empty());
    last.map(|l| format!("; it last said: {}", l.trim()))
        .unwrap_or_default()
}

fn reader(
    mut source: impl Read + Send + 'static,
    keep_head: usize,
    keep_tail: usize,
) -> JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buf = [0u8; 8192];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = &buf[..n];
                    if keep_tail > 0 {
                        kept.extend_from_slice(chunk);
                        if kept.len() > keep_tail * 2 {
                            let cut = kept.len() - keep_tail;
                            kept.drain(..cut);
                        }
                    } else if kept.len() + n <= keep_head {
                        kept.extend_from_slice(chunk);
                    } else {
                        let room = keep_head.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..room]);
                        truncated = true;
                    }
                }
            }
        }
        if keep_tail > 0 && kept.len() > keep_tail {
            let cut = kept.len() - keep_tail;
            kept.drain(..cut);
        }
        (kept, truncated)
    })
}

/// Runs `cmd` (its stdin closed) in a process group of its own, killing the whole group
/// when it runs longer than `timeout`, and what is left of the group when it exits.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Output, RunError> {
    use std::os::unix::process::CommandExt as _;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = child.stdout.take().map(|s| reader(s, STDOUT_LIMIT, 0));
    let stderr = child.stderr.take().map(|s| reader(s, 0, STDERR_TAIL));
    let started = Instant::now();
    let pid = child.id();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > timeout => break Err(None),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(Some(e)),
        }
    };
    // On a timeout the command, and in every case whatever it left running in its
    // group (a background job holding the pipes open would block the readers forever).
    kill_group(pid);
    if status.is_err() {
        let _ = child.wait();
    }
    let (stdout, stdout_truncated) = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
    let (stderr, _) = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr_tail = String::from_utf8_lossy(&stderr).into_owned();
    match status {
        Ok(status) => Ok(Output {
            success: status.success(),
            status: status.to_string(),
            stdout,
            stdout_truncated,
            stderr_tail,
        }),
        Err(None) => Err(RunError::Timeout {
            program,
            secs: timeout.as_secs(),
            stderr_tail,
        }),
        Err(Some(source)) => Err(RunError::Wait { program, source }),
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals the process group the child leads
        // (it was started with process_group(0)); no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded_and_timeouts_kill() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run(cmd, Duration::from_secs(10)).unwrap();
        assert!(!out.success);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.last_lines(3), "err");

        // A background job that keeps the pipes open does not hang the caller either.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & echo done"]);
        let started = Instant::now();
        let out = run(cmd, Duration::from_secs(10)).unwrap();
        assert!(out.success && started.elapsed() < Duration::from_secs(10));
        assert_eq!(out.stdout, b"done\n");

        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo started >&2; sleep 30"]);
        let started = Instant::now();
        let err = run(cmd, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("started"), "{err}");
    }
}
