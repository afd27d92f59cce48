//! Errors: set-up failures end the run ([`LoadgenError`]); request failures are counted by
//! kind ([`ErrorKind`]) and the run goes on.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Pki {
        what: String,
        source: nixfleet_pki::PkiError,
    },
    #[error("{what}: {detail}")]
    Key { what: String, detail: String },
    #[error("{0}")]
    Usage(String),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl LoadgenError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadgenError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Why one request failed, as counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// TCP connect refused or failed.
    Connect,
    /// TLS handshake failed.
    Tls,
    /// The whole request (connect, handshake, answer) took longer than the timeout.
    Timeout,
    /// The connection broke while the request was on it.
    Request,
    /// A status the agent did not expect.
    Status(u16),
    /// The answer was not the JSON the protocol says, or was too large.
    Decode,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Tls => f.write_str("tls"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Request => f.write_str("request"),
            ErrorKind::Status(s) => write!(f, "http-{s}"),
            ErrorKind::Decode => f.write_str("decode"),
        }
    }
}
