//! Issuance and identities without outside tools: happy paths, every CSR refusal, and the
//! rule that a host certificate never carries the operator role.

mod common;

use common::{ca, ca_at, der, enroll, expect, fingerprint, host_key, NOW};
use nixfleet_pki::{
    build_host_csr, generate_ca, issue_host_cert, issue_operator_cert, issue_server_cert,
    ClientIdentity, FleetCa, PkiError, Role,
};
use nixfleet_proto::Algorithm;
use nixfleet_trust::keys::PrivateKey;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateSigningRequestDer;
use time::Duration;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

fn uris(cert_der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A CSR built by rcgen with a key of its own, asking for whatever `params` says.
fn rcgen_csr(params: &CertificateParams, key: &KeyPair) -> String {
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn csr_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
}

fn csr_to_pem(der: &[u8]) -> String {
    p256::pkcs8::der::pem::encode_string(
        "CERTIFICATE REQUEST",
        p256::pkcs8::der::pem::LineEnding::LF,
        der,
    )
    .unwrap()
}

#[test]
fn generated_ca_loads_and_refuses_the_wrong_key() {
    let test = ca();
    assert_eq!(test.ca.not_after(), NOW + Duration::days(3650));
    assert!(test
        .ca
        .cert_pem()
        .starts_with("-----BEGIN CERTIFICATE-----\n"));
    assert_eq!(der(test.ca.cert_pem()), test.ca.cert_der());
    assert!(test.key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    // The CA key is P-256 and loads as a nixfleet key.
    assert_eq!(
        PrivateKey::from_pem(&test.key_pem).unwrap().algorithm(),
        Algorithm::EcdsaP256
    );

    let other = ca();
    assert_eq!(
        FleetCa::from_pem(&test.cert_pem, &other.key_pem).unwrap_err(),
        PkiError::CaKeyMismatch
    );
    assert!(matches!(
        FleetCa::from_pem(&test.cert_pem, "not a key").unwrap_err(),
        PkiError::CaKey(_)
    ));
    assert!(matches!(
        FleetCa::from_pem("no cert", &test.key_pem).unwrap_err(),
        PkiError::CaCertificate(_)
    ));
    // A leaf certificate is not a CA, whatever key comes with it.
    let (server_pem, server_key) =
        issue_server_cert(&test.ca, &["localhost".to_owned()], NOW, Duration::days(1)).unwrap();
    assert_eq!(
        FleetCa::from_pem(&server_pem, &server_key).unwrap_err(),
        PkiError::NotACa
    );
    // Debug output never shows the key.
    assert!(!format!("{:?}", test.ca).contains("PRIVATE"));
}

#[test]
fn host_certificate_happy_path() {
    let test = ca();
    let key = host_key();
    let issued = enroll(&test.ca, "web-01", &key, NOW);
    assert_eq!(issued.not_before, NOW);
    assert_eq!(issued.not_after, NOW + Duration::days(30));
    assert_eq!(issued.ssh_fingerprint, fingerprint(&key));
    assert_eq!(issued.serial_hex.len(), 32, "{}", issued.serial_hex);

    let cert_der = der(&issued.cert_pem);
    let identity = ClientIdentity::from_der(&cert_der).unwrap();
    assert_eq!(
        identity.role,
        Role::Host {
            hostname: "web-01".to_owned()
        }
    );
    assert_eq!(identity.hostname(), Some("web-01"));
    assert_eq!(identity.operator_name(), None);
    assert_eq!(identity.serial_hex, issued.serial_hex);
    assert_eq!(identity.not_before, issued.not_before);
    assert_eq!(identity.not_after, issued.not_after);
    assert_eq!(uris(&cert_der), ["urn:nixfleet:host:web-01"]);

    // The certificate holds the CSR's key: the host SSH key.
    let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
    let PrivateKey::Ed25519(signing) = &key else {
        panic!("host keys are ed25519")
    };
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        signing.verifying_key().as_bytes()
    );

    // Serials are random.
    let again = enroll(&test.ca, "web-01", &key, NOW);
    assert_ne!(again.serial_hex, issued.serial_hex);
}

#[test]
fn a_renewal_carries_the_enrollment_time_and_a_revocation_cut_off_covers_it() {
    let test = ca();
    let key = host_key();
    let enrolled =
        ClientIdentity::from_der(&der(&enroll(&test.ca, "web-01", &key, NOW).cert_pem)).unwrap();
    assert_eq!(enrolled.enrolled_at, NOW);
    assert_eq!(
        enrolled.ssh_fingerprint.as_deref(),
        Some(fingerprint(&key).as_str())
    );
    let later = NOW + Duration::days(15);
    let renewed = nixfleet_pki::renew_host_cert(
        &test.ca,
        &build_host_csr("web-01", &key).unwrap(),
        &expect("web-01", Some(&key)),
        enrolled.enrolled_at,
        later,
        Duration::days(30),
    )
    .unwrap();
    assert_eq!(renewed.not_before, later, "validity starts at the renewal");
    let renewed = ClientIdentity::from_der(&der(&renewed.cert_pem)).unwrap();
    assert_eq!(renewed.enrolled_at, NOW, "the enrollment time goes forward");
    // A cut-off between the enrollment and the renewal revokes the renewed certificate.
    assert!(renewed.is_revoked_by("web-01", NOW + Duration::days(1)));
    assert!(!renewed.is_revoked_by("web-01", NOW));
    // A new enrollment after the cut-off is not revoked by it.
    let re_enrolled =
        ClientIdentity::from_der(&der(&enroll(&test.ca, "web-01", &key, later).cert_pem)).unwrap();
    assert!(!re_enrolled.is_revoked_by("web-01", NOW + Duration::days(1)));
}

#[test]
fn fingerprint_is_optional_at_renewal() {
    let test = ca();
    let key = host_key();
    let csr = build_host_csr("web-01", &key).unwrap();
    let issued = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", None),
        NOW,
        Duration::days(30),
    )
    .unwrap();
    assert_eq!(issued.ssh_fingerprint, fingerprint(&key));
}

