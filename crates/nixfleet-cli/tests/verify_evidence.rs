//! `nixfleet verify evidence`, run as the real binary on a signed release: good evidence
//! is accepted with its controls listed; forged, replayed, another host's, and evidence
//! from another closure or rollout are refused, each naming why.

mod support;
use support::*;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use base64::Engine as _;
use nixfleet_proto::compliance::{
    ComplianceMode, ControlEvidence, ControlStatus, Evidence, EvidenceRequest, EvidenceTrigger,
};
use nixfleet_proto::Algorithm;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use time::OffsetDateTime;

const WEB: &str = "00000000000000000000000000000004-nixos-system-web-01";
const DB: &str = "00000000000000000000000000000001-nixos-system-db-01";

struct Release {
    dir: tempfile::TempDir,
    web: PrivateKey,
    db: PrivateKey,
    rollout: String,
}

/// Trust roots in `d`, and a signed release in `d/out` of the example fleet with `pinned`
/// hosts' keys pinned; returns the stable channel's rollout id. The CI and org keys are
/// removed afterwards: they have no place in an example.
fn sign_example_release(
    d: &Path,
    pinned: &[(&str, &PrivateKey)],
    signed_at: Option<&str>,
    out: &str,
) -> String {
    let ci = ok(d, &["keygen", "--out", "ci.pem"]);
    let org = ok(d, &["keygen", "--out", "org.pem"]);
    ok(
        d,
        &[
            "trust",
            "init",
            "--ci-release-key",
            ci.trim(),
            "--org-root-key",
            org.trim(),
            "--cache-key",
            "cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--out",
            "trust.json",
        ],
    );
    let repo = repo();
    let mut fleet: serde_json::Value =
        serde_json::from_slice(&fs::read(repo.join("examples/fleet.json")).unwrap()).unwrap();
    for (host, key) in pinned {
        fleet["hosts"][*host]["pubkey"] =
            keys::to_ssh_public_line(&key.public_key(), &format!("root@{host}"))
                .unwrap()
                .into();
    }
    fs::write(
        d.join("fleet.json"),
        serde_json::to_string_pretty(&fleet).unwrap(),
    )
    .unwrap();
    let closures = repo.join("examples/closures.json");
    let mut args = vec![
        "release",
        "--fleet",
        "fleet.json",
        "--closures",
        closures.to_str().unwrap(),
        "--ci-commit",
        "0123456789abcdef0123456789abcdef01234567",
        "--key",
        "ci.pem",
        "--out",
        out,
    ];
    if let Some(at) = signed_at {
        args.extend(["--signed-at", at]);
    }
    ok(d, &args);
    fs::remove_file(d.join("ci.pem")).unwrap();
    fs::remove_file(d.join("org.pem")).unwrap();
    let rollouts = d.join(out).join("rollouts");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(rollouts.join("channel/stable.json")).unwrap()).unwrap();
    fs::read_dir(&rollouts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
        .find(|id| {
            id.len() == 64
                && serde_json::from_slice::<serde_json::Value>(
                    &fs::read(rollouts.join(format!("{id}.json"))).unwrap(),
                )
                .unwrap()
                    == manifest
        })
        .expect("the stable channel's manifest under its rollout id")
}

/// The example fleet with web-01 and db-01 keys pinned, released and signed now.
fn release() -> Release {
    let dir = tempfile::tempdir().unwrap();
    let web = PrivateKey::generate(Algorithm::Ed25519);
    let db = PrivateKey::generate(Algorithm::Ed25519);
    let rollout =
        sign_example_release(dir.path(), &[("web-01", &web), ("db-01", &db)], None, "rel");
    Release {
        dir,
        web,
        db,
        rollout,
    }
}

