//! The fleet CA and the three kinds of certificate it issues.
//!
//! | kind | subject | role URI SAN | other SANs | EKU |
//! |---|---|---|---|---|
//! | CA | CN = common name | none | none | none; CA:TRUE, pathlen 0, keyCertSign + cRLSign |
//! | host | CN = hostname | `urn:nixfleet:host:<hostname>` | none | clientAuth |
//! | operator | CN = name | `urn:nixfleet:operator:<name>` | none | clientAuth |
//! | server | CN = first SAN | none | DNS names and IPs | serverAuth |
//!
//! Every certificate is built from scratch here: nothing a CSR asks for besides its public
//! key and its common name reaches a certificate, so a host cannot obtain the operator role.

use std::fmt;
use std::net::IpAddr;

use nixfleet_proto::Algorithm;
use nixfleet_trust::keys::{PrivateKey, PublicKey};
use p256::pkcs8::der::pem::LineEnding;
use rand_core::{OsRng, RngCore as _};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm, SigningKey,
};
use rustls_pki_types::{CertificateDer, DnsName};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
use x509_parser::prelude::{FromDer as _, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::csr::{check_host_csr, HostExpectation};
use crate::names::{host_role_uri, operator_role_uri, validate_operator_name};
use crate::pem::first_certificate;
use crate::PkiError;

/// Serial numbers are 16 random bytes: unguessable, and well under RFC 5280's 20-octet cap.
const SERIAL_LEN: usize = 16;
/// X.520 upper bound for a common name.
const COMMON_NAME_MAX: usize = 64;

/// A host certificate as issued at enrollment or renewal: what the control plane returns
/// and writes to its audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    /// Lowercase hex of the serial number, without leading zero bytes.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// `SHA256:…` OpenSSH fingerprint of the certified key (the host SSH key).
    pub ssh_fingerprint: String,
}

/// The fleet CA, loaded from its certificate and private key.
pub struct FleetCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeySigner>,
}

// Hand-written so the CA key can never reach a log through `{:?}`.
impl fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl FleetCa {
    /// Loads the CA from `fleet-ca-cert.pem` and `fleet-ca-key.pem` contents. The key may be
    /// PKCS#8 or SEC1 PEM, ECDSA P-256 (what [`generate_ca`] makes) or ed25519. The first
    /// certificate in `cert_pem` is the CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<FleetCa, PkiError> {
        let der = first_certificate(cert_pem).map_err(PkiError::CaCertificate)?;
        let (rest, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| PkiError::CaCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::CaCertificate(
                "trailing bytes after the certificate".to_owned(),
            ));
        }
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        // keyUsage is optional in a CA certificate, but when present it must allow signing.
        let may_sign = match cert.key_usage() {
            Ok(Some(ku)) => ku.value.key_cert_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        if !is_ca || !may_sign {
            return Err(PkiError::NotACa);
        }
        let key = PrivateKey::from_pem(key_pem).map_err(PkiError::CaKey)?;
        if public_key_of(cert.public_key()) != Some(key.public_key()) {
            return Err(PkiError::CaKeyMismatch);
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der, KeySigner::new(key))
            .map_err(|e| PkiError::CaCertificate(e.to_string()))?;
        Ok(FleetCa {
            cert_pem: to_pem(der.as_ref())?,
            cert_der: der,
            not_after,
            issuer,
        })
    }

    /// The CA certificate alone, as PEM: the enroll response's `caPem` and clients' `--cacert`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        self.cert_der.as_ref()
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// notBefore = `now` (whole seconds), notAfter = `now + validity`, cut at the CA's own
    /// expiry: a certificate cannot outlive the CA that vouches for it. No backdating, so a
    /// certificate issued after a revocation entry's `notBefore` is never caught by it.
    fn window(
        &self,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
        let (not_before, not_after) = window(now, validity)?;
        if not_before >= self.not_after {
            return Err(PkiError::CaExpired {
                not_after: rfc3339(self.not_after),
            });
        }
        Ok((not_before, not_after.min(self.not_after)))
    }
}

/// Creates a fleet CA: a new ECDSA P-256 key and a self-signed certificate with
/// basicConstraints CA:TRUE, pathlen 0 (it signs only end-entity certificates) and keyUsage
/// keyCertSign + cRLSign. Returns `(cert_pem, key_pem)`; the key is PKCS#8 PEM.
pub fn generate_ca(
    common_name: &str,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(String, String), PkiError> {
    if common_name.is_empty()
        || common_name.chars().count() > COMMON_NAME_MAX
        || common_name.chars().any(char::is_control)
    {
        return Err(PkiError::InvalidCommonName(common_name.to_owned()));
    }
    let (not_before, not_after) = window(now, validity)?;
    let key = PrivateKey::generate(Algorithm::EcdsaP256);
    let key_pem = key.to_pkcs8_pem().map_err(PkiError::Key)?;
    let signer = KeySigner::new(key);

    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&signer).map_err(generate_error)?;
    Ok((cert.pem(), key_pem))
}

