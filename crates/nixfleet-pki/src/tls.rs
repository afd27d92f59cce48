//! rustls configurations for the control plane (server) and for agents and operator tools
//! (client), on the `ring` provider. They take PEM text; reading files is the caller's job.

use std::sync::Arc;

use nixfleet_trust::keys::PrivateKey;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::pem::{certificates, private_key};
use crate::PkiError;

/// Server-side session cache for TLS 1.2 session ids and TLS 1.3 stateful resumption;
/// stateless TLS 1.3 tickets carry the rest, so agents reconnecting after a poll interval
/// skip the full handshake.
const SESSION_CACHE_SIZE: usize = 4096;

/// The ring crypto provider every nixfleet TLS configuration uses. Pass the same provider
/// to anything else that builds rustls configs (HTTP clients) to avoid mixing providers.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The control plane's TLS server configuration.
///
/// - `server_cert_pem`: the server certificate, optionally followed by its chain;
/// - `server_key_pem`: its private key (PKCS#8, SEC1 or PKCS#1 PEM);
/// - `client_ca_pem`: the fleet CA certificate(s) that client certificates must chain to
///   (pass the old and the new CA during a CA rotation).
///
/// A client certificate is optional at the TLS layer (`/healthz` and `/v1/enroll` have
/// none); when one is presented it must verify, and each route then decides from
/// [`crate::ClientIdentity`]. ALPN offers h2 and http/1.1; session tickets and a session
/// cache are on.
pub fn server_tls_config(
    server_cert_pem: &str,
    server_key_pem: &str,
    client_ca_pem: &str,
) -> Result<ServerConfig, PkiError> {
    let provider = crypto_provider();
    let chain = certificates(server_cert_pem).map_err(|detail| PkiError::CertificatePem {
        what: "server certificate",
        detail,
    })?;
    let key = private_key(server_key_pem).map_err(|detail| PkiError::PrivateKeyPem {
        what: "server key",
        detail,
    })?;
    let roots = root_store("client CA certificate", client_ca_pem)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(tls_error)?;
    // An agent holds one connection at a time and gets a fresh ticket with every
    // resumption, so one ticket per handshake is enough (rustls sends two by default).
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// A client configuration that trusts only `ca_pem` (the fleet CA, which issued the
/// control plane's server certificate) and, when given, presents `client_auth`: a
/// certificate PEM (optionally with its chain) and its key, e.g. the host certificate with
/// the host's ed25519 SSH key, or an operator certificate with its P-256 key.
///
/// ALPN is left to the HTTP client, which knows which protocols it speaks. Session
/// resumption uses rustls' default in-memory store.
pub fn client_tls_config(
    ca_pem: &str,
    client_auth: Option<(&str, &PrivateKey)>,
) -> Result<ClientConfig, PkiError> {
    let roots = root_store("CA certificate", ca_pem)?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots);
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key)) => {
            let chain = certificates(cert_pem).map_err(|detail| PkiError::CertificatePem {
                what: "client certificate",
                detail,
            })?;
            let pkcs8 = key.to_pkcs8_pem().map_err(PkiError::Key)?;
            let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8.as_bytes()).map_err(|e| {
                PkiError::PrivateKeyPem {
                    what: "client key",
                    detail: e.to_string(),
                }
            })?;
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(der))
                .map_err(tls_error)?
        }
    };
    Ok(config)
}

fn root_store(what: &'static str, pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(pem).map_err(|detail| PkiError::CertificatePem { what, detail })? {
        roots.add(cert).map_err(|e| PkiError::CertificatePem {
            what,
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn tls_error(e: rustls::Error) -> PkiError {
    PkiError::Tls(e.to_string())
}

/// An error with its whole source chain, `outer: inner: …`: a connection failure's cause
/// (refused, certificate unknown, name mismatch) is only in the sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
