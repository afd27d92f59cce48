//! Running the real `nixfleet` binary in tests.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub fn nixfleet(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run nixfleet")
}

/// Runs `nixfleet`, asserting success.
pub fn succeeds(dir: &Path, args: &[&str]) -> Output {
    let out = nixfleet(dir, args);
    assert!(
        out.status.success(),
        "nixfleet {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `nixfleet`, asserting success; returns stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(succeeds(dir, args).stdout).unwrap()
}

/// Runs `nixfleet`, asserting failure; returns stderr.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = nixfleet(dir, args);
    assert!(!out.status.success(), "nixfleet {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// Nix as root without a daemon, sandbox or build users, on the dummy store: evaluating
/// writes nothing under /nix.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nstore = dummy://";
pub const NIX_TIMEOUT: Duration = Duration::from_secs(120);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// What one `nix-instantiate` run gave.
pub struct Nix {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `nix-instantiate` from the repository root with a throwaway HOME and XDG
/// directories, and a time limit.
pub fn nix_instantiate<S: AsRef<OsStr>>(args: &[S]) -> Nix {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new("nix-instantiate");
    command
        .args(args)
        .current_dir(repo())
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("HOME", home.path())
        .env("XDG_CACHE_HOME", home.path().join("cache"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("XDG_DATA_HOME", home.path().join("data"))
        .env("XDG_STATE_HOME", home.path().join("state"))
        .env_remove("NIX_PATH")
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "nix-instantiate is not installed; the Nix tests need it: \
             apt-get install -y nix-bin"
        ),
        Err(e) => panic!("cannot run nix-instantiate: {e}"),
    };
    // Read both pipes while waiting, so a long error trace cannot fill one and stall.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).map(|_| text)
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + NIX_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            panic!("nix-instantiate {shown:?} took longer than {NIX_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Nix {
        success: status.success(),
        stdout: stdout.join().unwrap().unwrap(),
        stderr: stderr.join().unwrap().unwrap(),
    }
}
