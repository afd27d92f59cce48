//! Bounded fuzzing of the certificate parsers that take attacker input: the host CSR
//! (enrollment and renewal, `issue_host_cert` / `renew_host_cert`) and the client
//! certificate (`ClientIdentity::from_der`, on what rustls let through), plus the name
//! checks.
//!
//! Inputs are arbitrary bytes and structure-aware mutations of valid CSRs and
//! certificates: PEM armour changes, and DER trees with TLVs removed, duplicated,
//! retagged, given broken or ~4 GiB lengths, or 100,000-deep nesting
//! (`nixfleet_fuzz::der`). For each: no panic; a CSR is only accepted when the bytes its
//! signature covers are the ones the host signed, and is refused with a CSR error
//! otherwise; an identity is only read from a certificate whose names pass the same
//! checks as at issuance; and one parse allocates at most a bounded multiple of its
//! input.
//!
//! `NIXFLEET_FUZZ_CASES` sets the cases per property; the seed is fixed
//! (`PROPTEST_RNG_SEED` to change it). The CA and host keys are fixed too; only the
//! serial numbers of the seed certificates and the ECDSA seed CSR are random (same
//! layout every run).

use nixfleet_fuzz::alloc::{Bound, CountingAlloc};
use nixfleet_fuzz::der::{self, nested};
use nixfleet_fuzz::json::{self as mutate, ByteEdit};
use nixfleet_fuzz::{alone, run, Bytes};
use nixfleet_pki::{
    build_host_csr, issue_host_cert, issue_operator_cert, issue_server_cert, renew_host_cert,
    validate_hostname, validate_operator_name, ClientIdentity, FleetCa, HostExpectation, PkiError,
    Role,
};
use nixfleet_trust::keys::{ssh_fingerprint_of, PrivateKey};
use p256::pkcs8::der::pem::LineEnding;
use proptest::prelude::*;
use proptest::sample::select;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer as _;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// What checking a CSR and issuing from it may allocate. Linear in the PEM text: it is
/// decoded once (3/4 of its length) and x509-parser borrows from that DER, but parses
/// each extension the CSR requests and, for a malformed one, allocates about 150 bytes
/// per 4-byte TLV of its value (measured: an extension request whose basicConstraints
/// value is `SET { SEQUENCE {} }` repeated costs 110 bytes per PEM byte; `00 00`
/// repeated in any other position, at most 55). 128 per byte covers it. The certificate
/// issued from a valid CSR is built from scratch, independent of the input: the
/// constant (rcgen's certificate and PEM buffers, about 20 KiB, with room).
///
/// The enroll route takes a CSR only with a valid bootstrap token, and the renew route
/// only from an enrolled host, both under a 256 KiB body limit: at most ~32 MiB for a
/// moment. A real host CSR is under 1 KiB, so a size cap before parsing would bring this
/// to a constant.
const CSR: Bound = Bound {
    per_input_byte: 128,
    constant: 128 << 10,
};

/// Reading an identity: x509-parser over borrowed DER, with the same cost per TLV of a
/// malformed extension (measured 151 bytes per DER byte for a basicConstraints value of
/// `SET { SEQUENCE {} }` repeated; linear from 10 KB to 1 MB). The certificate has
/// passed rustls' chain verification against the fleet CA before it gets here, and TLS
/// caps it at 64 KiB.
const IDENTITY: Bound = Bound {
    per_input_byte: 160,
    constant: 64 << 10,
};

const NOW: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

fn ed25519(seed: u8) -> PrivateKey {
    PrivateKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
}

/// A fleet CA with a fixed ed25519 key, self-signed with rcgen.
fn fleet_ca() -> FleetCa {
    let key_pem = ed25519(7).to_pkcs8_pem().unwrap();
    let key = KeyPair::from_pem(&key_pem).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "nixfleet fuzz CA");
    params.not_before = NOW - Duration::days(1);
    params.not_after = NOW + Duration::days(3650);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[1]));
    let cert = params.self_signed(&key).unwrap();
    FleetCa::from_pem(&cert.pem(), &key_pem).unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    p256::pkcs8::der::pem::encode_string(label, LineEnding::LF, der).unwrap()
}

