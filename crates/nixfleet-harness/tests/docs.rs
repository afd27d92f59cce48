//! Every shell block in `docs/*.md` whose info string is `sh tested` runs here. The
//! tested blocks of one page run in order as one bash script (`set -euo pipefail`), in a
//! scratch directory holding a copy of `examples/`, with the workspace's binaries first
//! on PATH, HOME pointing into the scratch directory, and `PORT` set to a free port.
//! Blocks marked plain `sh` are shown to readers but not run (they need root, systemd
//! or a real fleet).
//! `set -e` does not stop at a negated command (`! cmd`): a block that shows a refusal
//! checks it with `if cmd; then false; fi`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet_harness::{bin, free_port};

/// The info string that marks a block as run by this test.
const MARKER: &str = "sh tested";
const PAGE_TIMEOUT: Duration = Duration::from_secs(180);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tested blocks of a page: (line of the opening fence, body).
fn tested_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, bool, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut current, fence) {
            (None, true) => {
                let info = line.trim_start().trim_start_matches('`').trim();
                current = Some((i + 1, info == MARKER, String::new()));
            }
            (Some(_), true) => {
                if let Some((start, true, body)) = current.take() {
                    blocks.push((start, body));
                }
            }
            (Some((_, _, body)), false) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, false) => {}
        }
    }
    blocks
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs one page's script; returns a failure description, if any.
fn run_page(page: &Path, blocks: &[(usize, String)]) -> Option<String> {
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), &scratch.path().join("examples"));
    let home = scratch.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut script = String::from(
        "set -euo pipefail\n# Background jobs a page starts end with it.\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n",
    );
    for (line, body) in blocks {
        script.push_str(&format!("echo '>>> {}:{line}' >&2\n{body}", page.display()));
    }
    let bin_dir = bin("nixfleet").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = scratch.path().join("output.log");
    let out = std::fs::File::create(&log).unwrap();
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(scratch.path())
        .env("PATH", path)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("PORT", free_port().to_string())
        .env_remove("NO_COLOR")
        .env_remove("NIXFLEET_URL")
        .env_remove("NIXFLEET_CONFIG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own process group, so that whatever it leaves behind can be ended.
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > PAGE_TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = output.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    match status {
        Some(s) if s.success() => None,
        Some(s) => Some(format!(
            "{}: the tested blocks exited with {s}; last output:\n{}",
            page.display(),
            tail.join("\n")
        )),
        None => Some(format!(
            "{}: the tested blocks ran longer than {} s; last output:\n{}",
            page.display(),
            PAGE_TIMEOUT.as_secs(),
            tail.join("\n")
        )),
    }
}

#[test]
fn tested_shell_blocks_in_the_docs_run() {
    let docs = repo().join("docs");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    let mut ran = 0;
    let mut failures = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let blocks = tested_blocks(&text);
        if blocks.is_empty() {
            continue;
        }
        ran += blocks.len();
        let relative = page.strip_prefix(repo()).unwrap_or(page);
        if let Some(failure) = run_page(relative, &blocks) {
            failures.push(failure);
        }
    }
    assert!(ran > 0, "no `{MARKER}` block found under docs/");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_marker_is_found_and_other_blocks_are_left_alone() {
    let page = "text\n```sh tested\necho one\n```\n```sh\necho two\n```\n```\nplain\n```\n```sh tested\necho three\n```\n";
    let blocks = tested_blocks(page);
    assert_eq!(
        blocks,
        [
            (2, "echo one\n".to_owned()),
            (11, "echo three\n".to_owned())
        ]
    );
}

#[test]
fn a_failing_block_fails_its_page() {
    let failure = run_page(
        Path::new("docs/example.md"),
        &[(3, "echo fine\n".to_owned()), (7, "false\n".to_owned())],
    )
    .expect("a failing block is reported");
    assert!(failure.contains("docs/example.md:7"), "{failure}");
}

/// The `--flags` a command's `--help` lists (clap's definitions are the source).
fn help_flags(args: &[&str]) -> Vec<String> {
    let out = Command::new(bin(args[0]))
        .args(&args[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags: Vec<String> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<', ',']).next())
        .filter(|f| !matches!(*f, "help" | "version"))
        .map(|f| format!("--{f}"))
        .collect();
    flags.dedup();
    flags
}

#[test]
fn every_operator_flag_is_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/operator-cli.md")).unwrap();
    let mut checked = 0;
    for command in [
        &["nixfleet", "status"][..],
        &["nixfleet", "rollout", "list"],
        &["nixfleet", "rollout", "trace"],
    ] {
        for flag in help_flags(command) {
            assert!(
                doc.contains(&format!("`{flag}")),
                "{command:?} {flag} is not in docs/operator-cli.md"
            );
            checked += 1;
        }
    }
    for flag in help_flags(&["nixfleet-control-plane"])
        .into_iter()
        .filter(|f| f.starts_with("--event-hook"))
    {
        assert!(
            doc.contains(&format!("`{flag}")),
            "{flag} is not documented"
        );
        checked += 1;
    }
    assert!(checked >= 10, "too few flags found in --help");
}

#[test]
fn every_demo_flag_is_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/quickstart.md")).unwrap();
    let flags = help_flags(&["nixfleet", "demo"]);
    assert!(flags.len() >= 5, "{flags:?}");
    for flag in flags {
        assert!(
            doc.contains(&format!("`{flag}")),
            "nixfleet demo {flag} is not in docs/quickstart.md"
        );
    }
}