fn evidence(host: &str, closure: &str, rollout: &str, collected: i64) -> Evidence {
    let activated =
        OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() - time::Duration::seconds(600);
    let at = activated + time::Duration::seconds(collected);
    Evidence {
        hostname: host.into(),
        rollout_id: Some(rollout.into()),
        closure_hash: closure.into(),
        boot_id: "boot-1".into(),
        activated_at: activated,
        collected_at: at,
        trigger: EvidenceTrigger::Activation,
        mode: ComplianceMode::Enforce,
        frameworks: vec!["cis".into()],
        controls: vec![
            ControlEvidence {
                id: "ssh-root-login-key-only".into(),
                status: ControlStatus::Pass,
                articles: BTreeMap::from([("cis".to_owned(), vec!["5.2.8".to_owned()])]),
                output_hash: format!("sha256:{}", "a".repeat(64)),
                collected_at: at,
            },
            ControlEvidence {
                id: "auditd-enabled".into(),
                status: ControlStatus::Fail,
                articles: BTreeMap::from([("cis".to_owned(), vec!["4.1.1.2".to_owned()])]),
                output_hash: format!("sha256:{}", "b".repeat(64)),
                collected_at: at,
            },
        ],
    }
}

fn write(dir: &Path, name: &str, key: &PrivateKey, evidence: Evidence) -> String {
    let sig = key.sign(&jcs::to_canonical(&evidence).unwrap());
    let request = EvidenceRequest {
        evidence,
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    };
    fs::write(dir.join(name), serde_json::to_vec_pretty(&request).unwrap()).unwrap();
    name.to_owned()
}

fn verify(dir: &Path, file: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "verify",
        "evidence",
        file,
        "--fleet",
        "rel/fleet.resolved.json",
        "--trust-file",
        "trust.json",
    ];
    args.extend_from_slice(extra);
    nixfleet(dir, &args)
}

