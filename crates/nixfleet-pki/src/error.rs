//! The one error type of the crate. Each message is one sentence naming what is wrong and
//! what to do; callers add the file, flag or host it came from.

use nixfleet_trust::keys::KeyError;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PkiError {
    // --- the fleet CA itself ---
    #[error("fleet CA certificate could not be read ({0}); pass the fleet-ca-cert.pem that `nixfleet ca init` wrote")]
    CaCertificate(String),
    #[error("fleet CA certificate is not a CA certificate (it needs basicConstraints CA:TRUE and keyCertSign); pass the fleet-ca-cert.pem that `nixfleet ca init` wrote, not a server or client certificate")]
    NotACa,
    #[error("fleet CA key could not be loaded: {0}")]
    CaKey(KeyError),
    #[error("fleet CA key does not belong to the fleet CA certificate; pass the fleet-ca-key.pem that was created together with fleet-ca-cert.pem")]
    CaKeyMismatch,
    #[error("fleet CA certificate expired at {not_after}; create a new CA with `nixfleet ca init` and re-enroll the hosts")]
    CaExpired { not_after: String },

    // --- what the caller asked for ---
    #[error("certificate validity must be positive and end before the year 10000, got {0}; pass a validity such as 365 days")]
    InvalidValidity(String),
    #[error("CA common name {0:?} is not usable; pass 1 to 64 printable characters, e.g. \"nixfleet fleet CA\"")]
    InvalidCommonName(String),
    #[error("hostname {hostname:?} is not valid ({reason}); hostnames are 1 to 253 characters of a-z, 0-9, '.' and '-', as in fleet.resolved")]
    InvalidHostname {
        hostname: String,
        reason: &'static str,
    },
    #[error("operator name {0:?} is not valid; use 1 to 128 characters of a-z, 0-9, '.', '_', '@' and '-'")]
    InvalidOperatorName(String),
    #[error("a server certificate needs at least one subject alternative name; pass every DNS name and IP address that agents and operators use to reach the control plane")]
    NoServerSans,
    #[error("subject alternative name {0:?} is neither an IP address nor a valid DNS name; pass names such as cp.example.org, localhost or 127.0.0.1")]
    InvalidSan(String),

    // --- host CSR checks (the control plane maps these to 400/403) ---
    #[error("CSR is not a PEM certificate request ({0}); send the \"-----BEGIN CERTIFICATE REQUEST-----\" block that the agent built")]
    CsrPem(String),
    #[error("CSR could not be parsed ({0}); have the agent build a new one")]
    CsrMalformed(String),
    #[error("CSR key is {0}, but host certificates are issued only for the host's ed25519 SSH key (/etc/ssh/ssh_host_ed25519_key)")]
    CsrKeyNotEd25519(String),
    #[error("CSR signature does not verify with the CSR's own public key; the request was altered or built wrongly, so have the agent build a new one")]
    CsrSignature,
    #[error("CSR has {0} common names; it must have exactly one, the hostname")]
    CsrCommonName(usize),
    #[error("CSR common name {found:?} is not the expected hostname {expected:?}; a host can request a certificate only for its own name")]
    CsrHostnameMismatch { expected: String, found: String },
    #[error("CSR key has fingerprint {found}, but {expected} was expected; the request was not made with the host key that the token or fleet names")]
    CsrFingerprintMismatch { expected: String, found: String },

    // --- keys ---
    #[error("host CSRs are signed with the host's ed25519 SSH key, but a {0} key was given; use /etc/ssh/ssh_host_ed25519_key")]
    HostKeyNotEd25519(String),
    #[error("private key could not be used: {0}")]
    Key(KeyError),

    // --- client identities ---
    #[error(
        "client certificate could not be parsed ({0}); it was not issued by a nixfleet fleet CA"
    )]
    CertificateMalformed(String),
    #[error("client certificate carries no nixfleet role (no urn:nixfleet:host: or urn:nixfleet:operator: URI); issue host certificates through enrollment and operator certificates with `nixfleet cert operator`")]
    NoRole,
    #[error("client certificate carries {0} nixfleet role URIs where exactly one is allowed; refuse it and check how it was issued")]
    AmbiguousRole(usize),
    #[error("client certificate carries the unknown role URI {0:?}; only urn:nixfleet:host:<hostname> and urn:nixfleet:operator:<name> are recognised")]
    UnknownRole(String),
    #[error("host certificate for {hostname:?} has common name {common_name:?}; a fleet CA host certificate has the hostname as its only common name")]
    HostCommonNameMismatch {
        hostname: String,
        common_name: String,
    },

    // --- PEM inputs and TLS configuration ---
    #[error("{what} has no usable \"-----BEGIN CERTIFICATE-----\" block ({detail}); pass the PEM file that nixfleet wrote")]
    CertificatePem { what: &'static str, detail: String },
    #[error(
        "{what} has no usable private key ({detail}); pass an unencrypted PKCS#8 or SEC1 PEM key"
    )]
    PrivateKeyPem { what: &'static str, detail: String },
    #[error("TLS configuration could not be built ({0}); check that the certificate matches its key and was issued by the fleet CA")]
    Tls(String),
    #[error(
        "certificate could not be generated ({0}); this is a bug in nixfleet, please report it"
    )]
    Generate(String),
}
