//! The demo's fleet and its story: set-up, two releases, a revocation, the
//! disaster-recovery runbook, the summary.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nixfleet_proto::api::{state_name, Healthz, RolloutStatus, StatusReport};
use nixfleet_proto::Algorithm;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use serde_json::{json, Value};

use super::nix::{self, Cache, ClosureSpec};
use super::process::{tail, Proc};
use super::screen::Screen;
use super::{find_binary, interrupted, wait_until, DemoArgs, DemoError, INTERRUPTED};
use crate::commands::{self, MintToken, TokenKey, TrustInit};
use crate::operator::client::OperatorClient;
use crate::operator::config::Connection;
use crate::operator::render;
use crate::signer::Signer;
use crate::{files, pki};

/// The hosts: name, channel, canary.
const HOSTS: &[(&str, &str, bool)] = &[
    ("edge-01", "edge", true),
    ("edge-02", "edge", false),
    ("web-01", "stable", true),
    ("web-02", "stable", false),
    ("web-03", "stable", false),
    ("db-01", "stable", false),
];
/// The host whose loss is reported after the first release: revoked, then dropped.
const REVOKED: &str = "web-03";
const COMMITS: [&str; 2] = [
    "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d",
    "2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e",
];
/// Marks a directory made by the demo, so that only such a directory is ever cleaned.
const MARKER: &str = ".nixfleet-demo";
const POLL: Duration = Duration::from_millis(250);

struct Timings {
    setup: Duration,
    releases: Vec<Duration>,
    cp_ready: Duration,
    recovery: Duration,
}

struct Demo {
    // Dropped first: every process is killed before the forge stops serving.
    agents: Vec<(String, Proc)>,
    cp: Option<Proc>,
    forge: Option<crate::serve::StaticServer>,
    runtime: tokio::runtime::Runtime,
    screen: Screen,
    dir: PathBuf,
    /// `dir` as the user gave it.
    shown_dir: PathBuf,
    fast: bool,
    cp_bin: PathBuf,
    agent_bin: PathBuf,
    cp_port: u16,
    cache: Option<Cache>,
    /// Closure name (`nixos-system-web-01-1`) → store basename.
    closures: BTreeMap<String, String>,
    client: Option<OperatorClient>,
}

/// Runs the demo; see the module documentation.
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let started = Instant::now();
    let screen = Screen::new();
    let nix_version = nix::check_installed()?;
    let cp_bin = find_binary("nixfleet-control-plane")?;
    let agent_bin = find_binary("nixfleet-agent")?;
    let dir = absolute(&args.dir)?;
    prepare_dir(&dir, args.yes, &screen)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| DemoError::Failed(format!("cannot start the async runtime: {e}")))?;
    // From here on Ctrl-C (and SIGTERM) stop the demo through its waits, which then kill
    // every process it started.
    runtime.spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    screen.say(&format!(
        "nixfleet demo in {}\n  {nix_version}\n  {}\n  {}",
        dir.display(),
        cp_bin.display(),
        agent_bin.display()
    ));
    let mut demo = Demo {
        agents: Vec::new(),
        cp: None,
        forge: None,
        runtime,
        screen,
        dir,
        shown_dir: args.dir.clone(),
        fast: args.fast,
        cp_bin,
        agent_bin,
        cp_port: 0,
        cache: None,
        closures: BTreeMap::new(),
        client: None,
    };
    let result = demo.story(started);
    demo.screen.done_waiting();
    let result = match result {
        Ok(timings) => {
            demo.summary(&timings, started.elapsed(), args.keep_running);
            if args.keep_running {
                demo.keep_running()
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e),
    };
    demo.stop();
    result
}

fn absolute(dir: &Path) -> Result<PathBuf, DemoError> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|e| DemoError::io("read", Path::new("."), e))?;
    Ok(cwd.join(dir))
}

/// Makes `dir` ready: new, or cleaned (keeping `keys/` when reused) as the user chose.
fn prepare_dir(dir: &Path, yes: bool, screen: &Screen) -> Result<(), DemoError> {
    let exists = dir.exists();
    let mut keep_keys = false;
    if exists {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty && !dir.join(MARKER).exists() {
            return Err(DemoError::Failed(format!(
                "{} is not empty and was not made by `nixfleet demo` (no {MARKER} in it); \
                 refusing to clean it: pass --dir with a new directory",
                dir.display()
            )));
        }
        if !empty && !yes {
            let interactive = std::io::stdin().is_terminal() && screen.is_tty();
            if !interactive {
                return Err(DemoError::DirExists {
                    dir: dir.to_path_buf(),
                });
            }
            print!(
                "{} holds an earlier demo. [r]euse its keys, [c]lean it, or [q]uit? ",
                dir.display()
            );
            let _ = std::io::stdout().flush();
            let mut answer = String::new();
            let _ = std::io::stdin().lock().read_line(&mut answer);
            match answer.trim().to_ascii_lowercase().as_str() {
                "r" | "reuse" => keep_keys = true,
                "c" | "clean" => {}
                _ => {
                    return Err(DemoError::Declined {
                        dir: dir.to_path_buf(),
                    })
                }
            }
        }
        let entries = std::fs::read_dir(dir).map_err(|e| DemoError::io("read", dir, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if keep_keys && entry.file_name() == "keys" {
                continue;
            }
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| DemoError::io("remove", &path, e))?;
        }
    }
    files::create_dir(dir)?;
    std::fs::write(dir.join(MARKER), "made by `nixfleet demo`\n")
        .map_err(|e| DemoError::io("write", &dir.join(MARKER), e))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    if let Some(parent) = path.parent() {
        files::create_dir(parent)?;
    }
    std::fs::write(path, text).map_err(|e| DemoError::io("write", path, e))
}

