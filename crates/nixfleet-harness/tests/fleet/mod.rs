//! The fleet the scenarios share: the real control plane, one real `nixfleet-agent` per
//! host (its own host key, state dir, profile and current-system link), a forge serving
//! the signed artifacts, and a signed Nix binary cache over HTTP.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nixfleet_harness::agent::{AgentConfig, AgentProc};
use nixfleet_harness::nix::{delete_from_store, Cache, Machine};
use nixfleet_harness::*;
use serde_json::Value;

pub const COMMIT: &str = "1111111111111111111111111111111111111111";
pub const LONG: Duration = Duration::from_secs(90);
/// The agents' poll interval in these scenarios.
pub const POLL_SECS: u64 = 5;

/// One host: its key, its test machine (running generation 0) and its agent.
pub struct Node {
    pub host: Host,
    pub key_dir: PathBuf,
    pub machine: Machine,
    pub gen0: String,
    pub gen1: String,
    pub agent: Option<AgentProc>,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.host.name
    }

    pub fn agent(&self) -> &AgentProc {
        self.agent.as_ref().expect("agent started")
    }

    pub fn log(&self) -> String {
        self.agent().log_text()
    }

    pub fn state(&self) -> Value {
        let path = self.machine.dir.join("agent-state/state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or(Value::Null)
    }
}

/// A fleet of hosts in channel `stable`, each with a gen0 installed and a signed gen1 in
/// the cache; the release (gen1 everywhere) is on the forge and in the build-time
/// directory.
pub struct Fleet {
    // Dropped in this order: the CP and the agents are killed before the forge stops
    // and the temporary directory goes.
    pub cp: Option<Cp>,
    pub nodes: Vec<Node>,
    pub forge: Forge,
    pub pki: Pki,
    pub forge_dir: PathBuf,
    pub cp_port: u16,
    pub rollout: String,
    /// The fleet declaration CI released (before `nixfleet release` resolved it).
    pub decl: Value,
    /// The signed binary cache the forge serves.
    pub cache: Cache,
    /// Extra flags for the CP.
    pub cp_extra: Vec<String>,
    pub tmp: tempfile::TempDir,
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Fleet {
    // A failed scenario shows what every process said last.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for node in &self.nodes {
            if let Some(agent) = &node.agent {
                eprintln!(
                    "---- agent {} ----\n{}",
                    node.name(),
                    tail(&agent.log_text(), 40)
                );
            }
        }
        if let Some(cp) = &self.cp {
            let text = cp.log_text();
            let log: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains(" poll: ") && !l.contains("checkin received"))
                .map(|l| l.get(..400).unwrap_or(l))
                .collect();
            eprintln!("---- control plane ----\n{}", tail(&log.join("\n"), 80));
            let client = Client::operator(&self.pki, self.cp_port);
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let reply =
                    rt.block_on(client.try_request(hyper::Method::GET, "/v1/rollouts", None, &[]));
                if let Ok(reply) = reply {
                    eprintln!(
                        "---- /v1/rollouts ----\n{}",
                        String::from_utf8_lossy(&reply.body)
                    );
                }
            }
        }
    }
}

impl Fleet {
    pub fn new(names: &[String], policy: Value, revoked: Value) -> Fleet {
        Fleet::new_with(names, policy, revoked, |_| {})
    }

    /// As [`Fleet::new`], with `edit` applied to the fleet declaration before release.
    pub fn new_with(
        names: &[String],
        policy: Value,
        revoked: Value,
        edit: impl FnOnce(&mut Value),
    ) -> Fleet {
        Fleet::new_built(names, policy, revoked, edit, |machine, name| {
            machine.build(name)
        })
    }