#[test]
fn csr_with_the_wrong_common_name_is_refused() {
    let test = ca();
    let key = host_key();
    let csr = build_host_csr("web-02", &key).unwrap();
    let err = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", Some(&key)),
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert_eq!(
        err,
        PkiError::CsrHostnameMismatch {
            expected: "web-01".to_owned(),
            found: "web-02".to_owned()
        }
    );
    assert!(err.to_string().contains("web-02"), "{err}");
}

#[test]
fn csr_whose_key_does_not_match_the_fingerprint_is_refused() {
    let test = ca();
    let key = host_key();
    let token_key = host_key();
    let csr = build_host_csr("web-01", &key).unwrap();
    let err = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", Some(&token_key)),
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert_eq!(
        err,
        PkiError::CsrFingerprintMismatch {
            expected: fingerprint(&token_key),
            found: fingerprint(&key)
        }
    );
}

#[test]
fn p256_csr_is_refused_for_host_certificates() {
    let test = ca();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen_csr(&csr_params("web-01"), &key);
    let err = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", None),
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::CsrKeyNotEd25519(_)), "{err:?}");
    assert!(err.to_string().contains("ECDSA"), "{err}");

    // The agent side refuses a non-ed25519 key before building anything.
    assert!(matches!(
        build_host_csr("web-01", &PrivateKey::generate(Algorithm::EcdsaP256)),
        Err(PkiError::HostKeyNotEd25519(_))
    ));
}

