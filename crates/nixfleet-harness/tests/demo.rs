//! `nixfleet demo`, run as a user runs it: to the end without interaction, on a
//! terminal, interrupted with Ctrl-C, without Nix, and a second time over an old
//! directory. It needs the workspace's binaries (`cargo build --workspace --bins`) and
//! real Nix.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod fleet;

use nixfleet_harness::bin;
use nixfleet_harness::terminal::{assert_columns, Tmux};

/// The CLI; the demo finds the control plane and the agent beside it.
fn nixfleet() -> PathBuf {
    bin("nixfleet-control-plane");
    bin("nixfleet-agent");
    bin("nixfleet")
}

fn require_nix() {
    assert!(
        nixfleet_harness::nix::nix_available(),
        "the demo tests need Nix (apt-get install -y nix-bin)"
    );
}

/// Runs the demo to its exit, killing it after `timeout`.
fn run_demo(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(nixfleet())
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "demo did not finish within {timeout:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// Processes still running whose command line names `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            let cmdline = std::fs::read(path.join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (state != "Z" && cmdline.contains(&needle)).then_some(cmdline)
        })
        .collect()
}

fn running(link: &Path) -> String {
    std::fs::read_link(link)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn demo_runs_to_the_end_without_interaction() {
    require_nix();
    let mut summary = fleet::Summary::begin("12 nixfleet demo --fast");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let start = Instant::now();
    let out = run_demo(
        &["--yes", "--fast", "--dir", dir.to_str().unwrap()],
        Duration::from_secs(150),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    summary.timing("whole demo", start.elapsed());

    // Both releases converged on every host that is not revoked; the revoked one stayed
    // on the first release.
    for host in ["edge-01", "edge-02", "web-01", "web-02", "db-01"] {
        let link = running(&dir.join("hosts").join(host).join("current-system"));
        assert!(
            link.starts_with("/nix/store/") && link.ends_with(&format!("nixos-system-{host}-2")),
            "{host} runs {link}"
        );
        let activations =
            std::fs::read_to_string(dir.join("hosts").join(host).join("activations")).unwrap();
        assert_eq!(activations.lines().count(), 2, "{host}: {activations}");
        // The summary is the last table.
        let row = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{host} ")))
            .unwrap_or_else(|| panic!("no summary row for {host}:\n{stdout}"));
        assert!(
            row.contains("release 2") && row.ends_with("converged"),
            "{row}"
        );
    }
    let lost = running(&dir.join("hosts/web-03/current-system"));
    assert!(
        lost.ends_with("nixos-system-web-03-1"),
        "web-03 runs {lost}"
    );
    assert!(stdout.contains("web-03 is still refused"), "{stdout}");
    let agent_log = std::fs::read_to_string(dir.join("hosts/web-03/agent.log")).unwrap();
    assert!(agent_log.contains("revoked or expired"), "{agent_log}");

    // The recovery time is measured and printed.
    let recovery = stdout
        .lines()
        .find(|l| l.contains("recovery time (every agent visible again)"))
        .unwrap_or_else(|| panic!("no recovery time:\n{stdout}"));
    let secs: f64 = recovery
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{recovery}"));
    assert!(secs > 0.0 && secs < 120.0, "{recovery}");
    summary.timing("recovery", Duration::from_secs_f64(secs));

    // The way to look at it, and nothing left running.
    assert!(
        stdout.contains(&format!(
            "export NIXFLEET_CONFIG={}/nixfleet.toml\n",
            dir.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains(" rollout trace stable@"), "{stdout}");
    assert!(dir.join("nixfleet.toml").exists());
    assert_eq!(processes_under(&dir), Vec::<String>::new());
}

/// Starts the demo (stdout to `log`) and returns once its agents run.
fn demo_with_agents_running(dir: &Path, log: &Path) -> std::process::Child {
    let mut child = Command::new(nixfleet())
        .args(["demo", "--yes", "--dir", dir.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("agents enrolled")
    {
        assert!(child.try_wait().unwrap().is_none(), "demo ended early");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agents never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn demo_is_stopped_cleanly_by_ctrl_c() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    // Interrupted while the first release rolls out (the canary soaks for a minute).
    let mut child = demo_with_agents_running(&dir, &tmp.path().join("out"));
    assert!(!processes_under(&dir).is_empty());
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "demo ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(processes_under(&dir), Vec::<String>::new());
}

#[test]
fn a_killed_demo_leaves_no_process_behind() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut child = demo_with_agents_running(&dir, &tmp.path().join("out"));
    // SIGKILL: no chance to clean up; the children go with it.
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    while !processes_under(&dir).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left behind: {:?}",
            processes_under(&dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_without_nix_says_so_and_shows_how_to_install_it() {
    let tmp = tempfile::tempdir().unwrap();
    let empty_path = tmp.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    let dir = tmp.path().join("demo");
    let out = Command::new(nixfleet())
        .args(["demo", "--yes", "--fast", "--dir", dir.to_str().unwrap()])
        .env("PATH", &empty_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Nix is not available"), "{stderr}");
    assert!(stderr.contains("never fakes"), "{stderr}");
    assert!(stderr.contains("nixfleet demo --install-hint"), "{stderr}");
    assert!(!dir.exists(), "nothing is created without Nix");

    let hint = Command::new(nixfleet())
        .args(["demo", "--install-hint"])
        .env("PATH", &empty_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&hint.stdout);
    assert!(hint.status.success(), "{text}");
    assert!(text.contains("apt-get install nix-bin"), "{text}");
    assert!(text.contains("https://nixos.org/nix/install"), "{text}");
}

#[test]
fn second_run_without_yes_off_a_terminal_refuses_and_touches_nothing() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join(".nixfleet-demo"), "made by `nixfleet demo`\n").unwrap();
    std::fs::write(dir.join("keys/ci-release.pem"), "kept").unwrap();
    let listing = |d: &Path| {
        let mut names: Vec<String> = walk(d);
        names.sort();
        names
    };
    let before = listing(&dir);
    let out = run_demo(&["--dir", dir.to_str().unwrap()], Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already exists") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert_eq!(listing(&dir), before);
    assert_eq!(
        std::fs::read_to_string(dir.join("keys/ci-release.pem")).unwrap(),
        "kept"
    );

    // A directory the demo did not make is never cleaned, even with --yes.
    let other = tmp.path().join("precious");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let out = run_demo(
        &["--yes", "--dir", other.to_str().unwrap()],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refusing to clean it"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(other.join("notes.txt")).unwrap(),
        "mine"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        out.push(path.display().to_string());
        if path.is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

#[test]
fn demo_on_a_terminal_is_aligned_fits_100_columns_and_asks_before_reusing() {
    require_nix();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let tmux = Tmux::new();
    // As a user who put the binaries on PATH runs it, from the directory it works in.
    let bin_dir = nixfleet().parent().unwrap().to_path_buf();
    let path = PathBuf::from(format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    ));
    let env = [("PATH", path.as_path())];
    let script = format!(
        "cd {} && nixfleet demo --yes --fast --dir demo",
        tmp.path().display()
    );
    let (plain, coloured) = tmux.run_sized("demo", &script, &env, 100, Duration::from_secs(150));
    assert!(plain.contains("__done__ 0"), "{plain}");
    assert!(coloured.contains("\x1b["), "no colour on a terminal");
    let lines: Vec<&str> = plain.lines().collect();
    for line in &lines {
        assert!(
            line.chars().count() <= 100,
            "wider than 100 columns: {line:?}"
        );
    }
    // Every table: the fleet tables (one per release, one after the wipe) and the summary.
    let hosts = ["edge-01", "edge-02", "web-01", "web-02", "db-01"];
    let mut tables = 0;
    for (i, header) in lines.iter().enumerate() {
        if !header.starts_with("HOST ") {
            continue;
        }
        tables += 1;
        let rows: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| !l.is_empty() && !l.contains("hosts:"))
            .filter(|l| hosts.iter().any(|h| l.starts_with(h)))
            .copied()
            .collect();
        assert!(rows.len() >= 5, "{header}: {rows:?}");
        assert_columns(&plain, header, &rows);
    }
    assert_eq!(tables, 4, "{plain}");
    assert!(plain.contains("recovery time"), "{plain}");
    assert!(
        plain.contains("\n  nixfleet status --host web-01\n"),
        "{plain}"
    );
    // A second run on a terminal asks; reusing keeps the keys and runs again.
    let key = std::fs::read(dir.join("keys/ci-release.pem")).unwrap();
    tmux.start("again", &script.replace(" --yes", ""), &env, 100);
    tmux.wait_for(
        "again",
        "[r]euse its keys, [c]lean it, or [q]uit?",
        Duration::from_secs(30),
    );
    tmux.send_keys("again", &["r", "Enter"]);
    let (again, _) = tmux.wait_done("again", Duration::from_secs(150));
    assert!(again.contains("__done__ 0"), "{again}");
    assert_eq!(std::fs::read(dir.join("keys/ci-release.pem")).unwrap(), key);

    // The terminal's own shell names the directory too; nothing else may.
    let left: Vec<String> = processes_under(&dir)
        .into_iter()
        .filter(|p| !p.contains("__done__"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