    /// As [`Fleet::new_with`], with each host's released closure (gen1) built by
    /// `build(machine, name)` rather than [`Machine::build`].
    pub fn new_built(
        names: &[String],
        policy: Value,
        revoked: Value,
        edit: impl FnOnce(&mut Value),
        build: impl Fn(&Machine, &str) -> String,
    ) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let forge_dir = tmp.path().join("forge");
        let cache = Cache::new(&forge_dir.join("cache"), "fleet-cache-1");
        let pki = Pki::with_cache_keys(tmp.path(), &[&cache.public_key]);
        let mut nodes = Vec::new();
        for name in names {
            let key_dir = tmp.path().join(format!("hostkey-{name}"));
            let host = Host::from_ssh_keygen(name, &key_dir);
            let machine = Machine::new(&tmp.path().join(format!("machine-{name}")));
            let gen0 = machine.build(&format!("nixos-system-{name}-0"));
            machine.install(&gen0);
            let gen1 = build(&machine, &format!("nixos-system-{name}-1"));
            cache.push(&gen1);
            delete_from_store(&gen1);
            host.token_file(&pki, &machine.dir.join("token.json"));
            nodes.push(Node {
                host,
                key_dir,
                machine,
                gen0,
                gen1,
                agent: None,
            });
        }
        let mut fleet = fleet_json(&nodes.iter().map(|n| &n.host).collect::<Vec<_>>(), policy);
        edit(&mut fleet);
        let closures: serde_json::Map<String, Value> = nodes
            .iter()
            .map(|n| (n.name().to_owned(), Value::String(n.gen1.clone())))
            .collect();
        let closures = Value::Object(closures);
        release_with_fallback(&pki, &forge_dir, &fleet, &closures, COMMIT, &[]);
        let rollout = rollout_id(&forge_dir, "stable");
        sign_revocations(&pki, &forge_dir, revoked);
        let forge = Forge::start(&forge_dir);
        Fleet {
            tmp,
            pki,
            forge_dir,
            forge,
            nodes,
            cp: None,
            cp_port: free_port(),
            rollout,
            decl: fleet,
            cache,
            cp_extra: Vec::new(),
        }
    }

    /// CI releases `closures` ({host: closure}) of the same fleet as `commit`: signed into
    /// a staging directory, then published to the forge manifests first, so that the CP
    /// never sees a fleet whose manifest is not there yet. Returns the new rollout id.
    pub fn release_next(&self, closures: &Value, commit: &str) -> String {
        self.publisher_at(&format!("release-{commit}"))
            .publish(closures, commit)
    }

    /// A CI that can publish releases from another thread while the test keeps the fleet
    /// (it owns copies of what it needs). It signs into one staging directory of its own.
    pub fn publisher(&self) -> Publisher {
        self.publisher_at("ci-staging")
    }

    fn publisher_at(&self, staging: &str) -> Publisher {
        Publisher {
            pki: Pki {
                dir: self.pki.dir.clone(),
            },
            staging: self.tmp.path().join(staging),
            forge_dir: self.forge_dir.clone(),
            decl: self.decl.clone(),
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the CP process.
    pub fn signal_cp(&self, signal: &str) {
        let pid = self
            .cp
            .as_ref()
            .and_then(|cp| cp.child.as_ref())
            .expect("CP running")
            .id();
        sh_ok(&format!("kill -{signal} {pid}"));
    }

    pub fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("var-lib-nixfleet-cp")
    }

    /// Spawns the CP (the same flags every time, as a systemd unit would).
    pub fn spawn_cp(&mut self) {
        let cp = Cp::start_on(
            &self.pki,
            &self.forge,
            self.cp_port,
            &self.state_dir(),
            &CpOptions {
                extra: self.cp_extra.clone(),
                ..CpOptions::default()
            },
        );
        self.cp = Some(cp);
    }

    pub fn cp(&mut self) -> &mut Cp {
        self.cp.as_mut().expect("CP running")
    }

    pub fn start_agents(&mut self) {
        let url = self.forge.url("cache");
        for node in &mut self.nodes {
            let mut config = AgentConfig::new(
                &self.pki,
                self.cp_port,
                &node.host,
                &node.key_dir,
                &node.machine,
                &url,
            );
            config.poll_interval_secs = POLL_SECS;
            node.agent = Some(AgentProc::start(&config));
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name() == name).unwrap()
    }

    /// Runs an operator GET with the harness's mTLS client.
    pub fn operator_get(&self, path: &str) -> Reply {
        let client = Client::operator(&self.pki, self.cp_port);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client.get(path))
    }

    pub fn curl_operator(&self, path: &str) -> String {
        format!(
            "curl -sk --cacert {} --cert {} --key {} https://localhost:{}{path}",
            self.pki.path("etc/ca.pem").display(),
            self.pki.path("operator/operator-cert.pem").display(),
            self.pki.path("operator/operator-key.pem").display(),
            self.cp_port
        )
    }

    /// The rollout's state as the operator API reports it.
    pub fn rollout_state(&self) -> Value {
        let list = self.operator_get("/v1/rollouts").json();
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["rollout_id"] == self.rollout.as_str())
            .map(|r| r["state"].clone())
            .unwrap_or(Value::Null)
    }

    /// Waits until every named host's agent has confirmed gen1 (exactly one activation).
    pub fn wait_confirmed(&self, names: &[&str]) -> Instant {
        for name in names {
            let node = self.node(name);
            wait_for(&format!("{name} to confirm gen1"), LONG, || {
                node.log().contains("confirm of")
            });
            assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
        }
        Instant::now()
    }

    /// Agent log lengths now, to look at what comes after.
    pub fn log_marks(&self) -> Vec<usize> {
        self.nodes.iter().map(|n| n.log().len()).collect()
    }

    /// Asserts that no agent was told to act (target or rollback) since `marks`.
    pub fn assert_no_orders_since(&self, marks: &[usize], skip: &[&str]) {
        for (node, mark) in self.nodes.iter().zip(marks) {
            if skip.contains(&node.name()) {
                continue;
            }
            let after = &node.log()[*mark..];
            for line in after.lines().filter(|l| l.contains("checked in")) {
                assert!(
                    line.contains("target=None") && line.contains("rollback=None"),
                    "{} told to act after the wipe: {line}",
                    node.name()
                );
            }
            for bad in [
                "rollback signal",
                "rolling back",
                "switching to",
                "rolled back",
            ] {
                assert!(
                    !after.contains(bad),
                    "{}: {bad:?} after the wipe:\n{after}",
                    node.name()
                );
            }
        }
    }

    /// Waits until each agent not in `skip` has checked in `n` times since `marks`.
    pub fn wait_checkins_since(&self, marks: &[usize], n: usize, skip: &[&str]) {
        for (node, mark) in self.nodes.iter().zip(marks) {
            if skip.contains(&node.name()) {
                continue;
            }
            wait_for(&format!("{}: {n} check-ins", node.name()), LONG, || {
                node.log()[*mark..].matches("checked in").count() >= n
            });
        }
    }
}

