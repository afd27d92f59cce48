//! The operator CLI, run as a real binary: keys → trust → release → verify, external
//! signers, tokens against the real ssh-keygen, and release validation.

mod support;
use support::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// When the test releases are signed: now, since `release --trust-file` checks what it
/// signed against the clock, and a fixed instant would go stale a day later.
static SIGNED: std::sync::LazyLock<time::OffsetDateTime> = std::sync::LazyLock::new(|| {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
});
static SIGNED_AT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| at(0));
static SOON_AFTER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| at(300));

/// RFC 3339 of `secs` seconds after the signing time.
fn at(secs: i64) -> String {
    (*SIGNED + time::Duration::seconds(secs))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// keygen + trust init; returns the trust file path.
fn setup(dir: &Path, algorithm: &str) -> PathBuf {
    let ci_pub = ok(
        dir,
        &["keygen", "--algorithm", algorithm, "--out", "ci.pem"],
    );
    let org_pub = ok(
        dir,
        &["keygen", "--algorithm", "ed25519", "--out", "org.pem"],
    );
    assert_eq!(ok(dir, &["derive-pubkey", "ci.pem"]), ci_pub);
    ok(
        dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            ci_pub.trim(),
            "--org-root-key",
            org_pub.trim(),
            "--cache-key",
            "cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--out",
            "trust.json",
        ],
    );
    dir.join("trust.json")
}

fn release(dir: &Path, out: &str, sign: &[&str]) -> String {
    let fleet = fixture("fleet.json");
    let closures = fixture("closures.json");
    let mut args = vec![
        "release",
        "--fleet",
        fleet.to_str().unwrap(),
        "--closures",
        closures.to_str().unwrap(),
        "--ci-commit",
        "0123456789abcdef0123456789abcdef01234567",
        "--signed-at",
        &SIGNED_AT,
        "--out",
        out,
        "--trust-file",
        "trust.json",
    ];
    args.extend_from_slice(sign);
    ok(dir, &args)
}

/// The manifests of a release, `rollouts/<rolloutId>.json` (not their hosts files).
fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join("rollouts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.strip_suffix(".json")
                .is_some_and(|id| id.len() == 64 && !id.contains('.'))
        })
        .collect();
    out.sort();
    out
}

