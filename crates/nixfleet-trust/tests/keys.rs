use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nixfleet_proto::{Algorithm, PublicKeyEntry};
use nixfleet_trust::keys::{
    parse_ssh_ed25519_public, ssh_fingerprint, ssh_fingerprint_of, to_ssh_public_line, KeyError,
    PrivateKey, PublicKey, SignatureError,
};
use p256::elliptic_curve::scalar::IsHigh as _;

const ALGORITHMS: [Algorithm; 2] = [Algorithm::Ed25519, Algorithm::EcdsaP256];

/// Runs a tool, panicking with its stderr on failure; returns stdout.
fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// The raw public key openssl derives from a private key file: the tail of its SPKI DER.
fn openssl_public_raw(key: &Path, len: usize) -> Vec<u8> {
    let der = run(
        "openssl",
        &["pkey", "-in", path_str(key), "-pubout", "-outform", "DER"],
    );
    der[der.len() - len..].to_vec()
}

fn openssl_genpkey(dir: &Path, algorithm: Algorithm) -> PathBuf {
    let key = dir.join(format!("{algorithm}.pem"));
    let mut args = vec!["genpkey"];
    match algorithm {
        Algorithm::Ed25519 => args.extend(["-algorithm", "ed25519"]),
        Algorithm::EcdsaP256 => {
            args.extend(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])
        }
    }
    args.extend(["-out", path_str(&key)]);
    run("openssl", &args);
    key
}

fn raw_len(algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::Ed25519 => 32,
        Algorithm::EcdsaP256 => 65,
    }
}

#[test]
fn generate_pem_round_trip_and_signatures() {
    for algorithm in ALGORITHMS {
        let key = PrivateKey::generate(algorithm);
        assert_eq!(key.algorithm(), algorithm);
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        let loaded = PrivateKey::from_pem(&pem).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());

        let public = key.public_key();
        assert_eq!(public.algorithm(), algorithm);
        let msg = b"nixfleet release manifest";
        let sig = loaded.sign(msg);
        public.verify(msg, &sig).unwrap();
        assert_eq!(
            public.verify(b"nixfleet release manifesT", &sig),
            Err(SignatureError::Invalid(algorithm))
        );
        for (byte, bit) in [(0, 0), (31, 7), (32, 0), (63, 3)] {
            let mut bad = sig;
            bad[byte] ^= 1 << bit;
            assert!(
                public.verify(msg, &bad).is_err(),
                "{algorithm}: flipped bit {byte}/{bit} accepted"
            );
        }
        let other = PrivateKey::generate(algorithm);
        assert_eq!(
            other.public_key().verify(msg, &sig),
            Err(SignatureError::Invalid(algorithm))
        );
        assert_eq!(
            public.verify(msg, &sig[..63]),
            Err(SignatureError::Length(63))
        );
        assert_eq!(
            public.verify(msg, &[sig.as_slice(), &[0]].concat()),
            Err(SignatureError::Length(65))
        );
    }
}

#[test]
fn entry_and_base64_round_trip() {
    for algorithm in ALGORITHMS {
        let public = PrivateKey::generate(algorithm).public_key();
        let entry = public.to_entry();
        assert_eq!(entry.algorithm, algorithm);
        assert_eq!(
            STANDARD.decode(&entry.public).unwrap().len(),
            raw_len(algorithm)
        );
        assert_eq!(PublicKey::from_entry(&entry).unwrap(), public);
        let json = serde_json::to_string(&entry).unwrap();
        assert!(
            json.contains(&format!("\"algorithm\":\"{algorithm}\"")),
            "{json}"
        );
        let back: PublicKeyEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(PublicKey::from_entry(&back).unwrap(), public);
    }
}

#[test]
fn p256_public_key_forms() {
    let key = PrivateKey::generate(Algorithm::EcdsaP256);
    let PublicKey::EcdsaP256(vk) = key.public_key() else {
        panic!("not P-256")
    };
    let uncompressed = vk.to_encoded_point(false).as_bytes().to_vec();
    let compressed = vk.to_encoded_point(true).as_bytes().to_vec();
    assert_eq!((uncompressed.len(), compressed.len()), (65, 33));
    for bytes in [&uncompressed[..], &uncompressed[1..], &compressed[..]] {
        let parsed = PublicKey::from_base64(Algorithm::EcdsaP256, &STANDARD.encode(bytes)).unwrap();
        assert_eq!(parsed, key.public_key(), "{} bytes", bytes.len());
    }
    assert_eq!(key.public_key().to_base64(), STANDARD.encode(&uncompressed));

    let err = PublicKey::from_base64(Algorithm::EcdsaP256, &STANDARD.encode(&uncompressed[..40]))
        .unwrap_err();
    assert!(
        matches!(err, KeyError::PublicKeyLength { len: 40, .. }),
        "{err}"
    );
    let mut off_curve = uncompressed.clone();
    off_curve[64] ^= 1;
    assert_eq!(
        PublicKey::from_base64(Algorithm::EcdsaP256, &STANDARD.encode(&off_curve)),
        Err(KeyError::InvalidPublicKey {
            algorithm: Algorithm::EcdsaP256
        })
    );
}