/// CI publishing releases of the fleet declaration, as [`Fleet::release_next`] does, but
/// usable from a thread of its own. Its release calls write the PKI directory's
/// fleet.json and closures.json: callers serialise them with every other release.
pub struct Publisher {
    pki: Pki,
    staging: PathBuf,
    forge_dir: PathBuf,
    decl: Value,
}

impl Publisher {
    /// Signs `closures` ({host: closure}) as `commit` now and publishes it to the forge,
    /// manifests before the fleet; returns the rollout id of `stable`.
    pub fn publish(&self, closures: &Value, commit: &str) -> String {
        release_closures(&self.pki, &self.staging, &self.decl, closures, commit, &[]);
        let id = rollout_id(&self.staging, "stable");
        // The lists a schema-2 manifest commits to go first: a reader never finds a
        // signed manifest without them.
        let mut lists = Vec::new();
        for dir in ["rollouts/budgets", "rollouts/channel/budgets"] {
            std::fs::create_dir_all(self.forge_dir.join(dir)).unwrap();
            if let Ok(entries) = std::fs::read_dir(self.staging.join(dir)) {
                for e in entries.flatten() {
                    lists.push(format!("{dir}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        lists.push(format!("rollouts/{id}.hosts.json"));
        lists.push("rollouts/channel/stable.hosts.json".to_owned());
        for rel in lists.into_iter().chain([
            format!("rollouts/{id}.json.sig"),
            format!("rollouts/{id}.json"),
            "rollouts/channel/stable.json.sig".to_owned(),
            "rollouts/channel/stable.json".to_owned(),
            "fleet.resolved.json.sig".to_owned(),
            "fleet.resolved.json".to_owned(),
        ]) {
            let dest = self.forge_dir.join(&rel);
            let part = dest.with_extension("publishing");
            std::fs::copy(self.staging.join(&rel), &part).unwrap();
            std::fs::rename(&part, &dest).unwrap();
        }
        id
    }
}

/// A shell pipeline, as an operator would type it; returns its stdout.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A shell command that must succeed.
pub fn sh_ok(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runbook's last Verify command on a log file: every host that checked in.
pub fn checked_in(log: &std::path::Path) -> BTreeSet<String> {
    sh(&format!(
        "cat {} | grep 'checkin received' | awk '{{print $NF}}' | sort -u",
        log.display()
    ))
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// These scenarios need real Nix; without it they fail rather than pass vacuously.
pub fn require_nix() {
    assert!(
        nixfleet_harness::nix::nix_available(),
        "nix-store not found: the fleet scenarios need real Nix (apt-get install -y nix-bin)"
    );
}

pub fn in_an_hour() -> String {
    sh("date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ")
        .trim()
        .to_owned()
}

/// Runbook steps 1-3: SIGTERM, `rm -rf state.db state.db-wal state.db-shm`, start. Returns
/// the instant of the restart.
pub fn wipe_and_restart(f: &mut Fleet) -> Instant {
    let mut old = f.cp.take().expect("CP running");
    assert_eq!(
        old.terminate(),
        Some(0),
        "SIGTERM exits 0:\n{}",
        old.log_text()
    );
    let dir = f.state_dir();
    sh_ok(&format!(
        "cd {} && rm -rf state.db state.db-wal state.db-shm",
        dir.display()
    ));
    assert!(!dir.join("state.db").exists());
    let restarted = Instant::now();
    f.spawn_cp();
    restarted
}

/// One row of the summary table that `scripts/test` prints after the run: scenario,
/// result, key timings. Written when dropped, so a scenario that panics shows as FAILED.
pub struct Summary {
    scenario: String,
    started: Instant,
    timings: Vec<String>,
}

impl Summary {
    pub fn begin(scenario: &str) -> Summary {
        Summary {
            scenario: scenario.to_owned(),
            started: Instant::now(),
            timings: Vec::new(),
        }
    }

    pub fn timing(&mut self, what: &str, d: Duration) {
        eprintln!("{}: {what} {:.1} s", self.scenario, d.as_secs_f64());
        self.timings
            .push(format!("{what} {:.1} s", d.as_secs_f64()));
    }
}

impl Drop for Summary {
    fn drop(&mut self) {
        use std::io::Write as _;
        let result = if std::thread::panicking() {
            "FAILED"
        } else {
            "passed"
        };
        let line = format!(
            "{}\t{result}\t{:.0} s\t{}\n",
            self.scenario,
            self.started.elapsed().as_secs_f64(),
            self.timings.join("; ")
        );
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-scenarios.tsv");
        // One append of one short line: rows from concurrent scenarios do not interleave.
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// The time stamp of each line of an agent log that contains `needle`.
pub fn log_times(log: &str, needle: &str) -> Vec<time::OffsetDateTime> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .collect()
}
