//! `nixfleet release --flake`: from a flake to a published, signed release in one
//! command, in stages that each stop the release with their own exit code:
//!
//! 1. evaluate: the flake's git state (HEAD is the commit; a dirty tree is refused) and
//!    `<fleet attr>.resolved`, mkFleet's unsigned fleet;
//! 2. build: each host's system closure, a bounded number at a time;
//! 3. compliance: the static gate: each host of a channel with compliance frameworks is
//!    evaluated with the fleet's controls (`<fleet attr>.compliance.evaluateHost` on
//!    `--config-attr`); a failed control stops an `enforce` release, a `permissive` one
//!    records it in the channel's signed manifest;
//! 4. push: to a Nix store URL (signed with the cache key) or through a command, then the
//!    proof: every path of every closure is read back from the cache the hosts use and
//!    must carry a signature by a key pinned in the trust file's `cacheKeys`;
//! 5. sign: the same code as the manual `nixfleet release` writes fleet.resolved.json and
//!    the manifests, into a staging directory;
//! 6. publish: to `--out`, then `--publish-dir`, each swapped in atomically, then as a
//!    commit on `--publish-git REMOTE:BRANCH`;
//! 7. verify: what was published, the way a control plane and an agent will.
//!
//! Also here: `--resign` (a scheduled re-sign of a published release, nothing rebuilt)
//! and `check-fresh`.

pub mod compliance;
pub mod git_publish;
pub mod narinfo;
pub mod publish;
pub mod run;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixfleet_proto::{FleetResolved, Meta, Revocations, TrustFile};
use nixfleet_trust::verify::{self, Limits};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::commands::{self, now_utc};
use crate::release::ManifestSchema;
use crate::signer::Signer;
use crate::{files, CliError};

/// The stages of a release; each failure exits with its stage's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Evaluate,
    Build,
    Compliance,
    Push,
    Sign,
    Publish,
    Verify,
    /// `check-fresh`: the published release goes stale soon (or is stale).
    Stale,
}

impl Stage {
    pub fn exit_code(self) -> u8 {
        match self {
            Stage::Evaluate => 10,
            Stage::Build => 11,
            Stage::Compliance => 12,
            Stage::Push => 13,
            Stage::Sign => 14,
            Stage::Publish => 15,
            Stage::Verify => 16,
            Stage::Stale => 20,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stage::Evaluate => "evaluate",
            Stage::Build => "build",
            Stage::Compliance => "compliance",
            Stage::Push => "push",
            Stage::Sign => "sign",
            Stage::Publish => "publish",
            Stage::Verify => "verify",
            Stage::Stale => "check-fresh",
        }
    }
}

/// A release stopped at `stage`; `message` is one sentence saying what to do.
#[derive(Debug, thiserror::Error)]
#[error("{} failed: {message}", stage.name())]
pub struct PipelineError {
    pub stage: Stage,
    pub message: String,
}

fn fail(stage: Stage, message: impl Into<String>) -> PipelineError {
    PipelineError {
        stage,
        message: message.into(),
    }
}

/// Where the closures go after they are built.
pub enum Push {
    /// Not pushed here (already in the cache, or pushed by a later CI step: then the
    /// cache check needs `--cache-url`).
    None,
    /// `nix copy --to URL`, after `nix store sign --recursive` with the key when given.
    To {
        url: String,
        signing_key: Option<PathBuf>,
    },
    /// `/bin/sh -c CMD` once per closure, with NIXFLEET_CLOSURE, NIXFLEET_HOST and
    /// NIXFLEET_CACHE_URL set.
    Command(String),
}

pub struct FlakeRelease {
    pub flake: PathBuf,
    pub fleet_attr: String,
    /// An attribute path with `{host}` for the host name.
    pub toplevel_attr: String,
    /// An attribute path with `{host}`: the host's configuration the compliance controls
    /// read (`nixosConfigurations.{host}.config`).
    pub config_attr: String,
    /// Build only these hosts; the others keep their closures from the previous release.
    pub hosts: Vec<String>,
    pub jobs: usize,
    pub allow_dirty: bool,
    pub ci_commit: Option<String>,
    /// `--option NAME VALUE` for every nix command.
    pub nix_options: Vec<(String, String)>,
    pub eval_timeout: Duration,
    pub build_timeout: Duration,
    pub push_timeout: Duration,
    pub push: Push,
    pub cache_url: Option<String>,
    pub signer: Signer,
    pub trust_file: PathBuf,
    pub out: PathBuf,
    pub publish_dir: Option<PathBuf>,
    /// `REMOTE:BRANCH`: also commit the release there and push.
    pub publish_git: Option<String>,
    pub signed_at: Option<OffsetDateTime>,
    pub manifest_schema: ManifestSchema,
}

/// How long one git command of `--publish-git` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

fn git_target(text: Option<&str>) -> Result<Option<git_publish::GitTarget>, PipelineError> {
    let Some(text) = text else { return Ok(None) };
    let target = git_publish::GitTarget::parse(text).map_err(|e| fail(Stage::Publish, e))?;
    git_publish::check(&target, GIT_TIMEOUT)
        .map_err(|e| fail(Stage::Publish, format!("{e}; nothing was built or signed")))?;
    Ok(Some(target))
}

