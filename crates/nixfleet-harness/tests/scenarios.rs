//! End-to-end fleet scenarios: the real control plane, real `nixfleet-agent` processes (one
//! per host, each with its own host key, state dir, profile and current-system link), a
//! forge serving the signed artifacts, and a signed Nix binary cache over HTTP.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nixfleet_harness::agent::{AgentConfig, AgentProc};
use nixfleet_harness::nix::{delete_from_store, Cache, Machine};
use nixfleet_harness::*;
use serde_json::{json, Value};

const COMMIT: &str = "1111111111111111111111111111111111111111";
const LONG: Duration = Duration::from_secs(90);
/// The agents' poll interval in these scenarios.
const POLL_SECS: u64 = 5;

/// One host: its key, its test machine (running generation 0) and its agent.
struct Node {
    host: Host,
    key_dir: PathBuf,
    machine: Machine,
    gen0: String,
    gen1: String,
    agent: Option<AgentProc>,
}

impl Node {
    fn name(&self) -> &str {
        &self.host.name
    }

    fn agent(&self) -> &AgentProc {
        self.agent.as_ref().expect("agent started")
    }

    fn log(&self) -> String {
        self.agent().log_text()
    }

    fn state(&self) -> Value {
        let path = self.machine.dir.join("agent-state/state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or(Value::Null)
    }
}

/// A fleet of hosts in channel `stable`, each with a gen0 installed and a signed gen1 in
/// the cache; the release (gen1 everywhere) is on the forge and in the build-time
/// directory.
struct Fleet {
    // Dropped in this order: the CP and the agents are killed before the forge stops
    // and the temporary directory goes.
    cp: Option<Cp>,
    nodes: Vec<Node>,
    forge: Forge,
    pki: Pki,
    forge_dir: PathBuf,
    cp_port: u16,
    rollout: String,
    tmp: tempfile::TempDir,
}

impl Fleet {
    fn new(names: &[String], policy: Value, revoked: Value) -> Fleet {
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
            let gen1 = machine.build(&format!("nixos-system-{name}-1"));
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
        let fleet = fleet_json(&nodes.iter().map(|n| &n.host).collect::<Vec<_>>(), policy);
        let closures: serde_json::Map<String, Value> = nodes
            .iter()
            .map(|n| (n.name().to_owned(), Value::String(n.gen1.clone())))
            .collect();
        let closures = Value::Object(closures);
        release_closures(&pki, &forge_dir, &fleet, &closures, COMMIT, &[]);
        release_closures(
            &pki,
            &pki.path("build-time"),
            &fleet,
            &closures,
            COMMIT,
            &[],
        );
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
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.tmp.path().join("var-lib-nixfleet-cp")
    }

    /// Spawns the CP (the same flags every time, as a systemd unit would).
    fn spawn_cp(&mut self) {
        let cp = Cp::start_on(
            &self.pki,
            &self.forge,
            self.cp_port,
            &self.state_dir(),
            &CpOptions::default(),
        );
        self.cp = Some(cp);
    }

    fn cp(&mut self) -> &mut Cp {
        self.cp.as_mut().expect("CP running")
    }

    fn start_agents(&mut self) {
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

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name() == name).unwrap()
    }