fn closure_name(host: &str, generation: u32) -> String {
    format!("nixos-system-{host}-{generation}")
}

impl Demo {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn machine(&self, host: &str) -> PathBuf {
        self.dir.join("hosts").join(host)
    }

    fn soak_minutes(&self) -> u32 {
        if self.fast {
            0
        } else {
            1
        }
    }

    fn story(&mut self, started: Instant) -> Result<Timings, DemoError> {
        self.screen.title("Trust roots, fleet CA and certificates");
        self.trust_roots()?;
        self.screen
            .title("Six hosts, their first systems, and a signed binary cache");
        self.hosts_and_cache()?;
        self.screen
            .title("Release 1, signed by CI; the control plane starts");
        let rollouts = self.release(1, &HOSTS.iter().map(|h| h.0).collect::<Vec<_>>())?;
        self.start_forge_and_cp()?;
        self.start_agents()?;
        let setup = started.elapsed();
        let t = Instant::now();
        self.watch(1, &rollouts)?;
        let mut releases = vec![t.elapsed()];

        self.screen
            .title(&format!("{REVOKED} is lost: CI signs a revocation list"));
        self.revoke()?;

        self.screen.title(&format!(
            "Release 2: {REVOKED} is dropped from the fleet, the others get a new system"
        ));
        let remaining: Vec<&str> = HOSTS
            .iter()
            .map(|h| h.0)
            .filter(|h| *h != REVOKED)
            .collect();
        let rollouts = self.release(2, &remaining)?;
        let t = Instant::now();
        self.watch(2, &rollouts)?;
        releases.push(t.elapsed());

        self.screen
            .title("Disaster recovery: the runbook, run against this fleet");
        let (cp_ready, recovery) = self.disaster_recovery(&remaining)?;
        Ok(Timings {
            setup,
            releases,
            cp_ready,
            recovery,
        })
    }

    fn trust_roots(&mut self) -> Result<(), DemoError> {
        let keys = self.path("keys");
        files::create_dir(&keys.join("hosts"))?;
        let key = |name: &str, algorithm: Algorithm| -> Result<String, DemoError> {
            let path = keys.join(name);
            Ok(if path.exists() {
                commands::derive_pubkey(&path)?
            } else {
                commands::keygen(algorithm, &path)?
            })
        };
        let ci = key("ci-release.pem", Algorithm::Ed25519)?;
        let org = key("org-root.pem", Algorithm::Ed25519)?;
        let cache = Cache::new(&self.path("forge/cache"), &keys, "nixfleet-demo-cache-1")?;
        let etc = keys.join("etc");
        files::create_dir(&etc)?;
        commands::trust_init(&TrustInit {
            ci_release_key: ci,
            ci_release_key_algorithm: Some(Algorithm::Ed25519),
            previous_ci_release_key: None,
            org_root_key: org,
            cache_keys: vec![cache.public_key.clone()],
            out: etc.join("trust.json"),
        })?;
        if !etc.join(pki::CA_KEY_FILE).exists() {
            pki::ca_init(&pki::CaInit {
                out: etc.clone(),
                common_name: "nixfleet demo fleet CA".into(),
                validity_days: 3650,
            })?;
        }
        if !etc.join(pki::SERVER_CERT_FILE).exists() {
            pki::cert_server(&pki::CertServer {
                ca_dir: etc.clone(),
                sans: vec!["localhost".into(), "127.0.0.1".into()],
                out: etc.clone(),
                validity_days: 365,
            })?;
        }
        if !keys.join("operator").join(pki::OPERATOR_CERT_FILE).exists() {
            pki::cert_operator(&pki::CertOperator {
                ca_dir: etc.clone(),
                name: "demo".into(),
                out: keys.join("operator"),
                validity_days: 90,
            })?;
        }
        self.screen.say(&format!(
            "  keys/ci-release.pem   CI release key (signs releases and revocations)\n  \
             keys/org-root.pem     org root key (signs bootstrap tokens)\n  \
             keys/cache.secret     binary-cache key {}\n  \
             keys/etc/trust.json   the pinned public halves\n  \
             keys/etc/             fleet CA, the control plane's certificate\n  \
             keys/operator/        an operator certificate for `nixfleet status`",
            cache.public_key.split(':').next().unwrap_or("")
        ));
        self.cache = Some(cache);
        Ok(())
    }

    fn host_key(&self, host: &str) -> Result<(PathBuf, String), DemoError> {
        let path = self
            .path("keys/hosts")
            .join(format!("{host}_ssh_host_ed25519_key"));
        let key = if path.exists() {
            commands::load_private_key(&path)?
        } else {
            let key = PrivateKey::generate(Algorithm::Ed25519);
            let pem = key
                .to_pkcs8_pem()
                .map_err(|e| DemoError::Failed(format!("cannot encode a host key: {e}")))?;
            files::write_new(&path, pem.as_bytes(), 0o600)?;
            key
        };
        let line = keys::to_ssh_public_line(&key.public_key(), &format!("root@{host}"))
            .map_err(|e| DemoError::Failed(format!("cannot encode a host key: {e}")))?;
        Ok((path, line))
    }

