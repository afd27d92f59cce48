//! Who is calling: the role in a client certificate that rustls has already verified
//! against the fleet CA. The control plane authorises each route from this.

use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use nixfleet_trust::keys::{ssh_fingerprint_of, PublicKey};

use crate::ca::{serial_hex, ENROLLED_AT_OID};
use crate::names::{
    validate_hostname, validate_operator_name, HOST_ROLE_URI_PREFIX, OPERATOR_ROLE_URI_PREFIX,
    ROLE_URI_NAMESPACE,
};
use crate::PkiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An enrolled host; may call the agent routes for this hostname only.
    Host { hostname: String },
    /// An operator; may call the operator routes.
    Operator { name: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub role: Role,
    /// Lowercase hex, leading zero bytes dropped (as in [`crate::IssuedCert`]).
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// When the host enrolled: carried by renewals, so revocation cut-offs compare
    /// against it. `not_before` for certificates issued before the extension existed.
    pub enrolled_at: OffsetDateTime,
    /// `SHA256:…` OpenSSH fingerprint of the certified ed25519 key, when it is one.
    pub ssh_fingerprint: Option<String>,
}

/// The enrollment time in [`ENROLLED_AT_OID`]'s value: a DER UTF8String, RFC 3339.
fn enrolled_at_of(value: &[u8]) -> Option<OffsetDateTime> {
    let (&tag, rest) = value.split_first()?;
    let (&len, text) = rest.split_first()?;
    if tag != 0x0c || usize::from(len) != text.len() || len >= 0x80 {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

impl ClientIdentity {
    /// Reads the role from a client certificate (DER, e.g. rustls' `peer_certificates()[0]`).
    ///
    /// This does not verify the certificate: call it only on a certificate that rustls
    /// verified against the fleet CA. It requires exactly one `urn:nixfleet:` URI SAN, and
    /// a host certificate's only common name must be its hostname.
    pub fn from_der(cert_der: &[u8]) -> Result<ClientIdentity, PkiError> {
        let (_, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| PkiError::CertificateMalformed(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| PkiError::CertificateMalformed(e.to_string()))?;
        // Case-insensitive, as URN namespaces are: "URN:NIXFLEET:…" counts as a role too,
        // so it cannot slip past the one-role rule.
        let role_uris: Vec<&str> = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| {
                uri.get(..ROLE_URI_NAMESPACE.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(ROLE_URI_NAMESPACE))
            })
            .collect();
        let uri = match role_uris.as_slice() {
            [] => return Err(PkiError::NoRole),
            [uri] => *uri,
            many => return Err(PkiError::AmbiguousRole(many.len())),
        };

        let role = if let Some(hostname) = uri.strip_prefix(HOST_ROLE_URI_PREFIX) {
            validate_hostname(hostname)?;
            let names: Vec<&str> = cert
                .subject()
                .iter_common_name()
                .map(|cn| cn.as_str().unwrap_or(""))
                .collect();
            if names.as_slice() != [hostname] {
                return Err(PkiError::HostCommonNameMismatch {
                    hostname: hostname.to_owned(),
                    common_name: names.join(", "),
                });
            }
            Role::Host {
                hostname: hostname.to_owned(),
            }
        } else if let Some(name) = uri.strip_prefix(OPERATOR_ROLE_URI_PREFIX) {
            validate_operator_name(name)?;
            Role::Operator {
                name: name.to_owned(),
            }
        } else {
            return Err(PkiError::UnknownRole(uri.to_owned()));
        };

        let not_before = cert.validity().not_before.to_datetime();
        let enrolled_at = cert
            .extensions()
            .iter()
            .find(|ext| {
                ext.oid
                    .iter()
                    .is_some_and(|arcs| arcs.eq(ENROLLED_AT_OID.iter().copied()))
            })
            .and_then(|ext| enrolled_at_of(ext.value))
            .map_or(not_before, |t| t.min(not_before));
        let spki = cert.public_key();
        let ssh_fingerprint = (spki.algorithm.algorithm.to_id_string() == "1.3.101.112")
            .then(|| <[u8; 32]>::try_from(spki.subject_public_key.data.as_ref()).ok())
            .flatten()
            .and_then(|raw| ed25519_dalek::VerifyingKey::from_bytes(&raw).ok())
            .and_then(|key| ssh_fingerprint_of(&PublicKey::Ed25519(key)).ok());
        Ok(ClientIdentity {
            role,
            serial_hex: serial_hex(cert.raw_serial()),
            not_before,
            not_after: cert.validity().not_after.to_datetime(),
            enrolled_at,
            ssh_fingerprint,
        })
    }

    /// The hostname of a host certificate; `None` for an operator.
    pub fn hostname(&self) -> Option<&str> {
        match &self.role {
            Role::Host { hostname } => Some(hostname),
            Role::Operator { .. } => None,
        }
    }

    /// The operator name of an operator certificate; `None` for a host.
    pub fn operator_name(&self) -> Option<&str> {
        match &self.role {
            Role::Operator { name } => Some(name),
            Role::Host { .. } => None,
        }
    }

    /// Whether a revocations.json entry `{hostname, notBefore}` refuses this certificate:
    /// it is a host certificate for that hostname whose enrollment (carried by renewals)
    /// is strictly earlier. A certificate from a later enrollment with a new token stays
    /// valid; one renewed after the cut-off from an earlier enrollment does not.
    pub fn is_revoked_by(&self, hostname: &str, revoked_not_before: OffsetDateTime) -> bool {
        self.hostname() == Some(hostname)
            && self.enrolled_at.min(self.not_before) < revoked_not_before
    }
}
