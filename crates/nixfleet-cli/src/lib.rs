//! The `nixfleet` operator CLI (SPEC.md §8): keys, trust roots, releases, offline
//! verification, bootstrap tokens, and the fleet's status from a running control plane. `main.rs` holds the flag definitions; the work is
//! here so that it can be tested without spawning the binary.

pub mod commands;
pub mod compliance_gate;
pub mod demo;
pub mod evidence;
pub mod files;
pub mod host_lists;
pub mod operator;
pub mod pipeline;
pub mod pki;
pub mod proof;
pub mod release;
pub mod serve;
pub mod signer;

use std::path::{Path, PathBuf};

use nixfleet_trust::keys::KeyError;
use nixfleet_trust::verify::{TrustFileError, VerifyError};

/// Every way a command fails, each one sentence an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {limit} bytes; is it the right file?", path.display())]
    TooLarge { path: PathBuf, limit: usize },
    #[error("{} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{} already exists; refusing to overwrite it (move it away or pick another --out)", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Key { path: PathBuf, source: KeyError },
    #[error("{what}: {source}")]
    PublicKey { what: String, source: KeyError },
    #[error("{}: {detail}", path.display())]
    Json { path: PathBuf, detail: String },
    #[error("{0}")]
    Trust(#[from] TrustFileError),
    #[error("{}: {source}", path.display())]
    Verify { path: PathBuf, source: VerifyError },
    #[error("{}: {source}; {} is not there (--hosts FILE and --budgets DIR name the lists when they are elsewhere)", path.display(), missing.display())]
    MissingHostList {
        path: PathBuf,
        missing: PathBuf,
        source: Box<VerifyError>,
    },
    #[error("fleet is invalid:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Fleet(Vec<release::FleetError>),
    #[error("signing command {command:?} failed: {reason}")]
    SignCommand { command: String, reason: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Operator(#[from] operator::OperatorError),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error("{context}: {source}")]
    Pki {
        context: String,
        source: nixfleet_pki::PkiError,
    },
}

impl CliError {
    /// The process exit code: a release stage's own code (docs/release.md), else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Pipeline(e) => e.stage.exit_code(),
            _ => 1,
        }
    }

    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        CliError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}
