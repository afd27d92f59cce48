//! `nixfleet-loadgen`: `fleet` writes a fleet to release, `run` simulates its agents
//! against a control plane, `enroll` measures an enrollment burst.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nixfleet_loadgen::conn::Endpoint;
use nixfleet_loadgen::enroll::{self, EnrollConfig};
use nixfleet_loadgen::fleet::{self, Shape};
use nixfleet_loadgen::run::{self, Mode, RunConfig};
use nixfleet_loadgen::{identity, LoadgenError};
use nixfleet_trust::keys::PrivateKey;
use serde::Serialize;

/// PEM files (CA certificate and key, org root key) are small.
const PEM_LIMIT: u64 = 64 << 10;

#[derive(Parser)]
#[command(
    name = "nixfleet-loadgen",
    version,
    about = "Simulates nixfleet agents against a real control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write fleet.json and closures.json for `nixfleet release`.
    Fleet(FleetArgs),
    /// Simulate the fleet's agents checking in.
    Run(RunArgs),
    /// Enroll hosts with bootstrap tokens as fast as the control plane answers.
    Enroll(EnrollArgs),
}

#[derive(Args)]
struct FleetArgs {
    #[arg(long)]
    hosts: usize,
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Seed of the deterministic host keys; `run` must be given the same.
    #[arg(long, default_value = "nixfleet-loadgen")]
    seed: String,
    /// Closure generation the release declares.
    #[arg(long, default_value_t = 1)]
    generation: u32,
    /// Only these channels get `--generation`; the others keep `--base-generation`.
    #[arg(long = "channel")]
    only_channels: Vec<String>,
    #[arg(long, default_value_t = 1)]
    base_generation: u32,
    #[arg(long, default_value_t = 0)]
    soak_minutes: u32,
    #[arg(long, default_value_t = 0)]
    max_failures: u32,
    /// Fleet-wide disruption budget: hosts in flight at most.
    #[arg(long)]
    budget: Option<u32>,
    /// Directory for fleet.json and closures.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    KeepAlive,
    Resume,
}

#[derive(Args)]
struct Target {
    /// Control plane address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    connect: SocketAddr,
    /// Name in the control plane's server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Fleet CA certificate (trust root for the server certificate).
    #[arg(long)]
    ca_cert: PathBuf,
    /// Bound on one request (connect, handshake, answer), seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    target: Target,
    /// Fleet CA key: every simulated host gets a certificate issued with it.
    #[arg(long)]
    ca_key: PathBuf,
    #[arg(long)]
    hosts: usize,
    /// First host index (to split a fleet over several load generators).
    #[arg(long, default_value_t = 0)]
    first_host: usize,
    #[arg(long, default_value = "nixfleet-loadgen")]
    seed: String,
    #[arg(long, value_enum, default_value = "resume")]
    mode: ModeArg,
    /// Seconds between check-ins; 0 = again as soon as answered; unset = the control
    /// plane's nextCheckinSecs.
    #[arg(long)]
    interval: Option<f64>,
    /// Each wait is the interval times 1 ± jitter.
    #[arg(long, default_value_t = 0.1)]
    jitter: f64,
    /// Spread the first check-ins over this many seconds (default: the interval).
    #[arg(long)]
    start_spread: Option<f64>,
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Leave the first seconds out of rate and latency (they are still counted).
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Seconds a simulated activation takes.
    #[arg(long, default_value_t = 2.0)]
    activate_delay: f64,
    /// Fraction of activations that fail (reported as a real agent does).
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Closure generation the hosts run at the start.
    #[arg(long, default_value_t = 1)]
    generation: u32,
    /// Hosts start without a lastConfirmedAt.
    #[arg(long)]
    unconfirmed: bool,
    /// The fleet's trust.json: a dispatched host then fetches its proof
    /// (`/v1/rollouts/{id}/hosts/{host}`) and verifies it with the agent's gate before it
    /// activates, as a real agent does.
    #[arg(long)]
    trust_file: Option<PathBuf>,
    /// Threads that mint certificates (default: all cores).
    #[arg(long)]
    mint_threads: Option<usize>,
}

#[derive(Args)]
struct EnrollArgs {
    #[command(flatten)]
    target: Target,
    /// Org root key (ed25519 PKCS#8 PEM) that signs the bootstrap tokens.
    #[arg(long)]
    org_root_key: PathBuf,
    #[arg(long)]
    hosts: usize,
    #[arg(long, default_value = "nixfleet-loadgen")]
    seed: String,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Used tokens to send again afterwards (each must get 409).
    #[arg(long, default_value_t = 100)]
    replays: usize,
}

fn read_pem(path: &Path) -> Result<String, LoadgenError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| LoadgenError::io("open", path, e))?;
    let mut text = String::new();
    file.take(PEM_LIMIT)
        .read_to_string(&mut text)
        .map_err(|e| LoadgenError::io("read", path, e))?;
    Ok(text)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), LoadgenError> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").map_err(|e| LoadgenError::io("write", path, e))
}