fn csr_der(pem_text: &str) -> Option<Vec<u8>> {
    CertificateSigningRequestDer::from_pem_slice(pem_text.as_bytes())
        .ok()
        .map(|d| d.as_ref().to_vec())
}

/// The bytes the CSR's signature covers (certificationRequestInfo), if it parses.
fn signed_part(der: &[u8]) -> Option<Vec<u8>> {
    let (rest, csr) = X509CertificationRequest::from_der(der).ok()?;
    rest.is_empty()
        .then(|| csr.certification_request_info.raw.to_vec())
}

/// How the PEM armour around a CSR is changed.
#[derive(Debug, Clone)]
enum Armour {
    None,
    Label(&'static str),
    Crlf,
    NoFinalNewline,
    /// Another block (or text) before the CSR.
    Before(&'static str),
    /// Base64 lines of this width.
    Width(usize),
    /// A space inside the base64.
    Space(prop::sample::Index),
}

fn armour() -> impl Strategy<Value = Armour> {
    prop_oneof![
        4 => Just(Armour::None),
        1 => select(&["NEW CERTIFICATE REQUEST", "CERTIFICATE", "CERTIFICATE REQUEST ", "X"][..])
            .prop_map(Armour::Label),
        1 => Just(Armour::Crlf),
        1 => Just(Armour::NoFinalNewline),
        1 => select(&[
            "hello\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
            "-----BEGIN CERTIFICATE REQUEST-----\n",
        ][..])
        .prop_map(Armour::Before),
        1 => select(&[1usize, 4, 63, 65, 10_000][..]).prop_map(Armour::Width),
        1 => any::<prop::sample::Index>().prop_map(Armour::Space),
    ]
}

fn armoured(label: &str, der: &[u8], armour: &Armour) -> String {
    let text = pem(label, der);
    match armour {
        Armour::None => text,
        Armour::Label(l) => text.replace(label, l),
        Armour::Crlf => text.replace('\n', "\r\n"),
        Armour::NoFinalNewline => text.trim_end().to_owned(),
        Armour::Before(b) => format!("{b}{text}"),
        Armour::Width(w) => {
            let lines: Vec<&str> = text.lines().collect();
            let body: String = lines[1..lines.len() - 1].concat();
            let wrapped: Vec<String> = body
                .as_bytes()
                .chunks(*w)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            format!(
                "{}\n{}\n{}\n",
                lines[0],
                wrapped.join("\n"),
                lines[lines.len() - 1]
            )
        }
        Armour::Space(at) => {
            let start = text.find('\n').map_or(0, |i| i + 1);
            let end = text.rfind("-----END").unwrap_or(text.len());
            let pos = start + at.index(end.saturating_sub(start).max(1));
            let mut t = text;
            if t.is_char_boundary(pos) {
                t.insert(pos, ' ');
            }
            t
        }
    }
}

/// One CSR input: a seed mutated as DER, armoured, then edited as text; or arbitrary.
#[derive(Debug, Clone)]
enum CsrInput {
    Mutated {
        seed: usize,
        der: der::Plan,
        armour: Armour,
        text: Vec<ByteEdit>,
    },
    Deep {
        tag: u8,
        depth: usize,
    },
    Text(String),
    Der(Bytes),
}

fn csr_input(seeds: usize) -> impl Strategy<Value = CsrInput> {
    let text_edits = prop_oneof![
        3 => Just(vec![]),
        1 => prop::collection::vec(mutate::byte_edit(), 1..3),
    ];
    prop_oneof![
        1 => (0..seeds, armour()).prop_map(|(seed, armour)| CsrInput::Mutated {
            seed,
            der: der::Plan::default(),
            armour,
            text: vec![],
        }),
        8 => (0..seeds, der::plan(), armour(), text_edits).prop_map(|(seed, der, armour, text)| {
            CsrInput::Mutated { seed, der, armour, text }
        }),
        1 => (select(&[0x30u8, 0x31, 0xa0][..]), select(&[64usize, 1_000, 100_000][..]))
            .prop_map(|(tag, depth)| CsrInput::Deep { tag, depth }),
        1 => any::<String>().prop_map(CsrInput::Text),
        1 => nixfleet_fuzz::bytes(0..512).prop_map(CsrInput::Der),
    ]
}

struct CsrSeed {
    der: Vec<u8>,
    /// The host name it was made for, and whether its key is the host key.
    hostname: &'static str,
    host_key: bool,
}

fn csr_seeds(host: &PrivateKey) -> Vec<CsrSeed> {
    let plain = build_host_csr("web-01", host).unwrap();
    // A CSR asking for more than nixfleet gives (other names, the CA flag, server
    // auth), from the same key: the requests are ignored, the key and name are used.
    let key = KeyPair::from_pem(&host.to_pkcs8_pem().unwrap()).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "web-01");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fuzz");
    params.subject_alt_names = vec![
        SanType::URI(Ia5String::try_from("urn:nixfleet:operator:root").unwrap()),
        SanType::DnsName(Ia5String::try_from("cp.example.org").unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let greedy = params.serialize_request(&key).unwrap().pem().unwrap();
    // An ECDSA key: refused for host certificates.
    let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "web-01");
    let ecdsa = params.serialize_request(&p256).unwrap().pem().unwrap();
    vec![
        CsrSeed {
            der: csr_der(&plain).unwrap(),
            hostname: "web-01",
            host_key: true,
        },
        CsrSeed {
            der: csr_der(&greedy).unwrap(),
            hostname: "web-01",
            host_key: true,
        },
        CsrSeed {
            der: csr_der(&ecdsa).unwrap(),
            hostname: "web-01",
            host_key: false,
        },
    ]
}

fn csr_text(seeds: &[CsrSeed], input: &CsrInput) -> String {
    match input {
        CsrInput::Mutated {
            seed,
            der: plan,
            armour,
            text,
        } => {
            let der = der::apply(&seeds[*seed].der, plan);
            let pem = armoured("CERTIFICATE REQUEST", &der, armour);
            String::from_utf8_lossy(&mutate::apply_bytes(pem.as_bytes(), text)).into_owned()
        }
        CsrInput::Deep { tag, depth } => pem("CERTIFICATE REQUEST", &nested(*tag, *depth)),
        CsrInput::Text(t) => t.clone(),
        CsrInput::Der(b) => pem("CERTIFICATE REQUEST", b),
    }
}

fn is_csr_refusal(e: &PkiError) -> bool {
    matches!(
        e,
        PkiError::CsrPem(_)
            | PkiError::CsrMalformed(_)
            | PkiError::CsrKeyNotEd25519(_)
            | PkiError::CsrSignature
            | PkiError::CsrCommonName(_)
            | PkiError::CsrHostnameMismatch { .. }
            | PkiError::CsrFingerprintMismatch { .. }
    )
}

#[test]
fn mutated_csrs_are_accepted_only_as_signed() {
    let ca = fleet_ca();
    let host = ed25519(4);
    let fingerprint = ssh_fingerprint_of(&host.public_key()).unwrap();
    let seeds = csr_seeds(&host);
    let signed: Vec<Option<Vec<u8>>> = seeds.iter().map(|s| signed_part(&s.der)).collect();
    run(
        "mutated CSRs",
        4,
        (csr_input(seeds.len()), any::<bool>(), any::<bool>()),
        |(input, renewal, pinned)| {
            let text = csr_text(&seeds, &input);
            let expected = HostExpectation {
                hostname: "web-01".to_owned(),
                ssh_fingerprint: pinned.then(|| fingerprint.clone()),
            };
            let result = CSR.check("CSR", text.len(), || {
                if renewal {
                    renew_host_cert(
                        &ca,
                        &text,
                        &expected,
                        NOW - Duration::days(90),
                        NOW,
                        Duration::days(30),
                    )
                } else {
                    issue_host_cert(&ca, &text, &expected, NOW, Duration::days(30))
                }
            })?;
            let der = csr_der(&text);
            let seed = match &input {
                CsrInput::Mutated { seed, .. } => Some(&seeds[*seed]),
                _ => None,
            };
            match &result {
                Ok(issued) => {
                    let der = der.as_deref();
                    prop_assert!(der.is_some(), "issued from text that is not a PEM CSR");
                    let part = der.and_then(signed_part);
                    prop_assert!(
                        seed.is_some_and(|s| s.host_key)
                            && signed.iter().any(|p| p.is_some() && *p == part),
                        "issued from a CSR whose signed part no host signed"
                    );
                    prop_assert_eq!(&issued.ssh_fingerprint, &fingerprint);
                    let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
                    let id = ClientIdentity::from_der(cert.as_ref()).unwrap();
                    prop_assert_eq!(
                        id.role,
                        Role::Host {
                            hostname: "web-01".to_owned()
                        }
                    );
                    prop_assert_eq!(id.ssh_fingerprint.as_deref(), Some(fingerprint.as_str()));
                    if renewal {
                        prop_assert_eq!(id.enrolled_at, NOW - Duration::days(90));
                    }
                }
                Err(e) => {
                    prop_assert!(is_csr_refusal(e), "not a CSR refusal: {e:?}");
                    if der.is_none() {
                        prop_assert!(matches!(e, PkiError::CsrPem(_)), "{e:?}");
                    }
                    // The seed itself, however armoured, is accepted when its key is the
                    // host's.
                    if let (Some(s), Some(d)) = (seed, &der) {
                        prop_assert!(
                            !(s.host_key && *d == s.der && s.hostname == "web-01"),
                            "the untouched CSR was refused: {e:?}"
                        );
                    }
                }
            }
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
enum CertInput {
    Mutated { seed: usize, plan: der::Plan },
    Deep { tag: u8, depth: usize },
    Arbitrary(Bytes),
}

/// A host certificate, a renewed one (it carries the enrollment time), an operator
/// certificate, and the server certificate (no role).
fn cert_seeds(ca: &FleetCa) -> Vec<(Vec<u8>, Option<ClientIdentity>)> {
    let host = ed25519(4);
    let csr = build_host_csr("web-01", &host).unwrap();
    let expected = HostExpectation {
        hostname: "web-01".to_owned(),
        ssh_fingerprint: None,
    };
    let der = |pem: &str| {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    };
    let issued = issue_host_cert(ca, &csr, &expected, NOW, Duration::days(30)).unwrap();
    let renewed = renew_host_cert(
        ca,
        &csr,
        &expected,
        NOW - Duration::days(90),
        NOW,
        Duration::days(30),
    )
    .unwrap();
    let (operator, _) =
        issue_operator_cert(ca, "alice@example.org", NOW, Duration::days(30)).unwrap();
    let (server, _) = issue_server_cert(
        ca,
        &["cp.example.org".to_owned(), "127.0.0.1".to_owned()],
        NOW,
        Duration::days(30),
    )
    .unwrap();
    [issued.cert_pem, renewed.cert_pem, operator, server]
        .iter()
        .map(|p| {
            let d = der(p);
            let id = ClientIdentity::from_der(&d).ok();
            (d, id)
        })
        .collect()
}

#[test]
fn mutated_client_certificates_yield_only_checked_identities() {
    let ca = fleet_ca();
    let seeds = cert_seeds(&ca);
    assert!(seeds[0].1.is_some() && seeds[1].1.is_some() && seeds[2].1.is_some());
    assert_eq!(
        ClientIdentity::from_der(&seeds[3].0).unwrap_err(),
        PkiError::NoRole
    );
    let inputs = prop_oneof![
        8 => (0..seeds.len(), der::plan()).prop_map(|(seed, plan)| CertInput::Mutated { seed, plan }),
        1 => (select(&[0x30u8, 0x31, 0xa3][..]), select(&[64usize, 1_000, 100_000][..]))
            .prop_map(|(tag, depth)| CertInput::Deep { tag, depth }),
        1 => nixfleet_fuzz::bytes(0..1024).prop_map(CertInput::Arbitrary),
    ];
    run("mutated client certificates", 4, inputs, |input| {
        let bytes = match &input {
            CertInput::Mutated { seed, plan } => der::apply(&seeds[*seed].0, plan),
            CertInput::Deep { tag, depth } => nested(*tag, *depth),
            CertInput::Arbitrary(b) => b.0.clone(),
        };
        let result = IDENTITY.check("ClientIdentity::from_der", bytes.len(), || {
            ClientIdentity::from_der(&bytes)
        })?;
        match &result {
            Ok(id) => {
                match &id.role {
                    Role::Host { hostname } => prop_assert!(validate_hostname(hostname).is_ok()),
                    Role::Operator { name } => prop_assert!(validate_operator_name(name).is_ok()),
                }
                prop_assert!(id.enrolled_at <= id.not_before);
                // Lowercase hex; empty for a zero-length serial INTEGER, which DER forbids
                // but x509-parser reads (the fleet CA never issues one).
                prop_assert!(
                    id.serial_hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                        && !(id.serial_hex.len() > 2 && id.serial_hex.starts_with("00")),
                    "serial {:?}",
                    id.serial_hex
                );
                if let Some(fp) = &id.ssh_fingerprint {
                    prop_assert!(fp.starts_with("SHA256:"));
                }
            }
            Err(e) => prop_assert!(
                matches!(
                    e,
                    PkiError::CertificateMalformed(_)
                        | PkiError::NoRole
                        | PkiError::AmbiguousRole(_)
                        | PkiError::UnknownRole(_)
                        | PkiError::HostCommonNameMismatch { .. }
                        | PkiError::InvalidHostname { .. }
                        | PkiError::InvalidOperatorName(_)
                ),
                "unexpected error {e:?}"
            ),
        }
        if let CertInput::Mutated { seed, .. } = &input {
            if bytes == seeds[*seed].0 {
                prop_assert_eq!(result.ok(), seeds[*seed].1.clone());
            }
        }
        Ok(())
    });
}

#[test]
fn names_are_checked_the_same_way_everywhere() {
    let names = prop_oneof![
        "[a-z0-9.-]{0,260}",
        "[a-zA-Z0-9.:_@/ \\n-]{0,40}",
        any::<String>(),
    ];
    run("names", 4, names, |name| {
        let host = validate_hostname(&name);
        prop_assert_eq!(
            host.is_ok(),
            !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b == b'.'
                    || b == b'-')
        );
        if let Err(e) = host {
            prop_assert!(matches!(e, PkiError::InvalidHostname { .. }), "{:?}", e);
        }
        let operator = validate_operator_name(&name);
        if operator.is_ok() {
            prop_assert!(name.len() <= 128 && !name.contains(':') && !name.contains('\n'));
        }
        Ok(())
    });
}

/// 100,000 nested SEQUENCEs as a CSR, as a certificate, and inside each: an error.
#[test]
fn deep_der_nesting_is_an_error_not_a_stack_overflow() {
    let _alone = alone();
    let ca = fleet_ca();
    let host = ed25519(4);
    let expected = HostExpectation {
        hostname: "web-01".to_owned(),
        ssh_fingerprint: None,
    };
    let seeds = csr_seeds(&host);
    let certs = cert_seeds(&ca);
    for (tag, depth) in [
        (0x30u8, 100_000),
        (0x31, 1_000),
        (0xa0, 100_000),
        (0xa3, 1_000),
    ] {
        let deep = nested(tag, depth);
        let text = pem("CERTIFICATE REQUEST", &deep);
        let r = CSR
            .check("deep CSR", text.len(), || {
                issue_host_cert(&ca, &text, &expected, NOW, Duration::days(1))
            })
            .unwrap();
        assert!(matches!(r, Err(PkiError::CsrMalformed(_))), "{r:?}");
        let r = IDENTITY
            .check("deep certificate", deep.len(), || {
                ClientIdentity::from_der(&deep)
            })
            .unwrap();
        assert!(matches!(r, Err(PkiError::CertificateMalformed(_))), "{r:?}");
        // In place of every node of the seeds (the subject, an extension's value, the
        // key...): whatever the outcome, no overflow and no panic.
        for mutated in der::each_node_nested(&seeds[1].der, tag, depth) {
            let csr = pem("CERTIFICATE REQUEST", &mutated);
            let r = issue_host_cert(&ca, &csr, &expected, NOW, Duration::days(1));
            assert!(r.is_err(), "a CSR changed after signing was accepted");
        }
        for mutated in der::each_node_nested(&certs[0].0, tag, depth) {
            let _ = ClientIdentity::from_der(&mutated);
        }
    }
}
