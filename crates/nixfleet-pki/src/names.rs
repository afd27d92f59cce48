//! Names that end up inside certificates: hostnames, operator names and the role URIs.

use crate::PkiError;

/// URI SAN prefix of a host certificate: `urn:nixfleet:host:<hostname>`.
pub const HOST_ROLE_URI_PREFIX: &str = "urn:nixfleet:host:";
/// URI SAN prefix of an operator certificate: `urn:nixfleet:operator:<name>`.
pub const OPERATOR_ROLE_URI_PREFIX: &str = "urn:nixfleet:operator:";
/// Every role URI starts with this; anything else under it is an unknown role.
pub(crate) const ROLE_URI_NAMESPACE: &str = "urn:nixfleet:";

const HOSTNAME_MAX: usize = 253;
const OPERATOR_NAME_MAX: usize = 128;

/// A hostname as fleet.resolved names it: 1..=253 characters of `[a-z0-9.-]`.
///
/// Lowercase only, so that `Web-01` and `web-01` can never be two identities, and no `:`,
/// so that a hostname can never extend a role URI into another role.
pub fn validate_hostname(hostname: &str) -> Result<(), PkiError> {
    let invalid = |reason| PkiError::InvalidHostname {
        hostname: hostname.to_owned(),
        reason,
    };
    if hostname.is_empty() {
        return Err(invalid("it is empty"));
    }
    if hostname.len() > HOSTNAME_MAX {
        return Err(invalid("it is longer than 253 characters"));
    }
    if hostname.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("it has uppercase letters"));
    }
    if !hostname
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(invalid(
            "it has a character other than a-z, 0-9, '.' or '-'",
        ));
    }
    Ok(())
}

/// An operator name: 1..=128 characters of `[a-z0-9._@-]` (so `alice` or `alice@example.org`).
pub fn validate_operator_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= OPERATOR_NAME_MAX
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'@' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidOperatorName(name.to_owned()))
    }
}

pub(crate) fn host_role_uri(hostname: &str) -> String {
    format!("{HOST_ROLE_URI_PREFIX}{hostname}")
}

pub(crate) fn operator_role_uri(name: &str) -> String {
    format!("{OPERATOR_ROLE_URI_PREFIX}{name}")
}
