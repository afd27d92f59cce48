//! Interop with the real tools operators use: openssl verifies what the fleet CA issues,
//! CSRs made by `openssl req` and keys made by `ssh-keygen` are accepted, and a CA made by
//! openssl can serve as the fleet CA.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{ca, enroll, expect, host_key, NOW};
use nixfleet_pki::{
    build_host_csr, issue_host_cert, issue_operator_cert, issue_server_cert, ClientIdentity,
    FleetCa, PkiError,
};
use nixfleet_trust::keys::{ssh_fingerprint_of, PrivateKey};
use time::{Duration, OffsetDateTime};

fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run(dir, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

/// Certificates valid now, because `openssl verify` checks against the real clock.
fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc() - Duration::minutes(1)
}

#[test]
fn openssl_verifies_host_operator_and_server_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let test = common::ca_at(now());
    write(d, "ca.pem", test.ca.cert_pem());

    let ca_ext = ok(
        d,
        "openssl",
        &[
            "x509",
            "-in",
            "ca.pem",
            "-noout",
            "-ext",
            "basicConstraints,keyUsage",
        ],
    );
    assert!(ca_ext.contains("CA:TRUE, pathlen:0"), "{ca_ext}");
    assert!(ca_ext.contains("Certificate Sign"), "{ca_ext}");
    let ca_text = ok(d, "openssl", &["x509", "-in", "ca.pem", "-noout", "-text"]);
    assert!(ca_text.contains("ecdsa-with-SHA256"), "{ca_text}");
    assert!(ca_text.contains("NIST CURVE: P-256"), "{ca_text}");

    let host = enroll(&test.ca, "web-01", &host_key(), now());
    write(d, "host.pem", &host.cert_pem);
    let (operator, operator_key) =
        issue_operator_cert(&test.ca, "alice", now(), Duration::days(90)).unwrap();
    write(d, "operator.pem", &operator);
    write(d, "operator-key.pem", &operator_key);
    let sans = ["localhost", "127.0.0.1", "cp.example.org"].map(String::from);
    let (server, server_key) =
        issue_server_cert(&test.ca, &sans, now(), Duration::days(365)).unwrap();
    write(d, "server.pem", &server);
    write(d, "server-key.pem", &server_key);

    for (cert, purpose) in [
        ("host.pem", "sslclient"),
        ("operator.pem", "sslclient"),
        ("server.pem", "sslserver"),
    ] {
        let out = ok(
            d,
            "openssl",
            &["verify", "-CAfile", "ca.pem", "-purpose", purpose, cert],
        );
        assert_eq!(out.trim(), format!("{cert}: OK"));
    }
    // The plain form the runbook's tooling uses.
    assert_eq!(
        ok(d, "openssl", &["verify", "-CAfile", "ca.pem", "host.pem"]).trim(),
        "host.pem: OK"
    );
    // Client certificates are not server certificates and vice versa.
    for (cert, purpose) in [
        ("host.pem", "sslserver"),
        ("operator.pem", "sslserver"),
        ("server.pem", "sslclient"),
    ] {
        let out = run(
            d,
            "openssl",
            &["verify", "-CAfile", "ca.pem", "-purpose", purpose, cert],
        );
        assert!(!out.status.success(), "{cert} passed as {purpose}");
    }
    // The server certificate matches the names clients connect to.
    ok(
        d,
        "openssl",
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-verify_hostname",
            "cp.example.org",
            "server.pem",
        ],
    );
    ok(
        d,
        "openssl",
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-verify_ip",
            "127.0.0.1",
            "server.pem",
        ],
    );

    let eku = |cert: &str| {
        ok(
            d,
            "openssl",
            &["x509", "-in", cert, "-noout", "-ext", "extendedKeyUsage"],
        )
    };
    for cert in ["host.pem", "operator.pem"] {
        let out = eku(cert);
        assert!(out.contains("TLS Web Client Authentication"), "{out}");
        assert!(!out.contains("Server"), "{out}");
    }
    let out = eku("server.pem");
    assert!(out.contains("TLS Web Server Authentication"), "{out}");
    assert!(!out.contains("Client"), "{out}");

    let host_text = ok(
        d,
        "openssl",
        &["x509", "-in", "host.pem", "-noout", "-text"],
    );
    assert!(host_text.contains("Subject: CN = web-01"), "{host_text}");
    assert!(
        host_text.contains("URI:urn:nixfleet:host:web-01"),
        "{host_text}"
    );
    assert!(host_text.contains("ED25519"), "{host_text}");
    assert!(host_text.contains("CA:FALSE"), "{host_text}");
    // Same serial as the control plane records in its audit log.
    let serial = ok(
        d,
        "openssl",
        &["x509", "-in", "host.pem", "-noout", "-serial"],
    );
    assert_eq!(
        serial.trim().to_ascii_lowercase(),
        format!("serial={}", host.serial_hex)
    );

    // openssl reads the generated keys and they match their certificates.
    for (cert, key) in [
        ("operator.pem", "operator-key.pem"),
        ("server.pem", "server-key.pem"),
    ] {
        let from_cert = ok(d, "openssl", &["x509", "-in", cert, "-noout", "-pubkey"]);
        let from_key = ok(d, "openssl", &["pkey", "-in", key, "-pubout"]);
        assert_eq!(from_cert, from_key);
    }
}

