//! An end-to-end fleet on loopback, for tests only: real keys, CA and releases made with
//! the `nixfleet` CLI, a static "forge" serving the signed artifacts, the real
//! `nixfleet-control-plane` binary, mTLS clients acting as agents and operators, real
//! `nixfleet-agent` processes, and a signed Nix binary cache with tiny system closures.

pub mod agent;
pub mod browser;
pub mod compromised;
pub mod flake;
pub mod haproxy;
pub mod nix;
pub mod pg;
pub mod relay;
pub mod terminal;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use nixfleet_proto::Algorithm;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use serde_json::{json, Value};

/// A binary of this workspace (built by `cargo build --workspace`, which `scripts/test`
/// runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing; build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

pub fn nixfleet(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin("nixfleet"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run nixfleet");
    assert!(
        out.status.success(),
        "nixfleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn free_port() -> u16 {
    // Below Linux's ephemeral range (32768-60999): a port the kernel hands out for ":0"
    // is also what outgoing connections take as their local port, so between this check
    // and the server's bind another test's client could hold it. Each call in a process
    // takes the next port of its own sequence (no two servers of one run get the same),
    // starting at a place that depends on the process.
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(FIRST + offset).unwrap_or(20_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// Waits for a condition instead of sleeping a fixed time.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The forge: the CLI's static server over a directory (ETags, timeouts, no path outside
/// it), which a test can take down.
pub struct Forge(nixfleet_cli::serve::StaticServer);

impl Forge {
    pub fn start(root: &Path) -> Forge {
        Forge(nixfleet_cli::serve::StaticServer::start(root).expect("start the forge"))
    }
}

impl std::ops::Deref for Forge {
    type Target = nixfleet_cli::serve::StaticServer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Keys, trust roots, fleet CA and certificates, all made with the CLI.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        Pki::with_cache_keys(dir, &[])
    }

    /// Like [`Pki::new`], with these Nix binary-cache public keys pinned in trust.json.
    pub fn with_cache_keys(dir: &Path, cache_keys: &[&str]) -> Pki {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        let ci = nixfleet(dir, &["keygen", "--out", "ci.pem"]);
        let org = nixfleet(dir, &["keygen", "--out", "org.pem"]);
        let mut args = vec![
            "trust",
            "init",
            "--ci-release-key",
            ci.trim(),
            "--org-root-key",
            org.trim(),
            "--out",
            "etc/trust.json",
        ];
        for key in cache_keys {
            args.extend_from_slice(&["--cache-key", key]);
        }
        nixfleet(dir, &args);
        nixfleet(dir, &["ca", "init", "--out", "etc"]);
        nixfleet(
            dir,
            &[
                "cert",
                "server",
                "--ca-dir",
                "etc",
                "--san",
                "localhost",
                "--san",
                "127.0.0.1",
                "--out",
                "etc",
            ],
        );
        nixfleet(
            dir,
            &[
                "cert", "operator", "--ca-dir", "etc", "--name", "alice", "--out", "operator",
            ],
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }
}

/// A test host: its SSH key and, once enrolled, its certificate.
pub struct Host {
    pub name: String,
    pub key: PrivateKey,
    pub cert_pem: Option<String>,
}

impl Host {
    pub fn new(name: &str) -> Host {
        Host {
            name: name.to_owned(),
            key: PrivateKey::generate(Algorithm::Ed25519),
            cert_pem: None,
        }
    }

    pub fn pubkey_line(&self) -> String {
        keys::to_ssh_public_line(&self.key.public_key(), &format!("root@{}", self.name)).unwrap()
    }

    pub fn csr(&self) -> String {
        nixfleet_pki::build_host_csr(&self.name, &self.key).unwrap()
    }

    pub fn csr_for(&self, cn: &str) -> String {
        nixfleet_pki::build_host_csr(cn, &self.key).unwrap()
    }

    /// A bootstrap token minted by the CLI from the host's public key line.
    pub fn token(&self, pki: &Pki, extra: &[&str]) -> Value {
        let line = self.pubkey_line();
        let mut args = vec![
            "mint-token",
            "--hostname",
            &self.name,
            "--pubkey",
            &line,
            "--org-root-key",
            "org.pem",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&nixfleet(&pki.dir, &args)).unwrap()
    }
}

/// A fleet of `hosts` in channel `stable`: wave 0 = the first host (tag canary), wave 1 =
/// the rest. The policy is given as JSON.
pub fn fleet_json(hosts: &[&Host], policy: Value) -> Value {
    let mut host_map = serde_json::Map::new();
    for (i, h) in hosts.iter().enumerate() {
        let tags = if i == 0 {
            json!(["canary"])
        } else {
            json!(["web"])
        };
        host_map.insert(
            h.name.clone(),
            json!({"system": "x86_64-linux", "tags": tags, "channel": "stable", "closureHash": null, "pubkey": h.pubkey_line()}),
        );
    }
    json!({
        "schemaVersion": 1,
        "hosts": host_map,
        "channels": {"stable": {"rolloutPolicy": "canary", "reconcileIntervalMinutes": 1,
                                "signingIntervalMinutes": 60, "freshnessWindow": 1440}},
        "rolloutPolicies": {"canary": policy},
        "edges": [], "channelEdges": [], "disruptionBudgets": [],
        "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}
    })
}

pub fn canary_policy(on_failure: &str, max_failures: u32) -> Value {
    json!({
        "strategy": "canary",
        "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 0},
                  {"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": max_failures},
        "onHealthFailure": on_failure
    })
}

pub fn closure(host: &str, generation: u32) -> String {
    format!("{:032}-nixos-system-{host}-{generation}", generation)
}

/// `{hostname: closure(host, generation)}` for every host of `fleet`.
pub fn generation_closures(fleet: &Value, generation: u32) -> Value {
    let closures: serde_json::Map<String, Value> = fleet["hosts"]
        .as_object()
        .unwrap()
        .keys()
        .map(|h| (h.clone(), Value::String(closure(h, generation))))
        .collect();
    Value::Object(closures)
}

/// Signs a release of `fleet` with closures of `generation` into `forge`.
pub fn release(pki: &Pki, forge: &Path, fleet: &Value, generation: u32, commit: &str) {
    release_closures(
        pki,
        forge,
        fleet,
        &generation_closures(fleet, generation),
        commit,
        &[],
    );
}

/// A released fleet without Nix: keys and certificates, hosts `names` on generation 1 in
/// channel `stable` (signed to the forge and the build-time directory), the signed
/// revocation list `revoked`, and the forge serving them. Kept in a temporary directory
/// that goes with it.
pub struct Setup {
    pub pki: Pki,
    pub forge_dir: PathBuf,
    pub forge: Forge,
    pub hosts: Vec<Host>,
    pub fleet: Value,
    // Last: the forge stops before its directory goes.
    pub tmp: tempfile::TempDir,
}

impl Setup {
    pub fn new(names: &[&str], policy: Value, revoked: Value) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path());
        let hosts: Vec<Host> = names.iter().map(|n| Host::new(n)).collect();
        let fleet = fleet_json(&hosts.iter().collect::<Vec<_>>(), policy);
        let forge_dir = tmp.path().join("forge");
        release_with_fallback(
            &pki,
            &forge_dir,
            &fleet,
            &generation_closures(&fleet, 1),
            "1111111111111111111111111111111111111111",
            &[],
        );
        sign_revocations(&pki, &forge_dir, revoked);
        let forge = Forge::start(&forge_dir);
        Setup {
            pki,
            forge_dir,
            forge,
            hosts,
            fleet,
            tmp,
        }
    }
}

/// Signs the release into `forge` and into the control plane's build-time directory
/// (its start-up fallback), as CI and a deployment both would.
pub fn release_with_fallback(
    pki: &Pki,
    forge: &Path,
    fleet: &Value,
    closures: &Value,
    commit: &str,
    extra: &[&str],
) {
    release_closures(pki, forge, fleet, closures, commit, extra);
    release_closures(pki, &pki.path("build-time"), fleet, closures, commit, extra);
}

/// Signs a release of `fleet` with the given `{hostname: closure basename}` into `forge`;
/// `extra` goes to `nixfleet release` (e.g. `--signed-at`).
pub fn release_closures(
    pki: &Pki,
    forge: &Path,
    fleet: &Value,
    closures: &Value,
    commit: &str,
    extra: &[&str],
) {
    std::fs::write(pki.path("fleet.json"), fleet.to_string()).unwrap();
    std::fs::write(pki.path("closures.json"), closures.to_string()).unwrap();
    let mut args = vec![
        "release",
        "--fleet",
        "fleet.json",
        "--closures",
        "closures.json",
        "--ci-commit",
        commit,
        "--key",
        "ci.pem",
        "--out",
        forge.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    nixfleet(&pki.dir, &args);
}

pub fn sign_revocations(pki: &Pki, forge: &Path, entries: Value) {
    sign_revocations_with(pki, forge, entries, &[]);
}

/// Signs the revocation list `entries` into `forge`; `extra` goes to `nixfleet revocations
/// sign` (e.g. `--signed-at`).
pub fn sign_revocations_with(pki: &Pki, forge: &Path, entries: Value, extra: &[&str]) {
    let list = json!({
        "schemaVersion": 1, "revocations": entries, "freshnessWindow": null,
        "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}
    });
    std::fs::write(pki.path("revocations-in.json"), list.to_string()).unwrap();
    let mut args = vec![
        "revocations",
        "sign",
        "--in",
        "revocations-in.json",
        "--key",
        "ci.pem",
        "--out",
        forge.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    nixfleet(&pki.dir, &args);
}

/// The rollout id of `channel` in the release written to `forge`.
pub fn rollout_id(forge: &Path, channel: &str) -> String {
    let fleet_hash = jcs::sha256_hex(&std::fs::read(forge.join("fleet.resolved.json")).unwrap());
    for entry in std::fs::read_dir(forge.join("rollouts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if m["channel"] == channel && m["fleetResolvedHash"] == fleet_hash.as_str() {
                return path.file_stem().unwrap().to_str().unwrap().to_owned();
            }
        }
    }
    panic!("no manifest for {channel}");
}

/// The control-plane process; killed on drop.
pub struct Cp {
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    pub state: PathBuf,
}

pub struct CpOptions {
    pub with_ca_key: bool,
    pub with_revocations: bool,
    pub url: bool,
    pub build_time_artifact: bool,
    pub rollouts_dir: bool,
    /// A PostgreSQL URL: the replica keeps its state there (`--database-url`) rather than
    /// in `--db-path`.
    pub database_url: Option<String>,
    /// Runs the control plane under this open-file limit (soft and hard), through `prlimit`.
    pub open_files: Option<u64>,
    pub extra: Vec<String>,
}

impl Default for CpOptions {
    fn default() -> Self {
        CpOptions {
            with_ca_key: true,
            with_revocations: true,
            url: true,
            build_time_artifact: true,
            rollouts_dir: true,
            database_url: None,
            open_files: None,
            extra: Vec::new(),
        }
    }
}

impl Cp {
    pub fn command(pki: &Pki, forge: &Forge, port: u16, state: &Path, opts: &CpOptions) -> Command {
        let mut cmd = match opts.open_files {
            // prlimit execs the command, so the child's pid is the control plane's.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin("nixfleet-control-plane"));
                c
            }
            None => Command::new(bin("nixfleet-control-plane")),
        };
        let p = |rel: &str| pki.path(rel).to_str().unwrap().to_owned();
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db-path")
            .arg(state.join("state.db"))
            .arg("--audit-log")
            .arg(state.join("audit.log"))
            .args(["--trust-file", &p("etc/trust.json")])
            .args(["--tls-cert", &p("etc/server-cert.pem")])
            .args(["--tls-key", &p("etc/server-key.pem")])
            .args(["--client-ca", &p("etc/ca.pem")])
            .args(["--fleet-ca-cert", &p("etc/fleet-ca-cert.pem")])
            .env("NIXFLEET_LOG", "info,nixfleet_control_plane=debug");
        // Fast defaults for tests; a flag in `extra` replaces its default.
        for (flag, value) in [
            ("--tick-interval-secs", "1"),
            ("--channel-refs-poll-secs", "1"),
            ("--revocations-poll-secs", "1"),
            ("--checkin-interval-secs", "5"),
            ("--fetch-timeout-secs", "2"),
        ] {
            if !opts.extra.iter().any(|e| e == flag) {
                cmd.args([flag, value]);
            }
        }
        if opts.rollouts_dir {
            cmd.arg("--rollouts-dir").arg(forge.root.join("rollouts"));
        }
        if opts.with_ca_key {
            cmd.args(["--fleet-ca-key", &p("etc/fleet-ca-key.pem")]);
        }
        if opts.url {
            cmd.args([
                "--channel-refs-artifact-url",
                &forge.url("fleet.resolved.json"),
            ])
            .args([
                "--channel-refs-signature-url",
                &forge.url("fleet.resolved.json.sig"),
            ]);
        }
        if opts.build_time_artifact {
            cmd.arg("--artifact")
                .arg(pki.path("build-time/fleet.resolved.json"))
                .arg("--signature")
                .arg(pki.path("build-time/fleet.resolved.json.sig"));
        }
        if opts.with_revocations {
            cmd.args(["--revocations-artifact-url", &forge.url("revocations.json")])
                .args([
                    "--revocations-signature-url",
                    &forge.url("revocations.json.sig"),
                ]);
        }
        if let Some(url) = &opts.database_url {
            cmd.args(["--database-url", url]);
        }
        cmd.args(&opts.extra);
        cmd
    }

    pub fn start(pki: &Pki, forge: &Forge, state: &Path, opts: &CpOptions) -> Cp {
        Cp::start_on(pki, forge, free_port(), state, opts)
    }

    pub fn start_on(pki: &Pki, forge: &Forge, port: u16, state: &Path, opts: &CpOptions) -> Cp {
        std::fs::create_dir_all(state).unwrap();
        // One log per process started: a restarted CP must not append to the old one's
        // log, or a check of what the new process saw would read the old lines.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let log = state.join(format!(
            "cp-{port}-{}-{}.log",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Cp::command(pki, forge, port, state, opts)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Cp {
            child: Some(child),
            port,
            log,
            state: state.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// Waits until /healthz reports a tick (the runbook's first verify command).
    pub fn wait_ready(&mut self, pki: &Pki) {
        let url = self.url("/healthz");
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("control plane exited with {status}:\n{}", self.log_text());
                }
            }
            let out = Command::new("curl")
                .args(["-sk", "--max-time", "2", &url])
                .output()
                .unwrap();
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                if !v["last_tick_at"].is_null() {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "CP not ready:\n{}",
                self.log_text()
            );
            let _ = pki;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn send_sigterm(&self) {
        if let Some(child) = &self.child {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
        }
    }

    /// SIGTERM, then wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.send_sigterm();
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("control plane did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CP to completion (it is expected to refuse to start); returns its stderr.
    pub fn run_to_exit(pki: &Pki, forge: &Forge, state: &Path, opts: &CpOptions) -> (i32, String) {
        let out = Cp::command(pki, forge, free_port(), state, opts)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An mTLS client: anonymous, a host, or an operator.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    base: String,
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    /// Response headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Client {
    pub fn new(pki: &Pki, port: u16, auth: Option<(&str, &PrivateKey)>) -> Client {
        let config = nixfleet_pki::client_tls_config(&pki.read("etc/ca.pem"), auth).unwrap();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Client {
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            base: format!("https://localhost:{port}"),
        }
    }

    pub fn anonymous(pki: &Pki, port: u16) -> Client {
        Client::new(pki, port, None)
    }

    pub fn operator(pki: &Pki, port: u16) -> Client {
        let key = PrivateKey::from_pem(&pki.read("operator/operator-key.pem")).unwrap();
        Client::new(
            pki,
            port,
            Some((&pki.read("operator/operator-cert.pem"), &key)),
        )
    }

    pub fn host(pki: &Pki, port: u16, host: &Host) -> Client {
        Client::new(
            pki,
            port,
            Some((host.cert_pem.as_deref().expect("enrolled"), &host.key)),
        )
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.try_request(method, path, body, headers)
            .await
            .expect("request failed")
    }

    /// Like `request`, but a connection-level failure is returned, not a panic.
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .map_err(|_| "request timed out".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes()
            .to_vec();
        Ok(Reply {
            status,
            body,
            headers,
        })
    }

    pub async fn try_post(&self, path: &str, body: &Value) -> Result<Reply, String> {
        self.try_request(Method::POST, path, Some(body.to_string().into_bytes()), &[])
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.request(
            Method::POST,
            path,
            Some(body.to_string().into_bytes()),
            &[("x-nixfleet-protocol", "1")],
        )
        .await
    }
}

/// Enrolls a host with a fresh token; returns the reply.
pub async fn enroll(pki: &Pki, port: u16, host: &mut Host) -> Reply {
    let token = host.token(pki, &[]);
    let reply = Client::anonymous(pki, port)
        .post("/v1/enroll", &json!({"token": token, "csrPem": host.csr()}))
        .await;
    if reply.status == 200 {
        host.cert_pem = Some(reply.json()["certPem"].as_str().unwrap().to_owned());
    }
    reply
}

/// Renews `host`'s certificate with its own key; on 200 the new certificate is kept.
pub async fn renew(pki: &Pki, port: u16, host: &mut Host) -> Reply {
    let reply = Client::host(pki, port, host)
        .post("/v1/agent/renew", &json!({"csrPem": host.csr()}))
        .await;
    if reply.status == 200 {
        host.cert_pem = Some(reply.json()["certPem"].as_str().unwrap().to_owned());
    }
    reply
}

pub fn checkin_body(
    host: &str,
    closure: &str,
    last_confirmed_at: Option<&str>,
    failed: Value,
) -> Value {
    json!({
        "hostname": host, "agentVersion": "test", "bootId": "boot-1",
        "currentGeneration": {"closureHash": closure},
        "lastConfirmedAt": last_confirmed_at, "failedTargets": failed,
        "health": {"failedUnits": 0, "uptimeSecs": 100}
    })
}

pub fn confirm_body(host: &str, rollout: &str, wave: u32, closure: &str) -> Value {
    json!({"hostname": host, "rolloutId": rollout, "waveIndex": wave,
           "generation": {"closureHash": closure, "bootId": "boot-1"}})
}

/// Checks in as `host` (running `current`) until the answer carries a target; panics
/// after 20 s.
pub async fn until_target(client: &Client, host: &str, current: &str) -> Value {
    let mut last = Value::Null;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let r = client
            .post(
                "/v1/agent/checkin",
                &checkin_body(host, current, None, json!([])),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        last = r.json();
        if !last["target"].is_null() {
            return last["target"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{host} never got a target; last answer {last}");
}

/// What an agent does after activating: confirm, then report the new closure.
pub async fn activate(client: &Client, host: &str, target: &Value) -> u16 {
    let closure = target["closureHash"].as_str().unwrap();
    let r = client
        .post(
            "/v1/agent/confirm",
            &confirm_body(
                host,
                target["rolloutId"].as_str().unwrap(),
                target["waveIndex"].as_u64().unwrap() as u32,
                closure,
            ),
        )
        .await;
    if r.status == 204 {
        // The check-in that follows a confirm carries the health of the new closure.
        let after = client
            .post(
                "/v1/agent/checkin",
                &checkin_body(host, closure, None, json!([])),
            )
            .await;
        assert_eq!(
            after.status,
            200,
            "{}",
            String::from_utf8_lossy(&after.body)
        );
    }
    r.status
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    s
}

/// A request whose body is still being sent when `midway` runs: it is certainly in
/// flight at the server. Returns the response status.
pub async fn request_in_flight<F: std::future::Future<Output = ()>>(
    pki: &Pki,
    port: u16,
    host: &Host,
    path: &str,
    body: &Value,
    midway: F,
) -> u16 {
    use http_body_util::channel::Channel;
    let config = nixfleet_pki::client_tls_config(
        &pki.read("etc/ca.pem"),
        Some((host.cert_pem.as_deref().unwrap(), &host.key)),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let client_port = tcp.local_addr().unwrap().port();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let bytes = body.to_string().into_bytes();
    let (mut tx, channel) = Channel::<Bytes, std::convert::Infallible>::new(4);
    let req = Request::post(format!("https://localhost:{port}{path}"))
        .header("content-type", "application/json")
        .header("content-length", bytes.len())
        .body(channel)
        .unwrap();
    let response =
        tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status().as_u16()) });
    let half = bytes.len() / 2;
    tx.send_data(Bytes::copy_from_slice(&bytes[..half]))
        .await
        .unwrap();
    // The server has read what was sent (its receive queue is empty): the request is
    // being processed, not waiting in a socket buffer.
    let (server_port, client_port) = (port, client_port);
    wait_for_async(
        "the server to read the request head",
        Duration::from_secs(10),
        || async move { server_rx_queue(server_port, client_port) == Some(0) },
    )
    .await;
    midway.await;
    tx.send_data(Bytes::copy_from_slice(&bytes[half..]))
        .await
        .unwrap();
    drop(tx);
    response.await.unwrap().expect("in-flight request lost")
}

/// Bytes waiting unread in the server-side socket of a loopback connection, from
/// /proc/net/tcp (`None` when the socket is not found).
fn server_rx_queue(server_port: u16, client_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        if port(fields.get(1)?)? == server_port && port(fields.get(2)?)? == client_port {
            let queues = fields.get(4)?;
            u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
        } else {
            None
        }
    })
}