    /// Runs an operator GET with the harness's mTLS client.
    fn operator_get(&self, path: &str) -> Reply {
        let client = Client::operator(&self.pki, self.cp_port);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client.get(path))
    }

    fn curl_operator(&self, path: &str) -> String {
        format!(
            "curl -sk --cacert {} --cert {} --key {} https://localhost:{}{path}",
            self.pki.path("etc/ca.pem").display(),
            self.pki.path("operator/operator-cert.pem").display(),
            self.pki.path("operator/operator-key.pem").display(),
            self.cp_port
        )
    }

    /// The rollout's state as the operator API reports it.
    fn rollout_state(&self) -> Value {
        let list = self.operator_get("/v1/rollouts").json();
        list.as_array()
            .unwrap()
            .iter()
            .find(|r| r["rollout_id"] == self.rollout.as_str())
            .map(|r| r["state"].clone())
            .unwrap_or(Value::Null)
    }

    /// Waits until every named host's agent has confirmed gen1 (exactly one activation).
    fn wait_confirmed(&self, names: &[&str]) -> Instant {
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
    fn log_marks(&self) -> Vec<usize> {
        self.nodes.iter().map(|n| n.log().len()).collect()
    }

    /// Asserts that no agent was told to act (target or rollback) since `marks`.
    fn assert_no_orders_since(&self, marks: &[usize], skip: &[&str]) {
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
    fn wait_checkins_since(&self, marks: &[usize], n: usize, skip: &[&str]) {
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

/// A shell pipeline, as an operator would type it; returns its stdout.
fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A shell command that must succeed.
fn sh_ok(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runbook's last Verify command on a log file: every host that checked in.
fn checked_in(log: &std::path::Path) -> BTreeSet<String> {
    sh(&format!(
        "cat {} | grep 'checkin received' | awk '{{print $NF}}' | sort -u",
        log.display()
    ))
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// These scenarios need real Nix; without it they fail rather than pass vacuously.
fn require_nix() {
    assert!(
        nixfleet_harness::nix::nix_available(),
        "nix-store not found: the fleet scenarios need real Nix (apt-get install -y nix-bin)"
    );
}

fn in_an_hour() -> String {
    sh("date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ")
        .trim()
        .to_owned()
}

/// Runbook steps 1-3: SIGTERM, `rm -rf state.db state.db-wal state.db-shm`, start. Returns
/// the instant of the restart.
fn wipe_and_restart(f: &mut Fleet) -> Instant {
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

// ---- scenario 1 -----------------------------------------------------------------------------

#[test]
fn teardown_runbook_literally_with_ten_agents_and_a_revoked_host() {
    require_nix();
    let good: Vec<String> = (1..=10).map(|i| format!("web-{i:02}")).collect();
    let revoked_name = "lost-01".to_owned();
    let mut names = good.clone();
    names.push(revoked_name.clone());
    let mut f = Fleet::new(
        &names,
        canary_policy("halt", 0),
        json!([{"hostname": revoked_name, "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]),
    );
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();

    // The fleet rolls out gen1 once: every good host activates and confirms it.
    f.wait_confirmed(&good.iter().map(String::as_str).collect::<Vec<_>>());
    let lost = f.node(&revoked_name);
    wait_for("the revoked host to be refused", LONG, || {
        lost.log().contains("it is revoked or expired")
    });
    assert!(lost.machine.activations().is_empty());
    let lost_cert = std::fs::read_to_string(lost.machine.dir.join("agent-state/cert.pem")).unwrap();

    // ---- Pre-flight ----
    // 1. Signed artifacts reachable from the configured URLs, and they verify.
    let pre = f.tmp.path().join("preflight");
    std::fs::create_dir_all(&pre).unwrap();
    for file in [
        "fleet.resolved.json",
        "fleet.resolved.json.sig",
        "revocations.json",
        "revocations.json.sig",
    ] {
        sh_ok(&format!(
            "curl -sf -o {} {}",
            pre.join(file).display(),
            f.forge.url(file)
        ));
    }
    let trust = f.pki.path("etc/trust.json");
    let nixfleet = bin("nixfleet");
    let verify = |kind: &str, dir: &std::path::Path, name: &str| {
        sh_ok(&format!(
            "{} verify {kind} --trust-file {} {}",
            nixfleet.display(),
            trust.display(),
            dir.join(name).display()
        ))
    };
    verify("fleet", &pre, "fleet.resolved.json");
    verify("revocations", &pre, "revocations.json");
    // 2. Build-time fallback intact.
    verify("fleet", &f.pki.path("build-time"), "fleet.resolved.json");
    // 3. Fleet CA available.
    for pem in ["etc/fleet-ca-cert.pem", "etc/fleet-ca-key.pem"] {
        sh_ok(&format!("grep -q 'BEGIN' {}", f.pki.path(pem).display()));
    }
    // 4. At least one agent currently online.
    let online = sh(&format!(
        "{} | jq '[.[] | select(.online)] | length'",
        f.curl_operator("/v1/hosts")
    ));
    assert_eq!(
        online.trim(),
        "10",
        "every good agent online before the wipe"
    );

    let audit_before = std::fs::read(f.state_dir().join("audit.log")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&audit_before).lines().count(),
        names.len(),
        "one issuance line per enrollment"
    );
    let logs_before = f.log_marks();

    // ---- Procedure ----
    let restarted = wipe_and_restart(&mut f);
    let new_log = f.cp().log.clone();

    // The revoked host is refused from the CP's very first answer: the signed list is
    // replayed before any agent request is served (never a 503 window, never a 200).
    let probe_host = Host {
        name: revoked_name.clone(),
        key: f.node(&revoked_name).host.key.clone(),
        cert_pem: Some(lost_cert),
    };
    let probe = Client::host(&f.pki, f.cp_port, &probe_host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lost_gen0 = f.node(&revoked_name).gen0.clone();
    let first = rt.block_on(async {
        let body = checkin_body(&revoked_name, &lost_gen0, None, json!([]));
        loop {
            if let Ok(r) = probe.try_post("/v1/agent/checkin", &body).await {
                return r.status;
            }
            assert!(restarted.elapsed() < LONG, "the CP never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_eq!(
        first, 401,
        "the revoked host's first answer after the wipe must be 401"
    );

    // Full visibility: every good agent checked in with the new CP.
    let expected: BTreeSet<String> = good.iter().cloned().collect();
    wait_for("every good agent to check in again", LONG, || {
        checked_in(&new_log) == expected
    });
    let visible = restarted.elapsed();
    eprintln!(
        "teardown: restart to full visibility of {} agents at a {POLL_SECS} s poll: {:.2} s",
        good.len(),
        visible.as_secs_f64()
    );
    assert!(
        visible <= Duration::from_secs(2 * POLL_SECS),
        "restart to full visibility took {visible:?}, over 2 poll intervals"
    );
    f.cp.as_mut().unwrap().wait_ready(&f.pki);

    // ---- Verify, as written ----
    let healthz = sh(&format!(
        "curl -sk https://localhost:{}/healthz | jq '.last_tick_at != null'",
        f.cp_port
    ));
    assert_eq!(healthz.trim(), "true");
    let signed_at = sh(&format!(
        "{} | jq '.signed_at'",
        f.curl_operator("/v1/channels/stable")
    ));
    let released: Value =
        serde_json::from_slice(&std::fs::read(f.forge_dir.join("fleet.resolved.json")).unwrap())
            .unwrap();
    assert_eq!(
        signed_at.trim(),
        format!("\"{}\"", released["meta"]["signedAt"].as_str().unwrap())
    );
    let revocations = sh(&format!(
        "cat {} | grep -E 'revocations poll|cert_revocations'",
        new_log.display()
    ));
    assert!(
        revocations.contains("cert_revocations now has 1 rows"),
        "{revocations}"
    );
    assert_eq!(
        checked_in(&new_log),
        expected,
        "the revoked host never gets in"
    );

    // The operator view agrees: every good host seen since the restart, on gen1.
    let hosts = f.operator_get("/v1/hosts").json();
    for h in hosts.as_array().unwrap() {
        let name = h["name"].as_str().unwrap();
        if name == revoked_name {
            assert!(h["last_checkin"].is_null(), "revoked host seen: {h}");
        } else {
            assert!(!h["last_checkin"].is_null(), "{name} not seen: {h}");
            assert_eq!(h["current_closure"], f.node(name).gen1.as_str());
        }
    }

    // The revoked host stays refused: the agent keeps failing, the CP keeps saying 401.
    let lost = f.node(&revoked_name);
    let lost_before = logs_before[names.len() - 1];
    wait_for("the revoked agent to be refused again", LONG, || {
        lost.log()[lost_before..].contains("it is revoked or expired")
    });
    assert!(lost.machine.activations().is_empty());

    // No agent is told to roll back or re-activate: two more check-ins each, answered
    // with no target and no rollback; nothing switched again.
    let skip = [revoked_name.as_str()];
    f.wait_checkins_since(&logs_before, 2, &skip);
    f.assert_no_orders_since(&logs_before, &skip);
    for node in f.nodes.iter().filter(|n| n.name() != revoked_name) {
        assert_eq!(
            node.machine.activations(),
            vec![node.gen1.clone()],
            "{} activated again",
            node.name()
        );
        assert_eq!(node.machine.current().as_deref(), Some(node.gen1.as_str()));
        assert_eq!(node.state()["machine"]["phase"]["phase"], "idle");
    }

    // audit.log survives the wipe byte for byte.
    let audit_after = std::fs::read(f.state_dir().join("audit.log")).unwrap();
    assert_eq!(
        audit_after, audit_before,
        "audit.log changed across the wipe"
    );
}

// ---- scenario 2 -----------------------------------------------------------------------------

/// Three waves: canary (no soak), wave 1 soaking one minute, then everyone.
fn three_waves(wave1: &[&str]) -> Value {
    json!({
        "strategy": "canary",
        "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 0},
                  {"selector": {"hosts": wave1}, "soakMinutes": 1},
                  {"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
        "onHealthFailure": "halt"
    })
}

#[test]
fn teardown_mid_rollout_continues_the_soak_from_last_confirmed_at_and_converges() {
    require_nix();
    let names: Vec<String> = ["canary-01", "web-01", "web-02", "web-03", "web-04"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (wave0, wave1, wave2) = (["canary-01"], ["web-01", "web-02"], ["web-03", "web-04"]);
    let mut f = Fleet::new(&names, three_waves(&wave1), json!([]));
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    f.wait_confirmed(&wave0);
    let wave1_confirmed = f.wait_confirmed(&wave1);
    // Wave 1 is soaking; wave 2 has not been told anything.
    for name in wave2 {
        assert!(f.node(name).machine.activations().is_empty());
    }
    // Let the soak run a while (five check-ins of each wave-1 agent, about 25 s), so
    // that a soak restarted at the wipe would end visibly later than one continued.
    let marks = f.log_marks();
    for name in wave1 {
        let (node, mark) = f
            .nodes
            .iter()
            .zip(&marks)
            .find(|(n, _)| n.name() == name)
            .unwrap();
        wait_for(&format!("{name} soaking through 5 check-ins"), LONG, || {
            node.log()[*mark..].matches("checked in").count() >= 5
        });
    }
    for name in wave2 {
        assert!(
            f.node(name).machine.activations().is_empty(),
            "{name} dispatched before wave 1 soaked"
        );
    }
    let soaking = json!({"executing": {"wave": 1, "phase": "soaking"}});
    assert_eq!(f.rollout_state(), soaking, "wave 1 soaking before the wipe");

    let marks = f.log_marks();
    let restarted = wipe_and_restart(&mut f);
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    let log = f.cp().log.clone();
    wait_for("every agent to check in again", LONG, || {
        checked_in(&log) == expected
    });
    // Rebuilt from the agents' attestations: still wave 1, still soaking.
    wait_for("the rollout to be rebuilt at wave 1", LONG, || {
        f.rollout_state() == soaking
    });

    // Wave 2 is dispatched once wave 1 has soaked one minute since its agents'
    // lastConfirmedAt: not earlier, and not a minute after the restart.
    let w2 = f.node(wave2[0]);
    wait_for("wave 2 to be dispatched", LONG, || {
        !w2.machine.activations().is_empty()
    });
    let promoted = Instant::now();
    let soaked = promoted - wave1_confirmed;
    let since_restart = promoted - restarted;
    eprintln!(
        "teardown mid-rollout: wave 2 started {:.1} s after wave 1 confirmed, {:.1} s after the restart",
        soaked.as_secs_f64(),
        since_restart.as_secs_f64()
    );
    assert!(
        soaked >= Duration::from_secs(58),
        "wave 2 promoted early: {soaked:?} after wave 1 confirmed"
    );
    assert!(
        since_restart < Duration::from_secs(60),
        "the soak started over at the restart: wave 2 began {since_restart:?} after it"
    );
    f.wait_confirmed(&wave2);
    wait_for("the rollout to converge", LONG, || {
        f.rollout_state() == "converged"
    });
    // Waves 0 and 1 were not re-run: one activation each, no orders since the wipe.
    let done: Vec<&str> = wave0.iter().chain(&wave1).copied().collect();
    f.assert_no_orders_since(&marks, &wave2);
    for name in &done {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
    for name in wave2 {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
}

// ---- scenario 3 -----------------------------------------------------------------------------

#[test]
fn teardown_of_a_halted_rollout_stays_halted_and_nothing_re_activates() {
    require_nix();
    let names: Vec<String> = ["canary-01", "web-01", "web-02"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut f = Fleet::new(&names, canary_policy("halt", 0), json!([]));
    // The canary's switch fails: it rolls back to gen0 and the rollout halts.
    let canary = f.node("canary-01");
    canary.machine.set("fail", "nixos-system-canary-01-1", true);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    let canary = f.node("canary-01");
    wait_for("the canary to roll back", LONG, || {
        canary.log().contains("rolled back from")
    });
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()]
    );
    wait_for("the rollout to halt", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    let halted = f.rollout_state();
    // The failure no longer blocks the switch: only the halt keeps it from coming back.
    canary
        .machine
        .set("fail", "nixos-system-canary-01-1", false);

    let marks = f.log_marks();
    wipe_and_restart(&mut f);
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    let log = f.cp().log.clone();
    wait_for("every agent to check in again", LONG, || {
        checked_in(&log) == expected
    });
    // Several check-ins each after the wipe: the halt is rebuilt and holds.
    f.wait_checkins_since(&marks, 3, &[]);
    assert_eq!(f.rollout_state(), halted, "the halt is lost in the wipe");
    f.assert_no_orders_since(&marks, &[]);
    let canary = f.node("canary-01");
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()],
        "the failed closure was activated again"
    );
    assert_eq!(
        canary.machine.current().as_deref(),
        Some(canary.gen0.as_str())
    );
    for name in ["web-01", "web-02"] {
        assert!(
            f.node(name).machine.activations().is_empty(),
            "{name} dispatched after the wipe of a halted rollout"
        );
    }
}
