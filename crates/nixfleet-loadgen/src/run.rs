//! The simulated agents: one task per host that checks in at an interval with jitter,
//! follows targets (activates after a delay, then confirms, or fails at a given rate and
//! reports it the way `nixfleet-agent` does), and obeys rollback signals.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper::body::Bytes;
use nixfleet_pki::rustls::ClientConfig;
use nixfleet_proto::wire::{
    closure_blocked, CheckinRequest, CheckinResponse, ConfirmRequest, CurrentGeneration,
    FailedTarget, FailureCause, Generation, Health, Report, ReportKind, ReportRequest, Target,
};
use nixfleet_trust::jcs;
use nixfleet_trust::keys::PrivateKey;
use rand::Rng as _;
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::conn::{self, Conn, Endpoint};
use crate::fleet::closure;
use crate::identity::HostIdentity;
use crate::stats::{RunInfo, Stats, Summary};
use crate::{ErrorKind, LoadgenError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One connection per host, kept open between check-ins.
    KeepAlive,
    /// A new TCP and TLS connection per check-in, resuming the host's last TLS session.
    Resume,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Resume => "resume",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub endpoint: Endpoint,
    /// The fleet CA certificate: the control plane's server certificate chains to it.
    pub ca_pem: String,
    pub mode: Mode,
    /// Time between check-ins; `None` follows the control plane's `nextCheckinSecs`, zero
    /// checks in again as soon as an answer arrives (maximum throughput).
    pub interval: Option<Duration>,
    /// Each wait is the interval times a factor in `1 ± jitter`.
    pub jitter: f64,
    /// First check-ins are spread uniformly over this long.
    pub start_spread: Duration,
    pub duration: Duration,
    /// Check-ins in the first `warmup` are counted but left out of rate and latency.
    pub warmup: Duration,
    /// How long a simulated activation takes before the confirm (or the failure).
    pub activate_delay: Duration,
    /// Fraction of activations that fail.
    pub failure_rate: f64,
    /// Bound on one whole request: connect, handshake, answer.
    pub timeout: Duration,
    /// The closure generation every host runs at the start.
    pub generation: u32,
    /// Hosts start with a `lastConfirmedAt` for that closure (they confirmed it earlier).
    pub confirmed: bool,
    /// With the fleet's trust roots, a dispatched host fetches and verifies its proof
    /// before it activates, as an agent does.
    pub trust: Option<Arc<nixfleet_proto::TrustFile>>,
}

struct Agent {
    hostname: String,
    key: PrivateKey,
    tls: Arc<ClientConfig>,
    boot_id: String,
    booted: OffsetDateTime,
    closure: String,
    last_confirmed_at: Option<OffsetDateTime>,
    failed_targets: Vec<FailedTarget>,
    /// The rollout whose closure this host activated, and the closure it replaced.
    activated: Option<(String, String)>,
    conn: Option<Conn>,
    seen: bool,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill(&mut buf[..]);
    hex::encode(buf)
}

fn jittered(base: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || base.is_zero() {
        return base;
    }
    let factor = 1.0 + rand::thread_rng().gen_range(-jitter..=jitter);
    base.mul_f64(factor.max(0.0))
}

