//! `nixfleet`: the operator CLI.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nixfleet_cli::commands::{self, MintToken, TokenKey, TrustInit, VerifyTarget};
use nixfleet_cli::signer::Signer;
use nixfleet_cli::CliError;
use nixfleet_cli::{demo, operator, pki};
use nixfleet_proto::Algorithm;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Parser)]
#[command(
    name = "nixfleet",
    version,
    about = "Operator tools for nixfleet: keys, trust roots, signed releases, offline verification, bootstrap tokens, fleet status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a private key (PKCS#8 PEM) and print its base64 public key.
    Keygen {
        #[arg(long, value_parser = parse_algorithm, default_value = "ed25519")]
        algorithm: Algorithm,
        /// Where to write the private key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the base64 public key of a private key file (PKCS#8 PEM or OpenSSH ed25519).
    DerivePubkey { file: PathBuf },
    /// Trust file commands.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Validate the fleet, resolve waves, stamp and sign fleet.resolved and one rollout
    /// manifest per channel.
    Release(ReleaseArgs),
    /// Revocation list commands.
    #[command(subcommand)]
    Revocations(RevocationsCommand),
    /// Verify a signed artifact offline against a trust file.
    #[command(subcommand)]
    Verify(VerifyCommand),
    /// Mint a one-shot bootstrap token for a host, signed by the org root key.
    MintToken(MintTokenArgs),
    /// Print the RFC 8785 canonical form of the JSON on stdin.
    Canonicalize,
    /// Fleet CA commands.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue certificates from the fleet CA (hosts get theirs by enrolling).
    #[command(subcommand)]
    Cert(CertCommand),
    /// The fleet as the control plane sees it: per host, closures, state, how stale, and
    /// why it waits; `--host H` for one host and its recent events.
    Status(StatusArgs),
    /// Rollouts: list them, or trace one's events with the reconciler's reasons.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Run a local fleet under --dir, roll two signed releases out to it, wipe its control
    /// plane.
    ///
    /// Trust roots, a forge and a signed Nix binary cache on loopback, the control plane
    /// and six agents activating real Nix closures in canary and main waves, a revoked
    /// host, and the disaster-recovery runbook with its recovery time. Needs Nix; besides
    /// the Nix store, nothing outside --dir changes.
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo fleet lives.
    #[arg(long, default_value = "nixfleet-demo")]
    dir: PathBuf,
    /// Clean an existing demo directory without asking.
    #[arg(long)]
    yes: bool,
    /// Make every wait as short as possible (no soak), e.g. for CI.
    #[arg(long)]
    fast: bool,
    /// Keep the fleet running after the demo, until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Print how to install Nix, and exit.
    #[arg(long)]
    install_hint: bool,
}

/// Where the control plane and the operator certificate are. Each flag falls back to its
/// environment variable, then to the config file (see docs/operator-cli.md).
#[derive(Args)]
struct ConnectionFlags {
    /// Control-plane URL, e.g. https://cp.example.org:8443.
    #[arg(long, env = "NIXFLEET_URL")]
    url: Option<String>,
    /// Fleet CA certificate that issued the control plane's certificate (ca.pem).
    #[arg(long, env = "NIXFLEET_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Operator certificate (`nixfleet cert operator`).
    #[arg(long, env = "NIXFLEET_CERT")]
    cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, env = "NIXFLEET_KEY")]
    key: Option<PathBuf>,
    /// Timeout of each request, seconds [default: 10].
    #[arg(long, env = "NIXFLEET_TIMEOUT_SECS")]
    timeout_secs: Option<u64>,
    /// Config file [default: $XDG_CONFIG_HOME/nixfleet/config.toml].
    #[arg(long, env = "NIXFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long)]
    json: bool,
    /// When to colour the output.
    #[arg(long, value_enum, default_value = "auto")]
    color: ColorChoice,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ColorChoice {
    /// When stdout is a terminal and NO_COLOR is not set.
    Auto,
    Always,
    Never,
}

#[derive(Args)]
struct StatusArgs {
    /// Show one host in detail, with its recent events.
    #[arg(long)]
    host: Option<String>,
    #[command(flatten)]
    connection: ConnectionFlags,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Every rollout the control plane knows, newest first.
    List {
        #[command(flatten)]
        connection: ConnectionFlags,
    },
    /// One rollout's event trail, oldest first, with the reasons the reconciler gave.
    Trace {
        /// Rollout id, a unique prefix of it, or its name (stable@1a2b3c4).
        id: String,
        #[command(flatten)]
        connection: ConnectionFlags,
    },
}

