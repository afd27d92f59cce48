//! The real agent binary against the real control-plane binary on loopback, with real Nix:
//! closures built from tiny derivations, a binary cache signed with a key from
//! `nix-store --generate-binary-cache-key` and served over HTTP, host keys from `ssh-keygen`.

use std::path::PathBuf;
use std::time::Duration;

use nixfleet_harness::agent::{AgentConfig, AgentProc};
use nixfleet_harness::nix::{delete_from_store, Cache, Machine};
use nixfleet_harness::*;
use serde_json::{json, Value};

const HOST: &str = "web-01";
const COMMIT: &str = "1111111111111111111111111111111111111111";
const LONG: Duration = Duration::from_secs(60);

/// The shape of the host's system closures, and so the agent's activation backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `bin/switch-to-configuration`; the agent's default backend on Linux.
    Nixos,
    /// nix-darwin's `activate`, `activate-user` and `sw/bin`; `--activation darwin`.
    Darwin,
}

/// A nix-darwin-shaped toy system: `activate` is the machine's switch script (it records
/// the activation and repoints current-system, as nix-darwin's `activate` sets
/// /run/current-system), `activate-user` records that it ran, `sw/bin` has a program. No
/// `bin/switch-to-configuration`.
const DARWIN_SYSTEM_NIX: &str = r#"{ name, script, userScript }:
derivation {
  inherit name script userScript;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" ''
    mkdir -p $out/sw/bin
    printf '%s\n' "$script" | sed "s|@out@|$out|g" > $out/activate
    printf '%s\n' "$userScript" > $out/activate-user
    printf '#!/bin/sh\necho %s\n' "$name" > $out/sw/bin/darwin-version
    chmod +x $out/activate $out/activate-user $out/sw/bin/darwin-version
  '' ];
}
"#;

impl Layout {
    /// The closure name of generation `n` (the steering files are keyed by it).
    fn name(self, n: u32) -> String {
        match self {
            Layout::Nixos => format!("nixos-system-{HOST}-{n}"),
            Layout::Darwin => format!("darwin-system-{HOST}-{n}"),
        }
    }

    fn build(self, machine: &Machine, n: u32) -> String {
        let name = self.name(n);
        match self {
            Layout::Nixos => machine.build(&name),
            Layout::Darwin => {
                let file = machine.dir.join("darwin-system.nix");
                std::fs::write(&file, DARWIN_SYSTEM_NIX).unwrap();
                // Last, as nix-darwin's postActivation `launchctl kickstart -k` of the
                // agent's daemon: with `restart-agent-<name>`, the agent is killed.
                let activate = format!(
                    "{}if [ -e {d}/restart-agent-{name} ]; then kill -9 \"$(cat {d}/agent.pid)\"; fi\n",
                    machine.switch_script(&name),
                    d = machine.dir.display()
                );
                let user = format!(
                    "#!/bin/sh\necho {name} >> {}/user-activations",
                    machine.dir.display()
                );
                let out = nixfleet_harness::nix::nix_command("nix-build")
                    .arg(&file)
                    .args(["--no-out-link", "--argstr", "name", &name])
                    .args(["--argstr", "script", &activate])
                    .args(["--argstr", "userScript", &user])
                    .args(["--option", "substituters", ""])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "nix-build of a darwin-shaped closure: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                for file in ["activate", "activate-user", "sw/bin/darwin-version"] {
                    assert!(path.join(file).is_file(), "{file} in {}", path.display());
                }
                assert!(!path.join("bin/switch-to-configuration").exists());
                path.file_name().unwrap().to_string_lossy().into_owned()
            }
        }
    }

    /// What the agent says when the activation exits non-zero.
    fn activation_name(self) -> &'static str {
        match self {
            Layout::Nixos => "switch-to-configuration",
            Layout::Darwin => "activate",
        }
    }
}

/// One host on a test machine running generation 0, a CP, a forge serving the release
/// and the binary cache (under `cache/`), and a bootstrap token for the host.
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
    layout: Layout,
}

impl Fleet {
    fn new(policy: Value) -> Fleet {
        Fleet::with_layout(policy, Layout::Nixos)
    }

    fn with_layout(policy: Value, layout: Layout) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let forge_dir = tmp.path().join("forge");
        let cache = Cache::new(&forge_dir.join("cache"), "fleet-cache-1");
        let pki = Pki::with_cache_keys(tmp.path(), &[&cache.public_key]);
        let host = Host::from_ssh_keygen(HOST, &tmp.path().join("hostkey"));
        let machine = Machine::new(&tmp.path().join("machine"));
        let gen0 = layout.build(&machine, 0);
        machine.install(&gen0);
        host.token_file(&pki, &machine.dir.join("token.json"));
        let fleet = fleet_json(&[&host], policy);
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
            layout,
        }
    }

    /// The closure name of generation `n`, for steering files.
    fn name(&self, n: u32) -> String {
        self.layout.name(n)
    }

    /// Builds generation `n`, pushes it to the cache (signed unless `push` says
    /// otherwise) and removes it from the local store.
    fn closure(&self, n: u32, push: impl FnOnce(&Cache, &str)) -> String {
        let closure = self.layout.build(&self.machine, n);
        push(&self.cache, &closure);
        delete_from_store(&closure);
        closure
    }

    fn release(&self, closure: &str, commit: &str, extra: &[&str]) -> String {
        let closures = json!({ HOST: closure });
        release_with_fallback(
            &self.pki,
            &self.forge_dir,
            &self.fleet,
            &closures,
            commit,
            extra,
        );
        rollout_id(&self.forge_dir, "stable")
    }

    fn start_cp(&mut self, extra: &[&str]) {
        let opts = CpOptions {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..CpOptions::default()
        };
        let mut cp = Cp::start_on(
            &self.pki,
            &self.forge,
            self.cp_port,
            &self.tmp.path().join("cp"),
            &opts,
        );
        cp.wait_ready(&self.pki);
        self.cp = Some(cp);
    }

    fn cp(&self) -> &Cp {
        self.cp.as_ref().unwrap()
    }

    fn agent_config(&self) -> AgentConfig {
        let mut config = AgentConfig::new(
            &self.pki,
            self.cp_port,
            &self.host,
            &self.tmp.path().join("hostkey"),
            &self.machine,
            &self.forge.url("cache"),
        );
        if self.layout == Layout::Darwin {
            config
                .extra
                .extend(["--activation".into(), "darwin".into()]);
        }
        config
    }

    fn agent(&self) -> AgentProc {
        AgentProc::start(&self.agent_config())
    }

    fn cp_log_has(&self, needle: &str) -> bool {
        self.cp().log_text().contains(needle)
    }

    fn wait_cp_log(&self, needle: &str) {
        let start = std::time::Instant::now();
        while !self.cp_log_has(needle) {
            assert!(
                start.elapsed() < LONG,
                "timed out waiting for {needle:?} in the CP log:\n{}",
                self.cp().log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The operator's view of the host.
    fn host_view(&self) -> Value {
        let client = Client::operator(&self.pki, self.cp_port);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { client.get(&format!("/v1/hosts/{HOST}")).await.json() })
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
}

/// These tests need real Nix; without it they fail rather than pass vacuously.
fn nix_or_skip() -> bool {
    assert!(
        nixfleet_harness::nix::nix_available(),
        "nix-store not found: the agent tests need real Nix (apt-get install -y nix-bin)"
    );
    true
}

fn single_wave() -> Value {
    canary_policy("halt", 0)
}

#[test]
fn happy_path_enrolls_realises_switches_confirms_and_reports_current() {
    happy_path(Layout::Nixos);
}

#[test]
fn the_agent_believes_its_target_from_its_proof_and_keeps_it_for_auditors() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let id = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("confirm of", LONG);
    assert!(!agent.log_text().contains("fetching the whole manifest"));
    // What the agent kept verifies on its own: host, closure, rollout.
    let kept = f
        .machine
        .dir
        .join(format!("agent-state/manifests/{id}.json"));
    let bytes = std::fs::read(&kept).unwrap();
    let trust = nixfleet_trust::verify::read_trust_file(
        &f.pki.path("etc/trust.json"),
        &nixfleet_trust::verify::Limits::default(),
    )
    .unwrap();
    let proved = nixfleet_trust::verify::verify_host_proof(
        &bytes,
        &trust,
        time::OffsetDateTime::now_utc(),
        nixfleet_trust::verify::ManifestContext {
            rollout_id: Some(&id),
            fleet: None,
        },
        &nixfleet_trust::verify::Limits::default(),
    )
    .unwrap();
    assert_eq!(proved.entry.hostname, HOST);
    assert_eq!(proved.entry.target_closure, gen1);
    assert!(bytes.len() <= 4096, "{} bytes kept", bytes.len());
}

#[test]
fn a_schema_1_release_is_still_followed_during_the_transition() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &["--manifest-schema", "1"]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("fetching the whole manifest", LONG);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
}

