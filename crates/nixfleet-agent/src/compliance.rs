//! The runtime compliance gate (docs/compliance.md, "probe: the runtime check"; the
//! agent side in docs/agent.md): reads the probe set a closure carries, runs each probe
//! exactly as specified, and builds the evidence the host key signs. No decisions here:
//! what a failure does (roll back or not) is the state machine's.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use nixfleet_proto::compliance::{
    ControlEvidence, ControlStatus, Evidence, EvidenceRequest, EvidenceTrigger, Probe, ProbeSet,
    MAX_CONTROLS, MAX_PROBE_SET_BYTES, PROBE_SET_PATH,
};
use nixfleet_trust::jcs;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::activation::read_cut;

/// The whole environment of a probe besides `LC_ALL=C`: what every NixOS system has.
pub const PROBE_PATH: &str = "/run/wrappers/bin:/run/current-system/sw/bin";
/// Standard output kept (and hashed) of a probe; the rest is read and dropped.
pub const MAX_OUTPUT: usize = 64 * 1024;
/// Standard error kept of a probe, for the log.
const MAX_PROBE_STDERR: usize = 4 * 1024;
/// The longest `timeoutSecs` a probe may ask for (docs/compliance.md: 1 to 300).
const MAX_TIMEOUT_SECS: u64 = 300;
/// How long reaping a probe killed at its timeout may take.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeSetError {
    #[error("cannot read the probe set {path}: {detail}; check the closure in the store (nix-store --verify-path)")]
    Read { path: String, detail: String },
    #[error("the probe set {path} is malformed: {detail}; fix the channel's compliance options (or the closure's etc/nixfleet/compliance.json) and release again")]
    Malformed { path: String, detail: String },
}

/// The probe set of the closure at `closure_dir`, or none when it carries none.
pub fn read_probe_set(closure_dir: &Path) -> Result<Option<ProbeSet>, ProbeSetError> {
    let path = closure_dir.join(PROBE_SET_PATH);
    let shown = path.display().to_string();
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        // No etc/nixfleet/compliance.json, or a closure whose `etc` is not a directory.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(ProbeSetError::Read {
                path: shown,
                detail: e.to_string(),
            })
        }
    };
    let mut bytes = Vec::new();
    let cap = u64::try_from(MAX_PROBE_SET_BYTES).unwrap_or(u64::MAX);
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ProbeSetError::Read {
            path: shown.clone(),
            detail: e.to_string(),
        })?;
    let malformed = |detail: String| ProbeSetError::Malformed {
        path: shown.clone(),
        detail,
    };
    if bytes.len() > MAX_PROBE_SET_BYTES {
        return Err(malformed(format!(
            "over the limit of {MAX_PROBE_SET_BYTES} bytes"
        )));
    }
    let set: ProbeSet = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    validate(&set).map_err(malformed)?;
    Ok(Some(set))
}