/// Pushes the release in `dir` to the git target, if any; returns a summary line.
fn push_git(
    dir: &Path,
    target: Option<&git_publish::GitTarget>,
) -> Result<Option<String>, PipelineError> {
    let Some(target) = target else {
        return Ok(None);
    };
    let meta = std::fs::read(dir.join("fleet.resolved.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| v["meta"].clone())
        .unwrap_or_default();
    let message = format!(
        "nixfleet release of {} signed {}",
        meta["ciCommit"].as_str().unwrap_or("?"),
        meta["signedAt"].as_str().unwrap_or("?")
    );
    progress(&format!("pushing to {}:{}", target.remote, target.branch));
    let commit = git_publish::publish(dir, target, &message, GIT_TIMEOUT).map_err(|e| {
        fail(
            Stage::Publish,
            format!("{e}; the signed release is in {}", dir.display()),
        )
    })?;
    Ok(Some(format!(
        "pushed to {}:{} as {commit}",
        target.remote, target.branch
    )))
}

fn progress(line: &str) {
    eprintln!("nixfleet release: {line}");
}

fn nix(options: &[(String, String)]) -> Command {
    let mut cmd = Command::new("nix");
    cmd.args(["--extra-experimental-features", "nix-command flakes"]);
    for (name, value) in options {
        cmd.arg("--option").arg(name).arg(value);
    }
    cmd
}

fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    cmd.arg("-c")
        .arg(format!("safe.directory={}", dir.display()))
        .arg("-C")
        .arg(dir)
        .args(args);
    let out = run::run(cmd, Duration::from_secs(60)).map_err(|e| e.to_string())?;
    if !out.success {
        return Err(out.last_lines(2));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The flake reference to evaluate and the commit to stamp.
fn source(args: &FlakeRelease) -> Result<(String, String), PipelineError> {
    let dir = std::fs::canonicalize(&args.flake).map_err(|e| {
        fail(
            Stage::Evaluate,
            format!("flake directory {}: {e}", args.flake.display()),
        )
    })?;
    if !dir.join("flake.nix").is_file() {
        return Err(fail(
            Stage::Evaluate,
            format!(
                "{} holds no flake.nix; point --flake at your fleet's flake",
                dir.display()
            ),
        ));
    }
    let toplevel = git(&dir, &["rev-parse", "--show-toplevel"]).ok();
    let Some(toplevel) = toplevel else {
        let commit = args.ci_commit.clone().ok_or_else(|| {
            fail(
                Stage::Evaluate,
                format!(
                    "{} is not in a git checkout, so there is no commit to stamp; pass --ci-commit",
                    dir.display()
                ),
            )
        })?;
        return Ok((format!("path:{}", dir.display()), commit));
    };
    let status =
        git(&dir, &["status", "--porcelain", "--untracked-files=normal"]).map_err(|e| {
            fail(
                Stage::Evaluate,
                format!("git status in {}: {e}", dir.display()),
            )
        })?;
    // What this command writes (--out, --publish-dir, their staging siblings) may sit in
    // the checkout; it is not a change to the fleet.
    let ours: Vec<String> = std::iter::once(&args.out)
        .chain(args.publish_dir.as_ref())
        .filter_map(|p| {
            let parent = std::fs::canonicalize(
                p.parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )
            .ok()?;
            let rel = parent.join(p.file_name()?);
            rel.strip_prefix(&toplevel)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .collect();
    let is_ours = |path: &str| {
        let path = path.trim_end_matches('/');
        ours.iter().any(|o| {
            let (dir, name) = o.rsplit_once('/').unwrap_or(("", o.as_str()));
            let staging = if dir.is_empty() {
                format!(".{name}.")
            } else {
                format!("{dir}/.{name}.")
            };
            path == o || path.starts_with(&format!("{o}/")) || path.starts_with(&staging)
        })
    };
    let changes: Vec<&str> = status
        .lines()
        .filter(|l| {
            let path = l
                .trim_start()
                .split_once(' ')
                .map_or("", |(_, p)| p.trim_start());
            !is_ours(path)
        })
        .collect();
    if !changes.is_empty() && !args.allow_dirty {
        let first: Vec<&str> = changes.iter().take(3).copied().collect();
        return Err(fail(
            Stage::Evaluate,
            format!("the git tree at {toplevel} has uncommitted changes ({}); commit them so the release names what it was built from, or pass --allow-dirty", first.join(", ")),
        ));
    }
    let commit = match &args.ci_commit {
        Some(c) => c.clone(),
        None => git(&dir, &["rev-parse", "HEAD"]).map_err(|e| {
            fail(
                Stage::Evaluate,
                format!(
                    "git rev-parse HEAD in {}: {e}; commit once or pass --ci-commit",
                    dir.display()
                ),
            )
        })?,
    };
    let toplevel = PathBuf::from(toplevel);
    let reference = match dir.strip_prefix(&toplevel) {
        Ok(rel) if !rel.as_os_str().is_empty() => {
            format!("git+file://{}?dir={}", toplevel.display(), rel.display())
        }
        _ => format!("git+file://{}", toplevel.display()),
    };
    Ok((reference, commit))
}

/// The attribute path of a host's toplevel, the host quoted when it holds a dot.
fn host_attr(template: &str, host: &str) -> String {
    let quoted = if host.contains('.') {
        format!("\"{host}\"")
    } else {
        host.to_owned()
    };
    template.replace("{host}", &quoted)
}

fn evaluate(args: &FlakeRelease, reference: &str) -> Result<FleetResolved, PipelineError> {
    let attr = format!("{reference}#{}.resolved", args.fleet_attr);
    progress(&format!("evaluating {attr}"));
    let mut cmd = nix(&args.nix_options);
    cmd.args(["eval", "--json", "--no-write-lock-file", &attr]);
    let out = run::run(cmd, args.eval_timeout).map_err(|e| fail(Stage::Evaluate, e.to_string()))?;
    if !out.success {
        return Err(fail(
            Stage::Evaluate,
            format!(
                "nix eval {attr} exited with {}: {}",
                out.status,
                out.last_lines(6)
            ),
        ));
    }
    if out.stdout_truncated {
        return Err(fail(
            Stage::Evaluate,
            format!("nix eval {attr} printed more than {} bytes; is --fleet-attr the output of mkFleet?", run::STDOUT_LIMIT),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(
            Stage::Evaluate,
            format!("{attr} is not an unsigned fleet.resolved ({e}); --fleet-attr must name the output of mkFleet, whose .resolved is evaluated"),
        )
    })
}

/// Builds `hosts` in parallel; returns host -> full store path.
fn build(
    args: &FlakeRelease,
    reference: &str,
    hosts: &[String],
) -> Result<BTreeMap<String, String>, PipelineError> {
    let total = hosts.len();
    let queue: Arc<Mutex<VecDeque<(usize, String)>>> = Arc::new(Mutex::new(
        hosts
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, h)| (i + 1, h))
            .collect(),
    ));
    let results: Arc<Mutex<BTreeMap<String, Result<String, String>>>> = Arc::default();
    let jobs = args.jobs.clamp(1, total.max(1));
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (queue, results) = (queue.clone(), results.clone());
            scope.spawn(move || loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((n, host)) = next else { return };
                let attr = format!("{reference}#{}", host_attr(&args.toplevel_attr, &host));
                progress(&format!("[{n}/{total}] {host}: building"));
                let started = Instant::now();
                let result = build_one(args, &attr);
                let secs = started.elapsed().as_secs_f32();
                match &result {
                    Ok(path) => progress(&format!(
                        "[{n}/{total}] {host}: built {path} in {secs:.1} s"
                    )),
                    Err(e) => progress(&format!(
                        "[{n}/{total}] {host}: FAILED after {secs:.1} s: {e}"
                    )),
                }
                if let Ok(mut r) = results.lock() {
                    r.insert(host, result);
                }
            });
        }
    });
    let results = std::mem::take(
        &mut *results
            .lock()
            .map_err(|_| fail(Stage::Build, "a build thread panicked"))?,
    );
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(h, r)| r.as_ref().err().map(|e| format!("{h} ({e})")))
        .collect();
    if !failed.is_empty() {
        return Err(fail(
            Stage::Build,
            format!("{} of {total} host(s) did not build: {}; fix their configuration (nothing was pushed or signed)", failed.len(), failed.join("; ")),
        ));
    }
    Ok(results
        .into_iter()
        .filter_map(|(h, r)| r.ok().map(|p| (h, p)))
        .collect())
}