#[test]
fn darwin_happy_path_activates_with_activate_confirms_and_reports_current() {
    happy_path(Layout::Darwin);
}

fn happy_path(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("enrolled; certificate stored", LONG);
    assert!(f.machine.dir.join("agent-state/cert.pem").exists());
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    wait_for("the CP to see the new closure as current", LONG, || {
        f.host_view()["current_closure"] == gen1.as_str()
    });
    f.wait_cp_log("kind=activated");
    assert_eq!(f.phase(), "idle");
    assert!(f.state()["failedTargets"].as_array().unwrap().is_empty());
    assert!(!agent.log_text().contains("rolled back"));
    assert!(
        !f.machine.dir.join("user-activations").exists(),
        "activate-user is not run by the agent"
    );
}

#[test]
fn unsigned_closure_is_refused_and_reported_and_the_system_is_unchanged() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push_unsigned(p));
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("refused, nothing activated", LONG);
    f.wait_cp_log("kind=closure-rejected");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
    let failed = &f.state()["failedTargets"];
    assert_eq!(failed[0]["rolloutId"], rollout.as_str());
    assert_eq!(failed[0]["closureHash"], gen1.as_str());
    assert!(!nixfleet_harness::nix::is_valid(&gen1));
}

#[test]
fn closure_signed_by_a_foreign_key_is_refused_and_reported() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let foreign = Cache::new(&f.tmp.path().join("foreign-cache"), "foreign-1");
    let gen1 = f.closure(1, |c, p| c.push_signed_with(p, &foreign.secret_key));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("refused, nothing activated", LONG);
    f.wait_cp_log("kind=closure-rejected");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
}

/// Runs until the CP is gone for good: SIGTERM and wait.
fn stop_cp(f: &mut Fleet) {
    if let Some(mut cp) = f.cp.take() {
        cp.terminate();
    }
}

#[test]
fn cp_unreachable_for_the_whole_confirm_window_rolls_back_and_reports_failed_target() {
    cp_unreachable_whole_window(Layout::Nixos);
}

#[test]
fn darwin_cp_unreachable_for_the_whole_confirm_window_rolls_back() {
    cp_unreachable_whole_window(Layout::Darwin);
}

fn cp_unreachable_whole_window(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&["--confirm-window-secs", "12"]);
    let name1 = f.name(1);
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the switch to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    stop_cp(&mut f);
    f.machine.set("hang", &name1, false);
    agent.wait_log("confirm not sent", LONG);
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    assert!(
        !agent.log_text().contains("confirm of"),
        "no success after a rollback"
    );
    // Back online: the report arrives and the check-in carries the failed target.
    f.start_cp(&["--confirm-window-secs", "12"]);
    f.wait_cp_log("kind=rolled-back");
    wait_for("the CP to see the host back on generation 0", LONG, || {
        f.host_view()["current_closure"] == f.gen0.as_str()
    });
    assert_eq!(f.state()["failedTargets"][0]["rolloutId"], rollout.as_str());
    // The CP does not re-send a failed target, and the agent would not take it.
    let checkins = agent.log_text().matches("checked in").count();
    wait_for("two more check-ins", LONG, || {
        agent.log_text().matches("checked in").count() >= checkins + 2
    });
    assert_eq!(f.machine.activations().len(), 2);
}

#[test]
fn transient_outage_inside_the_confirm_window_still_confirms_without_rollback() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&["--confirm-window-secs", "120"]);
    let name1 = format!("nixos-system-{HOST}-1");
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the switch to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    stop_cp(&mut f);
    f.machine.set("hang", &name1, false);
    agent.wait_log("confirm not sent", LONG);
    f.start_cp(&["--confirm-window-secs", "120"]);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert!(!agent.log_text().contains("rolling back"));
    f.wait_cp_log("kind=activated");
}

#[test]
fn rollback_signal_from_a_tripped_health_gate_rolls_back() {
    health_gate_rollback(Layout::Nixos);
}

#[test]
fn darwin_rollback_signal_from_a_tripped_health_gate_rolls_back() {
    health_gate_rollback(Layout::Darwin);
}

