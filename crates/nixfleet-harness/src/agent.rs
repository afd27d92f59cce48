//! Real `nixfleet-agent` processes for tests, with a host key made by `ssh-keygen`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet_trust::keys::PrivateKey;

use crate::nix::{Machine, NIX_CONFIG};
use crate::{bin, Host, Pki};

impl Host {
    /// A host whose key is a real OpenSSH host key made by `ssh-keygen` in `dir`
    /// (`dir/ssh_host_ed25519_key`).
    pub fn from_ssh_keygen(name: &str, dir: &Path) -> Host {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("ssh_host_ed25519_key");
        let out = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                &format!("root@{name}"),
                "-f",
            ])
            .arg(&path)
            .output()
            .expect("run ssh-keygen (apt-get install openssh-client)");
        assert!(
            out.status.success(),
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = PrivateKey::from_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
        Host {
            name: name.to_owned(),
            key,
            cert_pem: None,
        }
    }

    /// Mints a bootstrap token with the CLI and writes it to `path`.
    pub fn token_file(&self, pki: &Pki, path: &Path) {
        std::fs::write(path, self.token(pki, &[]).to_string()).unwrap();
    }
}

/// Everything an agent process is started with.
#[derive(Clone)]
pub struct AgentConfig {
    pub control_plane_url: String,
    pub hostname: String,
    pub trust_file: PathBuf,
    pub state_dir: PathBuf,
    pub host_key: PathBuf,
    pub ca_cert: PathBuf,
    pub bootstrap_token_file: Option<PathBuf>,
    pub profile: PathBuf,
    pub current_system_link: PathBuf,
    pub health_command: String,
    pub switch_lock: PathBuf,
    pub substituters: Vec<String>,
    pub poll_interval_secs: u64,
    pub extra: Vec<String>,
}

impl AgentConfig {
    /// An agent for `host` on `machine`, talking to the CP on `cp_port`; the host key is
    /// the one [`Host::from_ssh_keygen`] wrote in `key_dir`.
    pub fn new(
        pki: &Pki,
        cp_port: u16,
        host: &Host,
        key_dir: &Path,
        machine: &Machine,
        substituter: &str,
    ) -> AgentConfig {
        AgentConfig {
            control_plane_url: format!("https://localhost:{cp_port}"),
            hostname: host.name.clone(),
            trust_file: pki.path("etc/trust.json"),
            state_dir: machine.dir.join("agent-state"),
            host_key: key_dir.join("ssh_host_ed25519_key"),
            ca_cert: pki.path("etc/ca.pem"),
            bootstrap_token_file: Some(machine.dir.join("token.json")),
            profile: machine.profile(),
            current_system_link: machine.current_system_link(),
            health_command: machine.health_command(),
            switch_lock: machine.switch_lock(),
            substituters: vec![substituter.to_owned()],
            poll_interval_secs: 2,
            extra: Vec::new(),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("nixfleet-agent"));
        cmd.arg("--control-plane-url")
            .arg(&self.control_plane_url)
            .args(["--hostname", &self.hostname])
            .arg("--trust-file")
            .arg(&self.trust_file)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--host-key")
            .arg(&self.host_key)
            .arg("--ca-cert")
            .arg(&self.ca_cert)
            .arg("--profile")
            .arg(&self.profile)
            .arg("--current-system-link")
            .arg(&self.current_system_link)
            .args(["--health-command", &self.health_command])
            .arg("--switch-lock")
            .arg(&self.switch_lock)
            .args([
                "--poll-interval-secs",
                &self.poll_interval_secs.to_string(),
                "--request-timeout-secs",
                "3",
            ])
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("NIXFLEET_LOG", "info,nixfleet_agent=debug");
        if let Some(token) = &self.bootstrap_token_file {
            cmd.arg("--bootstrap-token-file").arg(token);
        }
        for s in &self.substituters {
            cmd.args(["--substituter", s]);
        }
        cmd.args(&self.extra);
        cmd
    }
}

/// An agent process; killed (SIGKILL) on drop. Its log accumulates across restarts.
pub struct AgentProc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub config: AgentConfig,
}

impl AgentProc {
    pub fn start(config: &AgentConfig) -> AgentProc {
        let log = config.state_dir.with_extension("log");
        let mut proc = AgentProc {
            child: None,
            log,
            config: config.clone(),
        };
        proc.restart();
        proc
    }

    /// Starts the agent again (after [`AgentProc::kill9`]), with the same flags.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent still running");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .config
            .command()
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log on timeout or exit.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "agent exited with {status} while waiting for {needle:?}:\n{}",
                        self.log_text()
                    );
                }
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {needle:?} in the agent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs to exit (for start-up refusals); returns the exit code and the log.
    pub fn run_to_exit(config: &AgentConfig, timeout: Duration) -> (i32, String) {
        let mut proc = AgentProc::start(config);
        let start = Instant::now();
        loop {
            let child = proc.child.as_mut().unwrap();
            if let Ok(Some(status)) = child.try_wait() {
                proc.child = None;
                return (status.code().unwrap_or(-1), proc.log_text());
            }
            assert!(
                start.elapsed() < timeout,
                "agent did not exit:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
