//! `scripts/run-local`, the README's run command, on a machine without Nix: it checks
//! before building, asks before installing (or installs with `--yes`) and says what it
//! installed. Nix is hidden from it by a PATH that holds everything but `nix*`; `apt-get`
//! and `cargo` are stand-ins that record their arguments, so nothing is installed or
//! built. The stand-in `apt-get install` puts stand-in Nix commands on that PATH, and the
//! stand-in `cargo` fails, so the script stops before it would run the demo.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/run-local")
}

/// Exit code of the stand-in cargo: the script got as far as building.
const CARGO_EXIT: i32 = 42;

struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    /// A PATH directory with stand-in `apt-get` and `cargo` and, with `hide_nix`, links
    /// to every other command of this PATH except `nix*`.
    fn new(hide_nix: bool) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        let log = dir.path().join("calls.log");
        // What the stand-in `apt-get install` puts on PATH.
        let package = dir.path().join("nix-bin");
        std::fs::create_dir(&package).unwrap();
        for program in ["nix-store", "nix-build", "nix-env", "nix"] {
            write_exe(
                &package.join(program),
                "#!/bin/sh\necho 'nix (Nix) 2.8.0'\n",
            );
        }
        write_exe(
            &bin.join("apt-get"),
            &format!(
                "#!/bin/sh\necho \"apt-get $*\" >> '{}'\n[ \"$1\" = install ] || exit 0\ncp '{}'/* '{}'/\n",
                log.display(),
                package.display(),
                bin.display()
            ),
        );
        write_exe(
            &bin.join("cargo"),
            &format!(
                "#!/bin/sh\necho \"cargo $*\" >> '{}'\nexit {CARGO_EXIT}\n",
                log.display()
            ),
        );
        if hide_nix {
            let path = std::env::var_os("PATH").unwrap_or_default();
            for d in std::env::split_paths(&path) {
                let Ok(entries) = std::fs::read_dir(&d) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let target = bin.join(&name);
                    if name.to_string_lossy().starts_with("nix") || target.exists() {
                        continue;
                    }
                    let _ = std::os::unix::fs::symlink(entry.path(), &target);
                }
            }
        }
        Machine { dir }
    }

    fn path(&self) -> String {
        let bin = self.dir.path().join("bin").display().to_string();
        if self.dir.path().join("bin/bash").exists() {
            bin
        } else {
            format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PATH", self.path())
            .env("HOME", self.dir.path().join("home"))
            .env_remove("CARGO")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `scripts/run-local ARGS` with no terminal: stdin is /dev/null.
    fn run(&self, args: &[&str]) -> Output {
        self.command("bash")
            .arg(script())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `scripts/run-local` on a terminal (a pty from `script`), answering `answer`.
    fn run_on_a_terminal(&self, answer: &str) -> Output {
        let mut child = self
            .command("script")
            .args([
                "-qefc",
                &format!("bash {}", script().display()),
                "/dev/null",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(answer.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn write_exe(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_stand_in_path_hides_nix() {
    let m = Machine::new(true);
    let out = m
        .command("bash")
        .args(["-c", "command -v nix-store || echo hidden; command -v cc"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.starts_with("hidden\n"), "{out}");
}

#[test]
fn without_nix_and_without_yes_or_a_terminal_it_stops_before_building_and_names_the_install_command(
) {
    let m = Machine::new(true);
    let out = m.run(&["--fast"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert_ne!(out.status.code(), Some(CARGO_EXIT), "{said}");
    assert!(said.contains("apt-get install -y nix-bin"), "{said}");
    assert!(said.contains("--yes"), "{said}");
    assert_eq!(
        m.calls(),
        Vec::<String>::new(),
        "nothing installed or built"
    );
}

#[test]
fn without_nix_and_with_yes_it_installs_nix_bin_says_so_then_builds() {
    let m = Machine::new(true);
    let out = m.run(&["--yes", "--fast"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(CARGO_EXIT), "{said}");
    let calls = m.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[0].starts_with("apt-get update"), "{calls:?}");
    assert!(
        calls[1].starts_with("apt-get install -y") && calls[1].ends_with(" nix-bin"),
        "{calls:?}"
    );
    assert!(calls[2].starts_with("cargo build"), "{calls:?}");
    assert!(said.contains("installed nix-bin"), "{said}");
}

#[test]
fn without_nix_on_a_terminal_it_asks_first() {
    let m = Machine::new(true);
    let out = m.run_on_a_terminal("n\n");
    let said = text(&out);
    assert!(said.contains("Install now with"), "{said}");
    assert!(said.contains("nothing installed"), "{said}");
    assert_eq!(
        m.calls(),
        Vec::<String>::new(),
        "nothing installed or built"
    );

    let m = Machine::new(true);
    let out = m.run_on_a_terminal("y\n");
    let said = text(&out);
    let calls = m.calls();
    assert_eq!(calls.len(), 3, "{said}\n{calls:?}");
    assert!(calls[1].starts_with("apt-get install -y"), "{calls:?}");
    assert!(calls[2].starts_with("cargo build"), "{calls:?}");
}

#[test]
fn with_nix_it_installs_nothing_and_builds() {
    if Command::new("nix-store").arg("--version").output().is_err() {
        eprintln!("skipped: Nix is not installed here");
        return;
    }
    let m = Machine::new(false);
    let out = m.run(&["--fast"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(CARGO_EXIT), "{said}");
    let calls = m.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].starts_with("cargo build"), "{calls:?}");
}