fn health_gate_rollback(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(canary_policy("rollback-and-halt", 0), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    f.machine.set("unhealthy", &f.name(1), true);
    let mut agent = f.agent();
    agent.wait_log("confirm of", LONG);
    agent.wait_log("rollback signal for rollout", LONG);
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    f.wait_cp_log("kind=rolled-back");
}

/// Holds the switch-to-configuration lock as another switch would; released on drop.
struct LockHolder(std::process::Child);

impl LockHolder {
    fn hold(path: &std::path::Path) -> LockHolder {
        // One process holds the lock, so killing it releases the lock.
        let child = std::process::Command::new("sh")
            .args(["-c", r#"exec 9>"$1" && flock 9 && exec sleep 600"#, "sh"])
            .arg(path)
            .spawn()
            .unwrap();
        wait_for("the lock to be held", LONG, || {
            !std::process::Command::new("flock")
                .args(["--nonblock"])
                .arg(path)
                .arg("true")
                .status()
                .unwrap()
                .success()
        });
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill9_before_the_switch_resumes_with_exactly_one_activation() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let lock = LockHolder::hold(&f.machine.switch_lock());
    let mut agent = f.agent();
    agent.wait_log("deferring the switch", LONG);
    assert_eq!(f.phase(), "switching");
    agent.kill9();
    agent.restart();
    wait_for("the restarted agent to defer again", LONG, || {
        agent.log_text().matches("deferring the switch").count() >= 2
    });
    drop(lock);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
}

#[test]
fn kill9_mid_switch_resumes_with_exactly_one_activation() {
    kill9_mid_activation(Layout::Nixos);
}

#[test]
fn darwin_kill9_mid_activate_resumes_with_exactly_one_activation() {
    kill9_mid_activation(Layout::Darwin);
}

fn kill9_mid_activation(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let name1 = f.name(1);
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the switch to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    agent.kill9();
    // The switch runs detached: killing the agent does not kill it.
    f.machine.set("hang", &name1, false);
    wait_for("the detached switch to finish", LONG, || {
        f.machine.current().as_deref() == Some(gen1.as_str())
    });
    agent.restart();
    agent.wait_log("was started before; waiting for its outcome", LONG);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    f.wait_cp_log("kind=activated");
}

#[test]
fn kill9_after_the_switch_before_the_confirm_confirms_when_the_window_is_open() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&["--confirm-window-secs", "300"]);
    let name1 = format!("nixos-system-{HOST}-1");
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the switch to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    stop_cp(&mut f);
    f.machine.set("hang", &name1, false);
    agent.wait_log("confirm not sent", LONG);
    assert_eq!(f.phase(), "awaiting-confirm");
    agent.kill9();
    f.start_cp(&["--confirm-window-secs", "300"]);
    agent.restart();
    agent.wait_log("confirm window open until", LONG);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
}

#[test]
fn kill9_after_the_switch_resumed_after_the_window_rolls_back() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&["--confirm-window-secs", "10"]);
    let name1 = format!("nixos-system-{HOST}-1");
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the switch to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    stop_cp(&mut f);
    f.machine.set("hang", &name1, false);
    agent.wait_log("confirm not sent", LONG);
    agent.kill9();
    let deadline = f.state()["machine"]["phase"]["deadline"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline =
        time::OffsetDateTime::parse(&deadline, &time::format_description::well_known::Rfc3339)
            .unwrap();
    wait_for("the confirm window to pass", LONG, || {
        time::OffsetDateTime::now_utc() > deadline + time::Duration::seconds(1)
    });
    f.start_cp(&["--confirm-window-secs", "10"]);
    agent.restart();
    agent.wait_log(
        "resumed awaiting confirm after the confirm window closed",
        LONG,
    );
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    f.wait_cp_log("kind=rolled-back");
}

// ---- a compromised control plane ------------------------------------------------------

use nixfleet_harness::compromised::CompromisedCp;

impl Fleet {
    /// An agent talking to a compromised CP that relays to the real one.
    fn compromised(&self) -> (CompromisedCp, AgentProc) {
        let mut config = self.agent_config();
        let evil = CompromisedCp::start(
            &self.pki,
            self.cp_port,
            config.state_dir.join("cert.pem"),
            &self.host.key,
        );
        config.control_plane_url = format!("https://localhost:{}", evil.port);
        (evil, AgentProc::start(&config))
    }

    /// Signs another release (into its own directory) with `closures`, for a fleet of
    /// `hosts`; returns the directory and the rollout id.
    fn other_release(
        &self,
        name: &str,
        hosts: &[&Host],
        closures: Value,
        extra: &[&str],
    ) -> (PathBuf, String) {
        self.other_release_with(single_wave(), name, hosts, closures, extra)
    }

    /// A release under another rollout policy: the same closures, another intent.
    fn other_release_with(
        &self,
        policy: Value,
        name: &str,
        hosts: &[&Host],
        closures: Value,
        extra: &[&str],
    ) -> (PathBuf, String) {
        let dir = self.tmp.path().join(name);
        let fleet = fleet_json(hosts, policy);
        let commit = "2222222222222222222222222222222222222222";
        release_closures(&self.pki, &dir, &fleet, &closures, commit, extra);
        let id = rollout_id(&dir, "stable");
        (dir, id)
    }
}

fn set_target_rollout(id: String) -> impl Fn(&mut Value) + Send + Sync {
    move |v: &mut Value| {
        if v["target"].is_object() {
            v["target"]["rolloutId"] = Value::String(id.clone());
        }
    }
}

#[test]
fn manifest_whose_host_set_lacks_the_host_is_refused_and_reported() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    // CI really signed this manifest, but for another host.
    let db = Host::new("db-01");
    let (dir, other) = f.other_release("other", &[&db], json!({"db-01": gen1.clone()}), &[]);
    let (evil, mut agent) = f.compromised();
    evil.serve_manifests_from(dir);
    evil.rewrite_checkin(set_target_rollout(other.clone()));
    // The evil control plane offers db-01's real entry with its valid proof.
    agent.wait_log("db-01's, not web-01's", LONG);
    f.wait_cp_log("kind=manifest-rejected");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
    assert!(!nixfleet_harness::nix::is_valid(&gen1), "nothing realised");
    assert_eq!(f.state()["failedTargets"][0]["rolloutId"], other.as_str());
}

#[test]
fn target_the_signed_manifest_does_not_contain_is_refused_even_if_the_cache_signed_it() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let gen2 = f.closure(2, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let (evil, mut agent) = f.compromised();
    let lie = gen2.clone();
    evil.rewrite_checkin(move |v| {
        if v["target"].is_object() {
            v["target"]["closureHash"] = Value::String(lie.clone());
        }
    });
    agent.wait_log("but the signed manifest disagrees", LONG);
    f.wait_cp_log("kind=manifest-rejected");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
}

#[test]
fn stale_target_is_refused_and_reported() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    // The same plan, signed three days ago: older than its 1440-minute freshness window.
    // Same intent, so the same rollout id: only the signature is old.
    let (dir, stale) = f.other_release(
        "stale",
        &[&f.host],
        json!({ HOST: gen1.clone() }),
        &["--signed-at", "2026-01-01T00:00:00Z"],
    );
    let (evil, mut agent) = f.compromised();
    evil.serve_manifests_from(dir);
    evil.rewrite_checkin(set_target_rollout(stale));
    agent.wait_log("is stale", LONG);
    f.wait_cp_log("kind=stale-target");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
}

