//! Keys and raw signatures (SPEC: a signature is raw 64 bytes, ed25519 `R‖S` or P-256 `r‖s`).
//!
//! Private keys load from PKCS#8 PEM (ed25519 or P-256, as `openssl genpkey` writes them),
//! SEC1 P-256 PEM, or unencrypted OpenSSH ed25519 keys (host keys). Public keys are the
//! base64 forms pinned in trust.json.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use nixfleet_proto::{Algorithm, PublicKeyEntry};
use p256::ecdsa::signature::Verifier as _;
use p256::pkcs8::der::pem::LineEnding;
use p256::pkcs8::{EncodePrivateKey as _, ObjectIdentifier, PrivateKeyInfo, SecretDocument};
use rand_core::OsRng;
use ssh_key::public::{Ed25519PublicKey, KeyData};
use ssh_key::HashAlg;
use thiserror::Error;

/// Length of every nixfleet signature.
pub const SIGNATURE_LEN: usize = 64;

const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("private key text has no \"-----BEGIN ...-----\" line; pass the contents of a PEM or OpenSSH key file")]
    NotPem,
    #[error("private key of PEM type {0:?} is not supported; use a PKCS#8 (\"PRIVATE KEY\") ed25519 or P-256 key, or an OpenSSH ed25519 key")]
    UnsupportedPemLabel(String),
    #[error("private key is an encrypted OpenSSH key; nixfleet needs an unencrypted key (the host key /etc/ssh/ssh_host_ed25519_key is unencrypted)")]
    EncryptedOpenSsh,
    #[error("private key is an encrypted PEM key; nixfleet needs an unencrypted key (decrypt it with `openssl pkey -in KEY -out PLAIN.pem`)")]
    EncryptedPem,
    #[error(
        "private key algorithm {0} is not supported; nixfleet signs with ed25519 or ECDSA P-256"
    )]
    UnsupportedAlgorithm(String),
    #[error("private key could not be decoded ({0}); check that the key file is complete and uncorrupted")]
    InvalidPrivateKey(String),
    #[error("OpenSSH key could not be parsed ({0}); check that it is a complete key file or `ssh-ed25519 AAAA...` line")]
    OpenSsh(String),
    #[error("OpenSSH key type {0} is not supported; nixfleet uses ssh-ed25519 keys such as /etc/ssh/ssh_host_ed25519_key")]
    UnsupportedSshKeyType(String),
    #[error("{0} keys have no OpenSSH form in nixfleet; only ed25519 keys map to ssh-ed25519")]
    NotSshKeyAlgorithm(Algorithm),
    #[error(
        "{algorithm} public key is not valid base64 (standard alphabet, with padding): {reason}"
    )]
    PublicKeyBase64 {
        algorithm: Algorithm,
        reason: String,
    },
    #[error("{algorithm} public key is {len} bytes; expected {expected}")]
    PublicKeyLength {
        algorithm: Algorithm,
        len: usize,
        expected: &'static str,
    },
    #[error("{algorithm} public key bytes are not a valid curve point; check that the pinned key was copied intact")]
    InvalidPublicKey { algorithm: Algorithm },
    #[error("ed25519 public key is a small-order point that would accept forged signatures; pin the real key")]
    WeakPublicKey,
    #[error("could not encode the private key as PKCS#8 PEM: {0}")]
    Encode(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("signature is {0} bytes; nixfleet signatures are raw 64 bytes (ed25519 R||S or P-256 r||s), so check it is not DER or still base64-encoded")]
    Length(usize),
    #[error(
        "signature is not a valid P-256 r||s pair (r or s is zero or not below the group order)"
    )]
    Malformed,
    #[error("signature does not verify with this {0} public key; the data was altered or signed by a different key")]
    Invalid(Algorithm),
}

/// A signing key.
#[derive(Clone)]
pub enum PrivateKey {
    Ed25519(ed25519_dalek::SigningKey),
    EcdsaP256(p256::ecdsa::SigningKey),
}