/// What the control plane would refuse in the evidence, or the agent could not run.
fn validate(set: &ProbeSet) -> Result<(), String> {
    if set.probes.len() > MAX_CONTROLS {
        return Err(format!(
            "{} probes, over the limit of {MAX_CONTROLS}",
            set.probes.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for probe in &set.probes {
        let id = &probe.id;
        if id.is_empty()
            || id.len() > 128
            || !id
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        {
            return Err(format!(
                "control id {id:?} is not a control id (a-z, 0-9, -)"
            ));
        }
        if !seen.insert(id.as_str()) {
            return Err(format!("control {id} appears twice"));
        }
        match probe.command.first() {
            Some(program) if program.starts_with('/') => {}
            _ => {
                return Err(format!(
                    "control {id}: command must be an argv whose first element is an absolute path"
                ))
            }
        }
        if !(1..=MAX_TIMEOUT_SECS).contains(&probe.timeout_secs) {
            return Err(format!(
                "control {id}: timeoutSecs {} is not within 1 to {MAX_TIMEOUT_SECS}",
                probe.timeout_secs
            ));
        }
        if probe.expect != "exit0" {
            return Err(format!(
                "control {id}: expect {:?} is unknown (only \"exit0\")",
                probe.expect
            ));
        }
    }
    Ok(())
}

/// One probe's outcome: its evidence record and, for the log and a rollback reason, what
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub control: ControlEvidence,
    /// `exit 0`, `exit 1`, `exit 3`, `killed by signal 9`, `timed out after 1 s`…
    pub detail: String,
    /// The kept standard output (at most [`MAX_OUTPUT`] bytes).
    pub stdout: Vec<u8>,
}

fn output_hash(stdout: &[u8]) -> String {
    format!("sha256:{}", jcs::sha256_hex(stdout))
}

/// The status an exit means: 0 pass, 1 fail, anything else (a signal too) error.
fn status_of(status: std::process::ExitStatus) -> (ControlStatus, String) {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => (ControlStatus::Pass, "exit 0".to_owned()),
        (Some(1), _) => (ControlStatus::Fail, "exit 1".to_owned()),
        (Some(code), _) => (ControlStatus::Error, format!("exit {code}")),
        (None, Some(signal)) => (ControlStatus::Error, format!("killed by signal {signal}")),
        (None, None) => (ControlStatus::Error, "ended without a status".to_owned()),
    }
}

/// SIGKILL to the probe's process group (the probe leads it), so that nothing it started
/// outlives it. A pid that cannot be a process group of ours is left alone.
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; a gone group gives ESRCH, ignored.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Runs one probe as docs/compliance.md says: argv, cwd `/`, stdin `/dev/null`, only
/// `PATH` and `LC_ALL=C`, its own process group, killed with it after `timeoutSecs`.
pub async fn run_probe(probe: &Probe) -> ProbeRun {
    let started = probe.command.first().cloned().unwrap_or_default();
    let mut cmd = tokio::process::Command::new(&started);
    cmd.args(probe.command.iter().skip(1))
        .env_clear()
        .env("PATH", PROBE_PATH)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe. A probe must not outlive an agent killed -9
    // while it runs: the agent runs the probes again when it restarts.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let timeout = Duration::from_secs(probe.timeout_secs.max(1));
    let done = |status: ControlStatus, detail: String, stdout: Vec<u8>| ProbeRun {
        control: ControlEvidence {
            id: probe.id.clone(),
            status,
            articles: probe.articles.clone(),
            output_hash: output_hash(&stdout),
            collected_at: OffsetDateTime::now_utc(),
        },
        detail,
        stdout,
    };
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return done(
                ControlStatus::Error,
                format!("cannot start {started}: {e}"),
                Vec::new(),
            )
        }
    };
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(pid);
        return done(
            ControlStatus::Error,
            "cannot read its output".to_owned(),
            Vec::new(),
        );
    };
    let what = format!("probe {}", probe.id);
    let outcome = async {
        let (out, err) = tokio::join!(
            read_cut(stdout, MAX_OUTPUT, &what),
            read_cut(stderr, MAX_PROBE_STDERR, &what)
        );
        let status = child.wait().await;
        (out, err, status)
    };
    let result = tokio::time::timeout(timeout, outcome).await;
    // Whatever happened, nothing the probe started keeps running. After a normal exit the
    // leader is reaped already; its pid stays reserved while the group has members, and
    // pids are allocated in sequence, so this cannot reach another process's group.
    kill_group(pid);
    let run = match result {
        Ok((out, err, status)) => {
            let stdout = out.unwrap_or_default();
            let stderr = err.unwrap_or_default();
            let run = match status {
                Ok(status) => {
                    let (status, detail) = status_of(status);
                    done(status, detail, stdout)
                }
                Err(e) => done(ControlStatus::Error, format!("wait failed: {e}"), stdout),
            };
            if !stderr.is_empty() {
                tracing::info!(control = %probe.id, "probe stderr: {}", crate::activation::tail(&stderr));
            }
            run
        }
        Err(_) => {
            let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
            done(
                ControlStatus::Error,
                format!(
                    "timed out after {} s and was killed with its process group",
                    timeout.as_secs()
                ),
                Vec::new(),
            )
        }
    };
    tracing::info!(
        control = %probe.id,
        status = run.control.status.as_str(),
        "probe {}: {} ({})",
        probe.id,
        run.control.status.as_str(),
        run.detail
    );
    run
}