#[test]
fn rollout_id_swapped_mid_rollout_is_refused_and_the_activation_still_confirms() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let (dir, other) = f.other_release_with(
        canary_policy("halt", 1),
        "swap",
        &[&f.host],
        json!({ HOST: gen1.clone() }),
        &[],
    );
    assert_ne!(rollout, other);
    let (evil, mut agent) = f.compromised();
    evil.serve_manifests_from(dir);
    evil.answer_confirm(Some(503));
    agent.wait_log("confirm not accepted (503", LONG);
    // The host runs gen1 now, so the real CP sends no target; the lie adds one.
    let lie = json!({"closureHash": gen1.clone(), "rolloutId": other.clone(), "waveIndex": 0,
                     "signedAt": "2026-11-27T00:00:00Z", "freshnessWindowSecs": 86400,
                     "confirmWindowSecs": 300});
    evil.rewrite_checkin(move |v| v["target"] = lie.clone());
    agent.wait_log("changed the rollout of the activation in flight", LONG);
    f.wait_cp_log("kind=manifest-rejected");
    evil.answer_confirm(None);
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
}

#[test]
fn confirm_answered_410_rolls_back() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let (evil, mut agent) = f.compromised();
    evil.answer_confirm(Some(410));
    agent.wait_log("confirm refused with 410", LONG);
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    f.wait_cp_log("kind=rolled-back");
    assert!(!agent.log_text().contains("confirm of"));
}

// ---- certificates -------------------------------------------------------------------------

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn certificate_past_half_of_its_lifetime_is_renewed_and_the_old_one_still_works() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    f.release(&f.gen0.clone(), COMMIT, &[]);
    f.start_cp(&[]);
    // A certificate issued 20 days ago for 30 days: past half of its lifetime.
    let ca = nixfleet_pki::FleetCa::from_pem(
        &f.pki.read("etc/fleet-ca-cert.pem"),
        &f.pki.read("etc/fleet-ca-key.pem"),
    )
    .unwrap();
    let old = nixfleet_pki::issue_host_cert(
        &ca,
        &f.host.csr(),
        &nixfleet_pki::HostExpectation {
            hostname: HOST.into(),
            ssh_fingerprint: None,
        },
        time::OffsetDateTime::now_utc() - time::Duration::days(20),
        time::Duration::days(30),
    )
    .unwrap();
    let mut config = f.agent_config();
    config.bootstrap_token_file = None;
    std::fs::create_dir_all(&config.state_dir).unwrap();
    let cert_path = config.state_dir.join("cert.pem");
    std::fs::write(&cert_path, &old.cert_pem).unwrap();
    let mut agent = AgentProc::start(&config);
    agent.wait_log("certificate renewed", LONG);
    let new = std::fs::read_to_string(&cert_path).unwrap();
    assert_ne!(new, old.cert_pem);
    agent.wait_log("checked in", LONG);
    // Both certificates work until the old one expires.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for cert in [old.cert_pem.clone(), new] {
        let mut host = Host {
            name: HOST.into(),
            key: f.host.key.clone(),
            cert_pem: Some(cert),
        };
        let client = Client::host(&f.pki, f.cp_port, &host);
        let reply = rt.block_on(client.post(
            "/v1/agent/checkin",
            &checkin_body(HOST, &f.gen0, None, json!([])),
        ));
        assert_eq!(reply.status, 200);
        host.cert_pem = None;
    }
}

#[test]
fn revoked_certificate_is_logged_plainly_and_retried_with_bounded_backoff() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    f.release(&f.gen0.clone(), COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    // Two check-ins: the list below is signed at least a second after the first one
    // (the CP takes a list signed in the same second as the one it has for the same).
    wait_for("two check-ins", LONG, || {
        agent.log_text().matches("checked in").count() >= 2
    });
    let in_an_hour = rfc3339(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    sign_revocations(
        &f.pki,
        &f.forge_dir,
        json!([{"hostname": HOST, "notBefore": in_an_hour, "reason": "stolen", "revokedBy": "ops"}]),
    );
    f.wait_cp_log("cert_revocations now has 1 rows");
    agent.wait_log("it is revoked or expired", LONG);
    agent.wait_log("was already used to enroll", LONG);
    let before = agent.log_text().matches("not enrolled").count();
    std::thread::sleep(Duration::from_secs(6));
    let attempts = agent.log_text().matches("not enrolled").count() - before;
    // Backoff from 2 s capped at the 2 s poll interval: at most one attempt a second.
    assert!(attempts <= 7, "{attempts} attempts in 6 s: the agent spins");
    assert!(attempts >= 1, "the agent stopped trying");
    // The revocation is lifted (a newer, empty list): the same certificate works again.
    sign_revocations(&f.pki, &f.forge_dir, json!([]));
    agent.wait_log("control plane reachable again", LONG);
}

// ---- activation failures and start-up ---------------------------------------------------

#[test]
fn failing_switch_to_configuration_rolls_back_and_never_reports_success() {
    failing_activation(Layout::Nixos);
}

#[test]
fn darwin_failing_activate_rolls_back_and_never_reports_success() {
    failing_activation(Layout::Darwin);
}

fn failing_activation(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    f.machine.set("fail", &f.name(1), true);
    let mut agent = f.agent();
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    f.wait_cp_log("kind=rolled-back");
    assert!(!f.cp_log_has("kind=activated"));
    assert!(agent.log_text().contains(&format!(
        "{} of {gen1} exited with status 1",
        layout.activation_name()
    )));
}

#[test]
fn agent_refuses_to_start_on_a_trust_file_others_can_write() {
    if !nix_or_skip() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fleet::new(single_wave());
    let trust = f.tmp.path().join("writable-trust.json");
    std::fs::copy(f.pki.path("etc/trust.json"), &trust).unwrap();
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut config = f.agent_config();
    config.trust_file = trust.clone();
    let (code, log) = AgentProc::run_to_exit(&config, LONG);
    assert_ne!(code, 0);
    assert!(
        log.contains("writable-trust.json") && log.contains("chmod go-w"),
        "{log}"
    );
}

// ---- resources ------------------------------------------------------------------------------

/// (resident set in KiB, user + system CPU in clock ticks) of a process.
fn rss_and_cpu(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    let cpu = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (rss, cpu)
}

#[test]
fn idle_agent_stays_under_20_mb_and_uses_almost_no_cpu() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    f.release(&f.gen0.clone(), COMMIT, &[]);
    f.start_cp(&[]);
    let mut config = f.agent_config();
    config.poll_interval_secs = 300;
    let mut agent = AgentProc::start(&config);
    agent.wait_log("checked in", LONG);
    let pid = agent.child.as_ref().unwrap().id();
    let (_, cpu_before) = rss_and_cpu(pid);
    let checkins_before = agent.log_text().matches("checked in").count();
    let start = std::time::Instant::now();
    wait_for("three more check-ins", LONG, || {
        agent.log_text().matches("checked in").count() >= checkins_before + 3
    });
    let elapsed = start.elapsed();
    let (rss, cpu_after) = rss_and_cpu(pid);
    let ticks = cpu_after - cpu_before;
    eprintln!(
        "idle agent: VmRSS {rss} KiB; {ticks} CPU ticks (1/100 s) over {:.1} s and 3 check-ins",
        elapsed.as_secs_f64()
    );
    assert!(rss < 20 * 1024, "idle RSS {rss} KiB is over 20 MiB");
    // 3 check-ins (TLS resumption, health command) in about 15 s: well under 5 % of a core.
    let cpu_ms = ticks * 10;
    assert!(
        cpu_ms * 100 < elapsed.as_millis() as u64 * 5,
        "{cpu_ms} ms of CPU in {elapsed:?}"
    );
}