// Hand-written so secret material can never reach a log through `{:?}`.
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm())
            .field("public", &self.public_key().to_base64())
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// A fresh key from the OS RNG.
    pub fn generate(algorithm: Algorithm) -> PrivateKey {
        match algorithm {
            Algorithm::Ed25519 => {
                PrivateKey::Ed25519(ed25519_dalek::SigningKey::generate(&mut OsRng))
            }
            Algorithm::EcdsaP256 => {
                PrivateKey::EcdsaP256(p256::ecdsa::SigningKey::random(&mut OsRng))
            }
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            PrivateKey::Ed25519(_) => Algorithm::Ed25519,
            PrivateKey::EcdsaP256(_) => Algorithm::EcdsaP256,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            PrivateKey::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
            PrivateKey::EcdsaP256(k) => PublicKey::EcdsaP256(*k.verifying_key()),
        }
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), readable by `openssl pkey`.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let pem = match self {
            // PKCS#8 v1 without the optional public key: OpenSSL 3.0 cannot read the v2 form
            // that ed25519-dalek writes by default.
            PrivateKey::Ed25519(k) => ed25519_dalek::pkcs8::KeypairBytes {
                secret_key: k.to_bytes(),
                public_key: None,
            }
            .to_pkcs8_pem(LineEnding::LF),
            PrivateKey::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok(pem.as_str().to_owned())
    }

    /// Loads an unencrypted private key: PKCS#8 PEM (ed25519 or P-256), SEC1 PEM
    /// (`EC PRIVATE KEY`, P-256) or OpenSSH (ed25519).
    pub fn from_pem(text: &str) -> Result<PrivateKey, KeyError> {
        let (label, block) = pem_block(text).ok_or(KeyError::NotPem)?;
        match label {
            "OPENSSH PRIVATE KEY" => from_openssh(block),
            "PRIVATE KEY" => from_pkcs8(block),
            "ENCRYPTED PRIVATE KEY" => Err(KeyError::EncryptedPem),
            "EC PRIVATE KEY" => {
                // Legacy OpenSSL encryption puts "Proc-Type: 4,ENCRYPTED" inside the block.
                if block.contains("ENCRYPTED") {
                    return Err(KeyError::EncryptedPem);
                }
                let secret = p256::SecretKey::from_sec1_pem(block)
                    .map_err(|e| KeyError::InvalidPrivateKey(format!("SEC1 P-256 key: {e}")))?;
                Ok(PrivateKey::EcdsaP256(secret.into()))
            }
            other => Err(KeyError::UnsupportedPemLabel(other.to_owned())),
        }
    }

    /// Raw 64-byte signature: ed25519 (pure) `R‖S`, or ECDSA P-256 with SHA-256 over `msg`,
    /// `r‖s` as two 32-byte big-endian integers.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        match self {
            PrivateKey::Ed25519(k) => k.sign(msg).to_bytes(),
            PrivateKey::EcdsaP256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(msg);
                let mut out = [0u8; SIGNATURE_LEN];
                out.copy_from_slice(&sig.to_bytes());
                out
            }
        }
    }
}

/// The first PEM block in `text`: its label and the text from BEGIN to the end of END.
fn pem_block(text: &str) -> Option<(&str, &str)> {
    const BEGIN: &str = "-----BEGIN ";
    let start = text.find(BEGIN)?;
    let rest = &text[start + BEGIN.len()..];
    let label = &rest[..rest.find("-----")?];
    let end_marker = format!("-----END {label}-----");
    let block = &text[start..];
    let block = match block.find(&end_marker) {
        Some(i) => &block[..i + end_marker.len()],
        // Let the decoder report the truncation.
        None => block,
    };
    Some((label, block))
}

