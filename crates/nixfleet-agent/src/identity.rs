//! The host's identity: its SSH key (the TLS client key), enrollment with a bootstrap
//! token, and renewal at half of the certificate's lifetime.

use std::path::Path;

use nixfleet_proto::wire::{EnrollRequest, EnrollResponse, RenewRequest, RenewResponse};
use nixfleet_proto::BootstrapToken;
use nixfleet_trust::keys::{self, PrivateKey};
use time::OffsetDateTime;

use crate::client::{CpClient, NetError};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the host key {path}: {detail}; generate it with `ssh-keygen -t ed25519 -N '' -f {path}` or set --host-key")]
    HostKey { path: String, detail: String },
    #[error("cannot read the CA certificate {path}: {detail}; copy the fleet CA certificate there or set --ca-cert")]
    CaCert { path: String, detail: String },
    #[error("no certificate yet and no bootstrap token: mint one with `nixfleet mint-token` and pass it with --bootstrap-token-file")]
    NoToken,
    #[error("cannot read the bootstrap token {path}: {detail}")]
    TokenUnreadable { path: String, detail: String },
    #[error("bootstrap token {path} was already used to enroll; mint a new one with `nixfleet mint-token`")]
    TokenUsed { path: String },
    #[error("bootstrap token {path} is for host {token_host}, but this agent is {hostname}; mint one for {hostname} or fix --hostname")]
    TokenHost {
        path: String,
        token_host: String,
        hostname: String,
    },
    #[error("bootstrap token {path} expects host key {expected}, but {key} is {actual}; mint the token from this host's public key")]
    TokenKey {
        path: String,
        key: String,
        expected: String,
        actual: String,
    },
    #[error("cannot build a CSR for {hostname}: {detail}")]
    Csr { hostname: String, detail: String },
    #[error("{url} refused the {what} with {status}: {message}")]
    Refused {
        url: String,
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("{url} answered the {what} with something that is not a valid reply: {detail}")]
    BadReply {
        url: String,
        what: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The host key's signature over the canonical JSON (JCS) of `value`, base64 standard:
/// how reports and compliance evidence are signed, and how the control plane verifies
/// both.
pub fn sign_canonical<T: serde::Serialize>(
    key: &PrivateKey,
    value: &T,
) -> Result<String, nixfleet_trust::jcs::JcsError> {
    use base64::Engine as _;
    let canonical = nixfleet_trust::jcs::to_canonical(value)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(key.sign(&canonical)))
}

pub fn load_host_key(path: &Path) -> Result<PrivateKey, IdentityError> {
    let err = |detail: String| IdentityError::HostKey {
        path: path.display().to_string(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    PrivateKey::from_pem(&text).map_err(|e| err(e.to_string()))
}

pub fn load_ca(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|e| IdentityError::CaCert {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// notBefore and notAfter of a PEM certificate.
pub fn validity(cert_pem: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// Renewal is due from half of the lifetime on.
pub fn renewal_due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> bool {
    now >= not_before + (not_after - not_before) / 2
}

/// Reads and checks the bootstrap token against this host before sending it.
pub fn read_token(
    path: &Path,
    hostname: &str,
    key: &PrivateKey,
    key_path: &Path,
    used_nonce: Option<&str>,
) -> Result<BootstrapToken, IdentityError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| IdentityError::TokenUnreadable {
        path: name.clone(),
        detail: e.to_string(),
    })?;
    let token: BootstrapToken =
        serde_json::from_str(&text).map_err(|e| IdentityError::TokenUnreadable {
            path: name.clone(),
            detail: format!("not a bootstrap token: {e}"),
        })?;
    if used_nonce == Some(token.claims.nonce.as_str()) {
        return Err(IdentityError::TokenUsed { path: name });
    }
    if token.claims.hostname != hostname {
        return Err(IdentityError::TokenHost {
            path: name,
            token_host: token.claims.hostname,
            hostname: hostname.to_owned(),
        });
    }
    let actual =
        keys::ssh_fingerprint_of(&key.public_key()).map_err(|e| IdentityError::HostKey {
            path: key_path.display().to_string(),
            detail: e.to_string(),
        })?;
    if actual != token.claims.expected_pubkey_fingerprint {
        return Err(IdentityError::TokenKey {
            path: name,
            key: key_path.display().to_string(),
            expected: token.claims.expected_pubkey_fingerprint,
            actual,
        });
    }
    Ok(token)
}

fn csr(hostname: &str, key: &PrivateKey) -> Result<String, IdentityError> {
    nixfleet_pki::build_host_csr(hostname, key).map_err(|e| IdentityError::Csr {
        hostname: hostname.to_owned(),
        detail: e.to_string(),
    })
}

/// `POST /v1/enroll` with the token and a CSR (CN = hostname) signed by the host key.
pub async fn enroll(
    anonymous: &CpClient,
    hostname: &str,
    key: &PrivateKey,
    token: BootstrapToken,
) -> Result<EnrollResponse, IdentityError> {
    let request = EnrollRequest {
        token,
        csr_pem: csr(hostname, key)?,
    };
    let reply = anonymous.post("/v1/enroll", &request).await?;
    let url = anonymous.url("/v1/enroll");
    if reply.status != 200 {
        return Err(IdentityError::Refused {
            url,
            what: "enrollment",
            status: reply.status,
            message: reply.message(),
        });
    }
    serde_json::from_slice(&reply.body).map_err(|e| IdentityError::BadReply {
        url,
        what: "enrollment",
        detail: e.to_string(),
    })
}

/// `POST /v1/agent/renew` with a fresh CSR, authenticated by the current certificate.
pub async fn renew(
    client: &CpClient,
    hostname: &str,
    key: &PrivateKey,
) -> Result<RenewResponse, IdentityError> {
    let request = RenewRequest {
        csr_pem: csr(hostname, key)?,
    };
    let reply = client.post("/v1/agent/renew", &request).await?;
    let url = client.url("/v1/agent/renew");
    if reply.status != 200 {
        return Err(IdentityError::Refused {
            url,
            what: "renewal",
            status: reply.status,
            message: reply.message(),
        });
    }
    serde_json::from_slice(&reply.body).map_err(|e| IdentityError::BadReply {
        url,
        what: "renewal",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renewal_is_due_from_half_of_the_lifetime() {
        let nb = datetime!(2026-11-01 0:00 UTC);
        let na = datetime!(2026-12-01 0:00 UTC);
        assert!(!renewal_due(nb, na, datetime!(2026-11-15 23:59 UTC)));
        assert!(renewal_due(nb, na, datetime!(2026-11-16 0:00 UTC)));
        assert!(renewal_due(nb, na, datetime!(2026-12-02 0:00 UTC)));
    }
}
