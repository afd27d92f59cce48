//! Flags of `nixfleet-agent`; each also reads an environment variable. This is the one
//! definition of them: docs/agent.md lists the same.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActivationBackend {
    /// nix-store --realise, nix-env --set, switch-to-configuration.
    Nixos,
    /// nix-store --realise, nix-env --set, the nix-darwin closure's `activate`.
    Darwin,
}

/// The backend of this platform: darwin on macOS, nixos elsewhere.
#[cfg(target_os = "macos")]
const DEFAULT_ACTIVATION: &str = "darwin";
#[cfg(not(target_os = "macos"))]
const DEFAULT_ACTIVATION: &str = "nixos";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "nixfleet-agent",
    version,
    about = "nixfleet agent: checks in with the control plane, verifies what it is told against CI's signatures, activates it through Nix and rolls back by itself when it cannot confirm"
)]
pub struct Config {
    /// Base URL of the control plane, e.g. https://cp.example.org:8443.
    #[arg(long, env = "NIXFLEET_AGENT_CONTROL_PLANE_URL")]
    pub control_plane_url: String,

    /// This host's name in the fleet (default: the system hostname).
    #[arg(long, env = "NIXFLEET_AGENT_HOSTNAME")]
    pub hostname: Option<String>,

    /// Pinned trust roots (ciReleaseKey, orgRootKey, cacheKeys).
    #[arg(
        long,
        env = "NIXFLEET_AGENT_TRUST_FILE",
        default_value = "/etc/nixfleet/agent/trust.json"
    )]
    pub trust_file: PathBuf,

    /// Where the agent keeps its certificate, state machine, cached manifests and reports.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_STATE_DIR",
        default_value = "/var/lib/nixfleet-agent"
    )]
    pub state_dir: PathBuf,

    /// The host SSH ed25519 key (OpenSSH or PKCS#8); it is the TLS client key and signs
    /// the CSR and reports.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_HOST_KEY",
        default_value = "/etc/ssh/ssh_host_ed25519_key"
    )]
    pub host_key: PathBuf,

    /// The fleet CA certificate that the control plane's server certificate chains to.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_CA_CERT",
        default_value = "/etc/nixfleet/agent/ca.pem"
    )]
    pub ca_cert: PathBuf,

    /// A bootstrap token from `nixfleet mint-token`, used when the agent has no
    /// certificate (first enrollment, or after expiry or revocation).
    #[arg(long, env = "NIXFLEET_AGENT_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,

    /// How targets are activated: nixos (switch-to-configuration) or darwin (nix-darwin's
    /// `activate`); the default is this platform's.
    #[arg(
        long,
        alias = "activation-backend",
        env = "NIXFLEET_AGENT_ACTIVATION",
        value_enum,
        default_value = DEFAULT_ACTIVATION
    )]
    pub activation: ActivationBackend,

    /// The system profile that `nix-env --set` points at the target.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_PROFILE",
        default_value = "/nix/var/nix/profiles/system"
    )]
    pub profile: PathBuf,

    /// The link to the running system; its target's basename is the current closure.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_CURRENT_SYSTEM_LINK",
        default_value = "/run/current-system"
    )]
    pub current_system_link: PathBuf,

    /// A shell command printing {"failedUnits": N}; default: count `systemctl --failed`
    /// when systemd runs (nixos), the org.nixos.* launchd jobs that exited non-zero
    /// (darwin), else 0.
    #[arg(long, env = "NIXFLEET_AGENT_HEALTH_COMMAND")]
    pub health_command: Option<String>,

    /// A binary cache to realise closures from; repeat for several (the environment
    /// variable takes a space-separated list). Signatures are checked against cacheKeys.
    #[arg(
        long = "substituter",
        env = "NIXFLEET_AGENT_SUBSTITUTERS",
        value_delimiter = ' '
    )]
    pub substituters: Vec<String>,

    /// Longest wait between check-ins, seconds; also the cap of the error backoff.
    #[arg(long, env = "NIXFLEET_AGENT_POLL_INTERVAL_SECS", default_value_t = 60)]
    pub poll_interval_secs: u64,

    /// Timeout of each request to the control plane, seconds.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_REQUEST_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub request_timeout_secs: u64,

    /// Timeout of `nix-store --realise`, seconds.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_REALISE_TIMEOUT_SECS",
        default_value_t = 3600
    )]
    pub realise_timeout_secs: u64,

    /// How long switch-to-configuration (or `activate`) may run before it counts as
    /// failed, seconds.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_SWITCH_TIMEOUT_SECS",
        default_value_t = 900
    )]
    pub switch_timeout_secs: u64,

    /// A lock that switch-to-configuration holds while it runs; while someone else holds
    /// it, activation waits (nixos only).
    #[arg(
        long,
        env = "NIXFLEET_AGENT_SWITCH_LOCK",
        default_value = "/run/nixos/switch-to-configuration.lock"
    )]
    pub switch_lock: PathBuf,

    /// Between rollouts, run the running closure's compliance probes again this often
    /// (drift), seconds; 0 disables. The probes after an activation always run.
    #[arg(
        long,
        env = "NIXFLEET_AGENT_COMPLIANCE_INTERVAL_SECS",
        default_value_t = 3600
    )]
    pub compliance_interval_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn every_flag_has_an_environment_variable() {
        let command = Config::command();
        command.clone().debug_assert();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no environment variable"));
            assert!(
                env.to_string_lossy().starts_with("NIXFLEET_AGENT_"),
                "--{id}: {env:?}"
            );
        }
    }

    #[test]
    fn substituters_repeat_and_defaults_are_the_spec_paths() {
        let c = Config::try_parse_from([
            "nixfleet-agent",
            "--control-plane-url",
            "https://cp:8443",
            "--substituter",
            "https://a",
            "--substituter",
            "file:///b",
        ])
        .unwrap();
        assert_eq!(c.substituters, vec!["https://a", "file:///b"]);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/nixfleet-agent"));
        assert_eq!(
            c.trust_file,
            PathBuf::from("/etc/nixfleet/agent/trust.json")
        );
        assert_eq!(c.host_key, PathBuf::from("/etc/ssh/ssh_host_ed25519_key"));
        assert_eq!(c.current_system_link, PathBuf::from("/run/current-system"));
        let expected = if cfg!(target_os = "macos") {
            ActivationBackend::Darwin
        } else {
            ActivationBackend::Nixos
        };
        assert_eq!(c.activation, expected);
    }

    #[test]
    fn the_backend_is_chosen_by_flag_alias_or_environment() {
        for flag in ["--activation", "--activation-backend"] {
            let c = Config::try_parse_from([
                "nixfleet-agent",
                "--control-plane-url",
                "https://cp:8443",
                flag,
                "darwin",
            ])
            .unwrap();
            assert_eq!(c.activation, ActivationBackend::Darwin, "{flag}");
        }
        let err = Config::try_parse_from([
            "nixfleet-agent",
            "--control-plane-url",
            "https://cp:8443",
            "--activation",
            "windows",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("nixos") && err.contains("darwin"), "{err}");
    }
}