fn from_pkcs8(block: &str) -> Result<PrivateKey, KeyError> {
    let (_, doc) = SecretDocument::from_pem(block)
        .map_err(|e| KeyError::InvalidPrivateKey(format!("PKCS#8 PEM: {e}")))?;
    let info: PrivateKeyInfo<'_> = doc
        .decode_msg()
        .map_err(|e| KeyError::InvalidPrivateKey(format!("PKCS#8: {e}")))?;
    let oid = info.algorithm.oid;
    if oid == OID_ED25519 {
        let key = ed25519_dalek::SigningKey::try_from(info)
            .map_err(|e| KeyError::InvalidPrivateKey(format!("ed25519 PKCS#8: {e}")))?;
        Ok(PrivateKey::Ed25519(key))
    } else if oid == OID_EC_PUBLIC_KEY {
        match info.algorithm.parameters_oid() {
            Ok(curve) if curve == OID_P256 => {}
            Ok(curve) => {
                return Err(KeyError::UnsupportedAlgorithm(format!(
                    "EC on curve {curve}"
                )))
            }
            Err(e) => return Err(KeyError::InvalidPrivateKey(format!("EC curve: {e}"))),
        }
        let secret = p256::SecretKey::try_from(info)
            .map_err(|e| KeyError::InvalidPrivateKey(format!("P-256 PKCS#8: {e}")))?;
        Ok(PrivateKey::EcdsaP256(secret.into()))
    } else {
        Err(KeyError::UnsupportedAlgorithm(format!("OID {oid}")))
    }
}

fn from_openssh(block: &str) -> Result<PrivateKey, KeyError> {
    let key =
        ssh_key::PrivateKey::from_openssh(block).map_err(|e| KeyError::OpenSsh(e.to_string()))?;
    if key.is_encrypted() {
        return Err(KeyError::EncryptedOpenSsh);
    }
    match key.key_data() {
        ssh_key::private::KeypairData::Ed25519(pair) => {
            let signing = ed25519_dalek::SigningKey::from_bytes(&pair.private.to_bytes());
            // The file stores the public half separately; a mismatch means corruption.
            if signing.verifying_key().as_bytes() != &pair.public.0 {
                return Err(KeyError::InvalidPrivateKey(
                    "OpenSSH ed25519 key: public half does not match the private key".to_owned(),
                ));
            }
            Ok(PrivateKey::Ed25519(signing))
        }
        other => Err(KeyError::UnsupportedSshKeyType(match other.algorithm() {
            Ok(alg) => alg.to_string(),
            Err(_) => "unknown".to_owned(),
        })),
    }
}

/// A verifying key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    EcdsaP256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    pub fn from_entry(entry: &PublicKeyEntry) -> Result<PublicKey, KeyError> {
        PublicKey::from_base64(entry.algorithm, &entry.public)
    }

    /// ed25519: raw 32 bytes. P-256: SEC1 point, uncompressed (65 bytes), compressed (33)
    /// or bare `X‖Y` (64). Standard base64 with padding.
    pub fn from_base64(algorithm: Algorithm, text: &str) -> Result<PublicKey, KeyError> {
        let bytes = STANDARD
            .decode(text)
            .map_err(|e| KeyError::PublicKeyBase64 {
                algorithm,
                reason: e.to_string(),
            })?;
        match algorithm {
            Algorithm::Ed25519 => {
                let raw: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| KeyError::PublicKeyLength {
                            algorithm,
                            len: bytes.len(),
                            expected: "32 (raw ed25519 key)",
                        })?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
                    .map_err(|_| KeyError::InvalidPublicKey { algorithm })?;
                if key.is_weak() {
                    return Err(KeyError::WeakPublicKey);
                }
                Ok(PublicKey::Ed25519(key))
            }
            Algorithm::EcdsaP256 => {
                let sec1 = match bytes.len() {
                    33 | 65 => bytes,
                    64 => {
                        let mut v = Vec::with_capacity(65);
                        v.push(0x04);
                        v.extend_from_slice(&bytes);
                        v
                    }
                    len => {
                        return Err(KeyError::PublicKeyLength {
                            algorithm,
                            len,
                            expected: "65 (SEC1 uncompressed), 33 (SEC1 compressed) or 64 (X||Y)",
                        })
                    }
                };
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map_err(|_| KeyError::InvalidPublicKey { algorithm })?;
                Ok(PublicKey::EcdsaP256(key))
            }
        }
    }

    /// ed25519: raw 32 bytes; P-256: uncompressed 65-byte SEC1 point. Standard base64, padded.
    pub fn to_base64(&self) -> String {
        match self {
            PublicKey::Ed25519(k) => STANDARD.encode(k.as_bytes()),
            PublicKey::EcdsaP256(k) => STANDARD.encode(k.to_encoded_point(false).as_bytes()),
        }
    }

    pub fn to_entry(&self) -> PublicKeyEntry {
        PublicKeyEntry {
            algorithm: self.algorithm(),
            public: self.to_base64(),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Ed25519(_) => Algorithm::Ed25519,
            PublicKey::EcdsaP256(_) => Algorithm::EcdsaP256,
        }
    }

    /// Checks a raw 64-byte signature over `msg`. ed25519 uses strict verification
    /// (no malleable or small-order encodings). P-256 accepts high-S signatures, which
    /// some TPMs emit, by normalising S first.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        let raw: &[u8; SIGNATURE_LEN] = sig
            .try_into()
            .map_err(|_| SignatureError::Length(sig.len()))?;
        match self {
            PublicKey::Ed25519(k) => {
                let sig = ed25519_dalek::Signature::from_bytes(raw);
                k.verify_strict(msg, &sig)
                    .map_err(|_| SignatureError::Invalid(Algorithm::Ed25519))
            }
            PublicKey::EcdsaP256(k) => {
                let sig = p256::ecdsa::Signature::from_slice(raw)
                    .map_err(|_| SignatureError::Malformed)?;
                let sig = sig.normalize_s().unwrap_or(sig);
                k.verify(msg, &sig)
                    .map_err(|_| SignatureError::Invalid(Algorithm::EcdsaP256))
            }
        }
    }
}