/// Runs the fleet until `config.duration` has passed and every in-flight request has
/// ended; returns what was measured.
pub async fn run(
    config: RunConfig,
    identities: Vec<HostIdentity>,
) -> Result<Summary, LoadgenError> {
    let hosts = identities.len();
    let now = OffsetDateTime::now_utc();
    let mut agents = Vec::with_capacity(hosts);
    for id in identities {
        let tls = conn::host_tls(&config.ca_pem, &id)?;
        agents.push(Agent {
            closure: closure(&id.hostname, config.generation),
            hostname: id.hostname,
            key: id.key,
            tls,
            boot_id: random_hex(16),
            booted: now - time::Duration::hours(1),
            last_confirmed_at: config.confirmed.then(|| now - time::Duration::minutes(30)),
            failed_targets: Vec::new(),
            activated: None,
            conn: None,
            seen: false,
        });
    }
    let stats = Arc::new(Stats::new(hosts, config.duration, config.warmup));
    let config = Arc::new(config);
    let deadline = Instant::now() + config.duration;
    let mut tasks = JoinSet::new();
    for agent in agents {
        tasks.spawn(agent.run(config.clone(), stats.clone(), deadline));
    }
    while tasks.join_next().await.is_some() {}
    let info = RunInfo {
        hosts,
        mode: config.mode.name().to_owned(),
        interval_secs: config.interval.map(|d| d.as_secs_f64()),
        duration_secs: config.duration.as_secs_f64(),
        warmup_secs: config.warmup.as_secs_f64(),
        failure_rate: config.failure_rate,
    };
    Ok(stats.summary(info, config.duration))
}

/// Sleeps until `until` or the deadline; false when the run is over.
async fn sleep_until(until: Instant, deadline: Instant) -> bool {
    tokio::time::sleep_until(until.min(deadline)).await;
    Instant::now() < deadline
}

impl Agent {
    async fn run(mut self, config: Arc<RunConfig>, stats: Arc<Stats>, deadline: Instant) {
        let spread = config
            .start_spread
            .mul_f64(rand::thread_rng().gen_range(0.0..1.0));
        if !sleep_until(Instant::now() + spread, deadline).await {
            return;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.checkin(&config, &stats).await {
                Ok(response) => {
                    backoff = Duration::from_secs(1);
                    let base = config
                        .interval
                        .unwrap_or(Duration::from_secs(u64::from(response.next_checkin_secs)));
                    if let Some(signal) = &response.rollback {
                        Stats::inc(&stats.rollbacks_received);
                        self.roll_back(&config, &stats, &signal.rollout_id, &signal.reason)
                            .await;
                    } else if let Some(target) = &response.target {
                        Stats::inc(&stats.targets_received);
                        let confirmed_before = self.last_confirmed_at;
                        if !self.follow(&config, &stats, target, deadline).await {
                            return;
                        }
                        // As the agent does: check in right after a confirm, so that
                        // the control plane has the new closure's health.
                        if self.last_confirmed_at != confirmed_before {
                            continue;
                        }
                    }
                    jittered(base, config.jitter)
                }
                Err(kind) => {
                    stats.error(kind);
                    self.conn = None;
                    // Back off like an agent does, but never past the polling interval.
                    let cap = config.interval.unwrap_or(Duration::from_secs(60));
                    let wait = backoff.min(cap).max(Duration::from_millis(100));
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    jittered(wait, 0.2)
                }
            };
            if Instant::now() >= deadline || !sleep_until(Instant::now() + wait, deadline).await {
                return;
            }
        }
    }

    /// One POST on the host's connection: a new one per request in resume mode.
    async fn exchange(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ErrorKind> {
        self.request(config, stats, path, Some(body))
            .await
            .map(|(status, body, _)| (status, body))
    }

    /// One request (GET without a body) on the host's connection; also returns the size
    /// of the answer's head.
    async fn request(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes, usize), ErrorKind> {
        let attempt = async {
            let reuse =
                config.mode == Mode::KeepAlive && self.conn.as_ref().is_some_and(Conn::is_usable);
            if !reuse {
                let started = std::time::Instant::now();
                let c = conn::connect(&config.endpoint, self.tls.clone()).await?;
                stats.connect_latency(started.elapsed());
                Stats::inc(if c.resumed {
                    &stats.tls_resumed
                } else {
                    &stats.tls_full
                });
                self.conn = Some(c);
            }
            let close = config.mode == Mode::Resume;
            match (self.conn.as_mut(), body) {
                (Some(c), Some(body)) => c
                    .post(&config.endpoint, path, body, close)
                    .await
                    .map(|(status, body)| (status, body, 0)),
                (Some(c), None) => c.get(&config.endpoint, path, close).await,
                (None, _) => Err(ErrorKind::Request),
            }
        };
        let result = match tokio::time::timeout(config.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ErrorKind::Timeout),
        };
        if result.is_err() || config.mode == Mode::Resume {
            self.conn = None;
        }
        result
    }