/// The NAR file the cache's narinfo for `closure` points at.
fn nar_file(cache: &Cache, closure: &str) -> PathBuf {
    let narinfo =
        std::fs::read_to_string(cache.dir.join(format!("{}.narinfo", &closure[..32]))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    cache.dir.join(url)
}

#[test]
fn corrupted_closure_in_the_cache_is_refused_and_reported() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let gen2 = f.closure(2, |c, p| c.push(p));
    // gen1's signed narinfo now points at other bytes: its NarHash does not match.
    std::fs::copy(nar_file(&f.cache, &gen2), nar_file(&f.cache, &gen1)).unwrap();
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("refused, nothing activated", LONG);
    f.wait_cp_log("kind=closure-rejected");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert!(f.machine.activations().is_empty());
    // Nix may leave the unpacked bytes behind, but never registers them as valid.
    assert!(!nixfleet_harness::nix::is_valid(&gen1));
}

#[test]
fn kill9_mid_rollback_finishes_the_rollback_with_exactly_one_switch_back() {
    kill9_mid_rollback(Layout::Nixos);
}

#[test]
fn darwin_kill9_mid_rollback_finishes_it_with_exactly_one_reactivation() {
    kill9_mid_rollback(Layout::Darwin);
}

fn kill9_mid_rollback(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    f.machine.set("fail", &f.name(1), true);
    let name0 = f.name(0);
    f.machine.set("hang", &name0, true);
    let mut agent = f.agent();
    wait_for("the switch back to start", LONG, || {
        f.machine.activations().len() == 2
    });
    assert_eq!(f.phase(), "rolling-back");
    agent.kill9();
    f.machine.set("hang", &name0, false);
    agent.restart();
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    f.wait_cp_log("kind=rolled-back");
}

#[test]
fn a_cached_manifest_older_than_the_target_is_fetched_again() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    // The agent cached this rollout's manifest long ago; CI has re-signed it since. A
    // re-sign keeps the rollout id, so only the signing time tells the copies apart.
    let (old_dir, old_id) = f.other_release(
        "old",
        &[&f.host],
        json!({ HOST: gen1.clone() }),
        &["--signed-at", "2026-01-01T00:00:00Z"],
    );
    let rollout = f.release(&gen1, COMMIT, &[]);
    assert_eq!(old_id, rollout, "a re-sign of the same intent keeps the id");
    let cache = f.machine.dir.join("agent-state/manifests");
    std::fs::create_dir_all(&cache).unwrap();
    let old = old_dir.join(format!("rollouts/{rollout}.json"));
    std::fs::copy(&old, cache.join(format!("{rollout}.json"))).unwrap();
    std::fs::copy(
        old.with_extension("json.sig"),
        cache.join(format!("{rollout}.sig")),
    )
    .unwrap();
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("confirm of", LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert!(
        !agent.log_text().contains("is stale"),
        "{}",
        agent.log_text()
    );
    let cached = std::fs::read(cache.join(format!("{rollout}.json"))).unwrap();
    assert_ne!(
        cached,
        std::fs::read(&old).unwrap(),
        "the newer copy is cached"
    );
}