/// Converts a DER-encoded ECDSA P-256 signature (what `openssl pkeyutl` and many HSMs emit)
/// to the raw r‖s form nixfleet stores.
pub fn p256_der_to_raw(der: &[u8]) -> Result<[u8; SIGNATURE_LEN], SignatureError> {
    let sig = p256::ecdsa::Signature::from_der(der).map_err(|_| SignatureError::Malformed)?;
    let mut raw = [0u8; SIGNATURE_LEN];
    raw.copy_from_slice(&sig.to_bytes());
    Ok(raw)
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA... comment`); other key types are refused.
pub fn parse_ssh_ed25519_public(line: &str) -> Result<PublicKey, KeyError> {
    let key = parse_ssh_public(line)?;
    match key.key_data() {
        KeyData::Ed25519(pk) => {
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk.0).map_err(|_| {
                KeyError::InvalidPublicKey {
                    algorithm: Algorithm::Ed25519,
                }
            })?;
            if vk.is_weak() {
                return Err(KeyError::WeakPublicKey);
            }
            Ok(PublicKey::Ed25519(vk))
        }
        other => Err(KeyError::UnsupportedSshKeyType(
            other.algorithm().to_string(),
        )),
    }
}

/// `SHA256:<unpadded base64>` fingerprint of an OpenSSH public key line, as `ssh-keygen -lf` prints it.
pub fn ssh_fingerprint(line: &str) -> Result<String, KeyError> {
    Ok(parse_ssh_public(line)?
        .fingerprint(HashAlg::Sha256)
        .to_string())
}

/// The OpenSSH `SHA256:` fingerprint of an ed25519 key.
pub fn ssh_fingerprint_of(key: &PublicKey) -> Result<String, KeyError> {
    Ok(ssh_public(key, "")?
        .fingerprint(HashAlg::Sha256)
        .to_string())
}

/// `ssh-ed25519 AAAA... comment` for an ed25519 key (comment omitted when empty).
pub fn to_ssh_public_line(key: &PublicKey, comment: &str) -> Result<String, KeyError> {
    ssh_public(key, comment)?
        .to_openssh()
        .map_err(|e| KeyError::OpenSsh(e.to_string()))
}

fn parse_ssh_public(line: &str) -> Result<ssh_key::PublicKey, KeyError> {
    ssh_key::PublicKey::from_openssh(line.trim()).map_err(|e| KeyError::OpenSsh(e.to_string()))
}

fn ssh_public(key: &PublicKey, comment: &str) -> Result<ssh_key::PublicKey, KeyError> {
    match key {
        PublicKey::Ed25519(k) => Ok(ssh_key::PublicKey::new(
            KeyData::Ed25519(Ed25519PublicKey(k.to_bytes())),
            comment,
        )),
        PublicKey::EcdsaP256(_) => Err(KeyError::NotSshKeyAlgorithm(Algorithm::EcdsaP256)),
    }
}
