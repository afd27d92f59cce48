//! HAProxy in front of control-plane replicas, as a deployment runs it: TCP mode, so the
//! agents' mTLS goes through to the replica untouched.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `haproxy` process; killed on drop.
pub struct Haproxy {
    pub port: u16,
    /// The `maxconn` written, lower than the documented 20000 under a low descriptor limit.
    pub maxconn: u64,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// How HAProxy decides that a backend is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The control plane's `/healthz` over TLS says `ok` (as documented for replicas).
    Healthz,
    /// The port accepts TCP (for plain test servers).
    Tcp,
}

impl Haproxy {
    /// Starts HAProxy on a free loopback port, round-robin over the replicas listening on
    /// `backends` (loopback ports), checked by their `/healthz`; returns once the frontend
    /// accepts connections.
    pub fn start(dir: &Path, backends: &[u16]) -> Haproxy {
        Haproxy::start_with(dir, backends, Check::Healthz)
    }

    /// As [`Haproxy::start`], with the given health check.
    pub fn start_with(dir: &Path, backends: &[u16], check: Check) -> Haproxy {
        std::fs::create_dir_all(dir).expect("haproxy: create its directory");
        let port = crate::free_port();
        let maxconn = maxconn();
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, render(port, backends, maxconn, check))
            .expect("haproxy: write haproxy.cfg");
        let log = dir.join("haproxy.log");
        let file = std::fs::File::create(&log).expect("haproxy: create haproxy.log");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("haproxy: log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run haproxy ({e}); apt-get install -y haproxy"));
        let mut haproxy = Haproxy {
            port,
            maxconn,
            config,
            log,
            child: Some(child),
        };
        haproxy.wait_listening();
        haproxy
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("haproxy exited with {status}:\n{}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "haproxy not listening on {} after 10 s:\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The configuration `start` writes: one TCP frontend, one round-robin backend with a
    /// health check on each replica.
    pub fn config_text(frontend_port: u16, backends: &[u16]) -> String {
        render(frontend_port, backends, MAXCONN, Check::Healthz)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

const MAXCONN: u64 = 20000;

/// HAProxy refuses to start when it cannot get two descriptors per connection, and a
/// container's hard limit may be lower than that: there, fewer connections.
fn maxconn() -> u64 {
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(4)?.parse::<u64>().ok()
        });
    match hard {
        // Headroom for listeners, health checks and HAProxy's own descriptors.
        Some(hard) => MAXCONN.min(hard.saturating_sub(200) / 2).max(100),
        None => MAXCONN,
    }
}

fn render(frontend_port: u16, backends: &[u16], maxconn: u64, check: Check) -> String {
    // Not `daemon`: the process stays in the foreground so the test owns it.
    let mut cfg = format!(
        "global
    maxconn {maxconn}
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s

frontend nixfleet
    bind 127.0.0.1:{frontend_port}
    default_backend control_planes

backend control_planes
    # Round robin: every test client has the same address, which `balance source` (the
    # documented choice) would send to one replica.
    balance roundrobin
    # A replica that refuses the connection is retried, the last retry on another one.
    option redispatch
    retries 2
"
    );
    let check = match check {
        Check::Healthz => {
            // A replica is up while its /healthz says ok (a verified fleet, and its
            // database answers), asked over TLS without a client certificate.
            cfg.push_str(
                "    option httpchk GET /healthz\n    http-check expect rstring '^\\{.ok.:true'\n",
            );
            "check check-ssl verify none"
        }
        Check::Tcp => "check",
    };
    for (i, port) in backends.iter().enumerate() {
        let _ = writeln!(
            cfg,
            "    server cp{} 127.0.0.1:{port} {check} inter 500ms fall 2 rise 1",
            i + 1
        );
    }
    cfg
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
