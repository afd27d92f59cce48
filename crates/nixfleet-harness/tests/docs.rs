//! Every shell block in `docs/*.md` whose info string is `sh tested` runs here. The
//! tested blocks of one page run in order as one bash script (`set -euo pipefail`), in a
//! scratch directory holding a copy of `examples/`, with the workspace's binaries first
//! on PATH, HOME pointing into the scratch directory, `PORT` set to a free port, and
//! `NIX_CONFIG` set for Nix as root without a daemon and without substituters (there is
//! no network). A page whose blocks continue another page's (see [`CONTINUES`]) runs
//! after that page's blocks, in the same script.
//! Blocks marked plain `sh` are shown to readers but not run (they need root, systemd
//! or a real fleet).
//! `set -e` does not stop at a negated command (`! cmd`): a block that shows a refusal
//! checks it with `if cmd; then false; fi`.
//! HOME holds a config file of the reader's own (`~/.config/nixfleet/config.toml`): a page
//! must leave it as it is, writing its own config next to its files instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet_harness::{bin, free_port};

/// The info string that marks a block as run by this test.
const MARKER: &str = "sh tested";
const PAGE_TIMEOUT: Duration = Duration::from_secs(180);

/// (page, the page it continues, the heading before which that page's blocks stop): the
/// page's tested blocks run after those of the other page up to that heading, in the same
/// script and directory, with its variables and background jobs.
const CONTINUES: &[(&str, &str, &str)] = &[(
    "docs/disaster-recovery.md",
    "docs/quickstart.md",
    "## 5. Stop",
)];

/// What a reader's own operator config holds before a page runs; no page may change it.
const READERS_CONFIG: &str =
    "# The reader's own config: no page may change it.\nurl = \"https://reader.invalid:8443\"\n";

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

/// One tested block: its page (relative to the repository), the line of its opening
/// fence, its body.
#[derive(Debug, Clone)]
struct Block {
    page: PathBuf,
    line: usize,
    body: String,
}

/// What runs for `page` (relative to the repository, e.g. `docs/quickstart.md`): the
/// blocks of the page it continues, if any, then its own.
fn page_blocks(page: &str) -> Vec<Block> {
    let read = |page: &str| std::fs::read_to_string(repo().join(page)).unwrap();
    let blocks = |page: &str, text: &str| -> Vec<Block> {
        tested_blocks(text)
            .into_iter()
            .map(|(line, body)| Block {
                page: PathBuf::from(page),
                line,
                body,
            })
            .collect()
    };
    let mut all = Vec::new();
    for (continuing, first, until) in CONTINUES {
        if *continuing == page {
            let text = read(first);
            let stop = text
                .lines()
                .position(|l| l.trim_end() == *until)
                .unwrap_or_else(|| {
                    panic!("{first} has no heading {until:?}, which {page} continues before")
                });
            all.extend(blocks(first, &text).into_iter().filter(|b| b.line <= stop));
        }
    }
    all.extend(blocks(page, &read(page)));
    all
}

/// Runs one page's script; returns a failure description, if any.
fn run_page(page: &Path, blocks: &[(usize, String)]) -> Option<String> {
    let blocks: Vec<Block> = blocks
        .iter()
        .map(|(line, body)| Block {
            page: page.to_path_buf(),
            line: *line,
            body: body.clone(),
        })
        .collect();
    run_blocks(&blocks).0
}

/// Runs blocks as one script; returns a failure description, if any, and the scratch
/// directory they ran in.
fn run_blocks(blocks: &[Block]) -> (Option<String>, tempfile::TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("examples"), &scratch.path().join("examples"));
    let home = scratch.path().join("home");
    let readers_config = home.join(".config/nixfleet/config.toml");
    std::fs::create_dir_all(readers_config.parent().unwrap()).unwrap();
    std::fs::write(&readers_config, READERS_CONFIG).unwrap();
    let mut script = String::from(
        "set -euo pipefail\n# Background jobs a page starts end with it.\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n",
    );
    for Block { page, line, body } in blocks {
        script.push_str(&format!("echo '>>> {}:{line}' >&2\n{body}", page.display()));
    }
    let page = blocks
        .last()
        .map(|b| b.page.clone())
        .unwrap_or_else(|| PathBuf::from("(no block)"));
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
        .env(
            "NIX_CONFIG",
            format!("{}\nsubstituters =", nixfleet_harness::nix::NIX_CONFIG),
        )
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
    let failure = match status {
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
    };
    let failure = failure.or_else(|| {
        let now = std::fs::read_to_string(&readers_config).unwrap_or_default();
        (now != READERS_CONFIG).then(|| {
            format!(
                "{}: the tested blocks changed the reader's own ~/.config/nixfleet/config.toml \
                 (write the page's config next to its files and point NIXFLEET_CONFIG at it); \
                 it holds:\n{now}",
                page.display()
            )
        })
    });
    (failure, scratch)
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
        if tested_blocks(&text).is_empty() {
            continue;
        }
        let relative = page.strip_prefix(repo()).unwrap_or(page);
        let blocks = page_blocks(&relative.display().to_string());
        ran += blocks.len();
        if let (Some(failure), _) = run_blocks(&blocks) {
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
        &["nixfleet", "compliance", "report"],
        &["nixfleet", "compliance", "evidence"],
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

/// Runs `page` (with the page it continues) and fails with its output if it fails.
fn run_docs_page(page: &str) -> tempfile::TempDir {
    let blocks = page_blocks(page);
    assert!(
        blocks.iter().any(|b| b.page == Path::new(page)),
        "{page} has no `{MARKER}` block"
    );
    let (failure, scratch) = run_blocks(&blocks);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
    scratch
}

/// The text of `page`'s own tested blocks.
fn tested_text(page: &str) -> String {
    let text = std::fs::read_to_string(repo().join(page)).unwrap();
    tested_blocks(&text)
        .into_iter()
        .map(|(_, body)| body)
        .collect()
}

/// `name:base64` of a 32-byte ed25519 key, as `nix-store --generate-binary-cache-key`
/// writes a public key.
fn is_cache_key(key: &str) -> bool {
    use base64::Engine as _;
    key.split_once(':').is_some_and(|(name, key)| {
        !name.is_empty()
            && base64::engine::general_purpose::STANDARD
                .decode(key)
                .is_ok_and(|k| k.len() == 32)
    })
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_quickstart_leaves_the_readers_config_alone_and_its_trust_file_can_serve_an_agent() {
    // run_blocks fails the page if the reader's own config changed.
    let scratch = run_docs_page("docs/quickstart.md");
    let trust = json(&scratch.path().join("quickstart/trust.json"));
    let keys = trust["cacheKeys"].as_array().cloned().unwrap_or_default();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k.as_str().is_some_and(is_cache_key)),
        "the quickstart's trust.json pins no binary-cache key, so no agent can verify a closure with it: {trust}"
    );
}

