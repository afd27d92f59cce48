//! The static compliance gate on the manual path: `nixfleet release --compliance-results
//! FILE` (host -> `lib.compliance.evaluateHost` list), the same decision `release --flake`
//! takes in its stage 3. An enforce channel with a failed control is refused (exit 12,
//! nothing written); a permissive one records the failures in its signed manifest, outside
//! the rollout id.

mod support;
use support::*;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

fn setup(dir: &Path) {
    let ci = ok(dir, &["keygen", "--out", "ci.pem"]);
    let org = ok(dir, &["keygen", "--out", "org.pem"]);
    ok(
        dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            ci.trim(),
            "--org-root-key",
            org.trim(),
            "--out",
            "trust.json",
        ],
    );
}

/// examples/fleet.json (channel stable: cis; edge: disabled) with stable's mode set.
fn fleet_with_mode(dir: &Path, mode: &str) -> PathBuf {
    let mut fleet: Value =
        serde_json::from_slice(&fs::read(fixture("fleet.json")).unwrap()).unwrap();
    fleet["channels"]["stable"]["compliance"]["mode"] = json!(mode);
    let path = dir.join(format!("fleet-{mode}.json"));
    fs::write(&path, fleet.to_string()).unwrap();
    path
}

/// Results for the stable hosts: web-01 fails ssh-root-login-key-only, the rest pass.
fn results(dir: &Path, hosts: &[&str]) -> PathBuf {
    let mut all = serde_json::Map::new();
    for host in hosts {
        all.insert(
            (*host).to_owned(),
            json!([
                {"id": "ssh-root-login-key-only", "title": "root logs in over SSH with a key only, or not at all",
                 "articles": {"cis": ["5.2.8"], "nis2": ["21.2.i"]},
                 "passed": *host != "web-01",
                 "evidence": if *host == "web-01" { r#"services.openssh.settings.PermitRootLogin = "yes""# } else { r#"services.openssh.settings.PermitRootLogin = "no""# }},
                {"id": "aslr-full", "title": "Full address space layout randomisation",
                 "articles": {"cis": ["1.5.3"]}, "passed": true,
                 "evidence": "boot.kernel.sysctl.\"kernel.randomize_va_space\" = 2 (kernel default)"}
            ]),
        );
    }
    let path = dir.join("results.json");
    fs::write(&path, Value::Object(all).to_string()).unwrap();
    path
}

const STABLE: [&str; 5] = ["db-01", "db-02", "web-01", "web-02", "web-03"];

fn release(dir: &Path, fleet: &Path, out: &str, results: Option<&Path>) -> std::process::Output {
    let closures = fixture("closures.json");
    let mut args = vec![
        "release",
        "--fleet",
        fleet.to_str().unwrap(),
        "--closures",
        closures.to_str().unwrap(),
        "--ci-commit",
        "0123456789abcdef0123456789abcdef01234567",
        "--key",
        "ci.pem",
        "--out",
        out,
        "--trust-file",
        "trust.json",
    ];
    if let Some(results) = results {
        args.extend(["--compliance-results", results.to_str().unwrap()]);
    }
    nixfleet(dir, &args)
}

fn channel_manifest(dir: &Path, out: &str, channel: &str) -> (Value, String) {
    let bytes = fs::read(
        dir.join(out)
            .join(format!("rollouts/channel/{channel}.json")),
    )
    .unwrap();
    let id = nixfleet_trust::verify::rollout_id(&bytes).unwrap();
    (serde_json::from_slice(&bytes).unwrap(), id)
}

#[test]
fn enforce_refuses_with_exit_12_naming_every_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let fleet = fleet_with_mode(dir, "enforce");
    let out = release(dir, &fleet, "rel", Some(&results(dir, &STABLE)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.trim()
            == r#"host web-01: control ssh-root-login-key-only failed (cis 5.2.8; nis2 21.2.i): services.openssh.settings.PermitRootLogin = "yes""#),
        "{stderr}"
    );
    assert!(!stderr.contains("host web-02: control"), "{stderr}");
    assert!(
        !dir.join("rel/fleet.resolved.json").exists(),
        "a refused release wrote nothing"
    );

    // A host of a gated channel without results is refused too: a partial check would
    // be recorded as a complete one.
    let out = release(dir, &fleet, "rel", Some(&results(dir, &STABLE[1..])));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "{stderr}");
    assert!(
        stderr.contains("no result for host db-01 (channel stable, mode enforce)"),
        "{stderr}"
    );
}

#[test]
fn permissive_records_the_failures_in_the_signed_manifest_outside_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let fleet = fleet_with_mode(dir, "permissive");
    let results = results(dir, &STABLE);
    let out = release(dir, &fleet, "rel", Some(&results));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("warning: compliance")
            && l.contains("host web-01: control ssh-root-login-key-only failed")),
        "{stderr}"
    );
    let (stable, id) = channel_manifest(dir, "rel", "stable");
    assert_eq!(
        stable["compliance"],
        json!({"mode": "permissive", "staticFailures": [
            {"hostname": "web-01", "control": "ssh-root-login-key-only",
             "articles": {"cis": ["5.2.8"], "nis2": ["21.2.i"]},
             "evidence": "services.openssh.settings.PermitRootLogin = \"yes\""}
        ]})
    );
    // The edge channel is disabled: no record.
    let (edge, _) = channel_manifest(dir, "rel", "edge");
    assert!(edge.get("compliance").is_none(), "{edge}");
    // The manifest verifies (the record is signed with it).
    ok(
        dir,
        &[
            "verify",
            "manifest",
            "rel/rollouts/channel/stable.json",
            "--trust-file",
            "trust.json",
            "--fleet",
            "rel/fleet.resolved.json",
        ],
    );

    // The same intent released without the gate: no record, the same rollout id.
    let out = release(dir, &fleet, "plain", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (plain, plain_id) = channel_manifest(dir, "plain", "stable");
    assert!(plain.get("compliance").is_none(), "{plain}");
    assert_eq!(plain_id, id);

    // Re-signing the same intent without results keeps what the gate recorded.
    let out = release(dir, &fleet, "rel", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (again, again_id) = channel_manifest(dir, "rel", "stable");
    assert_eq!(again_id, id);
    assert_eq!(again["compliance"], stable["compliance"]);

    // An enforce channel whose hosts pass records an empty list.
    let enforce = fleet_with_mode(dir, "enforce");
    let passing = dir.join("passing.json");
    let mut all: Value = serde_json::from_slice(&fs::read(&results).unwrap()).unwrap();
    all["web-01"][0]["passed"] = json!(true);
    fs::write(&passing, all.to_string()).unwrap();
    let out = release(dir, &enforce, "enforced", Some(&passing));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (enforced, _) = channel_manifest(dir, "enforced", "stable");
    assert_eq!(
        enforced["compliance"],
        json!({"mode": "enforce", "staticFailures": []})
    );
}