    async fn checkin(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
    ) -> Result<CheckinResponse, ErrorKind> {
        let now = OffsetDateTime::now_utc();
        let request = CheckinRequest {
            hostname: self.hostname.clone(),
            agent_version: concat!("nixfleet-loadgen/", env!("CARGO_PKG_VERSION")).to_owned(),
            boot_id: self.boot_id.clone(),
            current_generation: CurrentGeneration {
                closure_hash: self.closure.clone(),
            },
            last_confirmed_at: self.last_confirmed_at,
            failed_targets: self.failed_targets.clone(),
            health: Health {
                failed_units: 0,
                uptime_secs: (now - self.booted).whole_seconds().max(0) as u64,
            },
            activation: None,
            compliance_evidence_at: None,
        };
        let body = serde_json::to_vec(&request).map_err(|_| ErrorKind::Request)?;
        let started = std::time::Instant::now();
        let (status, answer) = self
            .exchange(config, stats, "/v1/agent/checkin", body)
            .await?;
        if status != 200 {
            return Err(ErrorKind::Status(status));
        }
        let response: CheckinResponse =
            serde_json::from_slice(&answer).map_err(|_| ErrorKind::Decode)?;
        stats.checkin_ok(started.elapsed());
        if !self.seen {
            self.seen = true;
            stats.host_visible();
        }
        Ok(response)
    }

    /// Activates a target: waits, then fails (at the configured rate) or confirms.
    /// Returns false when the run ended meanwhile.
    async fn follow(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
        target: &Target,
        deadline: Instant,
    ) -> bool {
        let failed_before = closure_blocked(
            &self.failed_targets,
            &target.rollout_id,
            &target.closure_hash,
        )
        .is_some();
        if target.closure_hash == self.closure || failed_before {
            return true;
        }
        if config.trust.is_some() && !self.believe(config, stats, target).await {
            return true;
        }
        if !sleep_until(Instant::now() + config.activate_delay, deadline).await {
            return false;
        }
        if rand::thread_rng().gen_bool(config.failure_rate.clamp(0.0, 1.0)) {
            Stats::inc(&stats.activations_failed);
            let reason = "switch-to-configuration exited with status 1 (simulated)";
            self.record_failed(target, reason);
            self.report(config, stats, ReportKind::ActivationFailed, target, reason)
                .await;
            return true;
        }
        let previous = std::mem::replace(&mut self.closure, target.closure_hash.clone());
        self.activated = Some((target.rollout_id.clone(), previous));
        let confirm = ConfirmRequest {
            hostname: self.hostname.clone(),
            rollout_id: target.rollout_id.clone(),
            wave_index: target.wave_index,
            generation: Generation {
                closure_hash: target.closure_hash.clone(),
                boot_id: self.boot_id.clone(),
            },
        };
        let Ok(body) = serde_json::to_vec(&confirm) else {
            return true;
        };
        // Retried through errors for a while, as the agent does within its confirm window.
        for _ in 0..3 {
            let started = std::time::Instant::now();
            match self
                .exchange(config, stats, "/v1/agent/confirm", body.clone())
                .await
            {
                Ok((204, _)) => {
                    stats.confirm_latency(started.elapsed());
                    Stats::inc(&stats.confirms_ok);
                    self.last_confirmed_at = Some(OffsetDateTime::now_utc());
                    return true;
                }
                Ok((410, _)) => {
                    Stats::inc(&stats.confirms_gone);
                    let reason = "the control plane answered 410 to the confirm";
                    self.roll_back(config, stats, &target.rollout_id, reason)
                        .await;
                    return true;
                }
                Ok((status, _)) => stats.error(ErrorKind::Status(status)),
                Err(kind) => stats.error(kind),
            }
            if !sleep_until(Instant::now() + Duration::from_secs(1), deadline).await {
                return false;
            }
        }
        self.roll_back(
            config,
            stats,
            &target.rollout_id,
            "no confirm accepted in time",
        )
        .await;
        true
    }

