//! `nixfleet`: the operator CLI.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nixfleet_cli::commands::{self, MintToken, TokenKey, TrustInit, VerifyTarget};
use nixfleet_cli::release::ManifestSchema;
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
    Release(Box<ReleaseArgs>),
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
    /// Compliance evidence the hosts signed: per host and control, the newest status.
    #[command(subcommand)]
    Compliance(ComplianceCommand),
    /// Run a local fleet under --dir, roll two signed releases out to it, wipe its control
    /// plane.
    ///
    /// Trust roots, a forge and a signed Nix binary cache on loopback, the control plane
    /// and six agents activating real Nix closures in canary and main waves, a revoked
    /// host, and the disaster-recovery runbook with its recovery time. Needs Nix; besides
    /// the Nix store, nothing outside --dir changes.
    Demo(DemoArgs),
    /// A read-only web page of the fleet, served on loopback: channels and rollouts with
    /// their waves, hosts (filter, sort), one host with its events, a rollout's timeline.
    ///
    /// It asks the control plane with the operator certificate, like `nixfleet status`,
    /// and refreshes itself every few seconds. See docs/dashboard.md.
    Dashboard(DashboardArgs),
}

#[derive(Args)]
struct DashboardArgs {
    /// Where to serve the page (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = operator::dashboard::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// Serve on an address that is not loopback: anyone who reaches it sees the fleet.
    #[arg(long)]
    allow_remote: bool,
    /// Seconds between refreshes of the page; 0 for none.
    #[arg(long, default_value_t = operator::dashboard::DEFAULT_REFRESH_SECS)]
    refresh_secs: u64,
    #[command(flatten)]
    endpoint: EndpointFlags,
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
    #[command(flatten)]
    endpoint: EndpointFlags,
    /// Print JSON for scripts instead of tables.
    #[arg(long)]
    json: bool,
    /// When to colour the output.
    #[arg(long, value_enum, default_value = "auto")]
    color: ColorChoice,
}

#[derive(Args)]
struct EndpointFlags {
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
}

impl EndpointFlags {
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
        self.endpoint.args()
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
enum ComplianceCommand {
    /// Per host and control, the newest status with its articles and output hash, from
    /// the evidence the hosts signed (docs/compliance.md).
    Report {
        /// Only this channel's hosts.
        #[arg(long)]
        channel: Option<String>,
        /// Only hosts whose channel selects this framework, and only the controls that
        /// cite it (cis, nis2, iso27001, anssi, dora).
        #[arg(long)]
        framework: Option<String>,
        #[command(flatten)]
        connection: ConnectionFlags,
    },
    /// Print a host's newest evidence as it signed it; save it for `nixfleet verify
    /// evidence`.
    Evidence {
        #[arg(long)]
        host: String,
        #[command(flatten)]
        endpoint: EndpointFlags,
    },
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
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct ReleaseArgs {
    #[command(subcommand)]
    command: Option<ReleaseCommand>,
    /// Unsigned fleet description (fleet.resolved shape, meta.signedAt null); the manual
    /// path, with --closures and --ci-commit.
    #[arg(
        long,
        required_unless_present_any = ["flake", "resign"],
        conflicts_with_all = ["flake", "resign"],
        requires_all = ["closures", "ci_commit"]
    )]
    fleet: Option<PathBuf>,
    /// JSON object: hostname -> Nix store basename of its system closure.
    #[arg(long, requires = "fleet")]
    closures: Option<PathBuf>,
    /// JSON object: hostname -> its `lib.compliance.evaluateHost` list; applies the static
    /// compliance gate (enforce channels with a failed control are refused, exit 12;
    /// permissive ones record the failures in their manifest).
    #[arg(long, requires = "fleet")]
    compliance_results: Option<PathBuf>,
    /// The commit the release was built from; with --flake, the flake's git HEAD by default.
    #[arg(long, conflicts_with = "resign")]
    ci_commit: Option<String>,
    #[command(flatten)]
    sign: SignWith,
    /// Output directory: fleet.resolved.json(.sig) and rollouts/<id>.json(.sig). With
    /// --resign, defaults to --from.
    #[arg(long, required_unless_present = "resign")]
    out: Option<PathBuf>,
    /// Verify the written release against this trust file before declaring success
    /// (required with --flake and --resign; its cacheKeys prove the push).
    #[arg(long, required_if_eq_any = [("resign", "true")])]
    trust_file: Option<PathBuf>,
    /// Stamp this signing time instead of now (reproducing a release).
    #[arg(long, value_parser = parse_time)]
    signed_at: Option<OffsetDateTime>,
    /// Rollout manifest schema: 2 signs a header committing to the host set and budget
    /// lists by hash (written beside it); 1 signs the whole plan, for fleets whose agents
    /// predate schema 2. A re-sign keeps the schema of the release it re-signs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2), conflicts_with = "resign")]
    manifest_schema: u32,
    #[command(flatten)]
    pipeline: PipelineFlags,
}