fn refused(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted, expected refusal: {needle}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn good_evidence_is_accepted_against_the_fleet_and_the_release() {
    let r = release();
    let d = r.dir.path();
    let file = write(
        d,
        "web.json",
        &r.web,
        evidence("web-01", WEB, &r.rollout, 5),
    );
    let manifest = format!("rel/rollouts/{}.json", r.rollout);
    let out = verify(d, &file, &["--host", "web-01", "--manifest", &manifest]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: compliance evidence "), "{stdout}");
    assert!(stdout.contains(&format!("closure {WEB}")), "{stdout}");
    assert!(
        stdout.contains(&format!("release: rollout {}", r.rollout)),
        "{stdout}"
    );
    assert!(stdout.contains("2 control(s), 1 not passing"), "{stdout}");
    assert!(
        stdout.contains("FAIL  auditd-enabled  [cis 4.1.1.2]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pass  ssh-root-login-key-only  [cis 5.2.8]"),
        "{stdout}"
    );
}

#[test]
fn forged_evidence_is_refused() {
    let r = release();
    let d = r.dir.path();
    // Signed by db-01's key while naming web-01.
    let forged = write(
        d,
        "forged.json",
        &r.db,
        evidence("web-01", WEB, &r.rollout, 5),
    );
    refused(&verify(d, &forged, &[]), "signature does not verify");
    // Signed by web-01, then a failing control turned into a pass.
    let good = write(
        d,
        "good.json",
        &r.web,
        evidence("web-01", WEB, &r.rollout, 5),
    );
    let text = fs::read_to_string(d.join(&good))
        .unwrap()
        .replace("\"fail\"", "\"pass\"");
    fs::write(d.join("altered.json"), text).unwrap();
    refused(&verify(d, "altered.json", &[]), "signature does not verify");
}

#[test]
fn another_hosts_evidence_is_refused() {
    let r = release();
    let d = r.dir.path();
    let db = write(d, "db.json", &r.db, evidence("db-01", DB, &r.rollout, 5));
    // It verifies as db-01's…
    assert!(verify(d, &db, &[]).status.success());
    // …but not as web-01's.
    refused(
        &verify(d, &db, &["--host", "web-01"]),
        "it is db-01's evidence, not web-01's",
    );
    // A host whose key the fleet does not pin has no evidence that verifies.
    let lab = write(
        d,
        "lab.json",
        &r.web,
        evidence("lab-01", WEB, &r.rollout, 5),
    );
    refused(&verify(d, &lab, &[]), "the fleet pins no key for lab-01");
}

#[test]
fn replayed_evidence_is_refused() {
    let r = release();
    let d = r.dir.path();
    let old = write(
        d,
        "old.json",
        &r.web,
        evidence("web-01", WEB, &r.rollout, 5),
    );
    let new = write(
        d,
        "new.json",
        &r.web,
        evidence("web-01", WEB, &r.rollout, 60),
    );
    assert!(verify(d, &new, &["--latest", &old]).status.success());
    assert!(verify(d, &new, &["--latest", &new]).status.success());
    refused(
        &verify(d, &old, &["--latest", &new]),
        "replayed: collected at",
    );
}

#[test]
fn evidence_from_another_closure_or_rollout_is_refused_against_the_release() {
    let r = release();
    let d = r.dir.path();
    let manifest = format!("rel/rollouts/{}.json", r.rollout);
    let other_closure = write(
        d,
        "closure.json",
        &r.web,
        evidence(
            "web-01",
            "11111111111111111111111111111111-nixos-system-web-01",
            &r.rollout,
            5,
        ),
    );
    refused(
        &verify(d, &other_closure, &["--manifest", &manifest]),
        "collected on closure 11111111111111111111111111111111-nixos-system-web-01",
    );
    let other_rollout = write(
        d,
        "rollout.json",
        &r.web,
        evidence("web-01", WEB, &"c".repeat(64), 5),
    );
    refused(
        &verify(d, &other_rollout, &["--manifest", &manifest]),
        &format!("collected in rollout {}", "c".repeat(64)),
    );
}

/// The auditor's walk in docs/compliance.md runs on `examples/compliance-audit`: a signed
/// release of the example fleet with web-01's key pinned, and two pieces of web-01's
/// evidence. `NIXFLEET_BLESS=1` writes them afresh; otherwise this checks they still
/// verify as the page says (the page itself runs in the docs test).
#[test]
fn the_audit_example_verifies() {
    let audit = repo().join("examples/compliance-audit");
    let now = "2026-12-04T10:00:00Z";
    if std::env::var_os("NIXFLEET_BLESS").is_some() {
        bless_audit_example(&audit);
    }
    let d = audit.as_path();
    let rollout: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("evidence.json")).unwrap()).unwrap();
    let rollout = rollout["evidence"]["rolloutId"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifest = format!("release/rollouts/{rollout}.json");
    let args = |file: &'static str, extra: &[&'static str]| {
        let mut v = vec![
            "verify".to_owned(),
            "evidence".to_owned(),
            file.to_owned(),
            "--fleet".to_owned(),
            "release/fleet.resolved.json".to_owned(),
            "--trust-file".to_owned(),
            "trust.json".to_owned(),
            "--now".to_owned(),
            now.to_owned(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let mut good = args(
        "evidence.json",
        &["--host", "web-01", "--latest", "evidence.json"],
    );
    good.extend(["--manifest".to_owned(), manifest.clone()]);
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    let out = ok(d, &good);
    assert!(out.contains("1 not passing"), "{out}");
    let old = args("evidence-earlier.json", &["--latest", "evidence.json"]);
    let old: Vec<&str> = old.iter().map(String::as_str).collect();
    assert!(fails(d, &old).contains("replayed"));
}

fn bless_audit_example(audit: &Path) {
    let _ = fs::remove_dir_all(audit);
    fs::create_dir_all(audit).unwrap();
    let d = audit;
    let web = PrivateKey::generate(Algorithm::Ed25519);
    let rollout = sign_example_release(
        d,
        &[("web-01", &web)],
        Some("2026-12-04T09:00:00Z"),
        "release",
    );
    let at = |text: &str| {
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    };
    for (name, collected) in [
        ("evidence-earlier.json", "2026-12-04T09:30:12Z"),
        ("evidence.json", "2026-12-04T09:45:03Z"),
    ] {
        let mut e = evidence("web-01", WEB, &rollout, 0);
        e.activated_at = at("2026-12-04T09:30:00Z");
        e.collected_at = at(collected);
        e.trigger = if name == "evidence.json" {
            EvidenceTrigger::Drift
        } else {
            EvidenceTrigger::Activation
        };
        for c in &mut e.controls {
            c.collected_at = at(collected);
        }
        write(d, name, &web, e);
    }
}