/// Verifies the fleet and every manifest of a release; returns each command's outcome.
fn verify_all(dir: &Path, release_dir: &str) -> Vec<(bool, String)> {
    let fleet = format!("{release_dir}/fleet.resolved.json");
    let mut results = Vec::new();
    let out = nixfleet(
        dir,
        &[
            "verify",
            "fleet",
            &fleet,
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    results.push((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ));
    for manifest in manifests(&dir.join(release_dir)) {
        let out = nixfleet(
            dir,
            &[
                "verify",
                "manifest",
                manifest.to_str().unwrap(),
                "--trust-file",
                "trust.json",
                "--fleet",
                &fleet,
                "--now",
                &SOON_AFTER,
            ],
        );
        results.push((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ));
    }
    results
}

#[test]
fn release_round_trip_with_key_file_and_tamper_detection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let summary = release(dir, "rel", &["--key", "ci.pem"]);
    assert!(summary.contains("6 host(s), 2 channel(s)"), "{summary}");
    assert!(summary.contains("verified against trust.json"), "{summary}");

    let results = verify_all(dir, "rel");
    assert_eq!(results.len(), 3, "fleet + one manifest per channel");
    for (ok, text) in &results {
        assert!(ok, "{text}");
        assert!(text.starts_with("ok: "), "{text}");
    }

    // The written fleet is canonical, stamped, and has resolved waves.
    let fleet: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("rel/fleet.resolved.json")).unwrap()).unwrap();
    assert_eq!(fleet["meta"]["signedAt"], SIGNED_AT.as_str());
    assert_eq!(fleet["meta"]["signatureAlgorithm"], "ed25519");
    assert_eq!(
        fleet["hosts"]["web-03"]["closureHash"],
        "00000000000000000000000000000006-nixos-system-web-03"
    );
    assert_eq!(
        fleet["waves"]["stable"],
        serde_json::json!([
            {"hosts": ["web-01"], "soakMinutes": 30},
            {"hosts": ["db-01", "db-02", "web-02", "web-03"], "soakMinutes": 0}
        ])
    );

    // Flip one byte of the fleet: verification fails with the typed signature error.
    let path = dir.join("rel/fleet.resolved.json");
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.windows(6).position(|w| w == b"web-01").unwrap();
    bytes[at + 5] ^= 0x06; // web-01 -> web-07: still valid JSON
    fs::write(&path, &bytes).unwrap();
    let err = fails(
        dir,
        &[
            "verify",
            "fleet",
            "rel/fleet.resolved.json",
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    assert!(
        err.contains("signature does not verify against ciReleaseKey"),
        "{err}"
    );
    // One line, one sentence.
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Flip one byte of a manifest (a digit of the host-set root it signs).
    let manifest = manifests(&dir.join("rel")).remove(0);
    let mut bytes = fs::read(&manifest).unwrap();
    let key = b"\"hostSetRoot\":\"";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    fs::write(&manifest, &bytes).unwrap();
    let err = fails(
        dir,
        &[
            "verify",
            "manifest",
            manifest.to_str().unwrap(),
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn sign_cmd_with_openssl_gives_identical_results() {
    for algorithm in ["ed25519", "ecdsa-p256"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        setup(dir, algorithm);
        release(dir, "with-key", &["--key", "ci.pem"]);
        let cmd = format!(
            "openssl pkeyutl -sign -rawin -inkey {} -in \"$NIXFLEET_INPUT\" -out \"$NIXFLEET_OUTPUT\"",
            dir.join("ci.pem").display()
        );
        release(
            dir,
            "with-cmd",
            &["--sign-cmd", &cmd, "--sign-cmd-algorithm", algorithm],
        );
        // Same canonical artifacts, same rollout ids.
        assert_eq!(
            fs::read(dir.join("with-key/fleet.resolved.json")).unwrap(),
            fs::read(dir.join("with-cmd/fleet.resolved.json")).unwrap()
        );
        let names = |d: &str| {
            manifests(&dir.join(d))
                .iter()
                .map(|p| p.file_name().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("with-key"), names("with-cmd"));
        if algorithm == "ed25519" {
            // ed25519 is deterministic: even the signatures are identical.
            assert_eq!(
                fs::read(dir.join("with-key/fleet.resolved.json.sig")).unwrap(),
                fs::read(dir.join("with-cmd/fleet.resolved.json.sig")).unwrap()
            );
        }
        let a = verify_all(dir, "with-key");
        let b = verify_all(dir, "with-cmd");
        assert_eq!(a.len(), b.len());
        for ((ok_a, text_a), (ok_b, text_b)) in a.iter().zip(&b) {
            assert!(*ok_a && *ok_b, "{algorithm}: {text_a} / {text_b}");
            assert_eq!(text_a, text_b, "{algorithm}");
        }
    }
}

#[test]
fn failing_or_silent_sign_cmd_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let fleet = fixture("fleet.json");
    let closures = fixture("closures.json");
    for (cmd, expect) in [
        ("exit 3", "exited with"),
        ("true", "wrote nothing"),
        (
            "printf abc > \"$NIXFLEET_OUTPUT\"",
            "expected the raw 64-byte",
        ),
    ] {
        let err = fails(
            dir,
            &[
                "release",
                "--fleet",
                fleet.to_str().unwrap(),
                "--closures",
                closures.to_str().unwrap(),
                "--ci-commit",
                "abc",
                "--out",
                "x",
                "--sign-cmd",
                cmd,
            ],
        );
        assert!(err.contains(expect), "{cmd}: {err}");
    }
    // A signer holding a key the trust file does not pin: the self-check refuses it.
    ok(dir, &["keygen", "--out", "other.pem"]);
    let err = fails(
        dir,
        &[
            "release",
            "--fleet",
            fleet.to_str().unwrap(),
            "--closures",
            closures.to_str().unwrap(),
            "--ci-commit",
            "abc",
            "--out",
            "y",
            "--key",
            "other.pem",
            "--trust-file",
            "trust.json",
        ],
    );
    assert!(
        err.contains("does not verify against ciReleaseKey"),
        "{err}"
    );
}

#[test]
fn mint_token_fingerprint_matches_ssh_keygen_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@web-01", "-f"])
        .arg(dir.join("host_key"))
        .status()
        .unwrap();
    assert!(status.success());
    let keygen = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(dir.join("host_key.pub"))
        .output()
        .unwrap();
    let expected = String::from_utf8(keygen.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();

    let line = fs::read_to_string(dir.join("host_key.pub")).unwrap();
    let by_file = ok(
        dir,
        &[
            "mint-token",
            "--hostname",
            "web-01",
            "--pubkey-file",
            "host_key.pub",
            "--org-root-key",
            "org.pem",
        ],
    );
    let by_line = ok(
        dir,
        &[
            "mint-token",
            "--hostname",
            "web-01",
            "--pubkey",
            line.trim(),
            "--org-root-key",
            "org.pem",
            "--validity-hours",
            "2",
        ],
    );
    let by_fp = ok(
        dir,
        &[
            "mint-token",
            "--hostname",
            "web-01",
            "--fingerprint",
            &expected,
            "--org-root-key",
            "org.pem",
        ],
    );
    for token in [&by_file, &by_line, &by_fp] {
        let value: serde_json::Value = serde_json::from_str(token).unwrap();
        assert_eq!(
            value["claims"]["expectedPubkeyFingerprint"],
            expected.as_str()
        );
        assert_eq!(value["claims"]["hostname"], "web-01");
        fs::write(dir.join("token.json"), token).unwrap();
        let out = ok(
            dir,
            &[
                "verify",
                "token",
                "token.json",
                "--trust-file",
                "trust.json",
            ],
        );
        assert!(out.starts_with("ok: bootstrap token for web-01"), "{out}");
    }
    // Two tokens never share a nonce.
    let nonce =
        |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap()["claims"]["nonce"].clone();
    assert_ne!(nonce(&by_file), nonce(&by_line));

    // A token signed by a key other than the pinned org root key is refused.
    ok(dir, &["keygen", "--out", "rogue.pem"]);
    let rogue = ok(
        dir,
        &[
            "mint-token",
            "--hostname",
            "web-01",
            "--fingerprint",
            &expected,
            "--org-root-key",
            "rogue.pem",
        ],
    );
    fs::write(dir.join("rogue.json"), rogue).unwrap();
    let err = fails(
        dir,
        &[
            "verify",
            "token",
            "rogue.json",
            "--trust-file",
            "trust.json",
        ],
    );
    assert!(err.contains("orgRootKey"), "{err}");
    // Expired by the auditor's clock.
    let err = fails(
        dir,
        &[
            "verify",
            "token",
            "token.json",
            "--trust-file",
            "trust.json",
            "--now",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn revocations_sign_and_verify_with_rollback_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let input = fixture("revocations.json");
    ok(
        dir,
        &[
            "revocations",
            "sign",
            "--in",
            input.to_str().unwrap(),
            "--key",
            "ci.pem",
            "--out",
            "rev",
            "--signed-at",
            &SIGNED_AT,
        ],
    );
    let out = ok(
        dir,
        &[
            "verify",
            "revocations",
            "rev/revocations.json",
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    assert!(out.contains("1 revocation(s)"), "{out}");
    let err = fails(
        dir,
        &[
            "verify",
            "revocations",
            "rev/revocations.json",
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
            "--last-applied",
            &SOON_AFTER,
        ],
    );
    assert!(err.contains("older than the list already applied"), "{err}");
}

#[test]
fn verify_refuses_stale_and_future_artifacts_by_now() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    release(dir, "rel", &["--key", "ci.pem"]);
    let args = |secs: i64| {
        [
            "verify",
            "fleet",
            "rel/fleet.resolved.json",
            "--trust-file",
            "trust.json",
            "--now",
        ]
        .map(str::to_owned)
        .into_iter()
        .chain([at(secs)])
        .collect::<Vec<String>>()
    };
    let run = |secs: i64, check: fn(&Path, &[&str]) -> String| {
        let args = args(secs);
        check(dir, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // freshnessWindow 1440 minutes, 60 s of clock skew either way.
    assert!(run(1440 * 60 + 61, fails).contains("stale"));
    run(1440 * 60 + 60, ok);
    assert!(run(-61, fails).contains("more than 60 s after now"));
    run(-59, ok);
}

#[test]
fn manifest_from_another_release_is_refused_with_fleet() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    release(dir, "a", &["--key", "ci.pem"]);
    let fleet = fixture("fleet.json");
    let closures = fixture("closures.json");
    ok(
        dir,
        &[
            "release",
            "--fleet",
            fleet.to_str().unwrap(),
            "--closures",
            closures.to_str().unwrap(),
            "--ci-commit",
            "ffffffffffffffffffffffffffffffffffffffff",
            "--signed-at",
            &SIGNED_AT,
            "--out",
            "b",
            "--key",
            "ci.pem",
        ],
    );
    let old = manifests(&dir.join("a")).remove(0);
    let err = fails(
        dir,
        &[
            "verify",
            "manifest",
            old.to_str().unwrap(),
            "--trust-file",
            "trust.json",
            "--fleet",
            "b/fleet.resolved.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    assert!(err.contains("mix-and-match"), "{err}");
    // Renamed to another rollout's id: refused, its intent hashes to its own id.
    let other = manifests(&dir.join("b"))
        .into_iter()
        .find(|p| p.file_name() != old.file_name())
        .unwrap();
    fs::copy(&old, &other).unwrap();
    fs::copy(
        old.with_extension("json.sig"),
        other.with_extension("json.sig"),
    )
    .unwrap();
    let err = fails(
        dir,
        &[
            "verify",
            "manifest",
            other.to_str().unwrap(),
            "--trust-file",
            "trust.json",
            "--now",
            &SOON_AFTER,
        ],
    );
    assert!(err.contains("not to its id"), "{err}");
}

fn release_with(dir: &Path, fleet: serde_json::Value, closures: serde_json::Value) -> Output {
    fs::write(dir.join("f.json"), fleet.to_string()).unwrap();
    fs::write(dir.join("c.json"), closures.to_string()).unwrap();
    nixfleet(
        dir,
        &[
            "release",
            "--fleet",
            "f.json",
            "--closures",
            "c.json",
            "--ci-commit",
            "abc",
            "--out",
            "o",
            "--key",
            "ci.pem",
        ],
    )
}

#[test]
fn release_refuses_invalid_fleets_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let base: serde_json::Value =
        serde_json::from_slice(&fs::read(fixture("fleet.json")).unwrap()).unwrap();
    let closures: serde_json::Value =
        serde_json::from_slice(&fs::read(fixture("closures.json")).unwrap()).unwrap();
    type Edit = fn(&mut serde_json::Value, &mut serde_json::Value);
    let cases: Vec<(&str, Edit)> = vec![
        ("host web-01: unknown channel \"nope\"", |f, _| {
            f["hosts"]["web-01"]["channel"] = "nope".into()
        }),
        ("channel edge: unknown rollout policy \"nope\"", |f, _| {
            f["channels"]["edge"]["rolloutPolicy"] = "nope".into()
        }),
        ("edges form a cycle: db-01 -> web-02 -> db-01", |f, _| {
            f["edges"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"before": "web-02", "after": "db-01", "reason": null}))
        }),
        (
            "channel edges form a cycle: edge -> stable -> edge",
            |f, _| {
                f["channelEdges"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"before": "stable", "after": "edge", "reason": null}))
            },
        ),
        ("edge db-01 -> web-99: unknown host \"web-99\"", |f, _| {
            f["edges"][0]["after"] = "web-99".into()
        }),
        (
            "channel stable: freshnessWindow 100 is less than 2 × signingIntervalMinutes (60)",
            |f, _| f["channels"]["stable"]["freshnessWindow"] = 100.into(),
        ),
        ("host lab-01: no closure", |_, c| {
            c.as_object_mut().unwrap().remove("lab-01");
        }),
        ("host lab-01: closure \"not-a-store-path\"", |_, c| {
            c["lab-01"] = "not-a-store-path".into()
        }),
        (
            "rollout policy canary wave 0: selector has no condition",
            |f, _| {
                f["rolloutPolicies"]["canary"]["waves"][0]["selector"] =
                    serde_json::json!({"tag": ["canary"]})
            },
        ),
        ("disruption budget 0: set maxInFlight", |f, _| {
            f["disruptionBudgets"][0]["maxInFlight"] = serde_json::Value::Null
        }),
    ];
    for (expect, edit) in cases {
        let mut fleet = base.clone();
        let mut c = closures.clone();
        edit(&mut fleet, &mut c);
        let out = release_with(dir, fleet, c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expect}: should fail");
        assert!(err.contains(expect), "expected {expect:?} in:\n{err}");
        assert!(
            !dir.join("o/fleet.resolved.json").exists(),
            "nothing written for an invalid fleet"
        );
    }

    // A selector matching no host is a warning, not an error.
    let mut fleet = base.clone();
    fleet["rolloutPolicies"]["canary"]["waves"][0]["selector"] =
        serde_json::json!({"tags": ["nobody"]});
    let out = release_with(dir, fleet, closures.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: rollout policy canary wave 0: selector matches no host"),
        "{err}"
    );
}

#[test]
fn keygen_never_overwrites_and_keys_interoperate_with_openssl_and_ssh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &["keygen", "--algorithm", "ecdsa-p256", "--out", "k.pem"],
    );
    let err = fails(dir, &["keygen", "--out", "k.pem"]);
    assert!(err.contains("already exists"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(dir.join("k.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let status = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(dir.join("k.pem"))
        .status()
        .unwrap();
    assert!(status.success(), "openssl pkey reads our PKCS#8");
    // derive-pubkey reads an OpenSSH host key, and an openssl-made PKCS#8 key.
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(dir.join("ssh"))
        .status()
        .unwrap();
    let pubkey = ok(dir, &["derive-pubkey", "ssh"]);
    assert_eq!(base64_len(pubkey.trim()), 32);
    Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(dir.join("o.pem"))
        .status()
        .unwrap();
    assert_eq!(base64_len(ok(dir, &["derive-pubkey", "o.pem"]).trim()), 32);
}

fn base64_len(s: &str) -> usize {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap()
        .len()
}

#[test]
fn canonicalize_is_rfc8785() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixfleet"))
        .arg("canonicalize")
        .current_dir(tmp.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{ "b": [1.0, 1e21, "\u00e9"], "a": null }"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, "{\"a\":null,\"b\":[1,1e+21,\"é\"]}".as_bytes());
}

/// Signs `fleet` + `closures` into `out` at `signed_at` for `commit`; returns the rollout
/// id of each channel, read from the manifests written under the channel's name.
fn release_ids(
    dir: &Path,
    out: &str,
    fleet: &serde_json::Value,
    closures: &serde_json::Value,
    commit: &str,
    signed_at: &str,
) -> std::collections::BTreeMap<String, String> {
    fs::write(dir.join("f.json"), fleet.to_string()).unwrap();
    fs::write(dir.join("c.json"), closures.to_string()).unwrap();
    #[rustfmt::skip]
    ok(dir, &["release", "--fleet", "f.json", "--closures", "c.json", "--ci-commit", commit,
              "--signed-at", signed_at, "--out", out, "--key", "ci.pem", "--trust-file", "trust.json"]);
    let mut ids = std::collections::BTreeMap::new();
    for channel in fleet["channels"].as_object().unwrap().keys() {
        let by_name = dir
            .join(out)
            .join(format!("rollouts/channel/{channel}.json"));
        let bytes = fs::read(&by_name).unwrap();
        let id = nixfleet_trust::verify::rollout_id(&bytes).unwrap();
        let by_id = dir.join(out).join(format!("rollouts/{id}.json"));
        assert_eq!(
            fs::read(&by_id).unwrap(),
            bytes,
            "{channel}: written under its id"
        );
        ids.insert(channel.clone(), id);
    }
    ids
}

fn examples() -> (serde_json::Value, serde_json::Value) {
    let read = |name| serde_json::from_slice(&fs::read(fixture(name)).unwrap()).unwrap();
    (read("fleet.json"), read("closures.json"))
}

#[test]
fn a_re_sign_keeps_every_rollout_id_and_the_first_release_s_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let (fleet, closures) = examples();
    const C1: &str = "1111111111111111111111111111111111111111";
    const C2: &str = "2222222222222222222222222222222222222222";
    let first = release_ids(dir, "out", &fleet, &closures, C1, &at(0));
    let fleet_1 = fs::read(dir.join("out/fleet.resolved.json")).unwrap();
    // CI's hourly re-sign, even from another commit that changed nothing for the fleet.
    let again = release_ids(dir, "out", &fleet, &closures, C2, &at(60));
    assert_eq!(first, again);
    assert_ne!(
        fs::read(dir.join("out/fleet.resolved.json")).unwrap(),
        fleet_1
    );
    let stable = dir.join(format!("out/rollouts/{}.json", again["stable"]));
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&stable).unwrap()).unwrap();
    assert_eq!(
        m["meta"]["ciCommit"], C2,
        "the newest signature is the one on disk"
    );
    assert_eq!(m["meta"]["signedAt"], at(60));
    assert_eq!(
        m["introduced"]["ciCommit"], C1,
        "provenance of the first release"
    );
    assert_eq!(m["introduced"]["signedAt"], at(0));
    #[rustfmt::skip]
    let line = ok(dir, &["verify", "manifest", stable.to_str().unwrap(), "--trust-file", "trust.json",
                         "--fleet", "out/fleet.resolved.json", "--now", &at(90)]);
    assert!(line.contains(&again["stable"]), "{line}");
    assert!(line.contains(&format!("for commit {C2}")), "{line}");
    assert!(
        line.contains(&format!("first released {} for commit {C1}", at(0))),
        "{line}"
    );
    // Into a fresh directory the same intent has the same id; this release is its first.
    let fresh = release_ids(dir, "fresh", &fleet, &closures, C2, &at(60));
    assert_eq!(fresh, first);
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join(format!("fresh/rollouts/{}.json", fresh["stable"]))).unwrap(),
    )
    .unwrap();
    assert_eq!(m["introduced"]["ciCommit"], C2);
}

#[test]
fn a_changed_closure_wave_or_policy_is_a_new_rollout_of_that_channel_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, "ed25519");
    let (fleet, closures) = examples();
    let commit = "1111111111111111111111111111111111111111";
    let base = release_ids(dir, "base", &fleet, &closures, commit, &at(0));
    assert_eq!(base.len(), 2);
    let changed = |what: &str, fleet: &serde_json::Value, closures: &serde_json::Value| {
        let ids = release_ids(dir, what, fleet, closures, commit, &at(0));
        ids.into_iter()
            .filter(|(channel, id)| base[channel] != *id)
            .map(|(channel, _)| channel)
            .collect::<Vec<_>>()
    };
    // A closure of a stable host.
    let mut c = closures.clone();
    c["web-02"] = "00000000000000000000000000000009-nixos-system-web-02".into();
    assert_eq!(changed("closure", &fleet, &c), ["stable"]);
    // A host moved to another wave (web-02 becomes a canary).
    let mut f = fleet.clone();
    f["hosts"]["web-02"]["tags"] = serde_json::json!(["web", "canary"]);
    assert_eq!(changed("wave", &f, &closures), ["stable"]);
    // The soak of a wave, and what a health failure does.
    let mut f = fleet.clone();
    f["rolloutPolicies"]["canary"]["waves"][0]["soakMinutes"] = 45.into();
    assert_eq!(changed("soak", &f, &closures), ["stable"]);
    let mut f = fleet.clone();
    f["rolloutPolicies"]["all-at-once"]["onHealthFailure"] = "rollback-and-halt".into();
    assert_eq!(changed("policy", &f, &closures), ["edge"]);
    // Another channel's new host matches a fleet-wide budget (not db, 50%) that covers
    // stable's web hosts too: only edge changes.
    let mut f = fleet.clone();
    let mut c = closures.clone();
    f["hosts"]["lab-02"] = f["hosts"]["lab-01"].clone();
    f["hosts"]["lab-02"]["pubkey"] = serde_json::Value::Null;
    c["lab-02"] = "00000000000000000000000000000008-nixos-system-lab-02".into();
    assert_eq!(changed("other-channel", &f, &c), ["edge"]);
    // Signing times, commits and freshness are not intent.
    let mut f = fleet.clone();
    f["channels"]["stable"]["freshnessWindow"] = 2880.into();
    assert!(changed("freshness", &f, &closures).is_empty());
}