fn secs(what: &str, s: f64) -> Result<Duration, LoadgenError> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| LoadgenError::Usage(format!("{what} {s} is not a duration in seconds")))
}

fn runtime() -> Result<tokio::runtime::Runtime, LoadgenError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| LoadgenError::Usage(format!("cannot start the async runtime: {e}")))
}

fn fleet_command(args: FleetArgs) -> Result<(), LoadgenError> {
    let mut shape = Shape::new(args.hosts, &args.seed);
    shape.channels = args.channels.max(1);
    shape.soak_minutes = args.soak_minutes;
    shape.max_failures = args.max_failures;
    shape.budget = args.budget;
    std::fs::create_dir_all(&args.out).map_err(|e| LoadgenError::io("create", &args.out, e))?;
    write_json(&args.out.join("fleet.json"), &fleet::fleet_json(&shape)?)?;
    write_json(
        &args.out.join("closures.json"),
        &fleet::closures_json(
            &shape,
            args.generation,
            args.base_generation,
            &args.only_channels,
        ),
    )?;
    println!(
        "{} hosts in {} channels written to {}",
        args.hosts,
        shape.channels,
        args.out.display()
    );
    Ok(())
}

fn run_command(args: RunArgs) -> Result<(), LoadgenError> {
    if !(0.0..=1.0).contains(&args.failure_rate) || !(0.0..1.0).contains(&args.jitter) {
        return Err(LoadgenError::Usage(
            "--failure-rate must be in [0, 1] and --jitter in [0, 1)".into(),
        ));
    }
    let ca_pem = read_pem(&args.target.ca_cert)?;
    let ca =
        nixfleet_pki::FleetCa::from_pem(&ca_pem, &read_pem(&args.ca_key)?).map_err(|source| {
            LoadgenError::Pki {
                what: format!(
                    "cannot load the fleet CA from {} and {}",
                    args.target.ca_cert.display(),
                    args.ca_key.display()
                ),
                source,
            }
        })?;
    let hostnames: Vec<String> = (args.first_host..args.first_host + args.hosts)
        .map(fleet::hostname)
        .collect();
    let threads = args
        .mint_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let minting = std::time::Instant::now();
    let identities = identity::mint(
        &ca,
        &args.seed,
        &hostnames,
        time::OffsetDateTime::now_utc(),
        time::Duration::days(7),
        threads,
    )?;
    eprintln!(
        "{} host certificates issued in {:.1} s",
        identities.len(),
        minting.elapsed().as_secs_f64()
    );
    let interval = args.interval.map(|s| secs("--interval", s)).transpose()?;
    let config = RunConfig {
        endpoint: Endpoint::new(args.target.connect, &args.target.server_name)?,
        ca_pem,
        mode: match args.mode {
            ModeArg::KeepAlive => Mode::KeepAlive,
            ModeArg::Resume => Mode::Resume,
        },
        interval,
        jitter: args.jitter,
        start_spread: match args.start_spread {
            Some(s) => secs("--start-spread", s)?,
            None => interval.unwrap_or(Duration::from_secs(60)),
        },
        duration: secs("--duration", args.duration)?,
        warmup: secs("--warmup", args.warmup)?,
        activate_delay: secs("--activate-delay", args.activate_delay)?,
        failure_rate: args.failure_rate,
        timeout: secs("--timeout", args.target.timeout)?,
        generation: args.generation,
        confirmed: !args.unconfirmed,
        trust: args
            .trust_file
            .as_deref()
            .map(|path| {
                nixfleet_trust::verify::read_trust_file(
                    path,
                    &nixfleet_trust::verify::Limits::default(),
                )
                .map(std::sync::Arc::new)
                .map_err(|e| LoadgenError::Key {
                    what: format!("trust file {}", path.display()),
                    detail: e.to_string(),
                })
            })
            .transpose()?,
    };
    let summary = runtime()?.block_on(run::run(config, identities))?;
    println!("{}", summary.human());
    if let Some(path) = &args.target.json {
        write_json(path, &summary)?;
    }
    Ok(())
}

fn enroll_command(args: EnrollArgs) -> Result<(), LoadgenError> {
    let key_path = &args.org_root_key;
    let org_root_key =
        PrivateKey::from_pem(&read_pem(key_path)?).map_err(|e| LoadgenError::Key {
            what: format!("org root key {}", key_path.display()),
            detail: e.to_string(),
        })?;
    let config = EnrollConfig {
        endpoint: Endpoint::new(args.target.connect, &args.target.server_name)?,
        ca_pem: read_pem(&args.target.ca_cert)?,
        org_root_key,
        hosts: args.hosts,
        seed: args.seed,
        concurrency: args.concurrency,
        timeout: secs("--timeout", args.target.timeout)?,
        replays: args.replays,
    };
    let summary = runtime()?.block_on(enroll::run(config))?;
    println!("{}", summary.human());
    if let Some(path) = &args.target.json {
        write_json(path, &summary)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Fleet(args) => fleet_command(args),
        Command::Run(args) => run_command(args),
        Command::Enroll(args) => enroll_command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixfleet-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