#[test]
fn ed25519_public_key_checks() {
    let err = PublicKey::from_base64(Algorithm::Ed25519, &STANDARD.encode([7u8; 31])).unwrap_err();
    assert!(
        matches!(err, KeyError::PublicKeyLength { len: 31, .. }),
        "{err}"
    );
    // The identity point is small-order: it would accept forged signatures.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert_eq!(
        PublicKey::from_base64(Algorithm::Ed25519, &STANDARD.encode(identity)),
        Err(KeyError::WeakPublicKey)
    );
    let good = PrivateKey::generate(Algorithm::Ed25519)
        .public_key()
        .to_base64();
    assert!(matches!(
        PublicKey::from_base64(Algorithm::Ed25519, good.trim_end_matches('=')),
        Err(KeyError::PublicKeyBase64 { .. })
    ));
    assert!(matches!(
        PublicKey::from_base64(Algorithm::Ed25519, "not base64!"),
        Err(KeyError::PublicKeyBase64 { .. })
    ));
}

#[test]
fn high_s_p256_signature_accepted() {
    let key = PrivateKey::generate(Algorithm::EcdsaP256);
    let msg = b"tpm-signed";
    let sig = p256::ecdsa::Signature::from_slice(&key.sign(msg)).unwrap();
    let (r, s) = sig.split_scalars();
    let flipped = -*s.as_ref();
    let other = p256::ecdsa::Signature::from_scalars(r.to_bytes(), flipped.to_bytes()).unwrap();
    let (low, high) = if bool::from(s.is_high()) {
        (other, sig)
    } else {
        (sig, other)
    };
    assert!(bool::from(high.s().is_high()));
    let public = key.public_key();
    public.verify(msg, &high.to_bytes()).unwrap();
    public.verify(msg, &low.to_bytes()).unwrap();
    assert!(public.verify(b"other", &high.to_bytes()).is_err());
}

#[test]
fn malformed_p256_signature() {
    let public = PrivateKey::generate(Algorithm::EcdsaP256).public_key();
    assert_eq!(
        public.verify(b"m", &[0u8; 64]),
        Err(SignatureError::Malformed)
    );
    assert_eq!(
        public.verify(b"m", &[0xffu8; 64]),
        Err(SignatureError::Malformed)
    );
}

#[test]
fn openssl_generated_keys_load() {
    let dir = tempfile::tempdir().unwrap();
    for algorithm in ALGORITHMS {
        let path = openssl_genpkey(dir.path(), algorithm);
        let key = PrivateKey::from_pem(&read(&path)).unwrap();
        assert_eq!(key.algorithm(), algorithm);
        let raw = openssl_public_raw(&path, raw_len(algorithm));
        assert_eq!(
            STANDARD.decode(key.public_key().to_base64()).unwrap(),
            raw,
            "{algorithm}"
        );
    }
}

#[test]
fn openssl_p256_without_public_key_field_loads() {
    let dir = tempfile::tempdir().unwrap();
    let full = openssl_genpkey(dir.path(), Algorithm::EcdsaP256);
    let expected = PrivateKey::from_pem(&read(&full)).unwrap().public_key();

    let sec1 = dir.path().join("nopub-sec1.pem");
    run(
        "openssl",
        &[
            "ec",
            "-in",
            path_str(&full),
            "-no_public",
            "-out",
            path_str(&sec1),
        ],
    );
    let pkcs8 = dir.path().join("nopub-pkcs8.pem");
    run(
        "openssl",
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            path_str(&sec1),
            "-out",
            path_str(&pkcs8),
        ],
    );
    let pkcs8_text = read(&pkcs8);
    assert!(pkcs8_text.starts_with("-----BEGIN PRIVATE KEY-----"));
    // PKCS#8 without the public key is markedly shorter than with it.
    assert!(pkcs8_text.len() < read(&full).len());
    assert_eq!(
        PrivateKey::from_pem(&pkcs8_text).unwrap().public_key(),
        expected
    );
    assert!(read(&sec1).starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert_eq!(
        PrivateKey::from_pem(&read(&sec1)).unwrap().public_key(),
        expected
    );
}

