//! docs/release.md and docs/ci.md against the binary: every flag of `nixfleet release`
//! (and `release check-fresh`) is documented, every flag the CI examples pass exists, each
//! stage's exit code is in the table, and the systemd units of the scheduled re-sign pass
//! `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join("docs").join(name)).unwrap()
}

/// The long flags `nixfleet ARGS --help` lists.
fn help_flags(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<', ',']).next())
        .filter(|f| !matches!(*f, "help" | "version"))
        .map(|f| format!("--{f}"))
        .collect()
}

#[test]
fn every_release_flag_is_documented_and_every_documented_one_exists() {
    let release = doc("release.md");
    let mut known = help_flags(&["release"]);
    known.extend(help_flags(&["release", "check-fresh"]));
    assert!(known.len() > 25, "{known:?}");
    for flag in &known {
        assert!(
            release.contains(&format!("`{flag}")) || release.contains(&format!(" {flag} ")),
            "nixfleet release {flag} is not in docs/release.md"
        );
    }
    // Every flag on a `nixfleet release` line of the CI examples is one the binary takes.
    let ci = doc("ci.md");
    let mut checked = 0;
    let mut in_release = false;
    for line in ci.lines() {
        if line.contains("nixfleet release") {
            in_release = true;
        }
        if in_release {
            for word in line.split_whitespace() {
                if let Some(flag) = word.strip_prefix("--").map(|f| format!("--{f}")) {
                    let flag = flag
                        .trim_end_matches(['"', ';', ')', '`', ',', ':'])
                        .to_owned();
                    assert!(
                        known.contains(&flag),
                        "docs/ci.md passes {flag}, which nixfleet release does not take: {line}"
                    );
                    checked += 1;
                }
            }
        }
        let continues = line.trim_end().ends_with('\\')
            || line.trim_end().ends_with("||")
            || (line.starts_with("    - nixfleet") || line.starts_with("        --"));
        if !continues {
            in_release = false;
        }
    }
    assert!(checked > 20, "only {checked} flags found in docs/ci.md");
}

#[test]
fn every_stage_exit_code_is_in_the_table() {
    let release = doc("release.md");
    for (stage, code) in [
        ("evaluate", 10),
        ("build", 11),
        ("compliance", 12),
        ("push", 13),
        ("sign", 14),
        ("publish", 15),
        ("verify", 16),
    ] {
        assert!(
            release.contains(&format!("| {stage} | {code} |")),
            "docs/release.md has no row for stage {stage} (exit {code})"
        );
    }
    assert!(release.contains("**20**"), "check-fresh's exit code");
    let ci = doc("ci.md");
    assert!(ci.contains("10 evaluate, 11 build, 12 compliance, 13 push"));
}

/// The ```ini blocks of docs/ci.md, in order.
fn ini_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start().starts_with("```")) {
            (None, true) if line.trim() == "```ini" => current = Some(String::new()),
            (Some(_), true) => blocks.extend(current.take()),
            (Some(body), false) => {
                body.push_str(line);
                body.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[test]
fn the_resign_timer_and_service_pass_systemd_analyze() {
    let blocks = ini_blocks(&doc("ci.md"));
    assert_eq!(blocks.len(), 2, "the service and the timer");
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_nixfleet");
    // As installed: the binary by its absolute path, the user a system user.
    let service = blocks[0]
        .replace("=nixfleet release", &format!("={exe} release"))
        .replace("'! nixfleet release", &format!("'! {exe} release"))
        .replace("User=nixfleet-ci\n", "");
    assert!(service.contains(exe), "the service runs nixfleet");
    std::fs::write(dir.path().join("nixfleet-resign.service"), &service).unwrap();
    std::fs::write(dir.path().join("nixfleet-resign.timer"), &blocks[1]).unwrap();
    for unit in ["nixfleet-resign.service", "nixfleet-resign.timer"] {
        let out = match Command::new("systemd-analyze")
            .args(["verify", "--man=no", unit])
            .current_dir(dir.path())
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("systemd-analyze is needed (apt-get install -y systemd): {e}"),
        };
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {said}\n{service}"
        );
    }
}