fn build_one(args: &FlakeRelease, attr: &str) -> Result<String, String> {
    let mut cmd = nix(&args.nix_options);
    cmd.args(["build", "--no-link", "--json", "--no-write-lock-file", attr]);
    let out = run::run(cmd, args.build_timeout).map_err(|e| e.to_string())?;
    if !out.success {
        return Err(format!(
            "nix build {attr} exited with {}: {}",
            out.status,
            out.last_lines(4)
        ));
    }
    #[derive(serde::Deserialize)]
    struct Built {
        outputs: BTreeMap<String, String>,
    }
    let built: Vec<Built> = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("nix build --json printed no build result ({e})"))?;
    let path = built
        .first()
        .and_then(|b| b.outputs.get("out"))
        .cloned()
        .ok_or_else(|| format!("nix build {attr} produced no `out` output"))?;
    if crate::release::normalize_closure(&path).is_none() {
        return Err(format!(
            "nix build {attr} produced {path}, which is not a store path"
        ));
    }
    Ok(path)
}

fn push(
    args: &FlakeRelease,
    closures: &BTreeMap<String, String>,
    cache_url: Option<&str>,
) -> Result<(), PipelineError> {
    let paths: Vec<&String> = closures.values().collect();
    match &args.push {
        Push::None => Ok(()),
        Push::To { url, signing_key } => {
            if let Some(key) = signing_key {
                progress(&format!(
                    "signing {} closure(s) with {}",
                    paths.len(),
                    key.display()
                ));
                let mut cmd = nix(&args.nix_options);
                cmd.args(["store", "sign", "--recursive", "--key-file"])
                    .arg(key)
                    .args(&paths);
                let out = run::run(cmd, args.push_timeout)
                    .map_err(|e| fail(Stage::Push, e.to_string()))?;
                if !out.success {
                    return Err(fail(
                        Stage::Push,
                        format!("nix store sign --key-file {} exited with {}: {}; check that it is the secret key from nix-store --generate-binary-cache-key", key.display(), out.status, out.last_lines(3)),
                    ));
                }
            }
            progress(&format!("copying {} closure(s) to {url}", paths.len()));
            let mut cmd = nix(&args.nix_options);
            cmd.args(["copy", "--to", url]).args(&paths);
            let out =
                run::run(cmd, args.push_timeout).map_err(|e| fail(Stage::Push, e.to_string()))?;
            if !out.success {
                return Err(fail(
                    Stage::Push,
                    format!("nix copy --to {url} exited with {}: {}; check the URL and your write access to the cache", out.status, out.last_lines(3)),
                ));
            }
            Ok(())
        }
        Push::Command(command) => {
            for (host, closure) in closures {
                progress(&format!("{host}: pushing {closure} with --push-cmd"));
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(command)
                    .env("NIXFLEET_CLOSURE", closure)
                    .env("NIXFLEET_HOST", host)
                    .env("NIXFLEET_CACHE_URL", cache_url.unwrap_or(""));
                let out = run::run(cmd, args.push_timeout)
                    .map_err(|e| fail(Stage::Push, format!("push command for host {host}: {e}")))?;
                if !out.success {
                    return Err(fail(
                        Stage::Push,
                        format!("push command {command:?} for host {host} ({closure}) exited with {}: {}; nothing was signed", out.status, out.last_lines(3)),
                    ));
                }
            }
            Ok(())
        }
    }
}