#[test]
fn our_pem_is_accepted_by_openssl() {
    let dir = tempfile::tempdir().unwrap();
    for algorithm in ALGORITHMS {
        let key = PrivateKey::generate(algorithm);
        let path = dir.path().join(format!("ours-{algorithm}.pem"));
        std::fs::write(&path, key.to_pkcs8_pem().unwrap()).unwrap();
        run("openssl", &["pkey", "-in", path_str(&path), "-noout"]);
        let raw = openssl_public_raw(&path, raw_len(algorithm));
        assert_eq!(
            STANDARD.decode(key.public_key().to_base64()).unwrap(),
            raw,
            "{algorithm}"
        );
    }
}

#[test]
fn openssl_signatures_verify() {
    let dir = tempfile::tempdir().unwrap();
    let msg_path = dir.path().join("msg");
    let msg = b"{\"kind\":\"release\",\"n\":1}";
    std::fs::write(&msg_path, msg).unwrap();
    for algorithm in ALGORITHMS {
        let key_path = openssl_genpkey(dir.path(), algorithm);
        let public = PrivateKey::from_pem(&read(&key_path)).unwrap().public_key();
        let out = run(
            "openssl",
            &[
                "pkeyutl",
                "-sign",
                "-rawin",
                "-inkey",
                path_str(&key_path),
                "-in",
                path_str(&msg_path),
            ],
        );
        let raw: Vec<u8> = match algorithm {
            Algorithm::Ed25519 => out,
            Algorithm::EcdsaP256 => p256::ecdsa::Signature::from_der(&out)
                .unwrap()
                .to_bytes()
                .to_vec(),
        };
        assert_eq!(raw.len(), 64);
        public.verify(msg, &raw).unwrap();
        assert!(public.verify(b"tampered", &raw).is_err());
    }
}

#[test]
fn encrypted_pkcs8_refused() {
    let dir = tempfile::tempdir().unwrap();
    for algorithm in ALGORITHMS {
        let plain = openssl_genpkey(dir.path(), algorithm);
        let enc = dir.path().join(format!("enc-{algorithm}.pem"));
        run(
            "openssl",
            &[
                "pkcs8",
                "-topk8",
                "-in",
                path_str(&plain),
                "-out",
                path_str(&enc),
                "-passout",
                "pass:hunter2",
            ],
        );
        let text = read(&enc);
        assert!(text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        let err = PrivateKey::from_pem(&text).unwrap_err();
        assert_eq!(err, KeyError::EncryptedPem);
        assert!(err.to_string().contains("unencrypted"), "{err}");
    }
}

fn ssh_keygen(dir: &Path, name: &str, key_type: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            key_type,
            "-N",
            passphrase,
            "-C",
            "host@example",
            "-f",
            path_str(&path),
        ],
    );
    path
}

#[test]
fn ssh_keygen_ed25519_key_loads_and_fingerprints_match() {
    let dir = tempfile::tempdir().unwrap();
    let path = ssh_keygen(dir.path(), "id_ed25519", "ed25519", "");
    let pub_path = path.with_extension("pub");
    let pub_line = read(&pub_path);

    let key = PrivateKey::from_pem(&read(&path)).unwrap();
    assert_eq!(key.algorithm(), Algorithm::Ed25519);
    let public = parse_ssh_ed25519_public(&pub_line).unwrap();
    assert_eq!(key.public_key(), public);

    let keygen = String::from_utf8(run("ssh-keygen", &["-lf", path_str(&pub_path)])).unwrap();
    let expected = keygen.split_whitespace().nth(1).unwrap();
    assert!(expected.starts_with("SHA256:"));
    assert_eq!(ssh_fingerprint(&pub_line).unwrap(), expected);
    assert_eq!(ssh_fingerprint_of(&public).unwrap(), expected);
    assert_eq!(
        to_ssh_public_line(&public, "host@example").unwrap(),
        pub_line.trim()
    );

    let sig = key.sign(b"host attestation");
    public.verify(b"host attestation", &sig).unwrap();
}

