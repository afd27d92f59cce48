//! Where the operator commands find the control plane and the operator certificate:
//! flags, then `NIXFLEET_*` environment variables (clap reads both), then a TOML file.
//!
//! The file is `--config FILE` / `$NIXFLEET_CONFIG` when given (it must exist), else
//! `$XDG_CONFIG_HOME/nixfleet/config.toml` (`~/.config/nixfleet/config.toml`) when it
//! exists:
//!
//! ```toml
//! url = "https://cp.example.org:8443"
//! ca_cert = "/etc/nixfleet/cp/ca.pem"
//! cert = "operator-cert.pem"      # relative paths are relative to this file
//! key = "operator-key.pem"
//! timeout_secs = 10
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::OperatorError;

/// Per-request timeout when nothing says otherwise.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// What the flags (or their environment variables) gave.
#[derive(Debug, Clone, Default)]
pub struct ConnectionArgs {
    pub url: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub timeout_secs: Option<u64>,
    pub config: Option<PathBuf>,
}

/// Everything needed to talk to the control plane as an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub url: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub timeout: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    url: Option<String>,
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    timeout_secs: Option<u64>,
}

/// `$XDG_CONFIG_HOME/nixfleet/config.toml`, or `$HOME/.config/nixfleet/config.toml`.
pub fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let non_empty = |name: &str| env(name).filter(|v| !v.is_empty());
    let base = non_empty("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty("HOME").map(|home| Path::new(&home).join(".config")))?;
    Some(base.join("nixfleet").join("config.toml"))
}

fn read_config(path: &Path) -> Result<ConfigFile, OperatorError> {
    let text = std::fs::read_to_string(path).map_err(|source| OperatorError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    let mut file: ConfigFile = toml::from_str(&text).map_err(|e| OperatorError::ConfigParse {
        path: path.to_path_buf(),
        detail: e.message().to_owned(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for p in [&mut file.ca_cert, &mut file.cert, &mut file.key]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = dir.join(&*p);
        }
    }
    Ok(file)
}

/// Flags and environment first, then the config file.
pub fn resolve(
    args: &ConnectionArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Connection, OperatorError> {
    let (file, file_path) = match &args.config {
        Some(path) => (read_config(path)?, Some(path.clone())),
        None => match default_config_path(env) {
            Some(path) if path.exists() => (read_config(&path)?, Some(path)),
            _ => (ConfigFile::default(), None),
        },
    };
    let missing = |what: &'static str, flag: &'static str, var: &'static str, key: &'static str| {
        OperatorError::NotConfigured {
            what,
            flag,
            var,
            key,
            file: file_path
                .clone()
                .or_else(|| default_config_path(env))
                .unwrap_or_else(|| PathBuf::from("$XDG_CONFIG_HOME/nixfleet/config.toml")),
        }
    };
    let url = args
        .url
        .clone()
        .or(file.url)
        .ok_or_else(|| missing("control-plane URL", "--url", "NIXFLEET_URL", "url"))?;
    if !url.starts_with("https://") {
        return Err(OperatorError::BadUrl { url });
    }
    Ok(Connection {
        url: url.trim_end_matches('/').to_owned(),
        ca_cert: args.ca_cert.clone().or(file.ca_cert).ok_or_else(|| {
            missing(
                "fleet CA certificate",
                "--ca-cert",
                "NIXFLEET_CA_CERT",
                "ca_cert",
            )
        })?,
        cert: args
            .cert
            .clone()
            .or(file.cert)
            .ok_or_else(|| missing("operator certificate", "--cert", "NIXFLEET_CERT", "cert"))?,
        key: args
            .key
            .clone()
            .or(file.key)
            .ok_or_else(|| missing("operator key", "--key", "NIXFLEET_KEY", "key"))?,
        timeout: Duration::from_secs(
            args.timeout_secs
                .or(file.timeout_secs)
                .unwrap_or(DEFAULT_TIMEOUT_SECS)
                .max(1),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn flags_win_over_the_file_and_relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "url = \"https://file:8443\"\nca_cert = \"ca.pem\"\ncert = \"/abs/cert.pem\"\nkey = \"k.pem\"\ntimeout_secs = 3\n",
        )
        .unwrap();
        let args = ConnectionArgs {
            url: Some("https://flag:8443/".into()),
            config: Some(path),
            ..Default::default()
        };
        let c = resolve(&args, &no_env).unwrap();
        assert_eq!(c.url, "https://flag:8443");
        assert_eq!(c.ca_cert, dir.path().join("ca.pem"));
        assert_eq!(c.cert, PathBuf::from("/abs/cert.pem"));
        assert_eq!(c.key, dir.path().join("k.pem"));
        assert_eq!(c.timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_default_file_lives_under_xdg_config_home() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("nixfleet")).unwrap();
        std::fs::write(
            dir.path().join("nixfleet/config.toml"),
            "url = \"https://cp:8443\"\nca_cert = \"/ca\"\ncert = \"/c\"\nkey = \"/k\"\n",
        )
        .unwrap();
        let xdg = dir.path().to_str().unwrap().to_owned();
        let env = move |name: &str| (name == "XDG_CONFIG_HOME").then(|| xdg.clone());
        let c = resolve(&ConnectionArgs::default(), &env).unwrap();
        assert_eq!(c.url, "https://cp:8443");
        assert_eq!(c.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
    }

    #[test]
    fn missing_settings_name_every_way_to_give_them() {
        let env = |name: &str| (name == "HOME").then(|| "/home/alice".to_owned());
        let e = resolve(&ConnectionArgs::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--url"), "{e}");
        assert!(e.contains("NIXFLEET_URL"), "{e}");
        assert!(
            e.contains("/home/alice/.config/nixfleet/config.toml"),
            "{e}"
        );
        let args = ConnectionArgs {
            url: Some("http://cp".into()),
            ..Default::default()
        };
        assert!(matches!(
            resolve(&args, &no_env),
            Err(OperatorError::BadUrl { .. })
        ));
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "uri = \"https://x\"\n").unwrap();
        let args = ConnectionArgs {
            config: Some(path),
            ..Default::default()
        };
        let e = resolve(&args, &no_env).unwrap_err().to_string();
        assert!(e.contains("uri"), "{e}");
    }
}