#[test]
fn release_md_signs_a_closure_into_a_binary_cache_end_to_end() {
    let page = "docs/release.md";
    let text = tested_text(page);
    for command in [
        "nix-store --generate-binary-cache-key",
        "nix store sign --key-file",
        "--recursive",
        "nix copy --to \"file://",
        "nixfleet trust init",
        "--cache-key",
        "--option require-sigs true",
    ] {
        assert!(
            text.contains(command),
            "{page}'s tested blocks do not show `{command}`"
        );
    }
    let scratch = run_docs_page(page);
    let dir = scratch.path();
    // The pinned key is the cache's, and every path in the cache carries its signature.
    let public = std::fs::read_to_string(dir.join("cache.pub")).unwrap();
    let trust = json(&dir.join("trust.json"));
    assert_eq!(trust["cacheKeys"], serde_json::json!([public.trim()]));
    let name = public.split(':').next().unwrap();
    let narinfos: Vec<String> = std::fs::read_dir(dir.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        narinfos.len() >= 2,
        "the closure and its dependency: {narinfos:?}"
    );
    for info in &narinfos {
        assert!(
            info.lines()
                .any(|l| l.starts_with(&format!("Sig: {name}:"))),
            "a path in the cache is not signed by the cache key:\n{info}"
        );
    }
}

#[test]
fn disaster_recovery_runs_without_systemd_against_the_quickstart_control_plane() {
    let page = "docs/disaster-recovery.md";
    let text = tested_text(page);
    for command in [
        "kill -TERM \"$cp_pid\"",
        "rm -rf state.db state.db-wal state.db-shm",
        "nixfleet-control-plane ",
        "nixfleet status --json | jq '.fleet_signed_at'",
    ] {
        assert!(
            text.contains(command),
            "{page}'s tested blocks do not show `{command}`"
        );
    }
    let scratch = run_docs_page(page);
    // The control plane was wiped and started again: a fresh database and log.
    let log = std::fs::read_to_string(
        scratch
            .path()
            .join("quickstart/control-plane-after-wipe.log"),
    )
    .unwrap();
    assert!(!log.is_empty());
}

/// The seed runbook's commands that docs/disaster-recovery.md carries word for word.
const SEED_RUNBOOK_LINES: &[&str] = &[
    "systemctl stop nixfleet-control-plane.service",
    "rm -rf /var/lib/nixfleet-cp/state.db \\",
    "       /var/lib/nixfleet-cp/state.db-wal \\",
    "       /var/lib/nixfleet-cp/state.db-shm",
    "systemctl start nixfleet-control-plane.service",
    "curl -sk https://localhost:8443/healthz | jq '.last_tick_at != null'",
    "  https://localhost:8443/v1/channels/stable | jq '.signed_at'",
];

#[test]
fn disaster_recovery_keeps_the_seed_runbooks_lines_as_they_are() {
    let doc = std::fs::read_to_string(repo().join("docs/disaster-recovery.md")).unwrap();
    for line in SEED_RUNBOOK_LINES {
        assert!(
            doc.lines().any(|l| l == *line),
            "docs/disaster-recovery.md no longer has the runbook's line {line:?}"
        );
    }
    assert!(doc.contains("journalctl -u nixfleet-control-plane.service | grep channel-refs"));
    // Each mTLS curl with placeholders has the nixfleet command next to it.
    let lines: Vec<&str> = doc.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("curl ") && line.contains("<OPERATOR_CERT>") {
            let next: String = lines[i + 1..(i + 5).min(lines.len())].join("\n");
            assert!(
                next.contains("nixfleet status"),
                "no nixfleet command next to line {}: {line}",
                i + 1
            );
        }
    }
}

/// Commands in `text`, with `\`-continued lines joined.
fn commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn no_doc_writes_a_bootstrap_token_through_a_redirect() {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.push(repo().join("README.md"));
    let mut with_out = 0;
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        for command in commands(&text) {
            let Some(at) = command.find("nixfleet mint-token ") else {
                continue;
            };
            let command = &command[at..];
            assert!(
                !command.contains('>'),
                "{}: a bootstrap token is a secret; `{command}` redirects it into a file of the umask's mode instead of `--out FILE` (0600)",
                page.display()
            );
            with_out += usize::from(command.contains("--out "));
        }
    }
    assert!(with_out > 0, "no doc shows `nixfleet mint-token --out`");
}