/// Runs every probe of `set`, one after the other.
pub async fn run_probes(set: &ProbeSet) -> Vec<ProbeRun> {
    let mut runs = Vec::with_capacity(set.probes.len());
    for probe in &set.probes {
        runs.push(run_probe(probe).await);
    }
    runs
}

/// Where and why the probes ran.
#[derive(Debug, Clone)]
pub struct Context {
    pub hostname: String,
    pub rollout_id: Option<String>,
    pub closure_hash: String,
    pub boot_id: String,
    pub activated_at: OffsetDateTime,
    pub trigger: EvidenceTrigger,
}

/// The evidence of `runs`. Timestamps are kept ordered whatever the clock did meanwhile
/// (the control plane refuses a control collected before the activation or after the
/// evidence).
pub fn evidence(
    context: Context,
    set: &ProbeSet,
    runs: &[ProbeRun],
    now: OffsetDateTime,
) -> Evidence {
    let controls: Vec<ControlEvidence> = runs
        .iter()
        .map(|r| ControlEvidence {
            collected_at: r.control.collected_at.max(context.activated_at),
            ..r.control.clone()
        })
        .collect();
    let collected_at = controls
        .iter()
        .map(|c| c.collected_at)
        .fold(now.max(context.activated_at), OffsetDateTime::max);
    Evidence {
        hostname: context.hostname,
        rollout_id: context.rollout_id,
        closure_hash: context.closure_hash,
        boot_id: context.boot_id,
        activated_at: context.activated_at,
        collected_at,
        trigger: context.trigger,
        mode: set.mode,
        frameworks: set.frameworks.clone(),
        controls,
    }
}