impl ConnectionFlags {
    fn args(&self) -> operator::config::ConnectionArgs {
        operator::config::ConnectionArgs {
            url: self.url.clone(),
            ca_cert: self.ca_cert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            timeout_secs: self.timeout_secs,
            config: self.config.clone(),
        }
    }

    /// Colour and width for stdout; a spinner only when stderr is a terminal.
    fn ui(&self) -> operator::Ui {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let colour = match self.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => tty && !no_color && !dumb,
        };
        let width = if tty {
            console::Term::stdout()
                .size_checked()
                .map_or(80, |(_, cols)| usize::from(cols).clamp(40, 200))
        } else {
            80
        };
        operator::Ui {
            json: self.json,
            style: operator::render::Style { width, colour },
            spinner: std::io::stderr().is_terminal() && !dumb,
        }
    }

    fn run(&self, query: operator::Query) -> Result<String, CliError> {
        Ok(operator::run(&query, &self.args(), self.ui())?)
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the fleet CA: DIR/fleet-ca-key.pem (0600), DIR/fleet-ca-cert.pem and DIR/ca.pem
    /// (the same certificate, for clients' --cacert). Existing files are never overwritten.
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = pki::DEFAULT_CA_COMMON_NAME)]
        common_name: String,
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
        validity_days: u32,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue the control plane's TLS certificate: DIR/server-cert.pem and DIR/server-key.pem (0600).
    Server {
        /// Directory holding fleet-ca-cert.pem and fleet-ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// A DNS name or IP address clients connect to; repeat for each. None is implied.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        validity_days: u32,
    },
    /// Issue an operator client certificate: DIR/operator-cert.pem and DIR/operator-key.pem
    /// (0600). Use one --out directory per operator.
    Operator {
        /// Directory holding fleet-ca-cert.pem and fleet-ca-key.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Operator name (a-z, 0-9, '.', '_', '@', '-'), e.g. alice or alice@example.org.
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..))]
        validity_days: u32,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Write a schemaVersion 1 trust.json.
    Init {
        /// Base64 public CI release key (ed25519: 32 bytes; ecdsa-p256: SEC1 point).
        #[arg(long)]
        ci_release_key: String,
        /// Algorithm of --ci-release-key; inferred from its length when omitted.
        #[arg(long, value_parser = parse_algorithm)]
        ci_release_key_algorithm: Option<Algorithm>,
        /// The key being rotated out, still accepted during the grace period.
        #[arg(long)]
        previous_ci_release_key: Option<String>,
        /// Base64 ed25519 public org root key (signs bootstrap tokens).
        #[arg(long)]
        org_root_key: String,
        /// Nix binary-cache public key NAME:BASE64; repeat for several caches.
        #[arg(long = "cache-key")]
        cache_keys: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct SignWith {
    /// PKCS#8 PEM private key to sign with.
    #[arg(
        long,
        required_unless_present = "sign_cmd",
        conflicts_with = "sign_cmd"
    )]
    key: Option<PathBuf>,
    /// External signer: reads $NIXFLEET_INPUT, writes the raw signature to $NIXFLEET_OUTPUT.
    #[arg(long)]
    sign_cmd: Option<String>,
    /// Algorithm of the --sign-cmd key (a key file knows its own).
    #[arg(long, value_parser = parse_algorithm, default_value = "ed25519")]
    sign_cmd_algorithm: Algorithm,
}

impl SignWith {
    fn signer(&self) -> Result<Signer, CliError> {
        match (&self.key, &self.sign_cmd) {
            (Some(key), _) => Signer::from_key_file(key),
            (None, Some(command)) => Ok(Signer::Command {
                command: command.clone(),
                algorithm: self.sign_cmd_algorithm,
            }),
            (None, None) => Err(CliError::Usage(
                "pass --key FILE or --sign-cmd CMD".to_owned(),
            )),
        }
    }
}

