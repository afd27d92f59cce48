//! Flags of `nixfleet-control-plane`; each also reads an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "nixfleet-control-plane",
    version,
    about = "nixfleet control plane: routes CI-signed intent to agents over mTLS"
)]
pub struct Config {
    /// Address to listen on (HTTPS, client certificates optional at the handshake).
    #[arg(long, env = "NIXFLEET_CP_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// SQLite database (WAL); everything in it can be rebuilt from signed artifacts.
    #[arg(
        long,
        env = "NIXFLEET_CP_DB_PATH",
        default_value = "/var/lib/nixfleet-cp/state.db"
    )]
    pub db_path: PathBuf,

    /// PostgreSQL shared by N replicas (postgres://user:password@host:port/database);
    /// when set, --db-path is not used and the replicas elect one leader.
    #[arg(long, env = "NIXFLEET_CP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// File holding the PostgreSQL password, for a --database-url without one (keeps the
    /// password out of unit files and the process list).
    #[arg(long, env = "NIXFLEET_CP_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<PathBuf>,

    /// CA certificate(s), PEM, that PostgreSQL's server certificate must chain to; with it
    /// the connection is TLS-only and verified (also what `sslmode=require` needs).
    #[arg(long, env = "NIXFLEET_CP_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,

    /// Connections each replica keeps to PostgreSQL.
    #[arg(long, env = "NIXFLEET_CP_DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,

    /// This replica's name in logs, /healthz and the database; the host name and listen
    /// port when not given.
    #[arg(long, env = "NIXFLEET_CP_REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// Append-only issuance log (JSON lines), kept outside the database.
    #[arg(
        long,
        env = "NIXFLEET_CP_AUDIT_LOG",
        default_value = "/var/lib/nixfleet-cp/audit.log"
    )]
    pub audit_log: PathBuf,

    #[arg(
        long,
        env = "NIXFLEET_CP_TRUST_FILE",
        default_value = "/etc/nixfleet/cp/trust.json"
    )]
    pub trust_file: PathBuf,

    /// Server certificate (PEM).
    #[arg(
        long,
        env = "NIXFLEET_CP_TLS_CERT",
        default_value = "/etc/nixfleet/cp/server-cert.pem"
    )]
    pub tls_cert: PathBuf,

    /// Server private key (PEM).
    #[arg(
        long,
        env = "NIXFLEET_CP_TLS_KEY",
        default_value = "/etc/nixfleet/cp/server-key.pem"
    )]
    pub tls_key: PathBuf,

    /// CA that issued agent and operator client certificates (the fleet CA certificate).
    #[arg(
        long,
        env = "NIXFLEET_CP_CLIENT_CA",
        default_value = "/etc/nixfleet/cp/ca.pem"
    )]
    pub client_ca: PathBuf,

    /// Fleet CA certificate, for issuing agent certificates.
    #[arg(long, env = "NIXFLEET_CP_FLEET_CA_CERT")]
    pub fleet_ca_cert: Option<PathBuf>,

    /// Fleet CA private key; without it /v1/enroll and /v1/agent/renew answer 503.
    #[arg(long, env = "NIXFLEET_CP_FLEET_CA_KEY")]
    pub fleet_ca_key: Option<PathBuf>,

    /// Validity of issued agent certificates, in days.
    #[arg(long, env = "NIXFLEET_CP_CERT_VALIDITY_DAYS", default_value_t = 30)]
    pub cert_validity_days: u32,

    /// URL of the signed fleet.resolved.json (polled).
    #[arg(long, env = "NIXFLEET_CP_CHANNEL_REFS_ARTIFACT_URL")]
    pub channel_refs_artifact_url: Option<String>,

    /// URL of its raw signature.
    #[arg(long, env = "NIXFLEET_CP_CHANNEL_REFS_SIGNATURE_URL")]
    pub channel_refs_signature_url: Option<String>,

    /// File holding a bearer token for the channel-refs URLs.
    #[arg(long, env = "NIXFLEET_CP_CHANNEL_REFS_TOKEN_FILE")]
    pub channel_refs_token_file: Option<PathBuf>,

    /// URL of the signed revocations.json (polled).
    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_ARTIFACT_URL")]
    pub revocations_artifact_url: Option<String>,

    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_SIGNATURE_URL")]
    pub revocations_signature_url: Option<String>,

    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_TOKEN_FILE")]
    pub revocations_token_file: Option<PathBuf>,

    /// Build-time fleet.resolved.json, used when the channel-refs URL cannot be verified.
    #[arg(long, env = "NIXFLEET_CP_ARTIFACT")]
    pub artifact: Option<PathBuf>,

    /// Signature of --artifact.
    #[arg(long, env = "NIXFLEET_CP_SIGNATURE")]
    pub signature: Option<PathBuf>,

    /// Build-time revocations.json fallback.
    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_ARTIFACT")]
    pub revocations_artifact: Option<PathBuf>,

    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_SIGNATURE")]
    pub revocations_signature: Option<PathBuf>,

    /// Directory of signed rollout manifests (`<rolloutId>.json` + `.sig`; for schema 2
    /// also `<rolloutId>.hosts.json` and `budgets/<hostsSha256>.json`).
    #[arg(long, env = "NIXFLEET_CP_ROLLOUTS_DIR")]
    pub rollouts_dir: Option<PathBuf>,

    /// URL of each channel's current signed manifest, with `{channel}` standing for the
    /// channel name (what `nixfleet release` writes under `rollouts/channel/`); the
    /// signature is the same URL plus `.sig`. A schema-2 manifest's hosts file is the URL
    /// with `.json` replaced by `.hosts.json`, its budget lists `budgets/<hostsSha256>.json`
    /// in the URL's directory. Uses the channel-refs token file.
    #[arg(long, env = "NIXFLEET_CP_ROLLOUTS_URL_TEMPLATE")]
    pub rollouts_url_template: Option<String>,

    /// Reconcile tick interval, seconds.
    #[arg(long, env = "NIXFLEET_CP_TICK_INTERVAL_SECS", default_value_t = 30)]
    pub tick_interval_secs: u64,

    /// Channel-refs poll interval, seconds.
    #[arg(long, env = "NIXFLEET_CP_CHANNEL_REFS_POLL_SECS", default_value_t = 60)]
    pub channel_refs_poll_secs: u64,

    /// Revocations poll interval, seconds.
    #[arg(long, env = "NIXFLEET_CP_REVOCATIONS_POLL_SECS", default_value_t = 60)]
    pub revocations_poll_secs: u64,

    /// Timeout of each artifact fetch, seconds.
    #[arg(long, env = "NIXFLEET_CP_FETCH_TIMEOUT_SECS", default_value_t = 10)]
    pub fetch_timeout_secs: u64,

    /// How long an agent has to confirm once its switch has finished, seconds; sent to
    /// agents as `confirmWindowSecs` (they use at least 10 s). Formerly
    /// --confirm-window-secs, still accepted.
    #[arg(
        long,
        alias = "confirm-deadline-secs",
        env = "NIXFLEET_CP_CONFIRM_WINDOW_SECS",
        default_value_t = 300
    )]
    pub confirm_window_secs: u64,

    /// How long a host has, from the delivery of its target, to fetch the closure and
    /// finish the switch, seconds. A host still fetching or switching after this long is
    /// failed; one that never reports is failed when this and the confirm window have
    /// both passed. 0: the confirm window counts from delivery.
    #[arg(
        long,
        env = "NIXFLEET_CP_ACTIVATION_TIMEOUT_SECS",
        default_value_t = 1800
    )]
    pub activation_timeout_secs: u64,

    /// Base interval agents are told to check in at, seconds (jittered per host).
    #[arg(long, env = "NIXFLEET_CP_CHECKIN_INTERVAL_SECS", default_value_t = 60)]
    pub checkin_interval_secs: u32,

    /// Reports one host may send per minute; more get 429 (the agent sends them later).
    /// Compliance evidence has a budget of the same size, counted apart.
    #[arg(long, env = "NIXFLEET_CP_REPORTS_PER_MINUTE", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    pub reports_per_minute: u32,

    /// Reports kept per host; older ones are pruned as new ones arrive.
    #[arg(long, env = "NIXFLEET_CP_REPORTS_PER_HOST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub reports_per_host: u32,

    /// Open HTTPS connections at most; at the cap the longest idle one is closed to make
    /// room. 0: the open-file limit less what the database and files need.
    #[arg(long, env = "NIXFLEET_CP_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: u64,

    /// Open HTTPS connections from one source address (an IPv6 /64 counts as one) at
    /// most; more are closed unserved. Behind a TCP proxy every agent shares the proxy's
    /// address: raise it, or 0 for no limit.
    #[arg(
        long,
        env = "NIXFLEET_CP_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 1024
    )]
    pub max_connections_per_source: u64,

    /// Plain-HTTP listener for /metrics (keep it on loopback).
    #[arg(long, env = "NIXFLEET_CP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How long shutdown waits for in-flight requests, seconds.
    #[arg(long, env = "NIXFLEET_CP_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    pub drain_timeout_secs: u64,

    /// Command run (through `/bin/sh -c`) for rollout events (halted, converged, host failed),
    /// with the event as one JSON object on stdin. Runs in the background, one event at a
    /// time; failures are logged.
    #[arg(long, env = "NIXFLEET_CP_EVENT_HOOK")]
    pub event_hook: Option<String>,

    /// How long one run of --event-hook may take before it is killed, seconds.
    #[arg(
        long,
        env = "NIXFLEET_CP_EVENT_HOOK_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub event_hook_timeout_secs: u64,
}
