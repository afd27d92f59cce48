//! Shared test fixtures: a fleet CA and certificates issued by it.
#![allow(dead_code)]

use nixfleet_pki::{
    build_host_csr, generate_ca, issue_host_cert, FleetCa, HostExpectation, IssuedCert,
};
use nixfleet_proto::Algorithm;
use nixfleet_trust::keys::{ssh_fingerprint_of, PrivateKey};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// A fixed instant for tests that do not touch a real TLS stack.
pub const NOW: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca: FleetCa,
}

pub fn ca_at(now: OffsetDateTime) -> Ca {
    let (cert_pem, key_pem) = generate_ca("nixfleet test CA", now, Duration::days(3650)).unwrap();
    let ca = FleetCa::from_pem(&cert_pem, &key_pem).unwrap();
    Ca {
        cert_pem,
        key_pem,
        ca,
    }
}

pub fn ca() -> Ca {
    ca_at(NOW)
}

pub fn host_key() -> PrivateKey {
    PrivateKey::generate(Algorithm::Ed25519)
}

pub fn fingerprint(key: &PrivateKey) -> String {
    ssh_fingerprint_of(&key.public_key()).unwrap()
}

pub fn expect(hostname: &str, key: Option<&PrivateKey>) -> HostExpectation {
    HostExpectation {
        hostname: hostname.to_owned(),
        ssh_fingerprint: key.map(fingerprint),
    }
}

/// The agent's side of enrollment, then the control plane's.
pub fn enroll(ca: &FleetCa, hostname: &str, key: &PrivateKey, now: OffsetDateTime) -> IssuedCert {
    let csr = build_host_csr(hostname, key).unwrap();
    issue_host_cert(
        ca,
        &csr,
        &expect(hostname, Some(key)),
        now,
        Duration::days(30),
    )
    .unwrap()
}

pub fn der(cert_pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}
