//! Producing raw 64-byte signatures, from a key file or an external command (HSM, TPM,
//! KMS): the command reads the canonical bytes from `$NIXFLEET_INPUT` and writes the raw
//! signature to `$NIXFLEET_OUTPUT` (SPEC.md §3).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixfleet_proto::Algorithm;
use nixfleet_trust::keys::{self, PrivateKey, SIGNATURE_LEN};

use crate::{files, CliError};

/// How long an external signer may take; a hardware token waiting for a touch is slow,
/// but a hung signer must not hang CI forever.
pub const SIGN_CMD_TIMEOUT: Duration = Duration::from_secs(300);

pub enum Signer {
    Key(Box<PrivateKey>),
    Command {
        command: String,
        algorithm: Algorithm,
    },
}

impl Signer {
    pub fn from_key_file(path: &Path) -> Result<Signer, CliError> {
        let text = files::read_text(path, 64 << 10)?;
        let key = PrivateKey::from_pem(&text).map_err(|source| CliError::Key {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Signer::Key(Box::new(key)))
    }

    pub fn algorithm(&self) -> Algorithm {
        match self {
            Signer::Key(key) => key.algorithm(),
            Signer::Command { algorithm, .. } => *algorithm,
        }
    }

    pub fn sign(&self, canonical: &[u8]) -> Result<[u8; SIGNATURE_LEN], CliError> {
        match self {
            Signer::Key(key) => Ok(key.sign(canonical)),
            Signer::Command { command, algorithm } => {
                let sig = run_sign_command(command, canonical)?;
                if let Ok(raw) = <[u8; SIGNATURE_LEN]>::try_from(sig.as_slice()) {
                    return Ok(raw);
                }
                match algorithm {
                    // Many HSMs and `openssl pkeyutl` emit DER for ECDSA.
                    Algorithm::EcdsaP256 => keys::p256_der_to_raw(&sig).map_err(|_| {
                        CliError::SignCommand {
                            command: command.clone(),
                            reason: format!("wrote {} bytes that are neither a raw 64-byte r||s signature nor DER", sig.len()),
                        }
                    }),
                    Algorithm::Ed25519 => Err(CliError::SignCommand {
                        command: command.clone(),
                        reason: format!("wrote {} bytes to $NIXFLEET_OUTPUT; expected the raw 64-byte ed25519 signature", sig.len()),
                    }),
                }
            }
        }
    }
}

fn run_sign_command(command: &str, canonical: &[u8]) -> Result<Vec<u8>, CliError> {
    let dir = tempdir()?;
    let input = dir.path.join("input");
    let output = dir.path.join("output");
    files::write_atomic(&input, canonical, 0o600)?;
    let fail = |reason: String| CliError::SignCommand {
        command: command.to_owned(),
        reason,
    };
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("NIXFLEET_INPUT", &input)
        .env("NIXFLEET_OUTPUT", &output)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("could not start /bin/sh: {e}")))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > SIGN_CMD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "did not finish within {} s",
                    SIGN_CMD_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    if !status.success() {
        return Err(fail(format!("exited with {status}")));
    }
    files::read_limited(&output, 1024).map_err(|_| fail("wrote nothing to $NIXFLEET_OUTPUT".into()))
}

/// A private temporary directory removed on drop.
struct TempDir {
    path: PathBuf,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn tempdir() -> Result<TempDir, CliError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let path = std::env::temp_dir().join(format!("nixfleet-sign-{}", hex::encode(nonce)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|e| CliError::io("create directory", &path, e))?;
    Ok(TempDir { path })
}
