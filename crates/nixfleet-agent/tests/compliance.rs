//! The runtime compliance gate end to end: the real agent binary against the real control
//! plane, with real Nix closures that carry `etc/nixfleet/compliance.json` and whose
//! probes are `/bin/sh` commands that pass, fail, hang, or read a file the test changes.
//! Probes get only `PATH=/run/wrappers/bin:/run/current-system/sw/bin`, which this test
//! machine lacks: they use shell builtins and absolute paths.

use std::path::PathBuf;
use std::time::Duration;

use nixfleet_harness::agent::{AgentConfig, AgentProc};
use nixfleet_harness::nix::{delete_from_store, Cache, Machine};
use nixfleet_harness::*;
use serde_json::{json, Value};

const HOST: &str = "web-01";
const COMMIT: &str = "1111111111111111111111111111111111111111";
const LONG: Duration = Duration::from_secs(60);

/// One host running generation 0 (no probe set), a CP, a forge with the binary cache.
struct Fleet {
    tmp: tempfile::TempDir,
    pki: Pki,
    forge_dir: PathBuf,
    forge: Forge,
    cache: Cache,
    host: Host,
    machine: Machine,
    fleet: Value,
    gen0: String,
    cp: Option<Cp>,
    cp_port: u16,
}

impl Fleet {
    fn new() -> Fleet {
        assert!(
            nixfleet_harness::nix::nix_available(),
            "nix-store not found: these tests need real Nix (apt-get install -y nix-bin)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let forge_dir = tmp.path().join("forge");
        let cache = Cache::new(&forge_dir.join("cache"), "fleet-cache-1");
        let pki = Pki::with_cache_keys(tmp.path(), &[&cache.public_key]);
        let host = Host::from_ssh_keygen(HOST, &tmp.path().join("hostkey"));
        let machine = Machine::new(&tmp.path().join("machine"));
        let gen0 = machine.build(&format!("nixos-system-{HOST}-0"));
        machine.install(&gen0);
        host.token_file(&pki, &machine.dir.join("token.json"));
        let fleet = fleet_json(&[&host], canary_policy("halt", 0));
        sign_revocations(&pki, &forge_dir, json!([]));
        let forge = Forge::start(&forge_dir);
        Fleet {
            tmp,
            pki,
            forge_dir,
            forge,
            cache,
            host,
            machine,
            fleet,
            gen0,
            cp: None,
            cp_port: free_port(),
        }
    }

    /// Builds generation `n` carrying `probe_set`, pushes it to the cache (signed) and
    /// removes it from the local store, so the agent realises it from the cache.
    fn closure(&self, n: u32, probe_set: &Value) -> String {
        let name = format!("nixos-system-{HOST}-{n}");
        let closure = self
            .machine
            .build_with_probes(&name, &probe_set.to_string());
        self.cache.push(&closure);
        delete_from_store(&closure);
        closure
    }

    fn release(&self, closure: &str) -> String {
        release_with_fallback(
            &self.pki,
            &self.forge_dir,
            &self.fleet,
            &json!({ HOST: closure }),
            COMMIT,
            &[],
        );
        rollout_id(&self.forge_dir, "stable")
    }

    fn start_cp(&mut self) {
        let mut cp = Cp::start_on(
            &self.pki,
            &self.forge,
            self.cp_port,
            &self.tmp.path().join("cp"),
            &CpOptions::default(),
        );
        cp.wait_ready(&self.pki);
        self.cp = Some(cp);
    }

    fn stop_cp(&mut self) {
        if let Some(mut cp) = self.cp.take() {
            cp.terminate();
        }
    }

    fn cp_log(&self) -> String {
        self.cp.as_ref().map(Cp::log_text).unwrap_or_default()
    }

    fn wait_cp_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the CP log"), LONG, || {
            self.cp_log().contains(needle)
        });
    }

    fn agent(&self, extra: &[&str]) -> AgentProc {
        let mut config = AgentConfig::new(
            &self.pki,
            self.cp_port,
            &self.host,
            &self.tmp.path().join("hostkey"),
            &self.machine,
            &self.forge.url("cache"),
        );
        config.extra.extend(extra.iter().map(|s| s.to_string()));
        AgentProc::start(&config)
    }

    fn state(&self) -> Value {
        let path = self.machine.dir.join("agent-state/state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap_or_default()).unwrap_or(Value::Null)
    }

    fn phase(&self) -> String {
        self.state()["machine"]["phase"]["phase"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The host's newest evidence as the CP stores it (operator API), verified against the
    /// host key as `nixfleet verify evidence` does; None while the CP has none.
    fn cp_evidence(&self) -> Option<Value> {
        let client = Client::operator(&self.pki, self.cp_port);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reply = rt.block_on(async { client.get(&format!("/v1/hosts/{HOST}/evidence")).await });
        if reply.status != 200 {
            return None;
        }
        let verified = nixfleet_trust::verify::verify_evidence(
            &reply.body,
            HOST,
            &self.host.pubkey_line(),
            &nixfleet_trust::verify::Limits::default(),
        )
        .expect("the stored evidence verifies against the host key");
        Some(serde_json::to_value(&verified.value.evidence).unwrap())
    }

    /// Waits for CP evidence that `matches`; returns it.
    fn wait_cp_evidence(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(e) = self.cp_evidence().filter(|e| matches(e)) {
                return e;
            }
            assert!(
                start.elapsed() < LONG,
                "timed out waiting for {what} at the CP; it has {:?}\nCP log:\n{}",
                self.cp_evidence(),
                self.cp_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A probe set whose controls cite CIS 5.2.8 and NIS2 21.2.i; each probe is
/// `(id, /bin/sh script, timeoutSecs)`.
fn probe_set(mode: &str, probes: &[(&str, &str, u64)]) -> Value {
    let probes: Vec<Value> = probes
        .iter()
        .map(|(id, script, timeout)| {
            json!({
                "id": id,
                "articles": {"cis": ["5.2.8"], "nis2": ["21.2.i"]},
                "command": ["/bin/sh", "-c", script],
                "timeoutSecs": timeout,
                "expect": "exit0",
            })
        })
        .collect();
    json!({"mode": mode, "frameworks": ["cis", "nis2"], "probes": probes})
}

fn status_of(evidence: &Value, control: &str) -> String {
    evidence["controls"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"] == control))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The failed target recorded for `closure`, from the agent's state file.
fn failed_target(f: &Fleet, closure: &str) -> Value {
    f.state()["failedTargets"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["closureHash"] == closure).cloned())
        .unwrap_or(Value::Null)
}

/// An enforce closure whose control does not pass: no confirm, rolled back, the failure
/// recorded with cause compliance and the control named, the evidence at the CP.
fn enforce_rolls_back(failing_script: &str, timeout: u64, status: &str, reason_has: &str) {
    let mut f = Fleet::new();
    let set = probe_set(
        "enforce",
        &[
            ("ssh-password-auth-off", "echo PasswordAuthentication no", 5),
            ("ssh-root-login-key-only", failing_script, timeout),
        ],
    );
    let gen1 = f.closure(1, &set);
    let rollout = f.release(&gen1);
    f.start_cp();
    let mut agent = f.agent(&[]);
    agent.wait_log("rolled back from", LONG);
    let log = agent.log_text();
    assert!(!log.contains("confirm of"), "no confirm in enforce:\n{log}");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    let failed = failed_target(&f, &gen1);
    assert_eq!(failed["rolloutId"], rollout.as_str());
    assert_eq!(failed["cause"], "compliance", "{failed}");
    let reason = failed["reason"].as_str().unwrap_or("");
    assert!(
        reason.starts_with("compliance: control ssh-root-login-key-only")
            && reason.contains(reason_has)
            && reason.contains("(cis 5.2.8, nis2 21.2.i)")
            && !reason.contains("ssh-password-auth-off"),
        "{reason}"
    );
    f.wait_cp_log("kind=rolled-back");
    assert!(!f.cp_log().contains("kind=activated"));
    let evidence = f.wait_cp_evidence("the activation evidence of gen1", |e| {
        e["closureHash"] == gen1.as_str()
    });
    assert_eq!(evidence["trigger"], "activation");
    assert_eq!(evidence["mode"], "enforce");
    assert_eq!(evidence["rolloutId"], rollout.as_str());
    assert_eq!(status_of(&evidence, "ssh-password-auth-off"), "pass");
    assert_eq!(status_of(&evidence, "ssh-root-login-key-only"), status);
    // The host keeps it, and says so in its check-ins.
    assert_eq!(
        f.state()["evidence"]["request"]["evidence"]["closureHash"],
        gen1.as_str()
    );
}

#[test]
fn enforce_failing_probe_rolls_back_without_confirm_and_the_cp_has_the_evidence() {
    enforce_rolls_back("echo PermitRootLogin yes; exit 1", 5, "fail", " failed ");
}

#[test]
fn enforce_probe_past_its_timeout_is_an_error_and_rolls_back() {
    enforce_rolls_back("/bin/sleep 30", 1, "error", "timed out after 1 s");
}

#[test]
fn a_malformed_probe_set_is_taken_as_an_enforce_failure_whatever_its_mode() {
    let mut f = Fleet::new();
    // Claims permissive, but a relative command cannot be run as specified.
    let set = json!({"mode": "permissive", "frameworks": ["cis"], "probes": [
        {"id": "ssh-root-login-key-only", "command": ["sh", "-c", "exit 0"],
         "timeoutSecs": 5, "expect": "exit0"}
    ]});
    let gen1 = f.closure(1, &set);
    f.release(&gen1);
    f.start_cp();
    let mut agent = f.agent(&[]);
    agent.wait_log("rolled back from", LONG);
    assert!(!agent.log_text().contains("confirm of"));
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    let failed = failed_target(&f, &gen1);
    assert_eq!(failed["cause"], "compliance", "{failed}");
    let reason = failed["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("etc/nixfleet/compliance.json is malformed")
            && reason.contains("absolute path")
            && reason.contains("in doubt"),
        "{reason}"
    );
}

#[test]
fn permissive_failing_probe_confirms_and_the_evidence_records_the_failure() {
    let mut f = Fleet::new();
    let set = probe_set(
        "permissive",
        &[(
            "ssh-root-login-key-only",
            "echo PermitRootLogin yes; exit 1",
            5,
        )],
    );
    let gen1 = f.closure(1, &set);
    f.release(&gen1);
    f.start_cp();
    let mut agent = f.agent(&[]);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert!(agent
        .log_text()
        .contains("recorded, not enforced (permissive): control ssh-root-login-key-only failed"));
    f.wait_cp_log("kind=activated");
    let evidence = f.wait_cp_evidence("the activation evidence of gen1", |e| {
        e["closureHash"] == gen1.as_str()
    });
    assert_eq!(evidence["mode"], "permissive");
    assert_eq!(status_of(&evidence, "ssh-root-login-key-only"), "fail");
    assert!(f.state()["failedTargets"].as_array().unwrap().is_empty());
}

#[test]
fn drift_probes_report_a_changed_control_without_rolling_back() {
    let mut f = Fleet::new();
    let flag = f.machine.dir.join("root-login-enabled");
    let set = probe_set(
        "enforce",
        &[(
            "ssh-root-login-key-only",
            &format!("test ! -e {}", flag.display()),
            5,
        )],
    );
    let gen1 = f.closure(1, &set);
    f.release(&gen1);
    f.start_cp();
    let mut agent = f.agent(&["--compliance-interval-secs", "2"]);
    agent.wait_log("confirm of", LONG);
    let first = f.wait_cp_evidence("the activation evidence", |e| {
        e["closureHash"] == gen1.as_str()
    });
    assert_eq!(first["trigger"], "activation");
    assert_eq!(status_of(&first, "ssh-root-login-key-only"), "pass");
    // Someone changes the host behind the fleet's back.
    std::fs::write(&flag, b"").unwrap();
    agent.wait_log("compliance drift", LONG);
    let drifted = f.wait_cp_evidence("drift evidence with the control failing", |e| {
        e["trigger"] == "drift" && status_of(e, "ssh-root-login-key-only") == "fail"
    });
    assert_eq!(drifted["closureHash"], gen1.as_str());
    assert_eq!(drifted["activatedAt"], first["activatedAt"]);
    assert!(
        agent
            .log_text()
            .contains("ssh-root-login-key-only: pass -> fail"),
        "the drift names the control"
    );
    // Drift never rolls back, enforce or not.
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert_eq!(f.phase(), "idle");
    assert!(!agent.log_text().contains("rolled back from"));
}

/// Whether process `pid` is gone (a zombie counts as gone).
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z"))
        .unwrap_or(true)
}

#[test]
fn kill9_while_probing_runs_the_probes_again_and_the_outcome_is_the_same() {
    let mut f = Fleet::new();
    let d = f.machine.dir.display().to_string();
    let hold = f.machine.dir.join("hold-probe");
    std::fs::write(&hold, b"").unwrap();
    let script = format!(
        "echo $$ >> {d}/probe-pids; while [ -e {d}/hold-probe ]; do /bin/sleep 0.1; done; exit 1"
    );
    let set = probe_set("enforce", &[("ssh-root-login-key-only", &script, 60)]);
    let gen1 = f.closure(1, &set);
    f.release(&gen1);
    f.start_cp();
    let pids = || -> Vec<String> {
        std::fs::read_to_string(f.machine.dir.join("probe-pids"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let mut agent = f.agent(&[]);
    wait_for("the probe to start", LONG, || pids().len() == 1);
    assert_eq!(f.phase(), "probing");
    agent.kill9();
    // The probe does not outlive the agent that ran it.
    let first = pids()[0].clone();
    wait_for("the orphaned probe to be killed", LONG, || gone(&first));
    agent.restart();
    agent.wait_log("resumed while probing", LONG);
    wait_for("the probe to run again", LONG, || pids().len() == 2);
    std::fs::remove_file(&hold).unwrap();
    agent.wait_log("rolled back from", LONG);
    assert!(!agent.log_text().contains("confirm of"));
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(
        f.machine.activations(),
        vec![gen1.clone(), f.gen0.clone()],
        "one switch and one switch back across the restart"
    );
    let failed = failed_target(&f, &gen1);
    assert_eq!(failed["cause"], "compliance", "{failed}");
    assert!(failed["reason"]
        .as_str()
        .unwrap_or("")
        .contains("ssh-root-login-key-only failed"));
    let evidence = f.wait_cp_evidence("the evidence of the second run", |e| {
        e["closureHash"] == gen1.as_str()
    });
    assert_eq!(status_of(&evidence, "ssh-root-login-key-only"), "fail");
}

#[test]
fn evidence_is_sent_again_to_a_control_plane_that_lost_it() {
    let mut f = Fleet::new();
    let set = probe_set("enforce", &[("ssh-password-auth-off", "exit 0", 5)]);
    let gen1 = f.closure(1, &set);
    f.release(&gen1);
    f.start_cp();
    let mut agent = f.agent(&["--compliance-interval-secs", "0"]);
    agent.wait_log("confirm of", LONG);
    let before = f.wait_cp_evidence("the activation evidence", |e| {
        e["closureHash"] == gen1.as_str()
    });
    let resend = "the control plane lacks this host's newest compliance evidence";
    let resent_before = agent.log_text().matches(resend).count();
    f.stop_cp();
    std::fs::remove_dir_all(f.tmp.path().join("cp")).unwrap();
    f.start_cp();
    wait_for("the agent to send the evidence again", LONG, || {
        agent.log_text().matches(resend).count() > resent_before
    });
    let after = f.wait_cp_evidence("the evidence sent again", |e| {
        e["closureHash"] == gen1.as_str()
    });
    // The same signed document: no probe ran again (drift is off).
    assert_eq!(after, before);
    assert_eq!(
        agent
            .log_text()
            .matches("running 1 compliance probes")
            .count(),
        1
    );
}
