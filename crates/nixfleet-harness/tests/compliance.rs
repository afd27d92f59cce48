//! Compliance as a rollout gate, with the real binaries and real Nix: closures carrying a
//! probe set (`etc/nixfleet/compliance.json`) whose probes pass or fail on the host.
//! Under `enforce` a failing probe rolls the canary back, fails it naming the control and
//! halts the rollout, and a wipe of the control plane keeps that decision and gets the
//! evidence back from the agent; under `permissive` the fleet converges and reports.

mod fleet;

use fleet::*;
use nixfleet_harness::nix::Machine;
use nixfleet_harness::*;
use serde_json::{json, Value};

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A probe set of one passing and one failing control (the failing one only on hosts
/// whose name is in `failing_on`).
fn probe_set(mode: &str, host: &str, failing_on: &[&str]) -> String {
    let audit = if failing_on.iter().any(|h| host.contains(h)) {
        "echo 'auditd.service inactive'; exit 1"
    } else {
        "echo 'auditd.service active'"
    };
    json!({
        "mode": mode,
        "frameworks": ["cis"],
        "probes": [
            {"id": "auditd-enabled", "articles": {"cis": ["4.1.1.2"], "nis2": ["21.2.b"]},
             "command": ["/bin/sh", "-c", audit], "timeoutSecs": 10, "expect": "exit0"},
            {"id": "time-sync-enabled", "articles": {"cis": ["2.2.1.1"]},
             "command": ["/bin/sh", "-c", "echo 'systemd-timesyncd active'"], "timeoutSecs": 10, "expect": "exit0"}
        ]
    })
    .to_string()
}

fn fleet(mode: &str, failing_on: &'static [&'static str]) -> Fleet {
    let mode_owned = mode.to_owned();
    Fleet::new_built(
        &names(&["canary-01", "web-01"]),
        canary_policy("halt", 0),
        json!([]),
        |fleet| {
            fleet["channels"]["stable"]["compliance"] =
                json!({"frameworks": ["cis"], "mode": mode_owned});
        },
        move |machine: &Machine, name: &str| {
            machine.build_with_probes(name, &probe_set(mode, name, failing_on))
        },
    )
}

/// `nixfleet compliance report --json` against the fleet's control plane.
fn report(f: &Fleet) -> Value {
    let out = std::process::Command::new(bin("nixfleet"))
        .args(["compliance", "report", "--json"])
        .args(["--url", &format!("https://localhost:{}", f.cp_port)])
        .arg("--ca-cert")
        .arg(f.pki.path("etc/ca.pem"))
        .arg("--cert")
        .arg(f.pki.path("operator/operator-cert.pem"))
        .arg("--key")
        .arg(f.pki.path("operator/operator-key.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "compliance report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn host<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hostname"] == name)
        .unwrap_or_else(|| panic!("{name} not in {report}"))
}

fn waiting_of(f: &Fleet, name: &str) -> String {
    f.operator_get(&format!("/v1/hosts/{name}")).json()["waiting"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn enforce_rolls_back_a_failing_canary_halts_and_keeps_the_decision_across_a_wipe() {
    require_nix();
    let mut summary = Summary::begin("17 compliance enforce");
    let mut f = fleet("enforce", &["canary-01"]);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let started = std::time::Instant::now();
    f.start_agents();
    let canary = f.node("canary-01");
    wait_for("the canary to roll back", LONG, || {
        canary.state()["failedTargets"][0]["cause"] == "compliance"
    });
    summary.timing("canary rolled back after", started.elapsed());
    // It switched, failed its probe, never confirmed, and runs gen0 again.
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()]
    );
    assert_eq!(
        canary.machine.current().as_deref(),
        Some(canary.gen0.as_str())
    );
    assert!(!canary.log().contains("confirm of"), "{}", canary.log());
    let reason = canary.state()["failedTargets"][0]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("auditd-enabled"), "{reason}");
    wait_for("the rollout to halt", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    let waiting = waiting_of(&f, "canary-01");
    assert!(waiting.contains("auditd-enabled"), "{waiting}");
    // The control plane has the canary's signed evidence: the failing control, and the
    // passing one.
    wait_for("the canary's evidence", LONG, || {
        host(&report(&f), "canary-01")["summary"]["failing"][0]["id"] == "auditd-enabled"
    });
    let r = report(&f);
    let canary_report = host(&r, "canary-01");
    assert_eq!(canary_report["mode"], "enforce");
    assert_eq!(canary_report["summary"]["passed"], 1);
    assert_eq!(
        canary_report["evidence"]["evidence"]["closureHash"],
        canary.gen1.as_str()
    );
    // The host's status carries it too (what `nixfleet status --host` and the
    // dashboard show).
    let status = f.operator_get("/v1/hosts/canary-01").json();
    assert_eq!(status["compliance"]["failing"][0]["id"], "auditd-enabled");
    // Wave 1 was never dispatched.
    assert!(f.node("web-01").machine.activations().is_empty());

    // The runbook's wipe: the halt is rebuilt from what agents report, and the evidence
    // comes back from the agent that holds it.
    let marks = f.log_marks();
    wipe_and_restart(&mut f);
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.wait_checkins_since(&marks, 2, &[]);
    wait_for("the rollout to be halted again", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    wait_for("the canary's evidence after the wipe", LONG, || {
        let r = report(&f);
        let h = host(&r, "canary-01");
        h["pending"] == false && h["summary"]["failing"][0]["id"] == "auditd-enabled"
    });
    f.assert_no_orders_since(&marks, &[]);
    assert!(f.node("web-01").machine.activations().is_empty());
}

#[test]
fn permissive_converges_and_reports_the_failing_control() {
    require_nix();
    let _summary = Summary::begin("18 compliance permissive");
    let mut f = fleet("permissive", &["web-01"]);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    f.wait_confirmed(&["canary-01", "web-01"]);
    wait_for("the rollout to converge", LONG, || {
        f.rollout_state() == "converged"
    });
    let r = report(&f);
    let web = host(&r, "web-01");
    assert_eq!(web["mode"], "permissive");
    assert_eq!(web["summary"]["failing"][0]["id"], "auditd-enabled");
    assert_eq!(web["summary"]["failing"][0]["status"], "fail");
    let canary = host(&r, "canary-01");
    assert_eq!(canary["summary"]["failing"], json!([]));
    assert_eq!(canary["summary"]["passed"], 2);
    // The text report names the host, the control and its articles.
    let text = std::process::Command::new(bin("nixfleet"))
        .args(["compliance", "report", "--framework", "nis2"])
        .args(["--url", &format!("https://localhost:{}", f.cp_port)])
        .arg("--ca-cert")
        .arg(f.pki.path("etc/ca.pem"))
        .arg("--cert")
        .arg(f.pki.path("operator/operator-cert.pem"))
        .arg("--key")
        .arg(f.pki.path("operator/operator-key.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    let web = text
        .split("web-01  channel")
        .nth(1)
        .unwrap_or_else(|| panic!("no web-01 in\n{text}"));
    let line = web
        .lines()
        .find(|l| l.contains("auditd-enabled"))
        .unwrap_or_else(|| panic!("no auditd-enabled row for web-01 in\n{text}"));
    assert!(
        line.contains("FAIL") && web.contains("nis2 21.2.b"),
        "{text}"
    );
    assert!(text.contains("1 with failing controls"), "{text}");
    // --framework nis2 keeps only the controls citing NIS2.
    assert!(!text.contains("time-sync-enabled"), "{text}");
}