#[test]
fn openssl_ed25519_csr_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let test = common::ca_at(now());
    write(d, "ca.pem", test.ca.cert_pem());
    ok(
        d,
        "openssl",
        &["genpkey", "-algorithm", "ed25519", "-out", "host-key.pem"],
    );
    ok(
        d,
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            "host-key.pem",
            "-subj",
            "/CN=web-01",
            "-out",
            "host.csr",
        ],
    );
    let key = PrivateKey::from_pem(&fs::read_to_string(d.join("host-key.pem")).unwrap()).unwrap();
    let csr = fs::read_to_string(d.join("host.csr")).unwrap();
    let issued = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", Some(&key)),
        now(),
        Duration::days(30),
    )
    .unwrap();
    write(d, "host.pem", &issued.cert_pem);
    assert_eq!(
        ok(d, "openssl", &["verify", "-CAfile", "ca.pem", "host.pem"]).trim(),
        "host.pem: OK"
    );

    // And openssl accepts the CSR nixfleet builds.
    write(d, "nixfleet.csr", &build_host_csr("web-01", &key).unwrap());
    let out = ok(
        d,
        "openssl",
        &[
            "req",
            "-in",
            "nixfleet.csr",
            "-noout",
            "-verify",
            "-subject",
        ],
    );
    assert!(out.contains("subject=CN = web-01"), "{out}");

    // An ECDSA CSR from openssl is refused.
    ok(
        d,
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ec-key.pem",
            "-subj",
            "/CN=web-01",
            "-out",
            "ec.csr",
        ],
    );
    let err = issue_host_cert(
        &test.ca,
        &fs::read_to_string(d.join("ec.csr")).unwrap(),
        &expect("web-01", None),
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::CsrKeyNotEd25519(_)), "{err:?}");
}

/// The agent's real flow: an OpenSSH host key, the fingerprint `ssh-keygen -lf` prints (what
/// the bootstrap token carries), a CSR, a certificate.
#[test]
fn ssh_host_key_enrolls_with_its_ssh_keygen_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "root@web-01",
            "-f",
            "ssh_host_ed25519_key",
        ],
    );
    let listed = ok(d, "ssh-keygen", &["-lf", "ssh_host_ed25519_key.pub"]);
    let fingerprint = listed.split_whitespace().nth(1).unwrap().to_owned();
    assert!(fingerprint.starts_with("SHA256:"), "{listed}");

    let key =
        PrivateKey::from_pem(&fs::read_to_string(d.join("ssh_host_ed25519_key")).unwrap()).unwrap();
    assert_eq!(ssh_fingerprint_of(&key.public_key()).unwrap(), fingerprint);
    let test = ca();
    let csr = build_host_csr("web-01", &key).unwrap();
    let expectation = nixfleet_pki::HostExpectation {
        hostname: "web-01".to_owned(),
        ssh_fingerprint: Some(fingerprint.clone()),
    };
    let issued = issue_host_cert(&test.ca, &csr, &expectation, NOW, Duration::days(30)).unwrap();
    assert_eq!(issued.ssh_fingerprint, fingerprint);
}

#[test]
fn a_ca_made_by_openssl_works_as_the_fleet_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/O=Example/CN=Example fleet CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let ca = FleetCa::from_pem(
        &fs::read_to_string(d.join("ca.pem")).unwrap(),
        &fs::read_to_string(d.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let issued = enroll(&ca, "web-01", &host_key(), now());
    write(d, "host.pem", &issued.cert_pem);
    assert_eq!(
        ok(d, "openssl", &["verify", "-CAfile", "ca.pem", "host.pem"]).trim(),
        "host.pem: OK"
    );
    let identity = ClientIdentity::from_der(&common::der(&issued.cert_pem)).unwrap();
    assert_eq!(identity.hostname(), Some("web-01"));

    // A self-signed certificate without CA:TRUE is refused as a fleet CA.
    ok(
        d,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf-key.pem",
            "-out",
            "leaf.pem",
            "-days",
            "30",
            "-subj",
            "/CN=leaf",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    assert_eq!(
        FleetCa::from_pem(
            &fs::read_to_string(d.join("leaf.pem")).unwrap(),
            &fs::read_to_string(d.join("leaf-key.pem")).unwrap(),
        )
        .unwrap_err(),
        PkiError::NotACa
    );
}
