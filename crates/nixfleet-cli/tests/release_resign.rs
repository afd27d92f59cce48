//! The parts of `nixfleet release`'s pipeline that need no Nix, on the real binary: the
//! scheduled re-sign (`--resign --from`: new signedAt, same rollout ids, revocations
//! re-signed, a release not signed by the pinned key refused), `release check-fresh`
//! (exit 20 when close to stale), `--publish-dir` on the manual path, and the stage exit
//! codes of refusals that come before any build.

mod support;
use support::*;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn ago(minutes: i64) -> String {
    (time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        - time::Duration::minutes(minutes))
    .format(&time::format_description::well_known::Rfc3339)
    .unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// Keys and trust.json in `dir`; returns the trust file.
fn setup(dir: &Path) -> PathBuf {
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
    dir.join("trust.json")
}

/// A release signed `minutes_ago`, published to `dir/forge` with its revocation list.
fn publish(dir: &Path, minutes_ago: i64) {
    let signed_at = ago(minutes_ago);
    ok(
        dir,
        &[
            "release",
            "--fleet",
            &fixture("fleet.json"),
            "--closures",
            &fixture("closures.json"),
            "--ci-commit",
            "1111111111111111111111111111111111111111",
            "--key",
            "ci.pem",
            "--out",
            "release",
            "--signed-at",
            &signed_at,
            "--publish-dir",
            "forge",
        ],
    );
    ok(
        dir,
        &[
            "revocations",
            "sign",
            "--in",
            &fixture("revocations.json"),
            "--key",
            "ci.pem",
            "--out",
            "forge",
            "--signed-at",
            &signed_at,
        ],
    );
}

/// Per channel, when its intent was first released; the fleet's and the revocation
/// list's signedAt.
fn stamps(forge: &Path) -> (Vec<(String, String)>, String, String) {
    let mut ids = Vec::new();
    for channel in ["edge", "stable"] {
        let manifest = json(&forge.join(format!("rollouts/channel/{channel}.json")));
        let id = manifest["introduced"]["signedAt"]
            .as_str()
            .unwrap()
            .to_owned();
        ids.push((channel.to_owned(), id));
    }
    let fleet = json(&forge.join("fleet.resolved.json"));
    let revocations = json(&forge.join("revocations.json"));
    (
        ids,
        fleet["meta"]["signedAt"].as_str().unwrap().to_owned(),
        revocations["meta"]["signedAt"].as_str().unwrap().to_owned(),
    )
}

fn manifest_ids(forge: &Path) -> Vec<String> {
    let mut ids: Vec<String> = fs::read_dir(forge.join("rollouts"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    ids.sort();
    ids
}

#[test]
fn check_fresh_exits_20_when_the_published_release_is_close_to_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    // Windows of 1440 minutes; signed 1400 minutes ago: 40 left.
    publish(dir, 1400);
    let check = |within: &str| {
        nixfleet(
            dir,
            &[
                "release",
                "check-fresh",
                "--from",
                "forge",
                "--trust-file",
                "trust.json",
                "--within-minutes",
                within,
            ],
        )
    };
    let out = check("30");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("fresh: "));
    let out = check("60");
    assert_eq!(out.status.code(), Some(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("goes stale at")
            && stderr.contains("nixfleet release --resign --from forge"),
        "{stderr}"
    );
    // Already stale: 20 too, saying so.
    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let out = nixfleet(
        dir,
        &[
            "release",
            "check-fresh",
            "--from",
            "forge",
            "--trust-file",
            "trust.json",
            "--now",
            &later,
        ],
    );
    assert_eq!(out.status.code(), Some(20));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale"));
}

#[test]
fn resign_refreshes_every_signature_and_keeps_every_rollout_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    publish(dir, 600);
    let forge = dir.join("forge");
    let ids_before = manifest_ids(&forge);
    let (introduced_before, fleet_before, revocations_before) = stamps(&forge);

    let out = ok(
        dir,
        &[
            "release",
            "--resign",
            "--from",
            "forge",
            "--key",
            "ci.pem",
            "--trust-file",
            "trust.json",
        ],
    );
    assert!(out.contains("rollout ids unchanged"), "{out}");
    let (introduced_after, fleet_after, revocations_after) = stamps(&forge);
    assert_ne!(fleet_after, fleet_before, "fleet signedAt did not move");
    assert_ne!(
        revocations_after, revocations_before,
        "revocations were not re-signed"
    );
    assert_eq!(
        manifest_ids(&forge),
        ids_before,
        "a re-sign changed rollout ids"
    );
    assert_eq!(
        introduced_after, introduced_before,
        "introduced moved on a re-sign"
    );
    let fleet = json(&forge.join("fleet.resolved.json"));
    assert_eq!(
        fleet["meta"]["ciCommit"], "1111111111111111111111111111111111111111",
        "the re-sign keeps the commit"
    );
    // Everything verifies now, as agents check it.
    ok(
        dir,
        &[
            "verify",
            "fleet",
            "forge/fleet.resolved.json",
            "--trust-file",
            "trust.json",
        ],
    );
    ok(
        dir,
        &[
            "verify",
            "revocations",
            "forge/revocations.json",
            "--trust-file",
            "trust.json",
        ],
    );
    for channel in ["edge", "stable"] {
        let path = format!("forge/rollouts/channel/{channel}.json");
        let out = ok(
            dir,
            &[
                "verify",
                "manifest",
                &path,
                "--trust-file",
                "trust.json",
                "--fleet",
                "forge/fleet.resolved.json",
            ],
        );
        assert!(out.starts_with("ok: "), "{out}");
    }
}

#[test]
fn resign_refuses_a_release_the_pinned_key_did_not_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    publish(dir, 10);
    let forge = dir.join("forge");
    // Another key signs a release into the forge: it must not be laundered by a re-sign.
    ok(dir, &["keygen", "--out", "intruder.pem"]);
    ok(
        dir,
        &[
            "release",
            "--fleet",
            &fixture("fleet.json"),
            "--closures",
            &fixture("closures.json"),
            "--ci-commit",
            "6666666666666666666666666666666666666666",
            "--key",
            "intruder.pem",
            "--out",
            "forge",
        ],
    );
    let before = fs::read(forge.join("fleet.resolved.json.sig")).unwrap();
    let out = nixfleet(
        dir,
        &[
            "release",
            "--resign",
            "--from",
            "forge",
            "--key",
            "ci.pem",
            "--trust-file",
            "trust.json",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(16),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to re-sign"), "{stderr}");
    assert_eq!(
        fs::read(forge.join("fleet.resolved.json.sig")).unwrap(),
        before
    );
}

#[test]
fn refusals_before_any_build_have_their_stage_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    fs::create_dir(dir.join("not-a-flake")).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["release", "--out", "out"];
        args.extend_from_slice(extra);
        nixfleet(dir, &args)
    };
    let flake = [
        "--flake",
        "not-a-flake",
        "--trust-file",
        "trust.json",
        "--key",
        "ci.pem",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = flake.to_vec();
        args.extend_from_slice(extra);
        args
    };
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (with(&["--ci-commit", "abc"]), 10, "evaluate failed: "),
        (
            vec![
                "--flake",
                "not-a-flake",
                "--trust-file",
                "missing.json",
                "--key",
                "ci.pem",
            ],
            16,
            "verify failed: ",
        ),
        (
            vec![
                "--flake",
                "not-a-flake",
                "--trust-file",
                "trust.json",
                "--key",
                "nope.pem",
            ],
            14,
            "sign failed: ",
        ),
        (with(&["--push-to", "file:///tmp/x"]), 13, "push failed: "),
        (
            with(&["--publish-dir", "trust.json/forge"]),
            15,
            "publish failed: ",
        ),
    ];
    for (extra, code, prefix) in cases {
        let out = run(&extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(&format!("error: {prefix}")),
            "{extra:?}: {stderr}"
        );
    }
    assert!(!dir.join("out/fleet.resolved.json").exists());
}