/// Reads every closure back from the cache and checks its signatures (see [`narinfo`]).
fn prove_push(
    closures: &BTreeMap<String, String>,
    cache_url: &str,
    trust: &TrustFile,
    trust_file: &Path,
) -> Result<(), PipelineError> {
    let keys = narinfo::cache_keys(&trust.cache_keys)
        .map_err(|e| fail(Stage::Push, format!("{}: {e}", trust_file.display())))?;
    let cache = narinfo::CacheSource::open(cache_url, Duration::from_secs(30))
        .map_err(|e| fail(Stage::Push, e))?;
    let mut seen = BTreeSet::new();
    for (host, closure) in closures {
        match narinfo::check_closure(&cache, closure, &keys, &mut seen) {
            Ok(n) => progress(&format!("{host}: {closure} is in {cache_url}, signed by a pinned cache key ({n} new path(s) checked)")),
            Err(narinfo::Refusal::Missing { path }) => {
                let what = if &path == closure { "it".to_owned() } else { format!("its dependency {path}") };
                return Err(fail(
                    Stage::Push,
                    format!("the closure {closure} of host {host} is not in the cache {cache_url} ({what} has no narinfo there); push it where the hosts fetch from (--push-to, --cache-url) before releasing; nothing was signed"),
                ));
            }
            Err(narinfo::Refusal::Unsigned { path, signers }) => {
                let pinned: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
                return Err(fail(
                    Stage::Push,
                    format!("{path} (closure of host {host}) in the cache {cache_url} is signed by {signers} but by no key pinned in {}'s cacheKeys ({}), so agents would refuse it; sign it with a pinned key (--cache-signing-key) or pin its key; nothing was signed", trust_file.display(), pinned.join(", ")),
                ));
            }
            Err(narinfo::Refusal::Unreadable { path, reason }) => {
                return Err(fail(
                    Stage::Push,
                    format!("could not check {path} (closure of host {host}) in the cache {cache_url}: {reason}; nothing was signed"),
                ));
            }
        }
    }
    Ok(())
}

/// The fleet of the release already at `dir`, checked against the trust file as of its
/// own signing time (an expired release is fine to read closures or intent from; one
/// that was not signed by the pinned key is not).
fn previous_release(dir: &Path, trust: &TrustFile) -> Result<Option<FleetResolved>, String> {
    let path = dir.join("fleet.resolved.json");
    if !path.exists() {
        return Ok(None);
    }
    let signed_at = signed_at_of(&path)?;
    let verified = commands::verify_fleet_file(&path, None, trust, signed_at).map_err(|e| {
        format!("{e}; it was not signed by the pinned CI release key, so it is not used")
    })?;
    Ok(Some(verified.value))
}

fn signed_at_of(path: &Path) -> Result<OffsetDateTime, String> {
    #[derive(serde::Deserialize)]
    struct WithMeta {
        meta: Meta,
    }
    let bytes =
        files::read_limited(path, Limits::default().fleet_bytes).map_err(|e| e.to_string())?;
    let parsed: WithMeta =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    parsed
        .meta
        .signed_at
        .ok_or_else(|| format!("{} carries no meta.signedAt", path.display()))
}

/// Where the release is seeded from (for `introduced` and earlier manifests).
fn seed_source(out: &Path, publish_dir: Option<&Path>) -> Option<PathBuf> {
    [publish_dir, Some(out)]
        .into_iter()
        .flatten()
        .find(|d| d.join("fleet.resolved.json").is_file() || d.join("rollouts").is_dir())
        .map(Path::to_path_buf)
}