    fn hosts_and_cache(&mut self) -> Result<(), DemoError> {
        let mut specs = Vec::new();
        for (host, _, _) in HOSTS {
            let machine = self.machine(host);
            files::create_dir(&machine.join("profiles"))?;
            for generation in 0..=2 {
                specs.push(ClosureSpec {
                    machine: machine.clone(),
                    name: closure_name(host, generation),
                });
            }
        }
        let t = Instant::now();
        self.screen.wait("nix-build: 18 system closures");
        self.closures = nix::build(&self.path("nix/systems.nix"), &specs)?;
        self.screen.done_waiting();
        let mut later = Vec::new();
        for (host, _, _) in HOSTS {
            let machine = self.machine(host);
            let gen0 = self.closure(host, 0)?;
            nix::install(
                &machine.join("profiles/system"),
                &machine.join("current-system"),
                &gen0,
            )?;
            later.push(self.closure(host, 1)?);
            if *host != REVOKED {
                later.push(self.closure(host, 2)?);
            }
        }
        let later_refs: Vec<&str> = later.iter().map(String::as_str).collect();
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| DemoError::Failed("no cache".into()))?;
        self.screen
            .wait("signing the closures into the binary cache");
        cache.push(&later_refs)?;
        self.screen.done_waiting();
        let deleted = nix::delete(&later_refs);
        self.screen.say(&format!(
            "  built 18 closures in {:.1} s; each host runs its first one:\n  \
             hosts/<host>/current-system links to it\n  \
             the closures of releases 1 and 2 are signed into forge/cache{}",
            t.elapsed().as_secs_f64(),
            if deleted {
                ",\n  and removed from the local store: the agents fetch them from the cache and\n  \
                 check the signature"
            } else {
                " (the local store keeps them too)"
            }
        ));
        Ok(())
    }

    fn closure(&self, host: &str, generation: u32) -> Result<String, DemoError> {
        self.closures
            .get(&closure_name(host, generation))
            .cloned()
            .ok_or_else(|| DemoError::Failed(format!("no closure for {host}")))
    }

    fn declaration(&self, hosts: &[&str]) -> Result<Value, DemoError> {
        let mut host_map = serde_json::Map::new();
        for (name, channel, canary) in HOSTS.iter().filter(|h| hosts.contains(&h.0)) {
            let (_, line) = self.host_key(name)?;
            let tags = if *canary {
                json!(["canary"])
            } else {
                json!([])
            };
            host_map.insert(
                (*name).to_owned(),
                json!({"system": "x86_64-linux", "tags": tags, "channel": channel,
                       "closureHash": null, "pubkey": line}),
            );
        }
        let channel = json!({"rolloutPolicy": "canary", "reconcileIntervalMinutes": 1,
                             "signingIntervalMinutes": 60, "freshnessWindow": 1440});
        Ok(json!({
            "schemaVersion": 1,
            "hosts": host_map,
            "channels": {"edge": channel, "stable": channel},
            "rolloutPolicies": {"canary": {
                "strategy": "canary",
                "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": self.soak_minutes()},
                          {"selector": {"all": true}, "soakMinutes": 0}],
                "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
                "onHealthFailure": "rollback-and-halt"
            }},
            "edges": [], "channelEdges": [], "disruptionBudgets": [],
            "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}
        }))
    }

    /// Signs release `n` for `hosts` (what CI does) and publishes it on the forge,
    /// manifests before the fleet that names them. Returns channel → rollout id.
    fn release(&mut self, n: u32, hosts: &[&str]) -> Result<BTreeMap<String, String>, DemoError> {
        let staging = self.path(&format!("releases/{n}"));
        let fleet = self.declaration(hosts)?;
        let closures: serde_json::Map<String, Value> = hosts
            .iter()
            .map(|h| Ok(((*h).to_owned(), Value::String(self.closure(h, n)?))))
            .collect::<Result<_, DemoError>>()?;
        write(&staging.join("fleet.json"), &fleet.to_string())?;
        write(
            &staging.join("closures.json"),
            &Value::Object(closures).to_string(),
        )?;
        let signer = Signer::from_key_file(&self.path("keys/ci-release.pem"))?;
        let commit = COMMITS[(n as usize - 1) % 2];
        let release = |out: PathBuf, signer: Signer| {
            commands::release(&commands::ReleaseArgs {
                fleet: staging.join("fleet.json"),
                closures: staging.join("closures.json"),
                ci_commit: commit.to_owned(),
                signer,
                out,
                trust_file: Some(self.path("keys/etc/trust.json")),
                signed_at: None,
                manifest_schema: Default::default(),
            })
        };
        let (summary, _) = release(staging.join("signed"), signer)?;
        let signed = staging.join("signed");
        let forge = self.path("forge");
        if n == 1 {
            // The control plane's build-time fallback (--artifact / --signature).
            let signer = Signer::from_key_file(&self.path("keys/ci-release.pem"))?;
            release(self.path("build-time"), signer)?;
            self.sign_revocations(&[])?;
        }
        let rollouts = rollout_ids(&signed)?;
        // The lists a schema-2 manifest commits to go first (the demo fleet has no budgets).
        let mut publish = Vec::new();
        for id in rollouts.values() {
            publish.push(format!("rollouts/{id}.hosts.json"));
            publish.push(format!("rollouts/{id}.json.sig"));
            publish.push(format!("rollouts/{id}.json"));
        }
        for channel in rollouts.keys() {
            publish.push(format!("rollouts/channel/{channel}.hosts.json"));
            publish.push(format!("rollouts/channel/{channel}.json.sig"));
            publish.push(format!("rollouts/channel/{channel}.json"));
        }
        publish.push("fleet.resolved.json.sig".into());
        publish.push("fleet.resolved.json".into());
        for rel in publish {
            copy_atomic(&signed.join(&rel), &forge.join(&rel))?;
        }
        for line in summary.lines() {
            self.screen.say(&format!("  {}", shorten_hashes(line)));
        }
        Ok(rollouts)
    }

    /// Signs a revocation list of `hosts` into the forge.
    fn sign_revocations(&self, hosts: &[&str]) -> Result<(), DemoError> {
        // Every certificate issued before tomorrow is refused: re-enrolling does not help.
        let not_before = commands::now_utc() + time::Duration::days(1);
        let not_before = not_before
            .replace_nanosecond(0)
            .unwrap_or(not_before)
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| DemoError::Failed(e.to_string()))?;
        let entries: Vec<Value> = hosts
            .iter()
            .map(|h| json!({"hostname": h, "notBefore": not_before, "reason": "reported lost", "revokedBy": "demo"}))
            .collect();
        let list = json!({
            "schemaVersion": 1, "revocations": entries, "freshnessWindow": null,
            "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}
        });
        let staging = self.path(&format!("releases/revocations-{}", hosts.len()));
        write(&staging.join("in.json"), &list.to_string())?;
        commands::revocations_sign(&commands::RevocationsSignArgs {
            input: staging.join("in.json"),
            signer: Signer::from_key_file(&self.path("keys/ci-release.pem"))?,
            out: staging.clone(),
            ci_commit: None,
            signed_at: None,
        })?;
        for rel in ["revocations.json.sig", "revocations.json"] {
            copy_atomic(&staging.join(rel), &self.path("forge").join(rel))?;
        }
        Ok(())
    }

    fn cp_command(&self) -> Command {
        let mut cmd = Command::new(&self.cp_bin);
        let p = |rel: &str| self.path(rel);
        let forge = self.forge.as_ref().map(|f| f.port).unwrap_or_default();
        let url = |rel: &str| format!("http://127.0.0.1:{forge}/{rel}");
        let checkin = if self.fast { "2" } else { "5" };
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.cp_port))
            .arg("--db-path")
            .arg(p("cp/state.db"))
            .arg("--audit-log")
            .arg(p("cp/audit.log"))
            .arg("--trust-file")
            .arg(p("keys/etc/trust.json"))
            .arg("--tls-cert")
            .arg(p("keys/etc/server-cert.pem"))
            .arg("--tls-key")
            .arg(p("keys/etc/server-key.pem"))
            .arg("--client-ca")
            .arg(p("keys/etc/ca.pem"))
            .arg("--fleet-ca-cert")
            .arg(p("keys/etc/fleet-ca-cert.pem"))
            .arg("--fleet-ca-key")
            .arg(p("keys/etc/fleet-ca-key.pem"))
            .args(["--channel-refs-artifact-url", &url("fleet.resolved.json")])
            .args([
                "--channel-refs-signature-url",
                &url("fleet.resolved.json.sig"),
            ])
            .args(["--revocations-artifact-url", &url("revocations.json")])
            .args(["--revocations-signature-url", &url("revocations.json.sig")])
            .arg("--artifact")
            .arg(p("build-time/fleet.resolved.json"))
            .arg("--signature")
            .arg(p("build-time/fleet.resolved.json.sig"))
            .arg("--rollouts-dir")
            .arg(p("forge/rollouts"))
            .args(["--tick-interval-secs", "1"])
            .args(["--channel-refs-poll-secs", "1"])
            .args(["--revocations-poll-secs", "1"])
            .args(["--fetch-timeout-secs", "2"])
            .args(["--checkin-interval-secs", checkin])
            .env("NIXFLEET_LOG", "info");
        cmd
    }

    fn spawn_cp(&mut self) -> Result<(), DemoError> {
        files::create_dir(&self.path("cp"))?;
        let mut cmd = self.cp_command();
        self.cp = Some(Proc::spawn(
            "the control plane",
            &mut cmd,
            &self.path("cp/cp.log"),
        )?);
        Ok(())
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, DemoError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| DemoError::Failed("no operator client".into()))?;
        Ok(self.runtime.block_on(client.get_json(path))?)
    }

    /// Waits until /healthz reports a tick (the runbook's first check).
    fn wait_cp_ready(&mut self) -> Result<(), DemoError> {
        let log = self.path("cp/cp.log");
        wait_until(
            "the control plane's first tick",
            Duration::from_secs(60),
            POLL,
            || {
                if let Some(cp) = self.cp.as_mut() {
                    cp.check_running()?;
                }
                Ok(self
                    .get::<Healthz>("/healthz")
                    .ok()
                    .filter(|h| h.last_tick_at.is_some()))
            },
        )
        .map_err(|e| with_log(e, &log))?;
        Ok(())
    }

    fn start_forge_and_cp(&mut self) -> Result<(), DemoError> {
        let forge_dir = self.path("forge");
        let forge = crate::serve::StaticServer::start(&forge_dir)
            .map_err(|e| DemoError::io("serve", &forge_dir, e))?;
        self.screen.say(&format!(
            "  forge/ on {}: signed artifacts and the binary cache",
            forge.url("")
        ));
        self.forge = Some(forge);
        self.cp_port = free_port()?;
        let conn = Connection {
            url: format!("https://localhost:{}", self.cp_port),
            ca_cert: self.path("keys/etc/ca.pem"),
            cert: self.path("keys/operator/operator-cert.pem"),
            key: self.path("keys/operator/operator-key.pem"),
            timeout: Duration::from_secs(5),
        };
        let config = format!(
            "url = \"{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            conn.url,
            conn.ca_cert.display(),
            conn.cert.display(),
            conn.key.display()
        );
        write(&self.path("nixfleet.toml"), &config)?;
        // The client's connection pool needs the runtime that it runs on.
        let _guard = self.runtime.enter();
        self.client = Some(OperatorClient::new(&conn)?);
        drop(_guard);
        self.spawn_cp()?;
        self.screen
            .wait("control plane: verifying the release, first tick");
        self.wait_cp_ready()?;
        self.screen.done_waiting();
        self.screen.say(&format!(
            "  control plane on {}, state in cp/state.db, log cp/cp.log",
            conn.url
        ));
        Ok(())
    }

    fn start_agents(&mut self) -> Result<(), DemoError> {
        let poll = if self.fast { "2" } else { "5" };
        let org = self.path("keys/org-root.pem");
        for (host, _, _) in HOSTS {
            let machine = self.machine(host);
            let (key, line) = self.host_key(host)?;
            let token = commands::mint_token(&MintToken {
                hostname: (*host).to_owned(),
                key: TokenKey::Line(line),
                org_root_key: org.clone(),
                validity_hours: 1,
            })?;
            write(&machine.join("token.json"), &token)?;
            let forge = self
                .forge
                .as_ref()
                .map(|f| f.url("cache"))
                .unwrap_or_default();
            let mut cmd = Command::new(&self.agent_bin);
            cmd.arg("--control-plane-url")
                .arg(format!("https://localhost:{}", self.cp_port))
                .args(["--hostname", host])
                .arg("--trust-file")
                .arg(self.path("keys/etc/trust.json"))
                .arg("--state-dir")
                .arg(machine.join("agent-state"))
                .arg("--host-key")
                .arg(&key)
                .arg("--ca-cert")
                .arg(self.path("keys/etc/ca.pem"))
                .arg("--bootstrap-token-file")
                .arg(machine.join("token.json"))
                .arg("--profile")
                .arg(machine.join("profiles/system"))
                .arg("--current-system-link")
                .arg(machine.join("current-system"))
                .args(["--health-command", r#"printf '{"failedUnits": 0}'"#])
                .arg("--switch-lock")
                .arg(machine.join("switch-to-configuration.lock"))
                .args(["--substituter", &forge])
                .args(["--poll-interval-secs", poll])
                .args(["--request-timeout-secs", "3"])
                .args([
                    "--realise-timeout-secs",
                    "120",
                    "--switch-timeout-secs",
                    "60",
                ])
                .env("NIX_CONFIG", nix::nix_config())
                .env("NIXFLEET_LOG", "info");
            let proc = Proc::spawn(
                &format!("the agent of {host}"),
                &mut cmd,
                &machine.join("agent.log"),
            )?;
            self.agents.push(((*host).to_owned(), proc));
        }
        self.screen
            .say("  6 agents enrolled with one-shot bootstrap tokens (hosts/<host>/agent.log)");
        Ok(())
    }

    fn check_processes(&mut self) -> Result<(), DemoError> {
        if let Some(cp) = self.cp.as_mut() {
            cp.check_running()?;
        }
        for (_, agent) in &mut self.agents {
            agent.check_running()?;
        }
        Ok(())
    }

    fn report(&self) -> Result<StatusReport, DemoError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| DemoError::Failed("no operator client".into()))?;
        let conn_url = format!("https://localhost:{}", self.cp_port);
        let conn = Connection {
            url: conn_url,
            ca_cert: PathBuf::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            timeout: Duration::from_secs(5),
        };
        Ok(self
            .runtime
            .block_on(crate::operator::fleet_report(&conn, client))?)
    }

    /// Follows release `n` until each of its rollouts converged and every host runs its
    /// closure, printing wave and host changes and counting down soaks.
    fn watch(&mut self, n: u32, rollouts: &BTreeMap<String, String>) -> Result<(), DemoError> {
        let timeout = Duration::from_secs(if self.fast { 180 } else { 300 });
        let start = Instant::now();
        let mut states: BTreeMap<String, String> = BTreeMap::new();
        let mut soaks: BTreeMap<String, Instant> = BTreeMap::new();
        let soak = Duration::from_secs(u64::from(self.soak_minutes()) * 60);
        let names: BTreeMap<&String, String> = rollouts
            .iter()
            .map(|(channel, id)| {
                (
                    id,
                    format!("{channel}@{}", &COMMITS[(n as usize - 1) % 2][..7]),
                )
            })
            .collect();
        loop {
            if interrupted() {
                return Err(DemoError::Interrupted);
            }
            self.check_processes()?;
            let Ok(report) = self.report() else {
                std::thread::sleep(POLL);
                continue;
            };
            let list: Vec<RolloutStatus> = self.get("/v1/rollouts").unwrap_or_default();
            let mut lines = Vec::new();
            let mut spinner = Vec::new();
            let mut all_converged = true;
            for (id, name) in &names {
                let Some(r) = list.iter().find(|r| &&r.rollout_id == id) else {
                    all_converged = false;
                    spinner.push(format!("{name}: waiting for the control plane"));
                    continue;
                };
                let text = render::rollout_state_text(&r.state);
                if states.get(name.as_str()) != Some(&text) {
                    lines.push(format!("  {name:<15} {text}"));
                    states.insert(name.clone(), text.clone());
                }
                let channel = name.split('@').next().unwrap_or(name);
                if text.contains("soaking") {
                    let since = *soaks
                        .entry(format!("{name} {text}"))
                        .or_insert_with(Instant::now);
                    let left = soak.saturating_sub(since.elapsed()).as_secs();
                    spinner.push(format!("{channel} {text} {}:{:02}", left / 60, left % 60));
                } else {
                    spinner.push(format!("{channel} {text}"));
                }
                if state_name(&r.state) != "converged" {
                    all_converged = false;
                }
                for (host, state) in &r.hosts {
                    let key = format!("{name} {host}");
                    let state = state_name(state);
                    if states.get(&key) != Some(&state) {
                        lines.push(format!("  {name:<15}   {host:<8} {state}"));
                        states.insert(key, state);
                    }
                }
            }
            let on_release = report
                .hosts
                .iter()
                .filter(|h| h.converged && on_closure(h.current_closure.as_deref(), n))
                .count();
            let expected = report.hosts.len();
            if !lines.is_empty() {
                self.screen.say(&lines.join("\n"));
            }
            self.screen.wait(&format!(
                "{} · {on_release}/{expected} on release {n}",
                spinner.join(" · ")
            ));
            if all_converged && on_release == expected && expected > 0 {
                self.screen.done_waiting();
                self.screen.say("");
                self.screen.say(&render::fleet(&report, &self.screen.style));
                return Ok(());
            }
            if start.elapsed() > timeout {
                self.screen.done_waiting();
                self.screen.say(&render::fleet(&report, &self.screen.style));
                // The first host that is behind usually says why in its agent log.
                let behind = report
                    .hosts
                    .iter()
                    .find(|h| !h.converged || !on_closure(h.current_closure.as_deref(), n));
                let Some(host) = behind else {
                    return Err(DemoError::Timeout {
                        what: format!("release {n} to converge"),
                        secs: timeout.as_secs(),
                        log: Some(self.path("cp/cp.log")),
                    });
                };
                return Err(DemoError::Failed(format!(
                    "release {n} did not converge within {} s; {} is behind, the last lines of {}:\n{}",
                    timeout.as_secs(),
                    host.name,
                    self.machine(&host.name).join("agent.log").display(),
                    tail(&self.agent_log(&host.name), 12)
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn agent_log(&self, host: &str) -> String {
        std::fs::read_to_string(self.machine(host).join("agent.log")).unwrap_or_default()
    }

    /// Waits until `host`'s agent logs a refusal after `mark` bytes of its log.
    fn wait_refused(&mut self, host: &str, mark: usize) -> Result<(), DemoError> {
        let log = self.machine(host).join("agent.log");
        wait_until(
            &format!("{host} to be refused"),
            Duration::from_secs(60),
            POLL,
            || {
                self.check_processes()?;
                let text = self.agent_log(host);
                Ok(text
                    .get(mark..)
                    .is_some_and(|t| t.contains("revoked or expired"))
                    .then_some(()))
            },
        )
        .map_err(|e| with_log(e, &log))
    }

    fn revoke(&mut self) -> Result<(), DemoError> {
        let mark = self.agent_log(REVOKED).len();
        self.sign_revocations(&[REVOKED])?;
        self.screen.say(&format!(
            "  revocations.json: every certificate of {REVOKED} issued before tomorrow\n  \
             is refused"
        ));
        self.screen.wait(&format!(
            "waiting for the control plane to refuse {REVOKED}"
        ));
        self.wait_refused(REVOKED, mark)?;
        self.screen.done_waiting();
        self.screen.say(&format!(
            "  the control plane applied the signed list; {REVOKED}'s agent is refused (401)"
        ));
        Ok(())
    }

    fn activations(&self, host: &str) -> usize {
        std::fs::read_to_string(self.machine(host).join("activations"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Runbook steps 1-3 and its checks; returns (CP ready, every agent seen again).
    fn disaster_recovery(&mut self, hosts: &[&str]) -> Result<(Duration, Duration), DemoError> {
        let before: Vec<usize> = hosts.iter().map(|h| self.activations(h)).collect();
        let revoked_mark = self.agent_log(REVOKED).len();
        let state = self.path("cp");
        let cp = self
            .cp
            .as_mut()
            .ok_or_else(|| DemoError::Failed("the control plane is not running".into()))?;
        self.screen.say(&format!(
            "  1. kill -TERM {}   (what systemctl stop does)",
            cp.pid().unwrap_or_default()
        ));
        let status = cp.terminate(Duration::from_secs(30))?;
        self.cp = None;
        if !status.success() {
            return Err(DemoError::Failed(format!(
                "the control plane exited with {status} on SIGTERM (expected 0); see {}",
                state.join("cp.log").display()
            )));
        }
        self.screen.say(&format!(
            "  2. cd {} && rm -rf state.db state.db-wal state.db-shm   (audit.log stays)",
            state.display()
        ));
        for file in ["state.db", "state.db-wal", "state.db-shm"] {
            match std::fs::remove_file(state.join(file)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DemoError::io("remove", &state.join(file), e))
                }
                _ => {}
            }
        }
        self.screen
            .say("  3. nixfleet-control-plane with the same flags   (systemctl start)");
        let restarted = Instant::now();
        self.spawn_cp()?;
        self.screen
            .wait("control plane: empty database, priming from signed artifacts");
        self.wait_cp_ready()?;
        let ready = restarted.elapsed();
        self.screen.say(&format!(
            "  healthy with a verified fleet after {:.1} s",
            ready.as_secs_f64()
        ));
        let expected: BTreeSet<&str> = hosts.iter().copied().collect();
        let mut shown = 0;
        let mut seen_lines = Vec::new();
        let recovery = wait_until(
            "every agent to check in again",
            Duration::from_secs(120),
            POLL,
            || {
                self.check_processes()?;
                let Ok(report) = self.report() else {
                    return Ok(None);
                };
                let seen: BTreeSet<&str> = report
                    .hosts
                    .iter()
                    .filter(|h| h.online && h.last_checkin.is_some())
                    .map(|h| h.name.as_str())
                    .filter(|h| expected.contains(h))
                    .collect();
                if seen.len() != shown {
                    shown = seen.len();
                    seen_lines.push(format!(
                        "  {:>5.1} s  {}/{} agents seen",
                        restarted.elapsed().as_secs_f64(),
                        seen.len(),
                        expected.len()
                    ));
                }
                self.screen.wait(&format!(
                    "agents checking in again: {}/{}",
                    seen.len(),
                    expected.len()
                ));
                Ok((seen.len() == expected.len()).then(|| restarted.elapsed()))
            },
        )?;
        self.screen.done_waiting();
        self.screen.say(&seen_lines.join("\n"));
        self.screen.say(&format!(
            "  every agent visible again {:.1} s after the restart",
            recovery.as_secs_f64()
        ));
        self.screen
            .wait(&format!("checking that {REVOKED} is still refused"));
        self.wait_refused(REVOKED, revoked_mark)?;
        self.screen.done_waiting();
        self.screen.say(&format!(
            "  {REVOKED} is still refused: the signed revocation list was applied again\n  \
             before the control plane served any agent"
        ));
        // The fresh database reopens each channel's rollout; every host already runs its
        // closure, so it converges without a single activation.
        self.screen
            .wait("rollouts rebuilt from the signed manifests and check-ins");
        let report = wait_until(
            "the rebuilt rollouts to converge",
            Duration::from_secs(60),
            POLL,
            || {
                self.check_processes()?;
                let Ok(report) = self.report() else {
                    return Ok(None);
                };
                let done = !report.rollouts.is_empty()
                    && report
                        .rollouts
                        .iter()
                        .all(|r| state_name(&r.state) == "converged")
                    && report.hosts.iter().all(|h| h.converged);
                Ok(done.then_some(report))
            },
        )?;
        self.screen.done_waiting();
        let after: Vec<usize> = hosts.iter().map(|h| self.activations(h)).collect();
        if before != after {
            return Err(DemoError::Failed(
                "a host activated something again after the wipe; see hosts/*/agent.log".into(),
            ));
        }
        self.screen.say(
            "  nothing was lost: the rollouts were rebuilt from the signed manifests and\n  \
             the check-ins, and no host was told to activate anything again\n",
        );
        self.screen.say(&render::fleet(&report, &self.screen.style));
        Ok((ready, recovery))
    }

    fn summary(&mut self, t: &Timings, total: Duration, keep_running: bool) {
        self.screen.title("Summary");
        let rows: Vec<Vec<String>> = HOSTS
            .iter()
            .map(|(host, channel, canary)| {
                let running = std::fs::read_link(self.machine(host).join("current-system"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_default();
                let generation = running.rsplit('-').next().unwrap_or("?").to_owned();
                vec![
                    (*host).to_owned(),
                    (*channel).to_owned(),
                    if *canary { "canary" } else { "main" }.to_owned(),
                    self.activations(host).to_string(),
                    format!("release {generation}"),
                    if *host == REVOKED {
                        "revoked, refused".to_owned()
                    } else {
                        "converged".to_owned()
                    },
                ]
            })
            .collect();
        let rows: Vec<Vec<String>> = rows
            .into_iter()
            .map(|mut r| {
                if r[4] == "release 0" {
                    r[4] = "first system".into();
                }
                r
            })
            .collect();
        let table = render::table(
            &["HOST", "CHANNEL", "WAVE", "ACTIVATIONS", "RUNNING", "STATE"],
            &[],
            &rows,
            &self.screen.style,
        );
        self.screen.say(&table.join("\n"));
        let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        self.screen.say(&format!(
            "\n  set-up (keys, Nix closures, cache, control plane, agents)  {}\n  \
             release 1 rolled out                                      {}\n  \
             release 2 rolled out                                      {}\n  \
             control plane healthy after the wipe                      {}\n  \
             recovery time (every agent visible again)                 {}\n  \
             whole demo                                                {}",
            secs(t.setup),
            secs(t.releases.first().copied().unwrap_or_default()),
            secs(t.releases.get(1).copied().unwrap_or_default()),
            secs(t.cp_ready),
            secs(t.recovery),
            secs(total)
        ));
        let nixfleet = nixfleet_command();
        if keep_running {
            self.screen.say(
                "\nThe fleet keeps running until Ctrl-C. In another terminal, explore it with:",
            );
        } else {
            self.screen.say(&format!(
                "\nThe fleet is stopped now. To explore it live, run `{nixfleet} demo --yes \
                 --keep-running --dir {}`, and in another terminal:",
                self.shown_dir.display()
            ));
        }
        // Absolute, for a terminal in another directory; whole, so that it can be copied.
        println!(
            "  export NIXFLEET_CONFIG={}",
            self.path("nixfleet.toml").display()
        );
        for args in [
            "status".to_owned(),
            "status --host web-01".to_owned(),
            "rollout list".to_owned(),
            format!("rollout trace stable@{}", &COMMITS[1][..7]),
        ] {
            self.screen.say(&format!("  {nixfleet} {args}"));
        }
        self.screen.say(
            "Logs: cp/cp.log, hosts/<host>/agent.log; everything is under the demo directory.",
        );
    }

    fn keep_running(&mut self) -> Result<(), DemoError> {
        // The web dashboard, on the same connection file as the commands above: on
        // 127.0.0.1:8080, or any free port when that is taken.
        use crate::operator::dashboard;
        let connection = crate::operator::config::ConnectionArgs {
            config: Some(self.path("nixfleet.toml")),
            ..Default::default()
        };
        let on_port = |port: u16| dashboard::DashboardArgs {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            allow_remote: false,
            refresh_secs: dashboard::DEFAULT_REFRESH_SECS,
        };
        let addr = dashboard::spawn(&self.runtime, &on_port(8080), &connection)
            .or_else(|_| dashboard::spawn(&self.runtime, &on_port(0), &connection))?;
        self.screen.say(&format!(
            "Dashboard: http://{addr}/ (read-only; open it in a browser)"
        ));
        self.screen.wait("fleet running; Ctrl-C stops it");
        loop {
            if interrupted() {
                self.screen.done_waiting();
                self.screen.say("stopping the fleet");
                return Ok(());
            }
            self.check_processes()?;
            std::thread::sleep(POLL);
        }
    }

    /// Stops every agent, then the control plane (SIGTERM), then the forge.
    fn stop(&mut self) {
        self.agents.clear();
        if let Some(mut cp) = self.cp.take() {
            let _ = cp.terminate(Duration::from_secs(15));
        }
        self.forge = None;
    }
}

/// How to run this `nixfleet`: its name when PATH finds this very binary, else its path
/// (relative to the current directory when under it, e.g. `target/release/nixfleet`).
fn nixfleet_command() -> String {
    let Ok(exe) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "nixfleet".into();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .any(|d| std::fs::canonicalize(d.join("nixfleet")).is_ok_and(|found| found == exe))
    });
    if on_path {
        return "nixfleet".into();
    }
    let cwd = std::env::current_dir().and_then(std::fs::canonicalize);
    match cwd
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf))
    {
        Some(relative) => relative.display().to_string(),
        None => exe.display().to_string(),
    }
}

/// Whether `closure` is a system of release `n` (`…-nixos-system-<host>-<n>`).
fn on_closure(closure: Option<&str>, n: u32) -> bool {
    closure.is_some_and(|c| c.ends_with(&format!("-{n}")))
}

/// Copies `from` to `to` through a temporary file and a rename: a reader of `to` sees
/// the old file or the new one, never half of one.
fn copy_atomic(from: &Path, to: &Path) -> Result<(), DemoError> {
    if let Some(parent) = to.parent() {
        files::create_dir(parent)?;
    }
    let part = to.with_extension("publishing");
    std::fs::copy(from, &part).map_err(|e| DemoError::io("copy", from, e))?;
    std::fs::rename(&part, to).map_err(|e| DemoError::io("publish", to, e))
}

/// Channel → rollout id of the release signed into `dir`.
fn rollout_ids(dir: &Path) -> Result<BTreeMap<String, String>, DemoError> {
    let fleet_path = dir.join("fleet.resolved.json");
    let fleet = std::fs::read(&fleet_path).map_err(|e| DemoError::io("read", &fleet_path, e))?;
    let fleet_hash = jcs::sha256_hex(&fleet);
    let rollouts = dir.join("rollouts");
    let mut ids = BTreeMap::new();
    for entry in std::fs::read_dir(&rollouts)
        .map_err(|e| DemoError::io("read", &rollouts, e))?
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| DemoError::io("read", &path, e))?;
        let Ok(manifest) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        if manifest["fleetResolvedHash"] == fleet_hash.as_str() {
            if let (Some(channel), Some(id)) = (
                manifest["channel"].as_str(),
                path.file_stem().and_then(|s| s.to_str()),
            ) {
                ids.insert(channel.to_owned(), id.to_owned());
            }
        }
    }
    Ok(ids)
}

/// `line` with each SHA-256 in hex cut to its first 12 digits (as `nixfleet rollout list`
/// shows ids).
fn shorten_hashes(line: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() == 64 {
            out.push_str(&run[..12]);
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in line.chars() {
        if c.is_ascii_hexdigit() && !c.is_ascii_uppercase() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A free loopback port for the control plane, below Linux's ephemeral range
/// (32768-60999): an outgoing connection never takes it, so the restarted control plane
/// gets it back after the wipe.
fn free_port() -> Result<u16, DemoError> {
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for i in 0..2000 {
        let port = 20_000 + ((seed.wrapping_add(i * 7)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(DemoError::Failed(
        "no free port between 20000 and 32000 on 127.0.0.1 for the control plane".into(),
    ))
}

/// A timeout error also says which log tells more, with its last lines.
fn with_log(e: DemoError, log: &Path) -> DemoError {
    match e {
        DemoError::Timeout { what, secs, .. } => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            DemoError::Failed(format!(
                "timed out after {secs} s waiting for {what}; the last lines of {}:\n{}",
                log.display(),
                tail(&text, 12)
            ))
        }
        other => other,
    }
}