#[test]
fn tampered_csr_is_refused() {
    let test = ca();
    let key = host_key();
    let csr = build_host_csr("web-01", &key).unwrap();
    let der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let expectation = expect("web-01", Some(&key));

    // A flipped bit in the signature.
    let mut bad_signature = der.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x01;
    let err = issue_host_cert(
        &test.ca,
        &csr_to_pem(&bad_signature),
        &expectation,
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert_eq!(err, PkiError::CsrSignature);

    // The signed content changed: web-01 renamed to web-02 after signing.
    let at = der.windows(6).position(|w| w == b"web-01").unwrap();
    let mut renamed = der.clone();
    renamed[at + 5] = b'2';
    let err = issue_host_cert(
        &test.ca,
        &csr_to_pem(&renamed),
        &expect("web-02", None),
        NOW,
        Duration::days(30),
    )
    .unwrap_err();
    assert_eq!(err, PkiError::CsrSignature);

    // Garbage and non-PEM input get their own errors.
    assert!(matches!(
        issue_host_cert(&test.ca, "hello", &expectation, NOW, Duration::days(1)),
        Err(PkiError::CsrPem(_))
    ));
    assert!(matches!(
        issue_host_cert(
            &test.ca,
            &csr_to_pem(&der[..der.len() / 2]),
            &expectation,
            NOW,
            Duration::days(1)
        ),
        Err(PkiError::CsrMalformed(_))
    ));
}

#[test]
fn hostnames_outside_lowercase_dns_characters_are_refused() {
    let test = ca();
    let key = host_key();
    for bad in ["Web-01", "web_01", "", "web 01", "a:b", &"a".repeat(254)] {
        let err = build_host_csr(bad, &key).unwrap_err();
        assert!(
            matches!(&err, PkiError::InvalidHostname { hostname, .. } if hostname == bad),
            "{bad:?}: {err:?}"
        );
        // The control plane checks the expected name too, whatever the CSR says.
        let csr = rcgen_csr(
            &csr_params(if bad.is_empty() { "x" } else { bad }),
            &KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        );
        let err = issue_host_cert(&test.ca, &csr, &expect(bad, None), NOW, Duration::days(1))
            .unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidHostname { .. }),
            "{bad:?}: {err:?}"
        );
    }
    let uppercase = build_host_csr("Web-01", &key).unwrap_err();
    assert!(uppercase.to_string().contains("uppercase"), "{uppercase}");
    // The longest valid name still works.
    let long = format!("{}.example", "a".repeat(245));
    assert_eq!(long.len(), 253);
    enroll(&test.ca, &long, &key, NOW);
}

