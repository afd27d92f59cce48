//! Running the real `nixfleet` binary in tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

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
