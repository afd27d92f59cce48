//! Commands run on a real terminal (tmux), captured as a user sees them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server on its own socket, killed on drop.
pub struct Tmux {
    socket: String,
}

impl Default for Tmux {
    fn default() -> Self {
        Tmux::new()
    }
}

impl Tmux {
    pub fn new() -> Tmux {
        Tmux {
            socket: format!(
                "nixfleet-test-{}-{}",
                std::process::id(),
                crate::free_port()
            ),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]);
        cmd
    }

    /// Runs `script` in an 80×50 terminal; see [`Tmux::run_sized`].
    pub fn run(&self, session: &str, script: &str, env: &[(&str, &Path)]) -> (String, String) {
        self.run_sized(session, script, env, 80, Duration::from_secs(30))
    }

    /// Runs `script` in a terminal `columns` wide and returns everything it printed
    /// (scrollback included) once it is done: (plain text with wrapped lines joined, text
    /// with colour escapes). The last line is `__done__ <exit status>`.
    pub fn run_sized(
        &self,
        session: &str,
        script: &str,
        env: &[(&str, &Path)],
        columns: u16,
        timeout: Duration,
    ) -> (String, String) {
        self.start(session, script, env, columns);
        self.wait_done(session, timeout)
    }

    /// Starts `script` in a new terminal `columns` wide, without waiting.
    pub fn start(&self, session: &str, script: &str, env: &[(&str, &Path)], columns: u16) {
        let mut cmd = self.cmd();
        cmd.args(["new-session", "-d", "-x", &columns.to_string(), "-y", "50"])
            .args(["-s", session])
            .env_remove("NO_COLOR")
            .env("TERM", "xterm-256color");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let status = cmd
            .arg(format!("{script}; echo __done__ $?; sleep 600"))
            .status()
            .expect("run tmux");
        assert!(status.success(), "tmux new-session");
    }

    /// Everything the terminal shows and showed, plain (`colour`: with escapes).
    pub fn capture(&self, session: &str, colour: bool) -> String {
        let mut cmd = self.cmd();
        cmd.args([
            "capture-pane",
            "-p",
            "-J",
            "-S",
            "-",
            "-E",
            "-",
            "-t",
            session,
        ]);
        if colour {
            cmd.arg("-e");
        }
        let out = cmd.output().expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the terminal shows `needle`; returns the plain text.
    pub fn wait_for(&self, session: &str, needle: &str, timeout: Duration) -> String {
        self.wait_until(session, timeout, |plain| plain.contains(needle))
    }

    fn wait_until(&self, session: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let plain = self.capture(session, false);
            if done(&plain) {
                return plain;
            }
            assert!(
                start.elapsed() < timeout,
                "{session}: not done within {timeout:?}:\n{plain}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Types `keys` (tmux key names, e.g. `Enter`).
    pub fn send_keys(&self, session: &str, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", session])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success(), "tmux send-keys");
    }

    /// Waits until the script of [`Tmux::start`] is done; see [`Tmux::run_sized`].
    pub fn wait_done(&self, session: &str, timeout: Duration) -> (String, String) {
        let plain = self.wait_until(session, timeout, |plain| {
            plain.lines().any(|l| l.starts_with("__done__ "))
        });
        (plain, self.capture(session, true))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// Column starts of the first line starting with `header_start`: each is preceded by two
/// spaces in the first line starting with each of `rows`.
pub fn assert_aligned(screen: &str, header_start: &str, rows: &[&str]) {
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.starts_with(header_start))
        .unwrap_or_else(|| panic!("no header {header_start:?}:\n{screen}"));
    let rows: Vec<&str> = rows
        .iter()
        .map(|start| {
            *lines
                .iter()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no row {start:?}:\n{screen}"))
        })
        .collect();
    assert_columns(screen, header, &rows);
}

/// Each column start of `header` is preceded by two spaces in every row.
pub fn assert_columns(screen: &str, header: &str, rows: &[&str]) {
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && i >= 2 && &header[i - 2..i] == "  ")
        .map(|(i, _)| i)
        .collect();
    assert!(!starts.is_empty(), "{header}");
    for row in rows {
        let chars: Vec<char> = row.chars().collect();
        for &s in &starts {
            assert!(
                chars.get(s).is_some_and(|c| *c != ' ')
                    && chars[s - 1] == ' '
                    && chars[s - 2] == ' ',
                "column at {s} misaligned in {row:?} under {header:?}:\n{screen}"
            );
        }
    }
}
