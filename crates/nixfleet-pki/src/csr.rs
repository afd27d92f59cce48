//! Host CSRs: the agent builds one with its SSH host key; the control plane checks it
//! before the fleet CA signs anything.

use nixfleet_trust::keys::{ssh_fingerprint_of, PrivateKey, PublicKey};
use rcgen::CertificateParams;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::ca::KeySigner;
use crate::names::validate_hostname;
use crate::PkiError;

/// What the control plane knows about the host before it signs: the hostname (from the
/// bootstrap token at enrollment, from the caller's certificate at renewal) and, when it
/// has one, the OpenSSH fingerprint of the host key (`SHA256:…`, from the token or from
/// the host's `pubkey` in fleet.resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostExpectation {
    pub hostname: String,
    pub ssh_fingerprint: Option<String>,
}

/// A CSR that passed every check.
pub(crate) struct CheckedCsr {
    pub(crate) public: ed25519_dalek::VerifyingKey,
    pub(crate) ssh_fingerprint: String,
}

/// Builds the agent's CSR: subject CN = `hostname`, signed with the host's ed25519 SSH key
/// (the same key becomes the TLS client key). Returns PEM (`CERTIFICATE REQUEST`).
pub fn build_host_csr(hostname: &str, key: &PrivateKey) -> Result<String, PkiError> {
    validate_hostname(hostname)?;
    if !matches!(key, PrivateKey::Ed25519(_)) {
        return Err(PkiError::HostKeyNotEd25519(key.algorithm().to_string()));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    params
        .serialize_request(&KeySigner::new(key.clone()))
        .and_then(|csr| csr.pem())
        .map_err(|e| PkiError::Generate(e.to_string()))
}

/// Checks, in this order: PEM and DER, ed25519 key, self-signature, hostname syntax, a
/// single common name equal to the expected hostname, and the key fingerprint.
pub(crate) fn check_host_csr(
    csr_pem: &str,
    expected: &HostExpectation,
) -> Result<CheckedCsr, PkiError> {
    validate_hostname(&expected.hostname)?;
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| PkiError::CsrPem(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| PkiError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::CsrMalformed(
            "trailing bytes after the request".to_owned(),
        ));
    }
    let info = &csr.certification_request_info;

    let spki = &info.subject_pki;
    if spki.algorithm.algorithm != OID_SIG_ED25519 {
        return Err(PkiError::CsrKeyNotEd25519(key_kind(spki)));
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| PkiError::CsrMalformed("the ed25519 key is not 32 bytes".to_owned()))?;
    let public = ed25519_dalek::VerifyingKey::from_bytes(&raw).map_err(|_| {
        PkiError::CsrMalformed("the ed25519 key is not a valid curve point".to_owned())
    })?;

    // Proof of possession: only the holder of the host key can have signed this request.
    if csr.signature_algorithm.algorithm != OID_SIG_ED25519 {
        return Err(PkiError::CsrSignature);
    }
    let signature = ed25519_dalek::Signature::from_slice(&csr.signature_value.data)
        .map_err(|_| PkiError::CsrSignature)?;
    // Strict: no malleable signatures and no small-order keys.
    public
        .verify_strict(info.raw, &signature)
        .map_err(|_| PkiError::CsrSignature)?;

    let names: Vec<_> = info.subject.iter_common_name().collect();
    let [name] = names.as_slice() else {
        return Err(PkiError::CsrCommonName(names.len()));
    };
    let common_name = name
        .as_str()
        .map_err(|_| PkiError::CsrMalformed("the common name is not a text string".to_owned()))?;
    if common_name != expected.hostname {
        return Err(PkiError::CsrHostnameMismatch {
            expected: expected.hostname.clone(),
            found: common_name.to_owned(),
        });
    }

    let ssh_fingerprint = ssh_fingerprint_of(&PublicKey::Ed25519(public)).map_err(PkiError::Key)?;
    if let Some(want) = &expected.ssh_fingerprint {
        if want.trim() != ssh_fingerprint {
            return Err(PkiError::CsrFingerprintMismatch {
                expected: want.trim().to_owned(),
                found: ssh_fingerprint,
            });
        }
    }
    Ok(CheckedCsr {
        public,
        ssh_fingerprint,
    })
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        "an ECDSA key".to_owned()
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        "an RSA key".to_owned()
    } else {
        format!("a key of algorithm {oid}")
    }
}