#[test]
fn a_closure_whose_activation_failed_is_not_sent_again_by_a_later_rollout() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let name = gen1.split_once('-').unwrap().1.to_owned();
    f.machine.set("fail", &name, true);
    let first = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.state()["failedTargets"][0]["cause"], "activation");
    // It would succeed now, so a second activation would show.
    f.machine.set("fail", &name, false);
    // A new intent (another health gate) that still gives this host that closure.
    let fleet = fleet_json(&[&f.host], canary_policy("halt", 1));
    release_closures(
        &f.pki,
        &f.forge_dir,
        &fleet,
        &json!({ HOST: gen1.clone() }),
        "2222222222222222222222222222222222222222",
        &[],
    );
    let second = rollout_id(&f.forge_dir, "stable");
    assert_ne!(first, second);
    let start = std::time::Instant::now();
    loop {
        let view = f.host_view();
        if view["rollout"] == second.as_str()
            && view["waiting"]
                .as_str()
                .is_some_and(|w| w.contains("closure already failed on this host"))
        {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "the later rollout did not count the host failed: {view}\nagent:\n{}\ncp:\n{}",
            agent.log_text(),
            f.cp().log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Two more check-ins, and nothing is offered.
    for _ in 0..2 {
        let seen = f.host_view()["last_checkin"].clone();
        wait_for("a check-in", LONG, || f.host_view()["last_checkin"] != seen);
    }
    // gen1 once, then the rollback to gen0; never gen1 again.
    assert_eq!(
        f.machine.activations(),
        vec![gen1.clone(), f.gen0.clone()],
        "activated once"
    );
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));

    // Retrying on purpose, as docs/release.md says: with the agent stopped, drop the
    // failure from its state; the next rollout that names the closure sends it again.
    agent.kill9();
    let state = f.machine.dir.join("agent-state/state.json");
    let script = r#"jq --arg c "$1" '.failedTargets |= map(select(.closureHash != $c))' "$2" > "$2.new" && install -m 0600 "$2.new" "$2""#;
    let out = std::process::Command::new("sh")
        .args(["-c", script, "sh", &gen1, state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.restart();
    let fleet = fleet_json(&[&f.host], canary_policy("halt", 2));
    release_closures(
        &f.pki,
        &f.forge_dir,
        &fleet,
        &json!({ HOST: gen1.clone() }),
        "3333333333333333333333333333333333333333",
        &[],
    );
    agent.wait_log(&format!("confirm of {gen1}"), LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
}

#[test]
fn an_older_signed_release_is_refused_after_a_newer_one_even_after_a_restart() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let gen1 = f.closure(1, |c, p| c.push(p));
    let gen2 = f.closure(2, |c, p| c.push(p));
    // r1 names gen1 and was signed five minutes before r2: both fresh, both really signed.
    let five_minutes_ago = (time::OffsetDateTime::now_utc() - time::Duration::minutes(5))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (old_dir, r1) = f.other_release(
        "r1",
        &[&f.host],
        json!({ HOST: gen1.clone() }),
        &["--signed-at", &five_minutes_ago],
    );
    f.release(&gen2, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log(&format!("confirm of {gen2}"), LONG);
    agent.kill9();
    // A compromised control plane now replays r1. The agent was restarted in between,
    // so what it accepted must come from its state.
    let (evil, mut agent) = f.compromised();
    evil.serve_manifests_from(old_dir.clone());
    let lie = json!({"closureHash": gen1.clone(), "rolloutId": r1.clone(), "waveIndex": 0,
                     "signedAt": five_minutes_ago, "freshnessWindowSecs": 86400,
                     "confirmWindowSecs": 300});
    evil.rewrite_checkin(move |v| v["target"] = lie.clone());
    agent.wait_log("an older release is never activated", LONG);
    f.wait_cp_log("kind=manifest-rejected");
    assert_eq!(f.machine.activations(), vec![gen2.clone()]);
    assert_eq!(f.machine.current().as_deref(), Some(gen2.as_str()));
    assert_eq!(f.state()["failedTargets"][0]["rolloutId"], r1.as_str());
}

// ---- closures already in the local store ------------------------------------------------
//
// `nix-store --realise` with require-sigs only checks what it substitutes; a path already
// valid in the local store passes it untouched. The agent checks the signature of every
// path of the closure itself, fetched or not.

/// Signs `closure` and everything it references, in the local store, with `key`.
fn sign_in_store(closure: &str, key: &std::path::Path, recursive: bool) {
    let mut cmd = nixfleet_harness::nix::nix_command("nix");
    cmd.args(["store", "sign", "--key-file"]).arg(key);
    if recursive {
        cmd.arg("--recursive");
    }
    let out = cmd
        .arg(nixfleet_harness::nix::store_path(closure))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix store sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A binary cache that has nothing and records every request made to it: the only
/// substituter of an agent that must not fetch.
struct WatchedCache {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WatchedCache {
    fn start() -> WatchedCache {
        use std::io::{BufRead as _, Write as _};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = std::io::BufReader::new(&stream).read_line(&mut line);
                seen.lock().unwrap().push(line.trim().to_owned());
                let _ = (&stream).write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        WatchedCache {
            port,
            requests,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for WatchedCache {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A system closure with a dependency: `<name>` (with the usual switch-to-configuration,
/// which records itself and repoints current-system) referencing `<name>-etc`.
const WITH_DEPENDENCY_NIX: &str = r#"{ name, dir }:
let etc = derivation {
  name = "${name}-etc";
  inherit dir;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "echo $dir > $out" ];
};
in derivation {
  inherit name dir etc;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/bin:/usr/bin";
  args = [ "-c" "mkdir -p $out/bin && ln -s $etc $out/etc && printf '#!/bin/sh\necho %s >> %s/activations\nln -sfn %s %s/current-system\n' $out $dir $out $dir > $out/bin/switch-to-configuration && chmod +x $out/bin/switch-to-configuration" ];
}
"#;

/// Builds a closure of two paths on `machine`; returns (system, its dependency), basenames.
fn build_with_dependency(machine: &Machine, name: &str) -> (String, String) {
    let file = machine.dir.join("with-dependency.nix");
    std::fs::write(&file, WITH_DEPENDENCY_NIX).unwrap();
    let mut cmd = nixfleet_harness::nix::nix_command("nix-build");
    cmd.arg(&file)
        .args(["--no-out-link", "--argstr", "name", name])
        .arg("--argstr")
        .arg("dir")
        .arg(&machine.dir)
        .args(["--option", "substituters", ""]);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "nix-build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let system = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let refs = nixfleet_harness::nix::nix_command("nix-store")
        .args(["--query", "--references", &system])
        .output()
        .unwrap();
    // The system references itself (its script names $out) and the dependency.
    let refs = String::from_utf8_lossy(&refs.stdout).into_owned();
    let dependency = refs
        .lines()
        .find(|r| r.ends_with(&format!("{name}-etc")))
        .unwrap_or_else(|| panic!("no dependency in {refs}"))
        .to_owned();
    let base = |p: &str| p.rsplit('/').next().unwrap().to_owned();
    (base(&system), base(&dependency))
}

impl Fleet {
    /// Asserts that nothing was switched: profile, current-system and activations as
    /// they were before the agent started.
    fn assert_nothing_switched(&self) {
        assert_eq!(self.machine.current().as_deref(), Some(self.gen0.as_str()));
        assert_eq!(
            self.machine.profile_target().as_deref(),
            Some(self.gen0.as_str())
        );
        assert!(self.machine.activations().is_empty());
    }

    /// Waits for the refusal of `closure` because `unsigned` lacks a pinned signature:
    /// in the agent's log, in the report the control plane received, and in failedTargets.
    fn assert_refused_for(
        &self,
        agent: &mut AgentProc,
        rollout: &str,
        closure: &str,
        unsigned: &str,
    ) {
        let named =
            format!("/nix/store/{unsigned} carries no valid signature by a pinned cache key");
        agent.wait_log("refused, nothing activated", LONG);
        assert_contains(&agent.log_text(), &named);
        assert_contains(&agent.log_text(), "cacheKeys trusted: fleet-cache-1");
        // The CP logs each report's kind and reason.
        self.wait_cp_log("kind=closure-rejected");
        self.wait_cp_log(&named);
        let failed = &self.state()["failedTargets"][0];
        assert_eq!(failed["rolloutId"], rollout);
        assert_eq!(failed["closureHash"], closure);
        assert_eq!(failed["cause"], "refused");
        assert_contains(failed["reason"].as_str().unwrap_or(""), &named);
        assert!(
            !agent.log_text().contains("switching to it"),
            "{}",
            agent.log_text()
        );
    }
}

fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

#[test]
fn unsigned_closure_already_in_the_local_store_is_refused_and_nothing_is_switched() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    // Built on the host itself and never signed: valid in the store, "ultimate".
    let gen1 = f.machine.build(&format!("nixos-system-{HOST}-1"));
    assert!(nixfleet_harness::nix::is_valid(&gen1));
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    f.assert_refused_for(&mut agent, &rollout, &gen1, &gen1);
    assert_contains(&agent.log_text(), "signatures on it: none");
    f.assert_nothing_switched();
    // Still nothing at a later check-in.
    let checkins = agent.log_text().matches("checked in").count();
    wait_for("two more check-ins", LONG, || {
        agent.log_text().matches("checked in").count() >= checkins + 2
    });
    f.assert_nothing_switched();
}

#[test]
fn closure_in_the_local_store_signed_only_by_a_key_that_is_not_pinned_is_refused() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let foreign = Cache::new(&f.tmp.path().join("foreign-cache"), "foreign-1");
    let gen1 = f.machine.build(&format!("nixos-system-{HOST}-1"));
    sign_in_store(&gen1, &foreign.secret_key, true);
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    f.assert_refused_for(&mut agent, &rollout, &gen1, &gen1);
    assert_contains(&agent.log_text(), "signatures on it: foreign-1");
    f.assert_nothing_switched();
}

#[test]
fn closure_signed_at_the_top_but_with_an_unsigned_dependency_is_refused_naming_it() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let (gen1, etc) = build_with_dependency(&f.machine, &format!("nixos-system-{HOST}-1"));
    // Only the top is signed by the pinned key.
    sign_in_store(&gen1, &f.cache.secret_key, false);
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    f.assert_refused_for(&mut agent, &rollout, &gen1, &etc);
    assert_contains(&agent.log_text(), "1 of the 2 paths of the closure");
    f.assert_nothing_switched();
}

#[test]
fn closure_in_the_local_store_signed_by_a_pinned_key_is_activated_without_a_fetch() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let (gen1, _etc) = build_with_dependency(&f.machine, &format!("nixos-system-{HOST}-1"));
    sign_in_store(&gen1, &f.cache.secret_key, true);
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    // The only substituter has nothing and records any request.
    let watched = WatchedCache::start();
    let mut config = f.agent_config();
    config.substituters = vec![watched.url()];
    let mut agent = AgentProc::start(&config);
    agent.wait_log("confirm of", LONG);
    assert_contains(
        &agent.log_text(),
        &format!("{gen1} realised; every path of its closure (2) carries a signature by a pinned cache key (fleet-cache-1); switching to it"),
    );
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(gen1.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    f.wait_cp_log("kind=activated");
    assert_eq!(
        watched.requests(),
        Vec::<String>::new(),
        "nothing is fetched"
    );
    assert!(
        std::fs::read_dir(&f.cache.dir).unwrap().next().is_none(),
        "the fleet cache never held it"
    );
}

// ---- the same scenarios on both backends: a frozen control plane, a wiped one ----------

/// Sends `signal` (STOP, CONT) to the control plane's process.
fn signal_cp(f: &Fleet, signal: &str) {
    let pid = f.cp().child.as_ref().unwrap().id().to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[test]
fn cp_frozen_for_the_whole_confirm_window_rolls_back_by_itself() {
    cp_frozen_whole_window(Layout::Nixos);
}

#[test]
fn darwin_cp_frozen_for_the_whole_confirm_window_rolls_back_by_itself() {
    cp_frozen_whole_window(Layout::Darwin);
}

/// Magic rollback against a control plane that accepts connections but never answers
/// (SIGSTOP): the confirm attempts time out, and at the window's end the agent activates
/// the previous generation again by itself.
fn cp_frozen_whole_window(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&["--confirm-window-secs", "12"]);
    let name1 = f.name(1);
    f.machine.set("hang", &name1, true);
    let mut agent = f.agent();
    wait_for("the activation to start", LONG, || {
        !f.machine.activations().is_empty()
    });
    signal_cp(&f, "STOP");
    f.machine.set("hang", &name1, false);
    agent.wait_log("confirm not sent", LONG);
    agent.wait_log("rolled back from", LONG);
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![gen1.clone(), f.gen0.clone()]);
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    assert_eq!(f.state()["failedTargets"][0]["rolloutId"], rollout.as_str());
    assert!(
        !agent.log_text().contains("confirm of"),
        "no success after a rollback"
    );
    // Thawed: the queued report arrives and the host is seen back on generation 0.
    signal_cp(&f, "CONT");
    f.wait_cp_log("kind=rolled-back");
    wait_for("the CP to see the host back on generation 0", LONG, || {
        f.host_view()["current_closure"] == f.gen0.as_str()
    });
    assert_eq!(f.machine.activations().len(), 2);
}

#[test]
fn failed_targets_survive_a_control_plane_wipe() {
    failed_targets_across_a_wipe(Layout::Nixos);
}

#[test]
fn darwin_failed_targets_survive_a_control_plane_wipe() {
    failed_targets_across_a_wipe(Layout::Darwin);
}

/// The control plane loses its state (a new database) while the release still gives the
/// host a closure whose activation failed there: the agent's check-ins carry its
/// failedTargets, so the new control plane counts the host failed and offers nothing, and
/// the agent activates nothing.
fn failed_targets_across_a_wipe(layout: Layout) {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), layout);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.machine.set("fail", &f.name(1), true);
    let rollout = f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("rolled back from", LONG);
    f.wait_cp_log("kind=rolled-back");
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    assert_eq!(f.state()["failedTargets"][0]["cause"], "activation");
    // It would succeed now, so an activation after the wipe would show.
    f.machine.set("fail", &f.name(1), false);
    stop_cp(&mut f);
    let cp_dir = f.tmp.path().join("cp");
    std::fs::remove_dir_all(&cp_dir).unwrap();
    f.start_cp(&[]);
    assert_contains(&f.cp().log_text(), "stored rollout state loaded rollouts=0");
    let failure = format!(
        "{} of {gen1} exited with status 1",
        layout.activation_name()
    );
    let start = std::time::Instant::now();
    loop {
        // The new control plane records the failure from the check-in alone (its own
        // record of the activation is gone) and the host's rollout state is failed.
        let view = f.host_view();
        let learned = view["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| {
                e["kind"] == "fail"
                    && e["detail"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains(&failure))
            })
        });
        if view["rollout"] == rollout.as_str() && view["rollout_state"] == "failed" && learned {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "the wiped CP did not learn the failure: {view}\nagent:\n{}\ncp:\n{}",
            agent.log_text(),
            f.cp().log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..2 {
        let seen = f.host_view()["last_checkin"].clone();
        wait_for("a check-in", LONG, || f.host_view()["last_checkin"] != seen);
    }
    assert_eq!(
        f.machine.activations(),
        vec![gen1.clone(), f.gen0.clone()],
        "nothing activated after the wipe"
    );
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
}

#[test]
fn darwin_backend_refuses_a_nixos_shaped_closure_and_stays_on_its_system() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), Layout::Darwin);
    // A NixOS closure sent to a nix-darwin host: signed, realised, but no `activate`.
    let gen1 = Layout::Nixos.build(&f.machine, 1);
    f.cache.push(&gen1);
    delete_from_store(&gen1);
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    let mut agent = f.agent();
    agent.wait_log("rolled back from", LONG);
    assert_contains(&agent.log_text(), "it is not a nix-darwin system closure");
    assert_eq!(f.machine.current().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.profile_target().as_deref(), Some(f.gen0.as_str()));
    assert_eq!(f.machine.activations(), vec![f.gen0.clone()]);
    assert_eq!(f.state()["failedTargets"][0]["closureHash"], gen1.as_str());
    f.wait_cp_log("kind=rolled-back");
}

