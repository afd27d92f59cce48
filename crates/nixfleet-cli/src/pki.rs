//! `nixfleet ca init` and `nixfleet cert server|operator`: the fleet CA and the
//! certificates an operator issues by hand (agents get theirs through enrollment).
//!
//! Files, all PEM:
//!
//! | command | writes | mode |
//! |---|---|---|
//! | `ca init --out DIR` | `DIR/fleet-ca-key.pem` | 0600 |
//! | | `DIR/fleet-ca-cert.pem`, `DIR/ca.pem` (the same certificate) | 0644 |
//! | `cert server --out DIR` | `DIR/server-key.pem` / `DIR/server-cert.pem` | 0600 / 0644 |
//! | `cert operator --out DIR` | `DIR/operator-key.pem` / `DIR/operator-cert.pem` | 0600 / 0644 |
//!
//! `ca.pem` is what clients pass as `--cacert` (the runbook's `/etc/nixfleet/cp/ca.pem`);
//! `fleet-ca-*.pem` are the control plane's `--fleet-ca-cert` / `--fleet-ca-key`. Operator
//! files have fixed names so that scripts can find them: give each operator its own `--out`.
//! No command overwrites an existing file; move old files away to re-issue.

use std::path::{Path, PathBuf};

use nixfleet_pki::{generate_ca, issue_operator_cert, issue_server_cert, FleetCa, PkiError};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use crate::commands::now_utc;
use crate::files;
use crate::CliError;

pub const CA_CERT_FILE: &str = "fleet-ca-cert.pem";
pub const CA_KEY_FILE: &str = "fleet-ca-key.pem";
pub const CA_BUNDLE_FILE: &str = "ca.pem";
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
pub const SERVER_KEY_FILE: &str = "server-key.pem";
pub const OPERATOR_CERT_FILE: &str = "operator-cert.pem";
pub const OPERATOR_KEY_FILE: &str = "operator-key.pem";

pub const DEFAULT_CA_COMMON_NAME: &str = "nixfleet fleet CA";

const PEM_FILE_LIMIT: usize = 64 << 10;

pub struct CaInit {
    pub out: PathBuf,
    pub common_name: String,
    pub validity_days: u32,
}

pub struct CertServer {
    pub ca_dir: PathBuf,
    pub sans: Vec<String>,
    pub out: PathBuf,
    pub validity_days: u32,
}

pub struct CertOperator {
    pub ca_dir: PathBuf,
    pub name: String,
    pub out: PathBuf,
    pub validity_days: u32,
}

/// `nixfleet ca init`: a new fleet CA in `--out`.
pub fn ca_init(args: &CaInit) -> Result<String, CliError> {
    let paths = FilePair::new(&args.out, CA_KEY_FILE, CA_CERT_FILE);
    let bundle = args.out.join(CA_BUNDLE_FILE);
    // Nothing is written unless every file is new, so a half-made CA never mixes with an old one.
    paths.refuse_existing()?;
    refuse_existing(&bundle)?;
    let now = now_utc();
    let (cert_pem, key_pem) = generate_ca(&args.common_name, now, days(args.validity_days))
        .map_err(|source| CliError::Pki {
            context: format!("creating the fleet CA in {}", args.out.display()),
            source,
        })?;
    files::create_private_dir(&args.out)?;
    paths.write(&key_pem, &cert_pem)?;
    files::write_new(&bundle, cert_pem.as_bytes(), 0o644)?;
    let ca = FleetCa::from_pem(&cert_pem, &key_pem).map_err(|source| CliError::Pki {
        context: format!("reading back {}", paths.cert.display()),
        source,
    })?;
    Ok(format!(
        "wrote {} (keep it secret), {} and {}; fleet CA {:?} is valid until {}",
        paths.key.display(),
        paths.cert.display(),
        bundle.display(),
        args.common_name,
        rfc3339(ca.not_after()),
    ))
}

/// `nixfleet cert server`: the control plane's TLS certificate, for exactly the `--san`s given.
pub fn cert_server(args: &CertServer) -> Result<String, CliError> {
    let paths = FilePair::new(&args.out, SERVER_KEY_FILE, SERVER_CERT_FILE);
    paths.refuse_existing()?;
    let ca = load_ca(&args.ca_dir)?;
    let (cert_pem, key_pem) =
        issue_server_cert(&ca, &args.sans, now_utc(), days(args.validity_days)).map_err(
            |source| CliError::Pki {
                context: "issuing the server certificate".to_owned(),
                source,
            },
        )?;
    files::create_private_dir(&args.out)?;
    paths.write(&key_pem, &cert_pem)?;
    Ok(format!(
        "wrote {} and {} for {}",
        paths.cert.display(),
        paths.key.display(),
        args.sans.join(", ")
    ))
}

/// `nixfleet cert operator`: a client certificate with the operator role.
pub fn cert_operator(args: &CertOperator) -> Result<String, CliError> {
    let paths = FilePair::new(&args.out, OPERATOR_KEY_FILE, OPERATOR_CERT_FILE);
    paths.refuse_existing()?;
    let ca = load_ca(&args.ca_dir)?;
    let (cert_pem, key_pem) =
        issue_operator_cert(&ca, &args.name, now_utc(), days(args.validity_days)).map_err(
            |source| CliError::Pki {
                context: format!("issuing the operator certificate for {:?}", args.name),
                source,
            },
        )?;
    files::create_private_dir(&args.out)?;
    paths.write(&key_pem, &cert_pem)?;
    Ok(format!(
        "wrote {} and {} for operator {:?}",
        paths.cert.display(),
        paths.key.display(),
        args.name
    ))
}

/// Loads `DIR/fleet-ca-cert.pem` and `DIR/fleet-ca-key.pem`.
pub fn load_ca(dir: &Path) -> Result<FleetCa, CliError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert = files::read_text(&cert_path, PEM_FILE_LIMIT)?;
    let key = files::read_text(&key_path, PEM_FILE_LIMIT)?;
    FleetCa::from_pem(&cert, &key).map_err(|source: PkiError| CliError::Pki {
        context: format!(
            "fleet CA in {} ({CA_CERT_FILE}, {CA_KEY_FILE})",
            dir.display()
        ),
        source,
    })
}

/// A private key and its certificate, written key first.
struct FilePair {
    key: PathBuf,
    cert: PathBuf,
}

impl FilePair {
    fn new(dir: &Path, key: &str, cert: &str) -> FilePair {
        FilePair {
            key: dir.join(key),
            cert: dir.join(cert),
        }
    }

    fn refuse_existing(&self) -> Result<(), CliError> {
        refuse_existing(&self.key)?;
        refuse_existing(&self.cert)
    }

    fn write(&self, key_pem: &str, cert_pem: &str) -> Result<(), CliError> {
        // create_new: even a file that appeared since the check is never overwritten.
        files::write_new(&self.key, key_pem.as_bytes(), 0o600)?;
        files::write_new(&self.cert, cert_pem.as_bytes(), 0o644)
    }
}

fn refuse_existing(path: &Path) -> Result<(), CliError> {
    if path.exists() {
        return Err(CliError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn days(n: u32) -> Duration {
    Duration::days(i64::from(n))
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}