fn sign_error(e: CliError) -> PipelineError {
    match e {
        CliError::Verify { .. } | CliError::MissingHostList { .. } => fail(Stage::Verify, format!("the signed release does not verify against the trust file: {e}; nothing was published")),
        CliError::Fleet(_) => fail(Stage::Evaluate, format!("{e}")),
        CliError::Pipeline(e) => e,
        other => fail(Stage::Sign, format!("{other}; nothing was published")),
    }
}

/// A staging directory removed on drop.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn new_staging(out: &Path, seed: Option<&Path>) -> Result<Staging, PipelineError> {
    let path = publish::sibling(out, "signing");
    let staging = Staging(path.clone());
    let result = match seed {
        Some(seed) => publish::publish(seed, &path),
        None => std::fs::create_dir(&path)
            .map_err(|e| format!("could not create {}: {e}", path.display())),
    };
    result.map_err(|e| fail(Stage::Publish, e))?;
    Ok(staging)
}

/// What the agents and the control plane will check, on the published directory.
fn verify_published(
    dir: &Path,
    trust: &TrustFile,
    expect: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, PipelineError> {
    let now = now_utc();
    let bad = |e: String| {
        fail(
            Stage::Verify,
            format!(
                "the published release at {} does not verify: {e}",
                dir.display()
            ),
        )
    };
    let fleet = commands::verify_fleet_file(&dir.join("fleet.resolved.json"), None, trust, now)
        .map_err(|e| bad(e.to_string()))?;
    let mut ids = BTreeMap::new();
    for channel in fleet.value.channels.keys() {
        let by_channel = dir.join("rollouts/channel").join(format!("{channel}.json"));
        let manifest = commands::verify_manifest_file(&by_channel, None, trust, now, Some(&fleet))
            .map_err(|e| bad(e.to_string()))?;
        let by_id = dir.join("rollouts").join(format!("{}.json", manifest.id));
        commands::verify_manifest_file(&by_id, None, trust, now, Some(&fleet))
            .map_err(|e| bad(e.to_string()))?;
        if let Some(expect) = expect {
            for entry in &manifest.value.host_set {
                let want = expect
                    .get(&entry.hostname)
                    .map(|p| p.trim_start_matches("/nix/store/"));
                if want != Some(entry.target_closure.as_str()) {
                    return Err(bad(format!(
                        "manifest {} gives host {} the closure {}, not the one built",
                        manifest.id, entry.hostname, entry.target_closure
                    )));
                }
            }
        }
        ids.insert(channel.clone(), manifest.id);
    }
    Ok(ids)
}

/// `nixfleet release --flake`: returns the summary and warnings.
pub fn release_flake(args: FlakeRelease) -> Result<(String, Vec<String>), PipelineError> {
    let trust = commands::load_trust(&args.trust_file).map_err(|e| {
        fail(
            Stage::Verify,
            format!("{e}; the release is verified against it"),
        )
    })?;
    // Everything that can be checked before building is checked now.
    let cache_url = args.cache_url.clone().or_else(|| match &args.push {
        Push::To { url, .. }
            if url.starts_with("file://")
                || url.starts_with("http://")
                || url.starts_with("https://") =>
        {
            Some(url.clone())
        }
        _ => None,
    });
    if cache_url.is_none() && !matches!(args.push, Push::None) {
        return Err(fail(Stage::Push, "pass --cache-url with the file:// or http(s):// URL the hosts fetch closures from, so the push can be read back before signing"));
    }
    if cache_url.is_some() {
        narinfo::cache_keys(&trust.cache_keys)
            .map_err(|e| fail(Stage::Push, format!("{}: {e}", args.trust_file.display())))?;
    }
    if let Push::To {
        signing_key: Some(key),
        ..
    } = &args.push
    {
        files::read_limited(key, 64 << 10)
            .map_err(|e| fail(Stage::Push, format!("cache signing key: {e}")))?;
    }
    for target in std::iter::once(&args.out).chain(args.publish_dir.as_ref()) {
        publish::check_writable(target)
            .map_err(|e| fail(Stage::Publish, format!("{e}; nothing was built or signed")))?;
    }
    let git_dest = git_target(args.publish_git.as_deref())?;

    let (reference, commit) = source(&args)?;
    let mut fleet = evaluate(&args, &reference)?;
    let all: Vec<String> = fleet.hosts.keys().cloned().collect();
    if let Some(unknown) = args.hosts.iter().find(|h| !fleet.hosts.contains_key(*h)) {
        return Err(fail(
            Stage::Evaluate,
            format!(
                "--host {unknown} is not a host of the fleet (hosts: {})",
                all.join(", ")
            ),
        ));
    }
    let selected: Vec<String> = if args.hosts.is_empty() {
        all.clone()
    } else {
        args.hosts
            .iter()
            .filter(|h| all.contains(h))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let seed = seed_source(&args.out, args.publish_dir.as_deref());
    let mut closures: BTreeMap<String, String> = BTreeMap::new();
    if selected.len() < all.len() {
        let previous = match &seed {
            Some(dir) => previous_release(dir, &trust).map_err(|e| fail(Stage::Evaluate, e))?,
            None => None,
        };
        for host in all.iter().filter(|h| !selected.contains(h)) {
            let closure = previous
                .as_ref()
                .and_then(|p| p.hosts.get(host))
                .and_then(|h| h.closure_hash.clone())
                .ok_or_else(|| fail(Stage::Evaluate, format!("host {host} was not named with --host and no previous release (in --publish-dir or --out) gives it a closure; build it too")))?;
            closures.insert(host.clone(), format!("/nix/store/{closure}"));
        }
    }

    closures.extend(build(&args, &reference, &selected)?);
    // Every host of a gated channel is checked, also one not rebuilt: the release signs
    // its closure again, under the fleet's current controls.
    // Always a results file for the signing step, empty when no channel is gated: then
    // no manifest keeps an earlier release's record.
    let compliance_results = compliance::evaluate(&args, &reference, &fleet)?.unwrap_or_default();
    {
        let decision =
            crate::compliance_gate::decide(&fleet, &compliance_results).map_err(|e| match e {
                crate::compliance_gate::GateError::Refused(_) => {
                    fail(Stage::Compliance, e.to_string())
                }
                _ => fail(
                    Stage::Compliance,
                    format!("{e}; nothing was pushed or signed"),
                ),
            })?;
        for (channel, outcome) in &decision.channels {
            progress(&format!(
                "compliance: channel {channel} ({}): {} failure(s){}",
                outcome.mode.as_str(),
                outcome.static_failures.len(),
                if outcome.static_failures.is_empty() {
                    ""
                } else {
                    ", recorded in its manifest"
                }
            ));
        }
    }
    push(
        &args,
        &closures
            .iter()
            .filter(|(h, _)| selected.contains(h))
            .map(|(h, c)| (h.clone(), c.clone()))
            .collect(),
        cache_url.as_deref(),
    )?;
    match &cache_url {
        Some(url) => prove_push(&closures, url, &trust, &args.trust_file)?,
        None => progress("warning: no --push-to or --cache-url: the closures were not read back from a cache; agents will refuse any that is not in theirs, signed"),
    }

    // From here to the end, no other release or re-sign publishes to the same places.
    let _locks = lock_all(&args.out, args.publish_dir.as_deref())?;
    // Sign: the manual path's code, into a staging directory beside --out.
    for host in fleet.hosts.values_mut() {
        host.closure_hash = None;
    }
    fleet.meta = Meta {
        schema_version: fleet.meta.schema_version,
        signed_at: None,
        ci_commit: None,
        signature_algorithm: None,
    };
    let staging = new_staging(&args.out, seed.as_deref())?;
    let inputs = Staging(publish::sibling(&args.out, "inputs"));
    std::fs::create_dir(&inputs.0).map_err(|e| {
        fail(
            Stage::Sign,
            format!("could not create {}: {e}", inputs.0.display()),
        )
    })?;
    let fleet_path = write_input(&inputs.0, "fleet.json", &fleet)?;
    let closures_path = write_input(&inputs.0, "closures.json", &closures)?;
    let compliance_path = write_input(&inputs.0, "compliance.json", &compliance_results)?;
    let release_args = commands::ReleaseArgs {
        fleet: fleet_path,
        closures: closures_path,
        ci_commit: commit,
        signer: args.signer,
        out: staging.0.clone(),
        trust_file: Some(args.trust_file.clone()),
        signed_at: args.signed_at,
        manifest_schema: args.manifest_schema,
    };
    progress("signing");
    let (summary, warnings) =
        commands::release_with_compliance(&release_args, Some(&compliance_path))
            .map_err(sign_error)?;

    progress(&format!("publishing to {}", args.out.display()));
    publish::publish(&staging.0, &args.out).map_err(|e| fail(Stage::Publish, e))?;
    let published = match &args.publish_dir {
        Some(dir) => {
            progress(&format!("publishing to {}", dir.display()));
            publish::publish(&args.out, dir).map_err(|e| {
                fail(
                    Stage::Publish,
                    format!("{e}; the signed release is in {}", args.out.display()),
                )
            })?;
            dir.clone()
        }
        None => args.out.clone(),
    };
    let pushed = push_git(&published, git_dest.as_ref())?;
    let ids = verify_published(&published, &trust, Some(&closures))?;
    let mut lines = vec![summary];
    lines.extend(pushed);
    lines.push(format!(
        "published to {}; verified as agents will: {}",
        published.display(),
        ids.iter()
            .map(|(c, id)| format!("{c} {id}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok((lines.join("\n"), warnings))
}

fn lock_all(
    out: &Path,
    publish_dir: Option<&Path>,
) -> Result<Vec<publish::PublishLock>, PipelineError> {
    let mut targets = vec![out.to_path_buf()];
    if let Some(dir) = publish_dir {
        if dir != out {
            targets.push(dir.to_path_buf());
        }
    }
    targets
        .iter()
        .map(|t| {
            publish::lock(t, publish::LOCK_WAIT)
                .map_err(|e| fail(Stage::Publish, format!("{e}; nothing was signed")))
        })
        .collect()
}

/// Writes an input of the signing step (the fleet, the closures) as JSON.
fn write_input<T: serde::Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
) -> Result<PathBuf, PipelineError> {
    let path = dir.join(name);
    let bytes = serde_json::to_vec(value)
        .map_err(|e| fail(Stage::Sign, format!("could not serialise {name}: {e}")))?;
    files::write_atomic(&path, &bytes, 0o600).map_err(|e| fail(Stage::Sign, e.to_string()))?;
    Ok(path)
}

pub struct Resign {
    pub from: PathBuf,
    /// Where the re-signed release goes; `from` when None.
    pub out: Option<PathBuf>,
    pub publish_dir: Option<PathBuf>,
    pub publish_git: Option<String>,
    pub signer: Signer,
    pub trust_file: PathBuf,
    pub signed_at: Option<OffsetDateTime>,
}

/// `nixfleet release --resign --from DIR`: new signatures (and signedAt) on the same
/// intent; every rollout id stays what it was.
pub fn resign(args: Resign) -> Result<String, PipelineError> {
    let trust =
        commands::load_trust(&args.trust_file).map_err(|e| fail(Stage::Verify, e.to_string()))?;
    let out = args.out.clone().unwrap_or_else(|| args.from.clone());
    for target in std::iter::once(&out).chain(args.publish_dir.as_ref()) {
        publish::check_writable(target)
            .map_err(|e| fail(Stage::Publish, format!("{e}; nothing was signed")))?;
    }
    let git_dest = git_target(args.publish_git.as_deref())?;
    let _locks = lock_all(&out, args.publish_dir.as_deref())?;
    let fleet = previous_release(&args.from, &trust)
        .map_err(|e| {
            fail(
                Stage::Verify,
                format!("refusing to re-sign {}: {e}", args.from.display()),
            )
        })?
        .ok_or_else(|| {
            fail(
                Stage::Verify,
                format!(
                    "{} holds no fleet.resolved.json to re-sign",
                    args.from.display()
                ),
            )
        })?;
    let (before, manifest_schema) = verify_ids(&args.from, &trust, &fleet)?;
    let commit = fleet.meta.ci_commit.clone().unwrap_or_default();
    let closures: BTreeMap<String, String> = fleet
        .hosts
        .iter()
        .filter_map(|(h, host)| host.closure_hash.clone().map(|c| (h.clone(), c)))
        .collect();
    let mut unsigned = fleet;
    for host in unsigned.hosts.values_mut() {
        host.closure_hash = None;
    }
    unsigned.meta = Meta {
        schema_version: unsigned.meta.schema_version,
        signed_at: None,
        ci_commit: None,
        signature_algorithm: None,
    };
    let revocations = read_revocations(&args.from, &trust)?;

    let staging = new_staging(&out, Some(&args.from))?;
    let inputs = Staging(publish::sibling(&out, "inputs"));
    std::fs::create_dir(&inputs.0).map_err(|e| {
        fail(
            Stage::Sign,
            format!("could not create {}: {e}", inputs.0.display()),
        )
    })?;
    let release_args = commands::ReleaseArgs {
        fleet: write_input(&inputs.0, "fleet.json", &unsigned)?,
        closures: write_input(&inputs.0, "closures.json", &closures)?,
        ci_commit: commit.clone(),
        signer: args.signer,
        out: staging.0.clone(),
        trust_file: Some(args.trust_file.clone()),
        signed_at: args.signed_at,
        // The schema of the release re-signed: another would change every rollout id.
        manifest_schema,
    };
    let (summary, _warnings) = commands::release(&release_args).map_err(sign_error)?;
    let mut lines = vec![summary];
    if let Some(mut list) = revocations {
        list.meta = Meta {
            schema_version: list.meta.schema_version,
            signed_at: None,
            ci_commit: None,
            signature_algorithm: None,
        };
        let line = commands::revocations_sign(&commands::RevocationsSignArgs {
            input: write_input(&inputs.0, "revocations.json", &list)?,
            signer: release_args.signer,
            out: staging.0.clone(),
            ci_commit: Some(commit),
            signed_at: args.signed_at,
        })
        .map_err(sign_error)?;
        lines.push(line);
    }
    let resigned: FleetResolved = previous_release(&staging.0, &trust)
        .map_err(|e| fail(Stage::Verify, e))?
        .ok_or_else(|| {
            fail(
                Stage::Sign,
                "the re-signed release has no fleet.resolved.json",
            )
        })?;
    let (after, _) = verify_ids(&staging.0, &trust, &resigned)?;
    if before != after {
        return Err(fail(Stage::Verify, format!("re-signing changed rollout ids ({before:?} -> {after:?}); this is a bug: nothing was published")));
    }
    publish::publish(&staging.0, &out).map_err(|e| fail(Stage::Publish, e))?;
    let published = match &args.publish_dir {
        Some(dir) => {
            publish::publish(&out, dir).map_err(|e| fail(Stage::Publish, e))?;
            dir.clone()
        }
        None => out,
    };
    lines.extend(push_git(&published, git_dest.as_ref())?);
    let ids = verify_published(&published, &trust, None)?;
    lines.push(format!(
        "re-signed and published to {}; rollout ids unchanged: {}",
        published.display(),
        ids.iter()
            .map(|(c, id)| format!("{c} {id}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(lines.join("\n"))
}

/// channel -> rollout id of the release at `dir`, each manifest checked as of its fleet's
/// signing time, and the manifest schema it was released with (1 if any manifest is).
fn verify_ids(
    dir: &Path,
    trust: &TrustFile,
    fleet: &FleetResolved,
) -> Result<(BTreeMap<String, String>, ManifestSchema), PipelineError> {
    let path = dir.join("fleet.resolved.json");
    let signed_at = signed_at_of(&path).map_err(|e| fail(Stage::Verify, e))?;
    let verified = commands::verify_fleet_file(&path, None, trust, signed_at)
        .map_err(|e| fail(Stage::Verify, e.to_string()))?;
    let mut ids = BTreeMap::new();
    let mut schema = ManifestSchema::V2;
    for channel in fleet.channels.keys() {
        let by_channel = dir.join("rollouts/channel").join(format!("{channel}.json"));
        let manifest =
            commands::verify_manifest_file(&by_channel, None, trust, signed_at, Some(&verified))
                .map_err(|e| {
                    fail(
                        Stage::Verify,
                        format!("{e}; refusing to re-sign a release whose manifests do not verify"),
                    )
                })?;
        if manifest.value.schema_version == ManifestSchema::V1.version() {
            schema = ManifestSchema::V1;
        }
        ids.insert(channel.clone(), manifest.id);
    }
    Ok((ids, schema))
}

fn read_revocations(dir: &Path, trust: &TrustFile) -> Result<Option<Revocations>, PipelineError> {
    let path = dir.join("revocations.json");
    if !path.exists() {
        return Ok(None);
    }
    let bad = |e: String| {
        fail(
            Stage::Verify,
            format!("refusing to re-sign {}: {e}", path.display()),
        )
    };
    let signed_at = signed_at_of(&path).map_err(bad)?;
    let limits = Limits::default();
    let bytes =
        files::read_limited(&path, limits.revocations_bytes).map_err(|e| bad(e.to_string()))?;
    let sig = files::read_limited(&dir.join("revocations.json.sig"), 4096)
        .map_err(|e| bad(e.to_string()))?;
    let verified = verify::verify_revocations(&bytes, &sig, trust, signed_at, None, &limits)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Some(verified.value))
}

/// `nixfleet release check-fresh`: Ok while the release at `dir` stays fresh for more
/// than `within` minutes.
pub fn check_fresh(
    dir: &Path,
    trust_file: &Path,
    within: u32,
    now: Option<OffsetDateTime>,
) -> Result<String, PipelineError> {
    let trust = commands::load_trust(trust_file).map_err(|e| fail(Stage::Verify, e.to_string()))?;
    let now = now.unwrap_or_else(now_utc);
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
    let fleet_path = dir.join("fleet.resolved.json");
    let fleet = commands::verify_fleet_file(&fleet_path, None, &trust, now).map_err(|e| {
        fail(
            Stage::Stale,
            format!(
                "{e}; re-sign it now (nixfleet release --resign --from {})",
                dir.display()
            ),
        )
    })?;
    let window = fleet.value.freshness_window_minutes().unwrap_or(0);
    let mut deadlines = vec![(
        "fleet.resolved.json".to_owned(),
        fleet.signed_at + time::Duration::minutes(i64::from(window)),
    )];
    if dir.join("revocations.json").exists() {
        let limits = Limits::default();
        let path = dir.join("revocations.json");
        let bytes = files::read_limited(&path, limits.revocations_bytes)
            .map_err(|e| fail(Stage::Verify, e.to_string()))?;
        let sig = files::read_limited(&dir.join("revocations.json.sig"), 4096)
            .map_err(|e| fail(Stage::Verify, e.to_string()))?;
        let list =
            verify::verify_revocations(&bytes, &sig, &trust, now, None, &limits).map_err(|e| {
                fail(
                    Stage::Stale,
                    format!(
                        "{}: {e}; re-sign it now (nixfleet release --resign --from {})",
                        path.display(),
                        dir.display()
                    ),
                )
            })?;
        let minutes = list
            .value
            .freshness_window
            .unwrap_or(verify::DEFAULT_REVOCATIONS_FRESHNESS_MINUTES);
        deadlines.push((
            "revocations.json".to_owned(),
            list.signed_at + time::Duration::minutes(i64::from(minutes)),
        ));
    }
    let (what, stale_at) = deadlines
        .into_iter()
        .min_by_key(|(_, t)| *t)
        .ok_or_else(|| fail(Stage::Verify, "nothing to check"))?;
    let left = (stale_at - now).whole_minutes();
    if left < i64::from(within) {
        return Err(fail(
            Stage::Stale,
            format!("{what} in {} goes stale at {} (in {left} minute(s), less than {within}); re-sign it now (nixfleet release --resign --from {})", dir.display(), fmt(stale_at), dir.display()),
        ));
    }
    Ok(format!(
        "fresh: {what} in {} goes stale at {} (in {left} minute(s))",
        dir.display(),
        fmt(stale_at)
    ))
}
