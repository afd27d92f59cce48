//! Child processes of the demo: each in its own process group, so that stopping one
//! also stops what it started (nix-store, health commands); killed when dropped, so that
//! an error or Ctrl-C leaves nothing running.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{interrupted, DemoError};

/// Sends `signal` to the process group `pgid`.
fn signal_group(pgid: u32, signal: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; a negative pid names a process group.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// A long-running child (the control plane, an agent) writing to a log file.
pub struct Proc {
    pub what: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Proc, DemoError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| DemoError::io("open", log, e))?;
        let err = file
            .try_clone()
            .map_err(|e| DemoError::io("open", log, e))?;
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of the parent. It
        // kills the child if the demo itself dies without a chance to clean up (SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| DemoError::Spawn {
                what: what.to_owned(),
                detail: e.to_string(),
            })?;
        Ok(Proc {
            what: what.to_owned(),
            log: log.to_path_buf(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error if the process has exited (it should be running).
    pub fn check_running(&mut self) -> Result<(), DemoError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(Some(status)) => Err(DemoError::Exited {
                what: self.what.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: tail(&self.log_text(), 15),
            }),
            _ => Ok(()),
        }
    }

    /// SIGTERM (what `systemctl stop` sends), then waits up to `timeout` for the exit;
    /// SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, DemoError> {
        let Some(mut child) = self.child.take() else {
            return Err(DemoError::Exited {
                what: self.what.clone(),
                status: "already stopped".into(),
                log: self.log.clone(),
                tail: String::new(),
            });
        };
        signal_group(child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                signal_group(child.id(), libc::SIGKILL);
                return Ok(status);
            }
            if start.elapsed() > timeout {
                signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                return Err(DemoError::Timeout {
                    what: format!("{} to exit after SIGTERM", self.what),
                    secs: timeout.as_secs(),
                    log: Some(self.log.clone()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a short command to completion within `timeout`; its stdout on success.
pub fn run(cmd: &mut Command, what: &str, timeout: Duration) -> Result<String, DemoError> {
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DemoError::Spawn {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    let pgid = child.id();
    // Read both pipes on threads so that a chatty command cannot block on a full pipe.
    let pipe = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                return Err(DemoError::Spawn {
                    what: what.to_owned(),
                    detail: e.to_string(),
                })
            }
        }
        if interrupted() || start.elapsed() > timeout {
            signal_group(pgid, libc::SIGKILL);
            let _ = child.wait();
            if interrupted() {
                return Err(DemoError::Interrupted);
            }
            return Err(DemoError::Timeout {
                what: what.to_owned(),
                secs: timeout.as_secs(),
                log: None,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(DemoError::Command {
            what: what.to_owned(),
            detail: format!("{status}: {}", tail(stderr.trim(), 10)),
        })
    }
}