/// `cis 5.2.8, nis2 21.2.i`.
fn articles(articles: &BTreeMap<String, Vec<String>>) -> String {
    articles
        .iter()
        .map(|(framework, list)| format!("{framework} {}", list.join(" ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each control that did not pass, as a rollback reason names it:
/// `control ssh-root-login-key-only failed (cis 5.2.8, nis2 21.2.i)`.
pub fn describe_failing(runs: &[ProbeRun]) -> Vec<String> {
    runs.iter()
        .filter(|r| r.control.status != ControlStatus::Pass)
        .map(|r| {
            let what = match r.control.status {
                ControlStatus::Fail => "failed".to_owned(),
                _ => format!("could not be checked, status error: {}", r.detail),
            };
            let cited = articles(&r.control.articles);
            if cited.is_empty() {
                format!("control {} {what}", r.control.id)
            } else {
                format!("control {} {what} ({cited})", r.control.id)
            }
        })
        .collect()
}

/// The controls whose status differs from `previous` (or that are new): `id: pass -> fail`.
pub fn changes(previous: &Evidence, current: &Evidence) -> Vec<String> {
    let before: BTreeMap<&str, ControlStatus> = previous
        .controls
        .iter()
        .map(|c| (c.id.as_str(), c.status))
        .collect();
    current
        .controls
        .iter()
        .filter_map(|c| match before.get(c.id.as_str()) {
            Some(old) if *old == c.status => None,
            Some(old) => Some(format!(
                "{}: {} -> {}",
                c.id,
                old.as_str(),
                c.status.as_str()
            )),
            None => Some(format!("{}: new, {}", c.id, c.status.as_str())),
        })
        .collect()
}

/// The newest signed evidence this host holds, kept in the state file until newer
/// replaces it: re-sent whenever a check-in shows the control plane without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldEvidence {
    pub request: EvidenceRequest,
    /// The control plane answered 409: it holds newer evidence, so this is never re-sent.
    #[serde(default)]
    pub superseded: bool,
}

impl HeldEvidence {
    pub fn evidence(&self) -> &Evidence {
        &self.request.evidence
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::compliance::ComplianceMode;
    use std::time::Instant;

    fn probe(id: &str, script: &str, timeout_secs: u64) -> Probe {
        Probe {
            id: id.to_owned(),
            articles: BTreeMap::from([("cis".to_owned(), vec!["5.2.8".to_owned()])]),
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout_secs,
            expect: "exit0".into(),
        }
    }

    #[tokio::test]
    async fn exit_codes_map_to_pass_fail_and_error() {
        for (script, status) in [
            ("exit 0", ControlStatus::Pass),
            ("exit 1", ControlStatus::Fail),
            ("exit 3", ControlStatus::Error),
            ("kill -9 $$", ControlStatus::Error),
        ] {
            let run = run_probe(&probe("p", script, 10)).await;
            assert_eq!(run.control.status, status, "{script}: {}", run.detail);
        }
        let mut missing = probe("p", "", 10);
        missing.command = vec!["/nonexistent/probe".into()];
        let run = run_probe(&missing).await;
        assert_eq!(run.control.status, ControlStatus::Error);
        assert!(run.detail.contains("cannot start"), "{}", run.detail);
    }

    #[tokio::test]
    async fn the_environment_is_only_path_and_lc_all_in_root_with_stdin_empty() {
        std::env::set_var("NIXFLEET_PROBE_TEST_LEAK", "1");
        let mut p = probe("p", "", 10);
        p.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            "/usr/bin/env | /usr/bin/sort; pwd; /bin/cat | /usr/bin/wc -c".into(),
        ];
        let run = run_probe(&p).await;
        assert_eq!(run.control.status, ControlStatus::Pass, "{}", run.detail);
        let out = String::from_utf8(run.stdout).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        // dash adds PWD to what it exports; nothing of the agent's environment gets in.
        let env: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains('=') && !l.starts_with("PWD="))
            .collect();
        assert_eq!(
            env,
            vec![
                "LC_ALL=C",
                "PATH=/run/wrappers/bin:/run/current-system/sw/bin"
            ]
        );
        assert!(lines.contains(&"/"), "{out}");
        assert_eq!(lines.last(), Some(&"0"), "stdin is empty: {out}");
    }

    #[tokio::test]
    async fn stdout_is_kept_up_to_64_kib_and_hashed() {
        let run = run_probe(&probe("p", "/usr/bin/head -c 100000 /dev/zero", 20)).await;
        assert_eq!(run.control.status, ControlStatus::Pass, "{}", run.detail);
        assert_eq!(run.stdout.len(), MAX_OUTPUT);
        assert_eq!(
            run.control.output_hash,
            format!("sha256:{}", jcs::sha256_hex(&vec![0u8; MAX_OUTPUT]))
        );
        let run = run_probe(&probe("p", "printf found", 20)).await;
        assert_eq!(
            run.control.output_hash,
            format!("sha256:{}", jcs::sha256_hex(b"found"))
        );
    }

    #[tokio::test]
    async fn a_probe_past_its_timeout_is_an_error_and_its_process_group_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let script = format!(
            "/bin/sleep 30 & echo $! > {}; /bin/sleep 30",
            pidfile.display()
        );
        let start = Instant::now();
        let run = run_probe(&probe("hang", &script, 1)).await;
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(run.control.status, ControlStatus::Error);
        assert!(run.detail.contains("timed out after 1 s"), "{}", run.detail);
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        // The background sleep was in the probe's group: it is gone too (a zombie until
        // reaped by init counts as gone).
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gone() {
            assert!(
                Instant::now() < deadline,
                "process {pid} survived the timeout"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn write_set(dir: &Path, text: &str) {
        let etc = dir.join("etc/nixfleet");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("compliance.json"), text).unwrap();
    }

    #[test]
    fn a_probe_set_is_read_validated_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_probe_set(dir.path()).unwrap(), None);
        // A closure whose `etc` is a file carries no probe set either.
        std::fs::write(dir.path().join("etc"), b"").unwrap();
        assert_eq!(read_probe_set(dir.path()).unwrap(), None);
        std::fs::remove_file(dir.path().join("etc")).unwrap();
        write_set(
            dir.path(),
            r#"{"mode":"enforce","frameworks":["cis"],"probes":[{"id":"a-1","command":["/bin/true"],"timeoutSecs":5,"expect":"exit0"}]}"#,
        );
        let set = read_probe_set(dir.path()).unwrap().unwrap();
        assert_eq!(set.mode, ComplianceMode::Enforce);
        assert_eq!(set.probes.len(), 1);
        for (bad, why) in [
            ("{not json", "malformed"),
            (
                r#"{"mode":"enforce","probes":[{"id":"A","command":["/bin/true"],"timeoutSecs":5,"expect":"exit0"}]}"#,
                "not a control id",
            ),
            (
                r#"{"mode":"enforce","probes":[{"id":"a","command":["true"],"timeoutSecs":5,"expect":"exit0"}]}"#,
                "absolute path",
            ),
            (
                r#"{"mode":"enforce","probes":[{"id":"a","command":["/bin/true"],"timeoutSecs":0,"expect":"exit0"}]}"#,
                "timeoutSecs",
            ),
            (
                r#"{"mode":"enforce","probes":[{"id":"a","command":["/bin/true"],"timeoutSecs":5,"expect":"stdout"}]}"#,
                "expect",
            ),
        ] {
            write_set(dir.path(), bad);
            let e = read_probe_set(dir.path()).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("compliance.json"), "{e}");
        }
        write_set(dir.path(), &" ".repeat(MAX_PROBE_SET_BYTES + 1));
        let e = read_probe_set(dir.path()).unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
    }

    #[test]
    fn failing_controls_are_described_with_their_articles_and_changes_are_found() {
        let mk = |id: &str, status| ProbeRun {
            control: ControlEvidence {
                id: id.into(),
                status,
                articles: BTreeMap::from([
                    ("cis".into(), vec!["5.2.8".into()]),
                    ("nis2".into(), vec!["21.2.i".into()]),
                ]),
                output_hash: output_hash(b""),
                collected_at: OffsetDateTime::UNIX_EPOCH,
            },
            detail: "timed out".into(),
            stdout: vec![],
        };
        let runs = vec![
            mk("ok", ControlStatus::Pass),
            mk("ssh-root-login-key-only", ControlStatus::Fail),
            mk("slow", ControlStatus::Error),
        ];
        assert_eq!(
            describe_failing(&runs),
            vec![
                "control ssh-root-login-key-only failed (cis 5.2.8, nis2 21.2.i)".to_owned(),
                "control slow could not be checked, status error: timed out (cis 5.2.8, nis2 21.2.i)".to_owned(),
            ]
        );
        let set = ProbeSet {
            mode: ComplianceMode::Enforce,
            frameworks: vec![],
            probes: vec![],
        };
        let context = Context {
            hostname: "h".into(),
            rollout_id: None,
            closure_hash: "c".into(),
            boot_id: "b".into(),
            activated_at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(10),
            trigger: EvidenceTrigger::Drift,
        };
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(5);
        let before = evidence(context.clone(), &set, &runs, now);
        // A clock that went back never orders a control before the activation.
        assert!(before.controls.iter().all(
            |c| c.collected_at >= before.activated_at && c.collected_at <= before.collected_at
        ));
        let mut flipped = runs.clone();
        flipped[0].control.status = ControlStatus::Fail;
        let after = evidence(context, &set, &flipped, now);
        assert_eq!(
            changes(&before, &after),
            vec!["ok: pass -> fail".to_owned()]
        );
        assert!(changes(&after, &after).is_empty());
    }
}