#[test]
fn agent_started_before_its_host_key_exists_waits_for_it_then_proceeds() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), Layout::Darwin);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    // At boot, before sshd generated the host key.
    let key = f.tmp.path().join("hostkey/ssh_host_ed25519_key");
    let aside = f.tmp.path().join("hostkey/aside");
    std::fs::rename(&key, &aside).unwrap();
    let mut agent = f.agent();
    agent.wait_log(
        &format!(
            "waiting for the host key {} (it does not exist yet)",
            key.display()
        ),
        LONG,
    );
    agent.wait_log("looking again in 2 s", LONG);
    assert!(!f.machine.dir.join("agent-state/cert.pem").exists());
    std::fs::rename(&aside, &key).unwrap();
    agent.wait_log("everything the agent needs is there; starting", LONG);
    agent.wait_log(&format!("confirm of {gen1}"), LONG);
    assert_eq!(f.machine.current().as_deref(), Some(gen1.as_str()));
}

#[test]
fn darwin_activate_that_restarts_the_agent_is_followed_by_the_new_agent_to_the_confirm() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::with_layout(single_wave(), Layout::Darwin);
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    f.machine.set("restart-agent", &f.name(1), true);
    let mut agent = f.agent();
    let pid = agent.child.as_ref().unwrap().id();
    std::fs::write(f.machine.dir.join("agent.pid"), pid.to_string()).unwrap();
    // `activate` kills the agent that started it (launchd stopping the daemon's job)...
    wait_for("activate to stop the agent", LONG, || {
        agent
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    });
    agent.kill9();
    // ...and finishes all the same, detached from it.
    wait_for("the detached activate to finish", LONG, || {
        f.machine.current().as_deref() == Some(gen1.as_str())
    });
    // launchd's KeepAlive starts a new agent, which learns the outcome from the run's
    // directory and confirms.
    agent.restart();
    agent.wait_log("was started before; waiting for its outcome", LONG);
    agent.wait_log(&format!("confirm of {gen1}"), LONG);
    assert_eq!(f.machine.activations(), vec![gen1.clone()]);
    assert_eq!(f.machine.profile_target().as_deref(), Some(gen1.as_str()));
    f.wait_cp_log("kind=activated");
    assert!(!agent.log_text().contains("rolled back"));
}