    /// What a dispatched agent does before anything else: fetch its proof and pass it
    /// through the agent's own gate. False when it was not believed (counted; the target
    /// is left, as an agent would refuse it).
    async fn believe(&mut self, config: &RunConfig, stats: &Stats, target: &Target) -> bool {
        let Some(trust) = &config.trust else {
            return true;
        };
        let path = format!("/v1/rollouts/{}/hosts/{}", target.rollout_id, self.hostname);
        let (status, body, head) = match self.request(config, stats, &path, None).await {
            Ok(answer) => answer,
            Err(kind) => {
                stats.error(kind);
                return false;
            }
        };
        if status != 200 {
            stats.error(ErrorKind::Status(status));
            return false;
        }
        let started = std::time::Instant::now();
        let verdict = nixfleet_agent::gate::check_proof(
            target,
            &self.hostname,
            &body,
            trust,
            OffsetDateTime::now_utc(),
            &path,
            &BTreeMap::new(),
        );
        stats.proof(started.elapsed(), head + body.len(), verdict.is_ok());
        if let Err(refusal) = verdict {
            stats.refusal(&refusal.reason);
            return false;
        }
        true
    }

    fn record_failed(&mut self, target: &Target, reason: &str) {
        self.failed_targets.push(FailedTarget {
            rollout_id: target.rollout_id.clone(),
            closure_hash: target.closure_hash.clone(),
            reason: reason.to_owned(),
            at: OffsetDateTime::now_utc(),
            cause: Some(FailureCause::Activation),
        });
    }

    /// Switches back to the closure the rollout replaced, if this host activated one.
    async fn roll_back(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
        rollout_id: &str,
        reason: &str,
    ) {
        let Some((activated_in, previous)) = self.activated.take() else {
            return;
        };
        if activated_in != rollout_id {
            self.activated = Some((activated_in, previous));
            return;
        }
        let failed_closure = std::mem::replace(&mut self.closure, previous);
        let target = Target {
            closure_hash: failed_closure,
            rollout_id: rollout_id.to_owned(),
            wave_index: 0,
            signed_at: OffsetDateTime::now_utc(),
            freshness_window_secs: 0,
            confirm_window_secs: 0,
        };
        self.record_failed(&target, reason);
        self.report(config, stats, ReportKind::RolledBack, &target, reason)
            .await;
    }

    /// A host-signed report, as the agent sends it.
    async fn report(
        &mut self,
        config: &RunConfig,
        stats: &Stats,
        kind: ReportKind,
        target: &Target,
        reason: &str,
    ) {
        let report = Report {
            hostname: self.hostname.clone(),
            report_id: random_hex(16),
            kind,
            rollout_id: Some(target.rollout_id.clone()),
            closure_hash: Some(target.closure_hash.clone()),
            boot_id: self.boot_id.clone(),
            reason: reason.to_owned(),
            at: OffsetDateTime::now_utc(),
        };
        let Ok(canonical) = jcs::to_canonical(&report) else {
            return;
        };
        let request = ReportRequest {
            signature: base64::engine::general_purpose::STANDARD.encode(self.key.sign(&canonical)),
            report,
        };
        let Ok(body) = serde_json::to_vec(&request) else {
            return;
        };
        match self.exchange(config, stats, "/v1/agent/report", body).await {
            Ok((200, _)) => Stats::inc(&stats.reports_ok),
            Ok((status, _)) => stats.error(ErrorKind::Status(status)),
            Err(kind) => stats.error(kind),
        }
    }
}