#[test]
fn csr_requests_are_ignored_so_a_host_never_gets_the_operator_role() {
    let test = ca();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = csr_params("web-01");
    params.subject_alt_names = vec![
        SanType::URI(Ia5String::try_from("urn:nixfleet:operator:root").unwrap()),
        SanType::DnsName(Ia5String::try_from("cp.example.org").unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let csr = rcgen_csr(&params, &key);

    let issued = issue_host_cert(
        &test.ca,
        &csr,
        &expect("web-01", None),
        NOW,
        Duration::days(30),
    )
    .unwrap();
    let cert_der = der(&issued.cert_pem);
    let identity = ClientIdentity::from_der(&cert_der).unwrap();
    assert_eq!(identity.hostname(), Some("web-01"));
    assert!(!matches!(identity.role, Role::Operator { .. }));
    assert_eq!(uris(&cert_der), ["urn:nixfleet:host:web-01"]);

    let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
    let basic = cert.basic_constraints().unwrap().unwrap();
    assert!(!basic.value.ca);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let dns: Vec<_> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter(|n| matches!(n, GeneralName::DNSName(_)))
        .collect();
    assert!(dns.is_empty());
}

#[test]
fn operator_and_server_certificates() {
    let test = ca();
    let (cert_pem, key_pem) =
        issue_operator_cert(&test.ca, "alice@example.org", NOW, Duration::days(90)).unwrap();
    let identity = ClientIdentity::from_der(&der(&cert_pem)).unwrap();
    assert_eq!(
        identity.role,
        Role::Operator {
            name: "alice@example.org".to_owned()
        }
    );
    assert_eq!(identity.hostname(), None);
    assert_eq!(identity.not_after, NOW + Duration::days(90));
    assert_eq!(
        PrivateKey::from_pem(&key_pem).unwrap().algorithm(),
        Algorithm::EcdsaP256
    );
    for bad in ["", "Alice", "a:b", "a b", "urn:nixfleet:host:web-01"] {
        assert!(
            matches!(
                issue_operator_cert(&test.ca, bad, NOW, Duration::days(1)),
                Err(PkiError::InvalidOperatorName(_))
            ),
            "{bad:?}"
        );
    }

    let sans = ["localhost", "127.0.0.1", "::1", "CP.example.org"].map(String::from);
    let (server_pem, _) = issue_server_cert(&test.ca, &sans, NOW, Duration::days(365)).unwrap();
    let server_der = der(&server_pem);
    // A server certificate is nobody's client identity.
    assert_eq!(
        ClientIdentity::from_der(&server_der).unwrap_err(),
        PkiError::NoRole
    );
    let (_, cert) = X509Certificate::from_der(&server_der).unwrap();
    let names: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "DNSName(localhost)",
            "IPAddress(7f:00:00:01)",
            "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)",
            "DNSName(cp.example.org)"
        ]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);

    assert_eq!(
        issue_server_cert(&test.ca, &[], NOW, Duration::days(1)).unwrap_err(),
        PkiError::NoServerSans
    );
    assert_eq!(
        issue_server_cert(&test.ca, &["bad name".to_owned()], NOW, Duration::days(1)).unwrap_err(),
        PkiError::InvalidSan("bad name".to_owned())
    );
}

/// Signs arbitrary parameters with the fleet CA key, to build certificates nixfleet itself
/// never issues.
fn forged(test: &common::Ca, params: CertificateParams) -> Vec<u8> {
    let ca_key = KeyPair::from_pem(&test.key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&test.cert_pem, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    params
        .signed_by(&key, &issuer)
        .unwrap()
        .der()
        .as_ref()
        .to_vec()
}

fn with_uris(common_name: &str, uris: &[&str]) -> CertificateParams {
    let mut params = csr_params(common_name);
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(Ia5String::try_from(*u).unwrap()))
        .collect();
    params
}

#[test]
fn identities_with_both_neither_or_odd_roles_are_refused() {
    let test = ca();
    let both = forged(
        &test,
        with_uris(
            "web-01",
            &["urn:nixfleet:host:web-01", "urn:nixfleet:operator:web-01"],
        ),
    );
    assert_eq!(
        ClientIdentity::from_der(&both).unwrap_err(),
        PkiError::AmbiguousRole(2)
    );
    let shouting = forged(
        &test,
        with_uris(
            "web-01",
            &["urn:nixfleet:host:web-01", "URN:NIXFLEET:OPERATOR:root"],
        ),
    );
    assert_eq!(
        ClientIdentity::from_der(&shouting).unwrap_err(),
        PkiError::AmbiguousRole(2)
    );
    let neither = forged(&test, with_uris("web-01", &["https://example.org"]));
    assert_eq!(
        ClientIdentity::from_der(&neither).unwrap_err(),
        PkiError::NoRole
    );
    let unknown = forged(&test, with_uris("x", &["urn:nixfleet:admin:x"]));
    assert_eq!(
        ClientIdentity::from_der(&unknown).unwrap_err(),
        PkiError::UnknownRole("urn:nixfleet:admin:x".to_owned())
    );
    let renamed = forged(&test, with_uris("web-02", &["urn:nixfleet:host:web-01"]));
    assert!(matches!(
        ClientIdentity::from_der(&renamed).unwrap_err(),
        PkiError::HostCommonNameMismatch { .. }
    ));
    let bad_host = forged(&test, with_uris("Web-01", &["urn:nixfleet:host:Web-01"]));
    assert!(matches!(
        ClientIdentity::from_der(&bad_host).unwrap_err(),
        PkiError::InvalidHostname { .. }
    ));
    assert!(matches!(
        ClientIdentity::from_der(b"not a certificate").unwrap_err(),
        PkiError::CertificateMalformed(_)
    ));
}