/// `--flake`: evaluate, build, push, sign, publish and verify in one command.
#[derive(Args)]
struct PipelineFlags {
    /// Directory of the fleet's flake (a git checkout: its HEAD is the commit).
    #[arg(long, requires = "trust_file", conflicts_with = "resign")]
    flake: Option<PathBuf>,
    /// The flake output holding mkFleet's result; its `.resolved` is evaluated.
    #[arg(long, default_value = "fleet", requires = "flake")]
    fleet_attr: String,
    /// Attribute path of a host's system closure; `{host}` is the host name.
    #[arg(
        long,
        default_value = "nixosConfigurations.{host}.config.system.build.toplevel",
        requires = "flake"
    )]
    toplevel_attr: String,
    /// Attribute path of a host's configuration, which the compliance controls of its
    /// channel read (the static gate); `{host}` is the host name.
    #[arg(
        long,
        default_value = "nixosConfigurations.{host}.config",
        requires = "flake"
    )]
    config_attr: String,
    /// Build only this host (repeat); the others keep the closure of the previous release
    /// found in --publish-dir or --out.
    #[arg(long = "host", requires = "flake")]
    hosts: Vec<String>,
    /// Builds run at the same time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64), requires = "flake")]
    jobs: u32,
    /// Release from a git tree with uncommitted changes.
    #[arg(long, requires = "flake")]
    allow_dirty: bool,
    /// A Nix setting for every nix command, NAME=VALUE (repeat), e.g. sandbox=false.
    #[arg(long = "nix-option", value_parser = parse_nix_option, requires = "flake")]
    nix_options: Vec<(String, String)>,
    #[arg(long, default_value_t = 600, requires = "flake")]
    eval_timeout_secs: u64,
    /// Per host.
    #[arg(long, default_value_t = 3600, requires = "flake")]
    build_timeout_secs: u64,
    /// Per push command (`nix store sign`, `nix copy`, each --push-cmd run).
    #[arg(long, default_value_t = 1800, requires = "flake")]
    push_timeout_secs: u64,
    /// Nix store URL to copy the closures to (file://…, s3://…, ssh://…).
    #[arg(long, requires = "flake", conflicts_with = "push_cmd")]
    push_to: Option<String>,
    /// Binary-cache secret key (nix-store --generate-binary-cache-key) to sign every path
    /// of each closure with before --push-to.
    #[arg(long, requires = "push_to")]
    cache_signing_key: Option<PathBuf>,
    /// Push command, run under /bin/sh -c once per closure with NIXFLEET_CLOSURE (store
    /// path), NIXFLEET_HOST and NIXFLEET_CACHE_URL set; needs --cache-url.
    #[arg(long, requires_all = ["flake", "cache_url"])]
    push_cmd: Option<String>,
    /// The cache the hosts fetch from (file:// or http(s)://), read back before signing;
    /// defaults to --push-to when that is file:// or http(s)://.
    #[arg(long, requires = "flake")]
    cache_url: Option<String>,
    /// Also publish the release here, swapped in atomically (the directory the forge serves).
    #[arg(long)]
    publish_dir: Option<PathBuf>,
    /// Also commit the release to BRANCH of the git remote REMOTE and push it (for a
    /// control plane fetching from a forge); REMOTE:BRANCH, split at the last ':'.
    #[arg(long, value_name = "REMOTE:BRANCH", conflicts_with = "fleet")]
    publish_git: Option<String>,
    /// Re-sign the release in --from (new signedAt, same rollout ids); nothing is built.
    #[arg(long, requires = "from")]
    resign: bool,
    /// The published release to re-sign.
    #[arg(long, requires = "resign")]
    from: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Exit 20 when the release in --from goes stale within --within-minutes (or is
    /// stale or invalid), 0 otherwise: for a timer that re-signs only when needed.
    CheckFresh {
        /// The published release (fleet.resolved.json, revocations.json if present).
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        trust_file: PathBuf,
        #[arg(long, default_value_t = 60)]
        within_minutes: u32,
        /// Check as of this instant instead of now.
        #[arg(long, value_parser = parse_time)]
        now: Option<OffsetDateTime>,
    },
}