#[derive(Args)]
struct ReleaseArgs {
    /// Unsigned fleet description (fleet.resolved shape, meta.signedAt null).
    #[arg(long)]
    fleet: PathBuf,
    /// JSON object: hostname -> Nix store basename of its system closure.
    #[arg(long)]
    closures: PathBuf,
    /// The commit the release was built from.
    #[arg(long)]
    ci_commit: String,
    #[command(flatten)]
    sign: SignWith,
    /// Output directory: fleet.resolved.json(.sig) and rollouts/<id>.json(.sig).
    #[arg(long)]
    out: PathBuf,
    /// Verify the written release against this trust file before declaring success.
    #[arg(long)]
    trust_file: Option<PathBuf>,
    /// Stamp this signing time instead of now (reproducing a release).
    #[arg(long, value_parser = parse_time)]
    signed_at: Option<OffsetDateTime>,
}

#[derive(Subcommand)]
enum RevocationsCommand {
    /// Stamp and sign a revocation list into DIR/revocations.json + .sig.
    Sign {
        #[arg(long = "in")]
        input: PathBuf,
        #[command(flatten)]
        sign: SignWith,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        ci_commit: Option<String>,
        #[arg(long, value_parser = parse_time)]
        signed_at: Option<OffsetDateTime>,
    },
}

#[derive(Args)]
struct VerifyCommon {
    file: PathBuf,
    /// Raw signature file; defaults to FILE.sig.
    #[arg(long)]
    sig: Option<PathBuf>,
    #[arg(long)]
    trust_file: PathBuf,
    /// Check freshness as of this instant (auditing a past date).
    #[arg(long, value_parser = parse_time)]
    now: Option<OffsetDateTime>,
}

#[derive(Subcommand)]
enum VerifyCommand {
    /// Verify fleet.resolved.json.
    Fleet(VerifyCommon),
    /// Verify a rollout manifest; with --fleet, also that it belongs to that fleet.
    Manifest {
        #[command(flatten)]
        common: VerifyCommon,
        /// The fleet.resolved.json it must belong to (its signature is checked too).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Signature of --fleet; defaults to FLEET.sig.
        #[arg(long)]
        fleet_sig: Option<PathBuf>,
    },
    /// Verify revocations.json.
    Revocations {
        #[command(flatten)]
        common: VerifyCommon,
        /// signedAt of the list already applied; an older list is refused.
        #[arg(long, value_parser = parse_time)]
        last_applied: Option<OffsetDateTime>,
    },
    /// Verify a bootstrap token file against the org root key.
    Token {
        file: PathBuf,
        #[arg(long)]
        trust_file: PathBuf,
        #[arg(long, value_parser = parse_time)]
        now: Option<OffsetDateTime>,
    },
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("host_key").required(true).args(["pubkey", "pubkey_file", "fingerprint"])))]
struct MintTokenArgs {
    #[arg(long)]
    hostname: String,
    /// The host's public key line, e.g. 'ssh-ed25519 AAAA… root@host'.
    #[arg(long)]
    pubkey: Option<String>,
    /// File holding the host's public key line (ssh_host_ed25519_key.pub).
    #[arg(long)]
    pubkey_file: Option<PathBuf>,
    /// The host key's fingerprint as `ssh-keygen -lf` prints it (SHA256:…).
    #[arg(long)]
    fingerprint: Option<String>,
    /// The org root private key (ed25519, PKCS#8 PEM).
    #[arg(long)]
    org_root_key: PathBuf,
    #[arg(long, default_value_t = 24)]
    validity_hours: u32,
    /// Write the token to this new file, mode 0600 (it is a secret until used); an
    /// existing file is never overwritten. Without it the token goes to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_algorithm(s: &str) -> Result<Algorithm, String> {
    s.parse()
}

fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-11-27T10:00:00Z: {e}"))
}

