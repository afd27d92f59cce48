//! The nixfleet fleet CA (SPEC.md §2, §5): certificate issuance, client identities and the
//! rustls configurations that the control plane, the agent and the operator CLI share.
//!
//! Pure library: no files, network or clock. Callers pass PEM text and `now` in; the only
//! outside input is the OS RNG, for new keys and serial numbers.
//!
//! Roles are carried by a URI subject alternative name that only the CA sets:
//! `urn:nixfleet:host:<hostname>` (CN = hostname) or `urn:nixfleet:operator:<name>`. A host
//! certificate is built from the CSR's public key and the expected hostname alone, so no
//! CSR can smuggle the operator role (or any other extension) into it.
//!
//! ```text
//! operator:  generate_ca → FleetCa::from_pem → issue_server_cert / issue_operator_cert
//! agent:     build_host_csr(hostname, host key) ─┐          client_tls_config(ca, cert+key)
//! CP:        issue_host_cert(ca, csr, expectation) ←┘       server_tls_config(cert, key, ca)
//!            ClientIdentity::from_der(peer cert) → Role::{Host, Operator} → authorise route
//! ```

mod ca;
mod csr;
mod error;
mod identity;
mod names;
mod pem;
mod tls;

pub use ca::{
    generate_ca, issue_host_cert, issue_operator_cert, issue_server_cert, renew_host_cert, FleetCa,
    IssuedCert, ENROLLED_AT_OID,
};
pub use csr::{build_host_csr, HostExpectation};
pub use error::PkiError;
pub use identity::{ClientIdentity, Role};
pub use names::{
    validate_hostname, validate_operator_name, HOST_ROLE_URI_PREFIX, OPERATOR_ROLE_URI_PREFIX,
};
pub use tls::{client_tls_config, crypto_provider, error_chain, server_tls_config};

// Re-exported so callers build and use these configs with the exact rustls version used here.
pub use rustls;