/// Issues the control plane's TLS server certificate for `sans` (DNS names or IP
/// addresses; nothing is added implicitly) with a new P-256 key. Returns
/// `(cert_pem, key_pem)`; the key is PKCS#8 PEM.
pub fn issue_server_cert(
    ca: &FleetCa,
    sans: &[String],
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(String, String), PkiError> {
    let names = sans
        .iter()
        .map(|san| server_san(san))
        .collect::<Result<Vec<_>, _>>()?;
    let first = sans.first().ok_or(PkiError::NoServerSans)?;
    let key = PrivateKey::generate(Algorithm::EcdsaP256);
    let key_pem = key.to_pkcs8_pem().map_err(PkiError::Key)?;
    let params = leaf_params(
        ca,
        first.trim(),
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        now,
        validity,
    )?;
    let cert = params
        .signed_by(&KeySigner::new(key), &ca.issuer)
        .map_err(generate_error)?;
    Ok((cert.pem(), key_pem))
}

/// Issues an operator client certificate (role `urn:nixfleet:operator:<name>`) with a new
/// P-256 key. Returns `(cert_pem, key_pem)`; the key is PKCS#8 PEM.
pub fn issue_operator_cert(
    ca: &FleetCa,
    name: &str,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(String, String), PkiError> {
    validate_operator_name(name)?;
    let key = PrivateKey::generate(Algorithm::EcdsaP256);
    let key_pem = key.to_pkcs8_pem().map_err(PkiError::Key)?;
    let params = leaf_params(
        ca,
        name,
        vec![SanType::URI(ia5(operator_role_uri(name))?)],
        ExtendedKeyUsagePurpose::ClientAuth,
        now,
        validity,
    )?;
    let cert = params
        .signed_by(&KeySigner::new(key), &ca.issuer)
        .map_err(generate_error)?;
    Ok((cert.pem(), key_pem))
}

/// Issues a host client certificate from the agent's CSR, after checking it: the CSR is
/// signed by its own key, that key is ed25519, the hostname is valid, the CSR's common name
/// is `expected.hostname`, and (when given) the key's OpenSSH fingerprint is
/// `expected.ssh_fingerprint`. Only the CSR's public key is used; every extension it
/// requests is ignored.
pub fn issue_host_cert(
    ca: &FleetCa,
    csr_pem: &str,
    expected: &HostExpectation,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<IssuedCert, PkiError> {
    host_cert(ca, csr_pem, expected, now, now, validity)
}

/// A host certificate issued by renewal: like [`issue_host_cert`], but it carries
/// `enrolled_at`, the enrollment time of the certificate it renews, so that a revocation
/// cut-off after that enrollment covers it too (renewing cannot outrun a revocation).
pub fn renew_host_cert(
    ca: &FleetCa,
    csr_pem: &str,
    expected: &HostExpectation,
    enrolled_at: OffsetDateTime,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<IssuedCert, PkiError> {
    host_cert(ca, csr_pem, expected, enrolled_at.min(now), now, validity)
}

/// nixfleet's own non-critical extension on host certificates: the time the host
/// enrolled (a DER UTF8String, RFC 3339), carried across renewals.
pub const ENROLLED_AT_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59999, 1, 1];

fn host_cert(
    ca: &FleetCa,
    csr_pem: &str,
    expected: &HostExpectation,
    enrolled_at: OffsetDateTime,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<IssuedCert, PkiError> {
    let csr = check_host_csr(csr_pem, expected)?;
    let mut params = leaf_params(
        ca,
        &expected.hostname,
        vec![SanType::URI(ia5(host_role_uri(&expected.hostname))?)],
        ExtendedKeyUsagePurpose::ClientAuth,
        now,
        validity,
    )?;
    let enrolled = enrolled_at
        .to_offset(UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(enrolled_at);
    let text = rfc3339(enrolled);
    let mut content = vec![0x0c, u8::try_from(text.len()).unwrap_or(u8::MAX)];
    content.extend_from_slice(text.as_bytes());
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            ENROLLED_AT_OID,
            content,
        ));
    let cert = params
        .signed_by(&Ed25519Public(csr.public.to_bytes()), &ca.issuer)
        .map_err(generate_error)?;
    let (serial_hex, not_before, not_after) = serial_and_validity(cert.der().as_ref())?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        serial_hex,
        not_before,
        not_after,
        ssh_fingerprint: csr.ssh_fingerprint,
    })
}

fn leaf_params(
    ca: &FleetCa,
    common_name: &str,
    subject_alt_names: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    now: OffsetDateTime,
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    let (not_before, not_after) = ca.window(now, validity)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(common_name);
    params.subject_alt_names = subject_alt_names;
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    // CA:FALSE stated explicitly, so no verifier can take a leaf for a CA.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    // Lets openssl and webpki pick the right CA certificate during a CA rotation.
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn window(
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    let now = now.to_offset(UtcOffset::UTC);
    // X.509 times have whole seconds; truncating here keeps IssuedCert equal to the cert.
    let not_before = now.replace_nanosecond(0).unwrap_or(now);
    let not_after = (validity > Duration::ZERO)
        .then(|| not_before.checked_add(validity))
        .flatten()
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| PkiError::InvalidValidity(validity.to_string()))?;
    Ok((not_before, not_after))
}

fn server_san(san: &str) -> Result<SanType, PkiError> {
    let san = san.trim();
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // The same check rustls applies to the name a client connects to.
    if DnsName::try_from(san).is_err() {
        return Err(PkiError::InvalidSan(san.to_owned()));
    }
    Ok(SanType::DnsName(ia5(san.to_ascii_lowercase())?))
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(text: String) -> Result<Ia5String, PkiError> {
    Ia5String::try_from(text).map_err(|e| PkiError::Generate(e.to_string()))
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; SERIAL_LEN];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| PkiError::Generate(format!("the OS random number generator failed: {e}")))?;
    // Positive (top bit clear) and a non-zero first byte, so DER keeps all 16 octets.
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn generate_error(e: rcgen::Error) -> PkiError {
    PkiError::Generate(e.to_string())
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub(crate) fn to_pem(der: &[u8]) -> Result<String, PkiError> {
    p256::pkcs8::der::pem::encode_string("CERTIFICATE", LineEnding::LF, der)
        .map_err(|e| PkiError::Generate(e.to_string()))
}

/// The serial (lowercase hex, leading zero bytes dropped) and validity of a certificate.
pub(crate) fn serial_and_validity(
    der: &[u8],
) -> Result<(String, OffsetDateTime, OffsetDateTime), PkiError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| PkiError::CertificateMalformed(e.to_string()))?;
    Ok((
        serial_hex(cert.raw_serial()),
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    ))
}

pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

/// The nixfleet key type of a certificate's subject key, if it is ed25519 or P-256.
fn public_key_of(spki: &SubjectPublicKeyInfo<'_>) -> Option<PublicKey> {
    let oid = &spki.algorithm.algorithm;
    let bits: &[u8] = &spki.subject_public_key.data;
    if *oid == OID_SIG_ED25519 {
        let raw: [u8; 32] = bits.try_into().ok()?;
        ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .ok()
            .map(PublicKey::Ed25519)
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
        if curve != OID_EC_P256 {
            return None;
        }
        p256::ecdsa::VerifyingKey::from_sec1_bytes(bits)
            .ok()
            .map(PublicKey::EcdsaP256)
    } else {
        None
    }
}

/// A nixfleet private key as an rcgen signer, so that CA, server, operator and host keys
/// all go through the same key type the rest of nixfleet loads and writes.
pub(crate) struct KeySigner {
    key: PrivateKey,
    /// The subjectPublicKey bits: raw 32 bytes (ed25519) or the uncompressed SEC1 point.
    public: Vec<u8>,
}

impl KeySigner {
    pub(crate) fn new(key: PrivateKey) -> KeySigner {
        let public = match key.public_key() {
            PublicKey::Ed25519(k) => k.to_bytes().to_vec(),
            PublicKey::EcdsaP256(k) => k.to_encoded_point(false).as_bytes().to_vec(),
        };
        KeySigner { key, public }
    }
}

impl PublicKeyData for KeySigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self.key {
            PrivateKey::Ed25519(_) => &rcgen::PKCS_ED25519,
            PrivateKey::EcdsaP256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl SigningKey for KeySigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let raw = self.key.sign(msg);
        match self.key {
            PrivateKey::Ed25519(_) => Ok(raw.to_vec()),
            // X.509 carries ECDSA signatures DER-encoded; nixfleet keys sign raw r‖s.
            PrivateKey::EcdsaP256(_) => p256::ecdsa::Signature::from_slice(&raw)
                .map(|sig| sig.to_der().as_bytes().to_vec())
                .map_err(|_| rcgen::Error::RingUnspecified),
        }
    }
}

/// The host's ed25519 public key taken from its CSR.
struct Ed25519Public([u8; 32]);

impl PublicKeyData for Ed25519Public {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}