fn run(cli: Cli) -> Result<(), CliError> {
    let out = |text: &str| println!("{text}");
    match cli.command {
        Command::Keygen {
            algorithm,
            out: path,
        } => out(&commands::keygen(algorithm, &path)?),
        Command::DerivePubkey { file } => out(&commands::derive_pubkey(&file)?),
        Command::Trust(TrustCommand::Init {
            ci_release_key,
            ci_release_key_algorithm,
            previous_ci_release_key,
            org_root_key,
            cache_keys,
            out: path,
        }) => {
            let summary = commands::trust_init(&TrustInit {
                ci_release_key,
                ci_release_key_algorithm,
                previous_ci_release_key,
                org_root_key,
                cache_keys,
                out: path,
            })?;
            eprintln!("{summary}");
        }
        Command::Release(args) => {
            let (summary, warnings) = commands::release(&commands::ReleaseArgs {
                signer: args.sign.signer()?,
                fleet: args.fleet,
                closures: args.closures,
                ci_commit: args.ci_commit,
                out: args.out,
                trust_file: args.trust_file,
                signed_at: args.signed_at,
            })?;
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            out(&summary);
        }
        Command::Revocations(RevocationsCommand::Sign {
            input,
            sign,
            out: dir,
            ci_commit,
            signed_at,
        }) => out(&commands::revocations_sign(
            &commands::RevocationsSignArgs {
                signer: sign.signer()?,
                input,
                out: dir,
                ci_commit,
                signed_at,
            },
        )?),
        Command::Verify(command) => {
            let (target, common) = match command {
                VerifyCommand::Fleet(common) => (VerifyTarget::Fleet, common),
                VerifyCommand::Manifest {
                    common,
                    fleet,
                    fleet_sig,
                } => (VerifyTarget::Manifest { fleet, fleet_sig }, common),
                VerifyCommand::Revocations {
                    common,
                    last_applied,
                } => (VerifyTarget::Revocations { last_applied }, common),
                VerifyCommand::Token {
                    file,
                    trust_file,
                    now,
                } => (
                    VerifyTarget::Token,
                    VerifyCommon {
                        file,
                        sig: None,
                        trust_file,
                        now,
                    },
                ),
            };
            out(&commands::verify_artifact(
                &target,
                &common.file,
                common.sig.as_deref(),
                &common.trust_file,
                common.now,
            )?)
        }
        Command::MintToken(args) => {
            let key = match (args.pubkey, args.pubkey_file, args.fingerprint) {
                (Some(line), _, _) => TokenKey::Line(line),
                (None, Some(file), _) => TokenKey::File(file),
                (None, None, Some(fp)) => TokenKey::Fingerprint(fp),
                (None, None, None) => {
                    return Err(CliError::Usage(
                        "pass --pubkey, --pubkey-file or --fingerprint".into(),
                    ))
                }
            };
            let token = commands::mint_token(&MintToken {
                hostname: args.hostname,
                key,
                org_root_key: args.org_root_key,
                validity_hours: args.validity_hours,
            })?;
            match args.out {
                Some(path) => out(&commands::write_token(&path, &token)?),
                None => out(&token),
            }
        }
        Command::Canonicalize => {
            let bytes = commands::canonicalize(std::io::stdin().lock())?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&bytes)
                .and_then(|()| stdout.flush())
                .map_err(|e| CliError::io("write", std::path::Path::new("<stdout>"), e))?;
        }
        Command::Ca(CaCommand::Init {
            out: dir,
            common_name,
            validity_days,
        }) => out(&pki::ca_init(&pki::CaInit {
            out: dir,
            common_name,
            validity_days,
        })?),
        Command::Cert(CertCommand::Server {
            ca_dir,
            sans,
            out: dir,
            validity_days,
        }) => out(&pki::cert_server(&pki::CertServer {
            ca_dir,
            sans,
            out: dir,
            validity_days,
        })?),
        Command::Cert(CertCommand::Operator {
            ca_dir,
            name,
            out: dir,
            validity_days,
        }) => out(&pki::cert_operator(&pki::CertOperator {
            ca_dir,
            name,
            out: dir,
            validity_days,
        })?),
        Command::Status(args) => {
            let query = match args.host {
                Some(host) => operator::Query::Host(host),
                None => operator::Query::Fleet,
            };
            print_text(&args.connection.run(query)?)?;
        }
        Command::Rollout(RolloutCommand::List { connection }) => {
            print_text(&connection.run(operator::Query::Rollouts)?)?
        }
        Command::Rollout(RolloutCommand::Trace { id, connection }) => {
            print_text(&connection.run(operator::Query::Trace(id))?)?
        }
        Command::Demo(args) if args.install_hint => print_text(demo::INSTALL_HINT)?,
        Command::Demo(args) => demo::run(&demo::DemoArgs {
            dir: args.dir,
            yes: args.yes,
            fast: args.fast,
            keep_running: args.keep_running,
        })?,
    }
    Ok(())
}

/// Writes a command's output; a reader that went away (`| head`) is not an error.
fn print_text(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::io("write", std::path::Path::new("<stdout>"), e))
        }
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Demo(demo::DemoError::Interrupted)) => {
            eprintln!("nixfleet demo: interrupted; every process it started was stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
