//! `nixfleet ca init`, `cert server` and `cert operator` run as the real binary, checked
//! with the real openssl.

mod support;
use support::*;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_then_server_and_operator_certificates_verify_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let summary = ok(
        d,
        &[
            "ca",
            "init",
            "--out",
            "cp",
            "--common-name",
            "Example fleet CA",
        ],
    );
    assert!(summary.contains("cp/fleet-ca-key.pem"), "{summary}");
    let cert = fs::read_to_string(d.join("cp/fleet-ca-cert.pem")).unwrap();
    assert_eq!(fs::read_to_string(d.join("cp/ca.pem")).unwrap(), cert);
    assert_eq!(mode(&d.join("cp/fleet-ca-key.pem")), 0o600);
    let subject = openssl(d, &["x509", "-in", "cp/ca.pem", "-noout", "-subject"]);
    assert_eq!(subject.trim(), "subject=CN = Example fleet CA");

    ok(
        d,
        &[
            "cert",
            "server",
            "--ca-dir",
            "cp",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--san",
            "cp.example.org",
            "--out",
            "cp",
        ],
    );
    ok(
        d,
        &[
            "cert", "operator", "--ca-dir", "cp", "--name", "alice", "--out", "alice",
        ],
    );
    assert_eq!(mode(&d.join("cp/server-key.pem")), 0o600);
    assert_eq!(mode(&d.join("alice/operator-key.pem")), 0o600);

    for (cert, purpose) in [
        ("cp/server-cert.pem", "sslserver"),
        ("alice/operator-cert.pem", "sslclient"),
    ] {
        let out = openssl(
            d,
            &["verify", "-CAfile", "cp/ca.pem", "-purpose", purpose, cert],
        );
        assert_eq!(out.trim(), format!("{cert}: OK"));
    }
    let sans = openssl(
        d,
        &[
            "x509",
            "-in",
            "cp/server-cert.pem",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(
        sans.contains("DNS:localhost, IP Address:127.0.0.1, DNS:cp.example.org"),
        "{sans}"
    );
    let operator = openssl(
        d,
        &["x509", "-in", "alice/operator-cert.pem", "-noout", "-text"],
    );
    assert!(
        operator.contains("URI:urn:nixfleet:operator:alice"),
        "{operator}"
    );
    // The operator key is the pair of the operator certificate.
    assert_eq!(
        openssl(
            d,
            &[
                "x509",
                "-in",
                "alice/operator-cert.pem",
                "-noout",
                "-pubkey"
            ]
        ),
        openssl(d, &["pkey", "-in", "alice/operator-key.pem", "-pubout"])
    );
}

#[test]
fn nothing_is_ever_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["ca", "init", "--out", "ca"]);
    let key = fs::read(d.join("ca/fleet-ca-key.pem")).unwrap();
    let cert = fs::read(d.join("ca/fleet-ca-cert.pem")).unwrap();

    let err = fails(d, &["ca", "init", "--out", "ca"]);
    assert!(err.contains("fleet-ca-key.pem already exists"), "{err}");
    assert_eq!(fs::read(d.join("ca/fleet-ca-key.pem")).unwrap(), key);
    assert_eq!(fs::read(d.join("ca/fleet-ca-cert.pem")).unwrap(), cert);

    // Even a leftover ca.pem alone stops a new CA from being written next to it.
    fs::create_dir(d.join("other")).unwrap();
    fs::write(d.join("other/ca.pem"), "old").unwrap();
    let err = fails(d, &["ca", "init", "--out", "other"]);
    assert!(err.contains("ca.pem already exists"), "{err}");
    assert!(!d.join("other/fleet-ca-key.pem").exists());

    let operator = [
        "cert", "operator", "--ca-dir", "ca", "--name", "alice", "--out", "alice",
    ];
    ok(d, &operator);
    let err = fails(d, &operator);
    assert!(err.contains("operator-key.pem already exists"), "{err}");
}

#[test]
fn bad_requests_fail_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["ca", "init", "--out", "ca"]);

    let err = fails(d, &["cert", "server", "--ca-dir", "ca", "--out", "cp"]);
    assert!(err.contains("--san"), "{err}");
    let err = fails(
        d,
        &[
            "cert",
            "server",
            "--ca-dir",
            "ca",
            "--san",
            "not a name",
            "--out",
            "cp",
        ],
    );
    assert!(err.contains("\"not a name\""), "{err}");
    let err = fails(
        d,
        &[
            "cert", "operator", "--ca-dir", "ca", "--name", "Alice", "--out", "x",
        ],
    );
    assert!(err.contains("operator name \"Alice\""), "{err}");
    let err = fails(
        d,
        &[
            "cert", "operator", "--ca-dir", "missing", "--name", "alice", "--out", "x",
        ],
    );
    assert!(err.contains("missing/fleet-ca-cert.pem"), "{err}");
    assert!(!d.join("cp").exists() && !d.join("x").exists());

    // A key that is not the CA's is refused.
    fs::create_dir(d.join("mixed")).unwrap();
    fs::copy(
        d.join("ca/fleet-ca-cert.pem"),
        d.join("mixed/fleet-ca-cert.pem"),
    )
    .unwrap();
    ok(d, &["ca", "init", "--out", "ca2"]);
    fs::copy(
        d.join("ca2/fleet-ca-key.pem"),
        d.join("mixed/fleet-ca-key.pem"),
    )
    .unwrap();
    let err = fails(
        d,
        &[
            "cert", "operator", "--ca-dir", "mixed", "--name", "alice", "--out", "x",
        ],
    );
    assert!(err.contains("does not belong"), "{err}");
}

#[test]
fn key_directories_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = env!("CARGO_BIN_EXE_nixfleet");
    let script = format!(
        "umask 000 && '{bin}' ca init --out pki/ca && \
         '{bin}' cert server --ca-dir pki/ca --san cp.example.org --out pki/server && \
         '{bin}' cert operator --ca-dir pki/ca --name alice --out pki/ops/alice && \
         '{bin}' keygen --out ci.pem > /dev/null && \
         '{bin}' release --fleet '{fleet}' --closures '{closures}' --ci-commit abc \
           --key ci.pem --out public/release > /dev/null",
        fleet = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/fleet.json")
            .display(),
        closures = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/closures.json")
            .display(),
    );
    let out = Command::new("sh")
        .current_dir(d)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for private in ["pki", "pki/ca", "pki/server", "pki/ops", "pki/ops/alice"] {
        assert_eq!(mode(&d.join(private)), 0o700, "{private}");
    }
    for public in ["public", "public/release", "public/release/rollouts"] {
        assert_eq!(mode(&d.join(public)), 0o755, "{public}");
    }
}
