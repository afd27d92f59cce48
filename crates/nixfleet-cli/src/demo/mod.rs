//! `nixfleet demo`: a complete local fleet under one directory. Trust roots and the fleet
//! CA, a forge and a signed Nix binary cache served on loopback, the real control plane
//! on SQLite, six real agents in two channels activating real Nix closures (whose
//! activation only repoints a link inside the demo directory), two signed releases rolled
//! out in canary and main waves, a host revoked by a signed list, and the
//! disaster-recovery runbook run against it all.

mod fleet;
pub mod nix;
mod process;
mod screen;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::operator::OperatorError;
use crate::CliError;

pub use fleet::run;

/// Set by Ctrl-C (SIGINT) or SIGTERM; every wait of the demo checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// What `nixfleet demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub dir: PathBuf,
    /// Clean an existing directory without asking.
    pub yes: bool,
    /// Every wait as short as it can be (no soak), for CI.
    pub fast: bool,
    /// Keep the fleet running after the demo until Ctrl-C.
    pub keep_running: bool,
}

/// How to install Nix, for `--install-hint`.
pub const INSTALL_HINT: &str = "\
nixfleet demo needs Nix: its agents fetch real closures from a signed binary cache and
activate them. Install it with one of:

  Debian or Ubuntu:     sudo apt-get install nix-bin
  Any Linux (official): sh <(curl -L https://nixos.org/nix/install) --daemon

Then check with `nix-store --version` and run `nixfleet demo` again. As root, Nix
runs without a daemon. As a normal user, the demo signs store paths and uses a binary
cache of its own, which Nix allows only to users it trusts: add your user to
`trusted-users` in /etc/nix/nix.conf and restart nix-daemon.
";

/// Every way the demo stops early, each with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("Nix is not available ({detail}). The demo activates real Nix closures and never fakes one; `nixfleet demo --install-hint` shows how to install Nix")]
    NoNix { detail: String },
    #[error("cannot find {name} next to {} or on PATH; build the binaries with `cargo build --release --workspace --bins`", next_to.display())]
    MissingBinary { name: String, next_to: PathBuf },
    #[error("{} already exists and stdin is not a terminal to ask whether to clean it; pass --yes to clean it, or --dir for another directory", dir.display())]
    DirExists { dir: PathBuf },
    #[error("{} is left as it is", dir.display())]
    Declined { dir: PathBuf },
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start {what}: {detail}")]
    Spawn { what: String, detail: String },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("timed out after {secs} s waiting for {what}{}", log.as_ref().map(|l| format!("; see {}", l.display())).unwrap_or_default())]
    Timeout {
        what: String,
        secs: u64,
        log: Option<PathBuf>,
    },
    #[error("{what} exited ({status}); its log is {}:\n{tail}", log.display())]
    Exited {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Cli(#[from] Box<CliError>),
    #[error(transparent)]
    Operator(#[from] OperatorError),
    #[error("interrupted; every process of the demo was stopped")]
    Interrupted,
}

impl DemoError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> DemoError {
        DemoError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<CliError> for DemoError {
    fn from(e: CliError) -> Self {
        DemoError::Cli(Box::new(e))
    }
}

/// Waits for a condition: `check` returns `Some` when it holds. Checked every `every`,
/// for at most `timeout`; Ctrl-C ends the wait.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<Option<T>, DemoError>,
) -> Result<T, DemoError> {
    let start = std::time::Instant::now();
    loop {
        if interrupted() {
            return Err(DemoError::Interrupted);
        }
        if let Some(v) = check()? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(DemoError::Timeout {
                what: what.to_owned(),
                secs: timeout.as_secs(),
                log: None,
            });
        }
        std::thread::sleep(every);
    }
}

/// `name` next to the running executable, else on PATH.
pub fn find_binary(name: &str) -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let beside = dir.join(name);
    if beside.is_file() {
        return Ok(beside);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            if d.join(name).is_file() {
                return Ok(d.join(name));
            }
        }
    }
    Err(DemoError::MissingBinary {
        name: name.to_owned(),
        next_to: dir,
    })
}
