//! PEM in, DER out. Errors are short descriptions; callers wrap them in a `PkiError`
//! that says which input was wrong.

use rustls_pki_types::pem::{Error, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn describe(e: Error, label: &str) -> String {
    match e {
        Error::NoItemsFound => format!("no \"-----BEGIN {label}-----\" block found"),
        other => other.to_string(),
    }
}

/// Every certificate in `text`, in order (a leaf followed by its chain, or several CAs).
pub(crate) fn certificates(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| describe(e, "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(describe(Error::NoItemsFound, "CERTIFICATE"));
    }
    Ok(certs)
}

pub(crate) fn first_certificate(text: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(text.as_bytes()).map_err(|e| describe(e, "CERTIFICATE"))
}

/// The first private key in `text`: PKCS#8, SEC1 or PKCS#1.
pub(crate) fn private_key(text: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| describe(e, "PRIVATE KEY"))
}