/// Bytes the control plane sends one real agent for a rollout, TLS included, counted on
/// the wire by a relay: from publication to the confirm, less what the same number of
/// idle check-ins costs. Its channel holds 20,000 hosts; the others never check in.
#[test]
fn a_rollout_costs_one_agent_a_few_kilobytes_in_a_20000_host_channel() {
    if !nix_or_skip() {
        return;
    }
    let mut f = Fleet::new(single_wave());
    let others: Vec<Host> = (1..20_000)
        .map(|i| Host::new(&format!("web-{i:05}")))
        .collect();
    let mut hosts: Vec<&Host> = vec![&f.host];
    hosts.extend(others.iter());
    let big = fleet_json(&hosts, single_wave());
    let closures = |fleet: &Value, own: &str, generation: u32| {
        let mut c = generation_closures(fleet, generation);
        c[HOST] = Value::String(own.to_owned());
        c
    };
    // A first rollout of this host alone, confirmed: the others join with the measured
    // releases.
    let gen1 = f.closure(1, |c, p| c.push(p));
    f.release(&gen1, COMMIT, &[]);
    f.start_cp(&[]);
    f.fleet = big;
    let relay = nixfleet_harness::relay::TcpRelay::start(
        format!("127.0.0.1:{}", f.cp_port).parse().unwrap(),
    );
    let mut config = f.agent_config();
    config.control_plane_url = format!("https://localhost:{}", relay.port);
    let mut agent = AgentProc::start(&config);
    agent.wait_log("confirm of", LONG);
    let checkins = |agent: &AgentProc| agent.log_text().matches("checked in").count();
    let wait_checkins = |agent: &AgentProc, n: usize| {
        let start = std::time::Instant::now();
        while checkins(agent) < n {
            assert!(start.elapsed() < LONG, "{}", agent.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_checkins(&agent, checkins(&agent) + 2);
    // Idle polling: what one check-in costs when there is nothing to do.
    let (b0, c0) = (relay.bytes_to_client(), checkins(&agent));
    wait_checkins(&agent, c0 + 3);
    let (b1, c1) = (relay.bytes_to_client(), checkins(&agent));
    let idle = (b1 - b0) as f64 / (c1 - c0) as f64;
    let rollout = |generation: u32, commit: &str, extra: &[&str]| -> u64 {
        let closure = f.closure(generation, |c, p| c.push(p));
        let (b, c) = (relay.bytes_to_client(), checkins(&agent));
        let confirms = agent.log_text().matches("confirm of").count();
        release_with_fallback(
            &f.pki,
            &f.forge_dir,
            &f.fleet,
            &closures(&f.fleet, &closure, generation),
            commit,
            extra,
        );
        let start = std::time::Instant::now();
        while agent.log_text().matches("confirm of").count() == confirms {
            assert!(
                start.elapsed() < LONG,
                "no confirm of generation {generation}; the control plane's log:\n{}",
                f.cp().log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (b2, c2) = (relay.bytes_to_client(), checkins(&agent));
        let spent = (b2 - b) as f64 - (c2 - c) as f64 * idle;
        assert_eq!(f.machine.current().as_deref(), Some(closure.as_str()));
        spent.max(0.0) as u64
    };
    let with_proof = rollout(2, "2222222222222222222222222222222222222222", &[]);
    let whole = rollout(
        3,
        "3333333333333333333333333333333333333333",
        &["--manifest-schema", "1"],
    );
    agent.wait_log("confirm of", LONG);
    eprintln!(
        "bytes from the control plane to one agent for a rollout of a 20,000-host channel: {with_proof} with its proof (schema 2), {whole} with the whole manifest (schema 1); an idle check-in costs {idle:.0}"
    );
    assert!(with_proof <= 8192, "{with_proof} bytes with a proof");
    assert!(
        whole > 1_000_000,
        "{whole} bytes with the whole manifest: the measurement sees it"
    );
}