fn parse_nix_option(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE (e.g. sandbox=false)"))?;
    if name.trim().is_empty() {
        return Err(format!("{s:?} has no setting name"));
    }
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

fn release(args: ReleaseArgs) -> Result<String, CliError> {
    use nixfleet_cli::pipeline::{self, Push};
    let flags = args.pipeline;
    let manifest_schema = ManifestSchema::from_version(args.manifest_schema).ok_or_else(|| {
        CliError::Usage(format!(
            "--manifest-schema {} is not 1 or 2",
            args.manifest_schema
        ))
    })?;
    let signer = args.sign.signer();
    if flags.resign {
        let (Some(from), Some(trust_file)) = (flags.from, args.trust_file) else {
            return Err(CliError::Usage(
                "--resign needs --from DIR and --trust-file".into(),
            ));
        };
        return Ok(pipeline::resign(pipeline::Resign {
            from,
            out: args.out,
            publish_dir: flags.publish_dir,
            publish_git: flags.publish_git,
            signer: signer?,
            trust_file,
            signed_at: args.signed_at,
        })?);
    }
    let out = args
        .out
        .ok_or_else(|| CliError::Usage("pass --out DIR".into()))?;
    if let Some(flake) = flags.flake {
        let trust_file = args
            .trust_file
            .ok_or_else(|| CliError::Usage("--flake needs --trust-file".into()))?;
        let push = match (flags.push_to, flags.push_cmd) {
            (Some(url), _) => Push::To {
                url,
                signing_key: flags.cache_signing_key,
            },
            (None, Some(command)) => Push::Command(command),
            (None, None) => Push::None,
        };
        let signer = signer.map_err(|e| {
            CliError::Pipeline(pipeline::PipelineError {
                stage: pipeline::Stage::Sign,
                message: format!("{e}; nothing was built or signed"),
            })
        })?;
        let (summary, warnings) = pipeline::release_flake(pipeline::FlakeRelease {
            flake,
            fleet_attr: flags.fleet_attr,
            toplevel_attr: flags.toplevel_attr,
            config_attr: flags.config_attr,
            hosts: flags.hosts,
            jobs: flags.jobs as usize,
            allow_dirty: flags.allow_dirty,
            ci_commit: args.ci_commit,
            nix_options: flags.nix_options,
            eval_timeout: std::time::Duration::from_secs(flags.eval_timeout_secs),
            build_timeout: std::time::Duration::from_secs(flags.build_timeout_secs),
            push_timeout: std::time::Duration::from_secs(flags.push_timeout_secs),
            push,
            cache_url: flags.cache_url,
            signer,
            trust_file,
            out,
            publish_dir: flags.publish_dir,
            publish_git: flags.publish_git,
            signed_at: args.signed_at,
            manifest_schema,
        })?;
        for warning in warnings {
            eprintln!("warning: {warning}");
        }
        return Ok(summary);
    }
    let (Some(fleet), Some(closures), Some(ci_commit)) =
        (args.fleet, args.closures, args.ci_commit)
    else {
        return Err(CliError::Usage(
            "pass --fleet, --closures and --ci-commit, or --flake DIR".into(),
        ));
    };
    let (summary, warnings) = commands::release_with_compliance(
        &commands::ReleaseArgs {
            signer: signer?,
            fleet,
            closures,
            ci_commit,
            out: out.clone(),
            trust_file: args.trust_file,
            signed_at: args.signed_at,
            manifest_schema,
        },
        args.compliance_results.as_deref(),
    )?;
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    if let Some(dir) = flags.publish_dir {
        pipeline::publish::publish(&out, &dir).map_err(|message| {
            CliError::Pipeline(pipeline::PipelineError {
                stage: pipeline::Stage::Publish,
                message,
            })
        })?;
        return Ok(format!("{summary}\npublished to {}", dir.display()));
    }
    Ok(summary)
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
    /// Verify a rollout manifest, the whole plan: for schema 2 also its hosts file and
    /// budget lists against the hashes it signs; with --fleet, also that it belongs to
    /// that fleet.
    Manifest {
        #[command(flatten)]
        common: VerifyCommon,
        /// The fleet.resolved.json it must belong to (its signature is checked too).
        #[arg(long)]
        fleet: Option<PathBuf>,
        /// Signature of --fleet; defaults to FLEET.sig.
        #[arg(long)]
        fleet_sig: Option<PathBuf>,
        /// The schema-2 hosts file; defaults to FILE with .json replaced by .hosts.json.
        #[arg(long)]
        hosts: Option<PathBuf>,
        /// Directory of the schema-2 budget lists (<hostsSha256>.json); defaults to
        /// budgets/ beside FILE.
        #[arg(long)]
        budgets: Option<PathBuf>,
    },
    /// Verify one host's proof document (what the agent keeps at
    /// <state dir>/manifests/<rolloutId>.json): the signed manifest in it, its
    /// freshness, and the inclusion proof of the entry under the signed host-set root;
    /// with --host and --closure, that the entry names them.
    Proof {
        file: PathBuf,
        #[arg(long)]
        trust_file: PathBuf,
        /// The host the entry must name.
        #[arg(long)]
        host: Option<String>,
        /// The closure the entry must give the host (store path or basename).
        #[arg(long)]
        closure: Option<String>,
        /// The rollout id the proof must belong to; defaults to the id the file is named
        /// after (<rolloutId>.json or <rolloutId>.proof.json), else the one it names.
        #[arg(long)]
        rollout: Option<String>,
        /// Check the manifest's freshness as of this instant (auditing a past date).
        #[arg(long, value_parser = parse_time)]
        now: Option<OffsetDateTime>,
    },
    /// Verify revocations.json.
    Revocations {
        #[command(flatten)]
        common: VerifyCommon,
        /// signedAt of the list already applied; an older list is refused.
        #[arg(long, value_parser = parse_time)]
        last_applied: Option<OffsetDateTime>,
    },
    /// Verify a host-signed report (as the agent sends it: {"report", "signature"})
    /// against the host key pinned in a signed fleet.
    Report {
        file: PathBuf,
        /// The fleet.resolved.json whose hosts.<name>.pubkey signs the report (its own
        /// signature is checked with --trust-file).
        #[arg(long)]
        fleet: PathBuf,
        /// Signature of --fleet; defaults to FLEET.sig.
        #[arg(long)]
        fleet_sig: Option<PathBuf>,
        #[arg(long)]
        trust_file: PathBuf,
        /// Check the fleet's freshness as of this instant (auditing a past date).
        #[arg(long, value_parser = parse_time)]
        now: Option<OffsetDateTime>,
    },
    /// Verify host-signed compliance evidence (as `nixfleet compliance evidence` prints
    /// it) against the host key pinned in a signed fleet; with --manifest, that it was
    /// collected on the closure that rollout gives the host; with --latest, that it is not
    /// older than evidence of the host already held (a replay).
    Evidence {
        file: PathBuf,
        /// The fleet.resolved.json whose hosts.<name>.pubkey signs the evidence.
        #[arg(long)]
        fleet: PathBuf,
        /// Signature of --fleet; defaults to FLEET.sig.
        #[arg(long)]
        fleet_sig: Option<PathBuf>,
        #[arg(long)]
        trust_file: PathBuf,
        /// The host the evidence must come from.
        #[arg(long)]
        host: Option<String>,
        /// A rollout manifest (rollouts/<id>.json, with its .sig, and for schema 2 its
        /// hosts file and budgets/ beside it) of the same fleet.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The newest evidence of the host already held.
        #[arg(long)]
        latest: Option<PathBuf>,
        /// Check the fleet's and manifest's freshness as of this instant (auditing a past
        /// date).
        #[arg(long, value_parser = parse_time)]
        now: Option<OffsetDateTime>,
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
        Command::Release(args) => match *args {
            ReleaseArgs {
                command:
                    Some(ReleaseCommand::CheckFresh {
                        from,
                        trust_file,
                        within_minutes,
                        now,
                    }),
                ..
            } => out(&nixfleet_cli::pipeline::check_fresh(
                &from,
                &trust_file,
                within_minutes,
                now,
            )?),
            args => out(&release(args)?),
        },
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
                    hosts,
                    budgets,
                } => (
                    VerifyTarget::Manifest {
                        fleet,
                        fleet_sig,
                        hosts,
                        budgets,
                    },
                    common,
                ),
                VerifyCommand::Proof {
                    file,
                    trust_file,
                    host,
                    closure,
                    rollout,
                    now,
                } => {
                    out(&nixfleet_cli::proof::verify_proof(
                        &nixfleet_cli::proof::VerifyProof {
                            file,
                            trust_file,
                            host,
                            closure,
                            rollout,
                            now,
                        },
                    )?);
                    return Ok(());
                }
                VerifyCommand::Revocations {
                    common,
                    last_applied,
                } => (VerifyTarget::Revocations { last_applied }, common),
                VerifyCommand::Report {
                    file,
                    fleet,
                    fleet_sig,
                    trust_file,
                    now,
                } => (
                    VerifyTarget::Report { fleet, fleet_sig },
                    VerifyCommon {
                        file,
                        sig: None,
                        trust_file,
                        now,
                    },
                ),
                VerifyCommand::Evidence {
                    file,
                    fleet,
                    fleet_sig,
                    trust_file,
                    host,
                    manifest,
                    latest,
                    now,
                } => {
                    out(&nixfleet_cli::evidence::verify_evidence(
                        &nixfleet_cli::evidence::VerifyEvidence {
                            file,
                            fleet,
                            fleet_sig,
                            trust_file,
                            host,
                            manifest,
                            latest,
                            now,
                        },
                    )?);
                    return Ok(());
                }
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
        Command::Compliance(ComplianceCommand::Report {
            channel,
            framework,
            connection,
        }) => print_text(&connection.run(operator::Query::Compliance { channel, framework })?)?,
        Command::Compliance(ComplianceCommand::Evidence { host, endpoint }) => {
            print_text(&operator::run(
                &operator::Query::Evidence(host),
                &endpoint.args(),
                operator::Ui {
                    json: true,
                    style: operator::render::Style {
                        width: 80,
                        colour: false,
                    },
                    spinner: false,
                },
            )?)?
        }
        Command::Dashboard(args) => operator::dashboard::run(
            &operator::dashboard::DashboardArgs {
                listen: args.listen,
                allow_remote: args.allow_remote,
                refresh_secs: args.refresh_secs,
            },
            &args.endpoint.args(),
        )?,
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
            ExitCode::from(e.exit_code())
        }
    }
}