#[test]
fn ssh_public_line_round_trip() {
    let public = PrivateKey::generate(Algorithm::Ed25519).public_key();
    let line = to_ssh_public_line(&public, "").unwrap();
    assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
    assert_eq!(parse_ssh_ed25519_public(&line).unwrap(), public);
    assert_eq!(
        ssh_fingerprint(&line).unwrap(),
        ssh_fingerprint_of(&public).unwrap()
    );

    let p256 = PrivateKey::generate(Algorithm::EcdsaP256).public_key();
    assert_eq!(
        ssh_fingerprint_of(&p256),
        Err(KeyError::NotSshKeyAlgorithm(Algorithm::EcdsaP256))
    );
    assert!(to_ssh_public_line(&p256, "x").is_err());
    assert!(matches!(
        parse_ssh_ed25519_public("ssh-ed25519 !!!"),
        Err(KeyError::OpenSsh(_))
    ));
}

#[test]
fn encrypted_openssh_key_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = ssh_keygen(dir.path(), "enc", "ed25519", "correct horse");
    let err = PrivateKey::from_pem(&read(&path)).unwrap_err();
    assert_eq!(err, KeyError::EncryptedOpenSsh);
    assert!(
        err.to_string().contains("/etc/ssh/ssh_host_ed25519_key"),
        "{err}"
    );
}

#[test]
fn non_ed25519_ssh_keys_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = ssh_keygen(dir.path(), "ecdsa", "ecdsa", "");
    let err = PrivateKey::from_pem(&read(&path)).unwrap_err();
    assert!(
        matches!(&err, KeyError::UnsupportedSshKeyType(t) if t.contains("ecdsa")),
        "{err}"
    );
    let pub_line = read(&path.with_extension("pub"));
    let err = parse_ssh_ed25519_public(&pub_line).unwrap_err();
    assert!(
        matches!(&err, KeyError::UnsupportedSshKeyType(t) if t.contains("ecdsa")),
        "{err}"
    );
    // Fingerprints work for any key type ssh-keygen prints.
    let keygen = String::from_utf8(run(
        "ssh-keygen",
        &["-lf", path_str(&path.with_extension("pub"))],
    ))
    .unwrap();
    assert_eq!(
        ssh_fingerprint(&pub_line).unwrap(),
        keygen.split_whitespace().nth(1).unwrap()
    );
}

#[test]
fn unsupported_private_key_inputs() {
    assert_eq!(PrivateKey::from_pem("hello").unwrap_err(), KeyError::NotPem);
    let rsa = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
    assert_eq!(
        PrivateKey::from_pem(rsa).unwrap_err(),
        KeyError::UnsupportedPemLabel("RSA PRIVATE KEY".into())
    );
    let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(matches!(
        PrivateKey::from_pem(garbage),
        Err(KeyError::InvalidPrivateKey(_))
    ));
    let legacy_encrypted = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END EC PRIVATE KEY-----\n";
    assert_eq!(
        PrivateKey::from_pem(legacy_encrypted).unwrap_err(),
        KeyError::EncryptedPem
    );
}

#[test]
fn openssl_other_algorithms_refused() {
    let dir = tempfile::tempdir().unwrap();
    let x25519 = dir.path().join("x25519.pem");
    run(
        "openssl",
        &["genpkey", "-algorithm", "x25519", "-out", path_str(&x25519)],
    );
    assert!(matches!(
        PrivateKey::from_pem(&read(&x25519)),
        Err(KeyError::UnsupportedAlgorithm(_))
    ));
    let p384 = dir.path().join("p384.pem");
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            path_str(&p384),
        ],
    );
    assert!(matches!(
        PrivateKey::from_pem(&read(&p384)),
        Err(KeyError::UnsupportedAlgorithm(_))
    ));
}

#[test]
fn debug_does_not_leak_secret() {
    let key = PrivateKey::generate(Algorithm::Ed25519);
    let PrivateKey::Ed25519(inner) = &key else {
        panic!()
    };
    let secret_hex: String = inner
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let debug = format!("{key:?}");
    assert!(!debug.contains(&secret_hex));
    assert!(!debug.contains(&format!("{:?}", inner.to_bytes())));
}

#[test]
fn pkcs8_v2_ed25519_with_public_key_loads() {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let PrivateKey::Ed25519(inner) = PrivateKey::generate(Algorithm::Ed25519) else {
        panic!()
    };
    // ed25519-dalek's own encoder writes the v2 form, with the public key.
    let pem = inner.to_pkcs8_pem(Default::default()).unwrap();
    let loaded = PrivateKey::from_pem(&pem).unwrap();
    assert_eq!(
        loaded.public_key(),
        PublicKey::Ed25519(inner.verifying_key())
    );
}