#[test]
fn validity_is_positive_and_capped_by_the_ca() {
    let test = ca();
    let key = host_key();
    let csr = build_host_csr("web-01", &key).unwrap();
    let expectation = expect("web-01", Some(&key));
    for bad in [
        Duration::ZERO,
        Duration::days(-1),
        Duration::days(3_000_000),
    ] {
        assert!(
            matches!(
                issue_host_cert(&test.ca, &csr, &expectation, NOW, bad),
                Err(PkiError::InvalidValidity(_))
            ),
            "{bad}"
        );
        assert!(matches!(
            generate_ca("ca", NOW, bad),
            Err(PkiError::InvalidValidity(_))
        ));
    }
    // Sub-second parts of `now` are dropped, as X.509 has whole seconds.
    let issued = issue_host_cert(
        &test.ca,
        &csr,
        &expectation,
        NOW + Duration::milliseconds(700),
        Duration::days(1),
    )
    .unwrap();
    assert_eq!(issued.not_before, NOW);

    // A certificate never outlives the CA.
    let late = test.ca.not_after() - Duration::days(10);
    let issued = issue_host_cert(&test.ca, &csr, &expectation, late, Duration::days(30)).unwrap();
    assert_eq!(issued.not_after, test.ca.not_after());
    // And an expired CA issues nothing.
    let err = issue_host_cert(
        &test.ca,
        &csr,
        &expectation,
        test.ca.not_after(),
        Duration::days(30),
    )
    .unwrap_err();
    assert!(matches!(err, PkiError::CaExpired { .. }), "{err:?}");
    assert!(matches!(
        issue_operator_cert(&test.ca, "alice", test.ca.not_after(), Duration::days(1)),
        Err(PkiError::CaExpired { .. })
    ));

    assert!(matches!(
        generate_ca("", NOW, Duration::days(1)),
        Err(PkiError::InvalidCommonName(_))
    ));
    assert!(matches!(
        generate_ca(&"x".repeat(65), NOW, Duration::days(1)),
        Err(PkiError::InvalidCommonName(_))
    ));
}

#[test]
fn revocation_entries_refuse_only_older_host_certificates() {
    let test = ca_at(NOW);
    let key = host_key();
    let old =
        ClientIdentity::from_der(&der(&enroll(&test.ca, "web-01", &key, NOW).cert_pem)).unwrap();
    let revoked_at = NOW + Duration::hours(1);
    let new = ClientIdentity::from_der(&der(&enroll(
        &test.ca,
        "web-01",
        &key,
        NOW + Duration::hours(2),
    )
    .cert_pem))
    .unwrap();
    assert!(old.is_revoked_by("web-01", revoked_at));
    assert!(!new.is_revoked_by("web-01", revoked_at));
    assert!(!old.is_revoked_by("web-02", revoked_at));
    // notBefore equal to the entry's notBefore is not "earlier".
    assert!(!old.is_revoked_by("web-01", NOW));

    let (operator_pem, _) =
        issue_operator_cert(&test.ca, "web-01", NOW, Duration::days(1)).unwrap();
    let operator = ClientIdentity::from_der(&der(&operator_pem)).unwrap();
    assert!(!operator.is_revoked_by("web-01", revoked_at));
}

#[test]
fn shared_types_cross_threads() {
    // The control plane keeps the CA and identities in shared state across tasks.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<FleetCa>();
    assert_send_sync::<ClientIdentity>();
    assert_send_sync::<PkiError>();
}
