//! The imperative shell: gathers inputs (the control plane, files, Nix, the clock), feeds
//! them to the state machine and the gate, persists every transition before acting on it,
//! and carries out what they decide. Every decision is logged with its reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixfleet_proto::compliance::{ComplianceMode, EvidenceRequest, EvidenceTrigger, ProbeSet};
use nixfleet_proto::wire::{
    ActivationPhase, ActivationProgress, CheckinRequest, CheckinResponse, ConfirmRequest,
    CurrentGeneration, Generation, Report, ReportKind, ReportRequest, Target,
};
use nixfleet_trust::keys::PrivateKey;
use nixfleet_trust::verify::{self, Limits};
use rand_core::RngCore as _;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::activation::nixos::{store_path, RealiseError, SwitchStatus, System};
use crate::backoff;
use crate::client::CpClient;
use crate::compliance::{self, HeldEvidence};
use crate::config::Config;
use crate::gate;
use crate::health;
use crate::identity::{self, IdentityError};
use crate::machine::{self, Activation, Event, Phase, ProbeOutcome};
use crate::store::{self, AgentState, Confirmation, StateDir, StoreError};

/// Confirms are retried quickly: the window is minutes, an outage may be seconds.
const CONFIRM_RETRY_CAP: Duration = Duration::from_secs(5);
/// The shortest confirm attempt, even when the window is about to close.
const MIN_CONFIRM_ATTEMPT: Duration = Duration::from_millis(500);
/// How often a deferred activation looks at the switch lock again.
const LOCK_RETRY: Duration = Duration::from_secs(5);
/// A failed renewal is tried again after this long (the certificate is still valid).
const RENEW_RETRY: Duration = Duration::from_secs(300);

/// Errors that stop the agent at start-up; each names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Trust(#[from] verify::TrustFileError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no --hostname given and the system hostname cannot be read from /proc/sys/kernel/hostname"
    )]
    NoHostname,
}

pub struct Agent {
    config: Config,
    hostname: String,
    key: PrivateKey,
    ca_pem: String,
    dir: StateDir,
    state: AgentState,
    system: System,
    client: Option<CpClient>,
    boot_id: String,
    failures: u32,
    next_renewal_attempt: Option<Instant>,
    certificate_refused: bool,
    /// The phase in flight and when this process saw it begin (reported on check-ins).
    phase_since: (&'static str, OffsetDateTime),
    /// How often to check in while fetching or switching: the control plane's interval.
    progress_every: Duration,
    /// No drift run before this (the running closure had nothing to probe).
    drift_not_before: Option<(String, Instant)>,
}

fn random_unit() -> f64 {
    (rand_core::OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut buf);
    hex_string(&buf)
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl Agent {
    pub fn new(config: Config) -> Result<Agent, StartupError> {
        let hostname = match &config.hostname {
            Some(h) => h.clone(),
            None => health::system_hostname().ok_or(StartupError::NoHostname)?,
        };
        if config.substituters.is_empty() {
            tracing::warn!("no --substituter given: only closures already in the local Nix store, every path signed by a pinned cache key, can be activated");
        }
        // Refuse to start on a missing or unsafe trust file (SPEC.md §2).
        verify::read_trust_file(&config.trust_file, &Limits::default())?;
        let key = identity::load_host_key(&config.host_key)?;
        let ca_pem = identity::load_ca(&config.ca_cert)?;
        let dir = StateDir::open(&config.state_dir)?;
        let state = dir.load()?;
        let state_phase_name = state.machine.phase.name();
        let poll_cap = Duration::from_secs(config.poll_interval_secs.max(1));
        let system = System {
            backend: config.activation,
            profile: config.profile.clone(),
            current_system_link: config.current_system_link.clone(),
            substituters: config.substituters.clone(),
            switch_lock: config.switch_lock.clone(),
            switches_dir: dir.switches(),
            command_timeout: Duration::from_secs(config.request_timeout_secs.max(60)),
            realise_timeout: Duration::from_secs(config.realise_timeout_secs),
            switch_timeout: Duration::from_secs(config.switch_timeout_secs),
        };
        Ok(Agent {
            config,
            hostname,
            key,
            ca_pem,
            dir,
            state,
            system,
            client: None,
            boot_id: health::boot_id(),
            failures: 0,
            next_renewal_attempt: None,
            certificate_refused: false,
            phase_since: (state_phase_name, now()),
            progress_every: poll_cap,
            drift_not_before: None,
        })
    }

    fn poll_cap(&self) -> Duration {
        Duration::from_secs(self.config.poll_interval_secs.max(1))
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.config.request_timeout_secs.max(1))
    }

    /// The delay after a failure, growing with consecutive failures.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        backoff::retry_delay(self.failures, self.poll_cap(), random_unit())
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), StartupError> {
        tracing::info!(
            host = %self.hostname,
            phase = self.state.machine.phase.name(),
            state_dir = %self.dir.root.display(),
            "nixfleet-agent {} starting",
            env!("CARGO_PKG_VERSION")
        );
        if let Phase::AwaitingConfirm { activation, .. } | Phase::Probing { activation, .. } =
            &self.state.machine.phase
        {
            let target_running = self.system.current_closure().as_deref()
                == Some(activation.target.closure_hash.as_str());
            let closure = activation.target.closure_hash.clone();
            self.apply(Event::Resumed { target_running });
            if let Phase::Probing { deadline, .. } = &self.state.machine.phase {
                // Never confirmed on results from before the restart, in any mode.
                tracing::info!(
                    "resumed while probing {closure}: its compliance probes run again before any confirm (window open until {deadline})"
                );
            }
        }
        loop {
            if *shutdown.borrow() {
                break;
            }
            let wait = tokio::select! {
                wait = self.iteration() => wait,
                _ = shutdown.changed() => break,
            };
            if wait.is_zero() {
                continue;
            }
            tracing::debug!("next step in {:.1} s", wait.as_secs_f64());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
        tracing::info!(
            phase = self.state.machine.phase.name(),
            "shutting down; the state machine is persisted"
        );
        Ok(())
    }

    /// One step; returns how long to wait before the next.
    async fn iteration(&mut self) -> Duration {
        // Only checking in needs the control plane; an activation in flight goes on (and
        // rolls back when its window closes) whatever happens to the certificate.
        let identity = self.ensure_identity().await;
        if identity.is_ok() {
            self.flush_reports().await;
        }
        match self.state.machine.phase.clone() {
            Phase::Idle => {
                let wait = match identity {
                    Ok(()) => self.checkin().await,
                    Err(wait) => wait,
                };
                // Drift runs between rollouts only: a check-in that started one wins.
                if !matches!(self.state.machine.phase, Phase::Idle) {
                    return wait;
                }
                match self.drift_due() {
                    Some(left) if left.is_zero() => {
                        self.drift().await;
                        wait.min(self.drift_due().unwrap_or(wait))
                    }
                    Some(left) => wait.min(left),
                    None => wait,
                }
            }
            Phase::Fetching { activation } => self.fetch(activation).await,
            Phase::Switching { activation } => self.switch(activation).await,
            Phase::Probing {
                activation,
                activated_at,
                ..
            } => self.probe(activation, activated_at).await,
            Phase::AwaitingConfirm { activation, .. } => self.confirm(activation).await,
            Phase::RollingBack { activation, .. } => self.roll_back(activation).await,
        }
    }

    /// Runs a transition, persists it, then applies its effects (persisted too). If the
    /// state cannot be written, nothing changes: the agent never acts on a state it could
    /// not persist.
    fn apply(&mut self, event: Event) -> bool {
        self.apply_and(event, |_| {})
    }

    /// [`Agent::apply`], with `also` changed in the same persisted state (new evidence
    /// with the transition it decided).
    fn apply_and(&mut self, event: Event, also: impl FnOnce(&mut AgentState)) -> bool {
        let at = now();
        let step = match machine::transition(&self.state.machine, event, at) {
            Ok(step) => step,
            Err(e) => {
                tracing::warn!("{e}");
                return false;
            }
        };
        let mut next = self.state.clone();
        also(&mut next);
        let from = next.machine.phase.name();
        let finished = next.machine.phase.activation().map(Activation::id);
        next.machine = step.machine;
        for effect in step.effects {
            match effect {
                machine::Effect::Report {
                    kind,
                    rollout_id,
                    closure_hash,
                    reason,
                } => {
                    if let Some(report) =
                        self.signed_report(kind, &rollout_id, &closure_hash, &reason)
                    {
                        next.queue_report(report);
                    }
                }
                machine::Effect::RecordFailed(f) => next.record_failed(f),
                machine::Effect::MarkConfirmed { closure_hash } => {
                    next.confirmed = Some(Confirmation { closure_hash, at })
                }
            }
        }
        if let Err(e) = self.dir.save(&next) {
            tracing::error!("{e}; not acting on it");
            return false;
        }
        let to = next.machine.phase.name();
        if next == self.state {
            // Nothing decided (a retry, an ignored signal): not worth an INFO line each time.
            tracing::debug!(from, to, "{}", step.reason);
        } else {
            tracing::info!(from, to, "{}", step.reason);
        }
        if matches!(next.machine.phase, Phase::Idle) {
            if let Some(id) = finished {
                self.system.clear_run(&id);
                self.system.clear_run(&format!("rb-{id}"));
            }
        }
        if self.phase_since.0 != to {
            self.phase_since = (to, at);
        }
        self.state = next;
        true
    }

    fn save(&self) {
        if let Err(e) = self.dir.save(&self.state) {
            tracing::error!("{e}");
        }
    }

    fn signed_report(
        &self,
        kind: ReportKind,
        rollout_id: &str,
        closure_hash: &str,
        reason: &str,
    ) -> Option<ReportRequest> {
        let report = Report {
            hostname: self.hostname.clone(),
            report_id: random_hex(16),
            kind,
            rollout_id: Some(rollout_id.to_owned()),
            closure_hash: Some(closure_hash.to_owned()),
            boot_id: self.boot_id.clone(),
            reason: reason.to_owned(),
            at: now(),
        };
        match identity::sign_canonical(&self.key, &report) {
            Ok(signature) => Some(ReportRequest { signature, report }),
            Err(e) => {
                tracing::error!("cannot canonicalise a report ({e}); it is not sent");
                None
            }
        }
    }

    // ---- identity ------------------------------------------------------------------

    async fn ensure_identity(&mut self) -> Result<(), Duration> {
        let cert_path = self.dir.cert();
        let cert = std::fs::read_to_string(&cert_path).ok();
        let validity = cert.as_deref().and_then(identity::validity);
        let expired = validity.is_some_and(|(_, not_after)| now() > not_after);
        if self.certificate_refused && cert.is_some() && !expired {
            match self.enroll().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Keep checking in with the refused certificate (with backoff): a
                    // revocation may be lifted.
                    tracing::warn!(
                        "not enrolled: {e}; checking in with the refused certificate meanwhile"
                    );
                    self.certificate_refused = false;
                }
            }
        }
        if let (Some(cert), false, false) = (&cert, expired, self.certificate_refused) {
            if self.client.is_none() {
                match CpClient::new(
                    &self.config.control_plane_url,
                    &self.ca_pem,
                    Some((cert, &self.key)),
                    self.request_timeout(),
                ) {
                    Ok(client) => self.client = Some(client),
                    Err(e) => {
                        tracing::error!("{e}");
                        return Err(self.failed());
                    }
                }
            }
            if let Some((not_before, not_after)) = validity {
                self.maybe_renew(not_before, not_after).await;
            }
            return Ok(());
        }
        if expired {
            if let Some((_, not_after)) = validity {
                tracing::error!(
                    "the certificate {} of {} expired at {not_after}; the agent needs a new bootstrap token to re-enroll (nixfleet mint-token)",
                    cert_path.display(),
                    self.hostname
                );
            }
        }
        match self.enroll().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let wait = self.failed();
                tracing::error!("not enrolled: {e}; trying again in {} s", wait.as_secs());
                Err(wait)
            }
        }
    }

    async fn enroll(&mut self) -> Result<(), IdentityError> {
        let token_path: PathBuf = self
            .config
            .bootstrap_token_file
            .clone()
            .ok_or(IdentityError::NoToken)?;
        let token = identity::read_token(
            &token_path,
            &self.hostname,
            &self.key,
            &self.config.host_key,
            self.state.enrolled_with_nonce.as_deref(),
        )?;
        let nonce = token.claims.nonce.clone();
        let anonymous = CpClient::new(
            &self.config.control_plane_url,
            &self.ca_pem,
            None,
            self.request_timeout(),
        )?;
        tracing::info!(host = %self.hostname, "enrolling with the bootstrap token {}", token_path.display());
        let response = identity::enroll(&anonymous, &self.hostname, &self.key, token).await;
        if let Err(IdentityError::Refused { status: 409, .. }) = &response {
            // The token's nonce was used: never send it again.
            self.state.enrolled_with_nonce = Some(nonce.clone());
            self.save();
        }
        let response = response?;
        store::write_atomic(&self.dir.cert(), response.cert_pem.as_bytes(), 0o644)?;
        self.state.enrolled_with_nonce = Some(nonce);
        self.save();
        self.client = Some(CpClient::new(
            &self.config.control_plane_url,
            &self.ca_pem,
            Some((&response.cert_pem, &self.key)),
            self.request_timeout(),
        )?);
        self.certificate_refused = false;
        self.failures = 0;
        tracing::info!(host = %self.hostname, not_after = %response.not_after, "enrolled; certificate stored in {}", self.dir.cert().display());
        Ok(())
    }

    async fn maybe_renew(&mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) {
        if !identity::renewal_due(not_before, not_after, now()) {
            return;
        }
        if self
            .next_renewal_attempt
            .is_some_and(|t| Instant::now() < t)
        {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        tracing::info!(%not_before, %not_after, "certificate past half of its lifetime; renewing");
        match identity::renew(&client, &self.hostname, &self.key).await {
            Ok(response) => {
                match store::write_atomic(&self.dir.cert(), response.cert_pem.as_bytes(), 0o644) {
                    Ok(()) => {
                        tracing::info!(not_after = %response.not_after, "certificate renewed");
                        self.client = None;
                        self.next_renewal_attempt = None;
                    }
                    Err(e) => {
                        tracing::error!("{e}; keeping the current certificate");
                        self.next_renewal_attempt = Some(Instant::now() + RENEW_RETRY);
                    }
                }
            }
            Err(e) => {
                tracing::warn!("renewal failed: {e}; the current certificate stays in use until {not_after}, retrying in {} s", RENEW_RETRY.as_secs());
                self.next_renewal_attempt = Some(Instant::now() + RENEW_RETRY);
            }
        }
    }

    /// A 401 from an agent route: the certificate is revoked or expired.
    fn certificate_rejected(&mut self, route: &str, message: &str) -> Duration {
        let wait = self.failed();
        tracing::error!(
            "the control plane refused the certificate of {} on {route} (401: {message}): it is revoked or expired; give the agent a new bootstrap token (--bootstrap-token-file) to re-enroll; trying again in {} s",
            self.hostname,
            wait.as_secs()
        );
        self.certificate_refused = true;
        self.client = None;
        wait
    }

    // ---- reports -------------------------------------------------------------------

    async fn flush_reports(&mut self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let mut changed = false;
        while let Some(report) = self.state.outbox.first().cloned() {
            match client.post("/v1/agent/report", &report).await {
                Ok(reply) if reply.status == 200 => {
                    tracing::info!(kind = ?report.report.kind, report_id = %report.report.report_id, "report acknowledged");
                    self.state.outbox.remove(0);
                    changed = true;
                }
                Ok(reply) if matches!(reply.status, 400 | 403 | 422) => {
                    tracing::error!(kind = ?report.report.kind, "the control plane will never accept report {} ({}: {}); dropping it", report.report.report_id, reply.status, reply.message());
                    self.state.outbox.remove(0);
                    changed = true;
                }
                Ok(reply) => {
                    tracing::warn!(
                        "report {} not acknowledged ({}: {}); re-sending later",
                        report.report.report_id,
                        reply.status,
                        reply.message()
                    );
                    break;
                }
                Err(e) => {
                    tracing::warn!(
                        "report {} not sent: {e}; re-sending later",
                        report.report.report_id
                    );
                    break;
                }
            }
        }
        if changed {
            self.save();
        }
    }

    // ---- idle: check in ---------------------------------------------------------------

    async fn checkin_request(&self, current: &str) -> CheckinRequest {
        CheckinRequest {
            hostname: self.hostname.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.boot_id.clone(),
            current_generation: CurrentGeneration {
                closure_hash: current.to_owned(),
            },
            last_confirmed_at: self
                .state
                .confirmed
                .as_ref()
                .filter(|c| c.closure_hash == current)
                .map(|c| c.at),
            failed_targets: self.state.failed_targets.clone(),
            health: health::collect(
                self.config.health_command.as_deref(),
                self.config.activation,
            )
            .await,
            activation: self.progress(),
            compliance_evidence_at: self
                .state
                .evidence
                .as_ref()
                .map(|held| held.evidence().collected_at),
        }
    }

    /// Where the activation in flight stands, for check-ins.
    fn progress(&self) -> Option<ActivationProgress> {
        let (phase, activation) = match &self.state.machine.phase {
            Phase::Idle => return None,
            Phase::Fetching { activation } => (ActivationPhase::Fetching, activation),
            Phase::Switching { activation } => (ActivationPhase::Switching, activation),
            // Probing is part of awaiting the confirm on the wire: the window counts from
            // the end of the switch on both sides, whatever the probes take.
            Phase::Probing {
                activation,
                deadline,
                ..
            }
            | Phase::AwaitingConfirm {
                activation,
                deadline,
            } => {
                return Some(ActivationProgress {
                    rollout_id: activation.target.rollout_id.clone(),
                    closure_hash: activation.target.closure_hash.clone(),
                    phase: ActivationPhase::AwaitingConfirm,
                    since: *deadline - machine::confirm_window(activation),
                })
            }
            Phase::RollingBack { activation, .. } => (ActivationPhase::RollingBack, activation),
        };
        Some(ActivationProgress {
            rollout_id: activation.target.rollout_id.clone(),
            closure_hash: activation.target.closure_hash.clone(),
            phase,
            since: self.phase_since.1,
        })
    }

    /// Runs `work` (a fetch or a switch, which may take many minutes) while checking in
    /// at the control plane's interval, so that it knows the activation is under way: its
    /// activation timeout and confirm window count against what the host reports.
    async fn while_reporting<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + self.progress_every;
                    let report = self.report_progress();
                    let mut report = std::pin::pin!(report);
                    tokio::select! {
                        out = &mut work => return out,
                        _ = &mut report => {}
                    }
                }
            }
        }
    }

    /// One check-in that only says where the activation stands. A target or a rollback
    /// signal in the answer waits for the activation's next step.
    async fn report_progress(&self) {
        let Some(client) = self.client.clone() else {
            return;
        };
        let current = self.system.current_closure().unwrap_or_default();
        let request = self.checkin_request(&current).await;
        let phase = self.phase_since.0;
        match client.post("/v1/agent/checkin", &request).await {
            Ok(reply) if reply.status == 200 => {
                let rollback = serde_json::from_slice::<CheckinResponse>(&reply.body)
                    .ok()
                    .and_then(|r| r.rollback);
                match rollback {
                    Some(signal) => tracing::info!(
                        "the control plane signals a rollback of rollout {} ({}); acted on once {phase} ends",
                        signal.rollout_id,
                        signal.reason
                    ),
                    None => tracing::debug!("checked in while {phase}"),
                }
            }
            Ok(reply) => tracing::debug!(
                "check-in while {phase} answered {}: {}",
                reply.status,
                reply.message()
            ),
            Err(e) => tracing::debug!("check-in while {phase} failed: {e}"),
        }
    }

    async fn checkin(&mut self) -> Duration {
        let Some(client) = self.client.clone() else {
            return self.failed();
        };
        let current = self.system.current_closure().unwrap_or_default();
        let request = self.checkin_request(&current).await;
        let reply = match client.post("/v1/agent/checkin", &request).await {
            Ok(reply) => reply,
            Err(e) => {
                let wait = self.failed();
                tracing::warn!(
                    "check-in failed: {e}; keeping the current system, retrying in {:.1} s",
                    wait.as_secs_f64()
                );
                return wait;
            }
        };
        match reply.status {
            200 => {}
            401 => return self.certificate_rejected("/v1/agent/checkin", &reply.message()),
            status => {
                let wait = self.failed();
                tracing::warn!(
                    "check-in refused ({status}: {}); retrying in {:.1} s",
                    reply.message(),
                    wait.as_secs_f64()
                );
                return wait;
            }
        }
        let response: CheckinResponse = match serde_json::from_slice(&reply.body) {
            Ok(r) => r,
            Err(e) => {
                let wait = self.failed();
                tracing::warn!(
                    "check-in answer from {} is not valid JSON ({e}); retrying in {:.1} s",
                    client.url("/v1/agent/checkin"),
                    wait.as_secs_f64()
                );
                return wait;
            }
        };
        if self.failures > 0 {
            tracing::info!(
                "control plane reachable again after {} failed attempts",
                self.failures
            );
        }
        self.failures = 0;
        let next =
            backoff::checkin_delay(response.next_checkin_secs, self.poll_cap(), random_unit());
        self.progress_every =
            Duration::from_secs(u64::from(response.next_checkin_secs.max(1))).min(self.poll_cap());
        self.resend_evidence_if_missing(response.compliance_evidence_at)
            .await;
        tracing::debug!(current = %current, target = ?response.target.as_ref().map(|t| &t.closure_hash), rollback = ?response.rollback, "checked in");
        if let Some(signal) = response.rollback {
            let unhealthy = self.over_health_gate(&signal.rollout_id, request.health.failed_units);
            self.apply(Event::RollbackSignal {
                signal,
                current: current.clone(),
                unhealthy,
            });
            if !matches!(self.state.machine.phase, Phase::Idle) {
                return Duration::ZERO;
            }
        }
        if let Some(target) = response.target {
            if target.closure_hash == current {
                tracing::debug!("target {} already runs", target.closure_hash);
            } else if let Some(wait) = self.consider(&client, target, current).await {
                return wait;
            }
        }
        if matches!(self.state.machine.phase, Phase::Idle) {
            next
        } else {
            Duration::ZERO
        }
    }

    /// What shows the target: this host's proof (`/v1/rollouts/{id}/hosts/{host}`), else,
    /// from a control plane that has none (schema 1, or one from before proofs), the whole
    /// manifest and its signature. Returns the bytes, the signature and where they came
    /// from, or the wait before trying again.
    async fn fetch_manifest(
        &mut self,
        client: &CpClient,
        target: &Target,
    ) -> Result<(Vec<u8>, Vec<u8>, String), Duration> {
        let path = format!("/v1/rollouts/{}", target.rollout_id);
        let proof_path = format!("{path}/hosts/{}", self.hostname);
        match client.get(&proof_path).await {
            Ok(r) if r.status == 200 => {
                let signature = proof_signature(&r.body).unwrap_or_default();
                return Ok((r.body, signature, client.url(&proof_path)));
            }
            // 404/409: no proof here; the whole manifest says whether that is a lie.
            Ok(r) if r.status == 404 || r.status == 409 => {
                tracing::info!(
                    "no host proof for rollout {} ({}: {}); fetching the whole manifest",
                    target.rollout_id,
                    r.status,
                    r.message()
                );
            }
            Ok(r) => {
                let wait = self.failed();
                tracing::warn!(
                    "cannot fetch the host proof of rollout {} ({}: {}); nothing activated, retrying in {:.1} s",
                    target.rollout_id, r.status, r.message(), wait.as_secs_f64()
                );
                return Err(wait);
            }
            Err(e) => {
                let wait = self.failed();
                tracing::warn!(
                    "cannot fetch the host proof of rollout {}: {e}; retrying in {:.1} s",
                    target.rollout_id,
                    wait.as_secs_f64()
                );
                return Err(wait);
            }
        }
        let fetched = async {
            let m = client.get(&path).await?;
            let s = client.get(&format!("{path}/sig")).await?;
            Ok::<_, crate::client::NetError>((m, s))
        }
        .await;
        match fetched {
            Ok((m, s)) if m.status == 200 && s.status == 200 => {
                Ok((m.body, s.body, client.url(&path)))
            }
            Ok((m, s)) => {
                let wait = self.failed();
                tracing::warn!(
                    "cannot fetch the manifest of rollout {} ({} / {}: {}); nothing activated, retrying in {:.1} s",
                    target.rollout_id, m.status, s.status, m.message(), wait.as_secs_f64()
                );
                Err(wait)
            }
            Err(e) => {
                let wait = self.failed();
                tracing::warn!(
                    "cannot fetch the manifest of rollout {}: {e}; retrying in {:.1} s",
                    target.rollout_id,
                    wait.as_secs_f64()
                );
                Err(wait)
            }
        }
    }

    /// The target gate; returns a wait when the manifest could not be fetched.
    async fn consider(
        &mut self,
        client: &CpClient,
        target: Target,
        current: String,
    ) -> Option<Duration> {
        if let Some(f) =
            self.state.failed_targets.iter().find(|f| {
                f.rollout_id == target.rollout_id && f.closure_hash == target.closure_hash
            })
        {
            tracing::warn!(
                "the control plane offers {} of rollout {} again, which already failed here ({}); not activating it",
                target.closure_hash, target.rollout_id, f.reason
            );
            return None;
        }
        if let Err(refusal) = gate::precheck(&target, None, &self.state.failed_targets) {
            self.apply(Event::TargetRefused {
                target,
                kind: refusal.kind,
                reason: refusal.reason,
            });
            return None;
        }
        // A re-sign keeps the rollout id: a cached copy older than the target's signature
        // is fetched again, so that freshness is judged on the newest signature.
        let cached = self
            .dir
            .cached_manifest(&target.rollout_id)
            .filter(|(m, _)| signed_at_of(m).is_some_and(|at| at >= target.signed_at));
        let (manifest, signature, source) = match cached {
            Some((m, s)) => (
                m,
                s,
                format!(
                    "{} (cached)",
                    self.dir.manifests().join(&target.rollout_id).display()
                ),
            ),
            None => match self.fetch_manifest(client, &target).await {
                Ok(fetched) => fetched,
                Err(wait) => return Some(wait),
            },
        };
        let trust = match verify::read_trust_file(&self.config.trust_file, &Limits::default()) {
            Ok(t) => t,
            Err(e) => {
                let wait = self.failed();
                tracing::error!("{e}; nothing activated");
                return Some(wait);
            }
        };
        // A schema-2 rollout comes as this host's proof (kept as fetched, with the
        // manifest's signature beside it); schema 1 as the whole manifest.
        let verdict = if is_host_proof(&manifest) {
            gate::check_proof(
                &target,
                &self.hostname,
                &manifest,
                &trust,
                now(),
                &source,
                &self.state.newest_accepted,
            )
        } else {
            gate::check(
                &target,
                &self.hostname,
                &manifest,
                &signature,
                &trust,
                now(),
                &source,
                &self.state.newest_accepted,
            )
        };
        match verdict {
            Ok(accepted) => {
                self.state
                    .record_accepted(&accepted.channel, accepted.signed_at);
                if let Err(e) = self
                    .dir
                    .cache_manifest(&target.rollout_id, &manifest, &signature)
                {
                    tracing::warn!("{e}; the manifest will be fetched again");
                }
                let machine = &self.state.machine;
                let keep: Vec<&str> = [
                    Some(target.rollout_id.as_str()),
                    machine
                        .phase
                        .activation()
                        .map(|a| a.target.rollout_id.as_str()),
                    machine
                        .last_activation
                        .as_ref()
                        .map(|a| a.target.rollout_id.as_str()),
                ]
                .into_iter()
                .flatten()
                .collect();
                let pruned = self.dir.prune_manifests(&keep, store::MAX_CACHED_MANIFESTS);
                if pruned > 0 {
                    tracing::debug!(pruned, "older cached manifests deleted");
                }
                self.apply(Event::TargetAccepted { target, current });
            }
            Err(refusal) => {
                self.apply(Event::TargetRefused {
                    target,
                    kind: refusal.kind,
                    reason: refusal.reason,
                });
            }
        }
        None
    }

    // ---- fetching: realise from the cache --------------------------------------------

    async fn fetch(&mut self, activation: Activation) -> Duration {
        let trust = match verify::read_trust_file(&self.config.trust_file, &Limits::default()) {
            Ok(t) => t,
            Err(e) => {
                let wait = self.failed();
                tracing::error!("{e}; waiting {} s before realising", wait.as_secs());
                return wait;
            }
        };
        let closure = &activation.target.closure_hash;
        tracing::info!(
            "realising {closure} from {}",
            self.config.substituters.join(" ")
        );
        let event = match self
            .while_reporting(self.system.realise(closure, &trust.cache_keys))
            .await
        {
            Ok(verified) => Event::Realised {
                paths: verified.paths,
                keys: verified.keys,
            },
            Err(RealiseError::Refused(reason)) => Event::ClosureRefused { reason },
            Err(RealiseError::Failed(reason)) => Event::RealiseFailed { reason },
        };
        let transient = matches!(event, Event::RealiseFailed { .. });
        self.apply(event);
        if transient {
            self.failed()
        } else {
            Duration::ZERO
        }
    }

    // ---- switching -------------------------------------------------------------------

    async fn switch(&mut self, activation: Activation) -> Duration {
        let id = activation.id();
        let closure = activation.target.closure_hash.clone();
        if self.system.switch_status(&id) == SwitchStatus::NotStarted {
            if self.system.lock_held().await {
                tracing::info!(
                    "{} is held by another switch-to-configuration; deferring the switch to {closure}",
                    self.config.switch_lock.display()
                );
                return LOCK_RETRY.min(self.poll_cap());
            }
            if let Err(reason) = self.system.set_profile(&closure).await {
                self.apply(Event::SwitchFailed { reason });
                return Duration::ZERO;
            }
            tracing::info!(
                "profile {} set to {closure}; running {} detached",
                self.config.profile.display(),
                self.system.activation_name()
            );
        } else {
            tracing::info!(
                "{} of {closure} was started before; waiting for its outcome",
                self.system.activation_name()
            );
        }
        let event = match self
            .while_reporting(self.system.switch_to(&id, &closure))
            .await
        {
            Ok(()) => Event::SwitchSucceeded,
            Err(reason) => Event::SwitchFailed { reason },
        };
        self.apply(event);
        Duration::ZERO
    }

    // ---- compliance: the runtime gate, drift, evidence ------------------------------

    /// The probe set of `closure`, logged when it cannot be used.
    fn probe_set(&self, closure: &str) -> Result<Option<ProbeSet>, String> {
        compliance::read_probe_set(&store_path(closure)).map_err(|e| {
            tracing::error!(closure = %closure, "{e}");
            e.to_string()
        })
    }

    /// Runs `set`, then builds and signs its evidence. None when it cannot be signed
    /// (logged): the runs are still returned, and decide as usual.
    async fn collect(
        &self,
        set: &ProbeSet,
        context: compliance::Context,
        reporting: bool,
    ) -> (Vec<compliance::ProbeRun>, Option<HeldEvidence>) {
        tracing::info!(
            closure = %context.closure_hash,
            trigger = ?context.trigger,
            "running {} compliance probes ({}, frameworks: {})",
            set.probes.len(),
            set.mode.as_str(),
            set.frameworks.join(", ")
        );
        let runs = if reporting {
            self.while_reporting(compliance::run_probes(set)).await
        } else {
            compliance::run_probes(set).await
        };
        let evidence = compliance::evidence(context, set, &runs, now());
        let held = match identity::sign_canonical(&self.key, &evidence) {
            Ok(signature) => Some(HeldEvidence {
                request: EvidenceRequest {
                    evidence,
                    signature,
                },
                superseded: false,
            }),
            Err(e) => {
                tracing::error!(
                    "cannot canonicalise the compliance evidence ({e}); it is not kept nor sent"
                );
                None
            }
        };
        (runs, held)
    }

    /// After the switch, before any confirm: the closure's probes, whose outcome the
    /// state machine turns into a confirm or (enforce) a rollback.
    async fn probe(&mut self, activation: Activation, activated_at: OffsetDateTime) -> Duration {
        let closure = activation.target.closure_hash.clone();
        let (outcome, held) = match self.probe_set(&closure) {
            Ok(None) => (
                ProbeOutcome::NotProbed {
                    why: format!(
                        "it carries no probe set ({})",
                        nixfleet_proto::compliance::PROBE_SET_PATH
                    ),
                },
                None,
            ),
            Ok(Some(set)) if set.mode == ComplianceMode::Disabled => (
                ProbeOutcome::NotProbed {
                    why: "its compliance mode is disabled".to_owned(),
                },
                None,
            ),
            Err(reason) => (ProbeOutcome::Unusable { reason }, None),
            Ok(Some(set)) => {
                let context = compliance::Context {
                    hostname: self.hostname.clone(),
                    rollout_id: Some(activation.target.rollout_id.clone()),
                    closure_hash: closure.clone(),
                    boot_id: self.boot_id.clone(),
                    activated_at,
                    trigger: EvidenceTrigger::Activation,
                };
                let (runs, held) = self.collect(&set, context, true).await;
                let failing = compliance::describe_failing(&runs);
                let outcome = ProbeOutcome::Ran {
                    mode: set.mode,
                    passed: runs.len() - failing.len(),
                    failing,
                };
                (outcome, held)
            }
        };
        let sending = held.is_some();
        // The evidence is persisted with the decision it led to, in one write.
        self.apply_and(Event::Probed(outcome), |next| {
            if let Some(held) = held {
                next.evidence = Some(held);
            }
        });
        if sending {
            // Before the confirm: the send must leave most of the window to it.
            let within = match &self.state.machine.phase {
                Phase::AwaitingConfirm { deadline, .. } => {
                    let left: time::Duration = (*deadline - now()).max(time::Duration::ZERO) / 2;
                    Some(Duration::from_secs_f64(left.as_seconds_f64()).max(MIN_CONFIRM_ATTEMPT))
                }
                _ => None,
            };
            self.send_evidence(within).await;
        }
        Duration::ZERO
    }

    /// Sends the held evidence (within `within` when given, else the request timeout); a
    /// failure leaves it to the next check-in's comparison.
    async fn send_evidence(&mut self, within: Option<Duration>) {
        let Some(held) = self.state.evidence.clone().filter(|h| !h.superseded) else {
            return;
        };
        let collected = held.evidence().collected_at;
        let Some(client) = self.client.clone() else {
            tracing::info!(%collected, "compliance evidence not sent: not enrolled yet; sent when a check-in shows the control plane without it");
            return;
        };
        let client = match within {
            Some(limit) => client.within(limit),
            None => client,
        };
        match client.post("/v1/agent/evidence", &held.request).await {
            Ok(reply) if reply.status == 200 => {
                let id = serde_json::from_slice::<nixfleet_proto::compliance::EvidenceResponse>(
                    &reply.body,
                )
                .map(|r| r.evidence_id)
                .unwrap_or_default();
                tracing::info!(evidence = %id, %collected, trigger = ?held.evidence().trigger, "compliance evidence stored by the control plane");
            }
            Ok(reply) if reply.status == 409 => {
                tracing::warn!(%collected, "the control plane holds newer compliance evidence of this host ({}); this one is dropped, never re-sent", reply.message());
                if let Some(h) = self.state.evidence.as_mut() {
                    h.superseded = true;
                }
                self.save();
            }
            Ok(reply) if matches!(reply.status, 400 | 403 | 413) => {
                tracing::error!(%collected, "the control plane will never accept this compliance evidence ({}: {}); dropping it, the next probe run makes new evidence", reply.status, reply.message());
                if let Some(h) = self.state.evidence.as_mut() {
                    h.superseded = true;
                }
                self.save();
            }
            Ok(reply) => tracing::warn!(
                %collected,
                "compliance evidence not stored ({}: {}); re-sent when a check-in shows the control plane without it",
                reply.status,
                reply.message()
            ),
            Err(e) => tracing::warn!(
                %collected,
                "compliance evidence not sent: {e}; re-sent when a check-in shows the control plane without it"
            ),
        }
    }

    /// A check-in answer says what evidence the control plane has (`stored`): older than
    /// what this host holds, or none (a wipe, a lost send), and the held one goes again.
    async fn resend_evidence_if_missing(&mut self, stored: Option<OffsetDateTime>) {
        let Some(held) = self.state.evidence.as_ref().filter(|h| !h.superseded) else {
            return;
        };
        let ours = held.evidence().collected_at;
        if stored.is_some_and(|at| at >= ours) {
            return;
        }
        let theirs = stored.map_or_else(|| "none".to_owned(), |at| at.to_string());
        tracing::info!(held = %ours, stored = %theirs, "the control plane lacks this host's newest compliance evidence; sending it again");
        self.send_evidence(None).await;
    }

    fn drift_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(self.config.compliance_interval_secs)).filter(|d| !d.is_zero())
    }

    /// How long until the next drift run (zero: now); None when drift is off.
    fn drift_due(&self) -> Option<Duration> {
        let interval = self.drift_interval()?;
        let current = self.system.current_closure()?;
        if let Some((closure, at)) = &self.drift_not_before {
            if *closure == current {
                return Some(at.saturating_duration_since(Instant::now()));
            }
        }
        let held = self
            .state
            .evidence
            .as_ref()
            .map(HeldEvidence::evidence)
            .filter(|e| e.closure_hash == current);
        let Some(last) = held else {
            // No evidence of the running closure: probe it now.
            return Some(Duration::ZERO);
        };
        let next = last.collected_at + interval;
        let left = (next - now()).max(time::Duration::ZERO);
        Some(Duration::from_secs_f64(left.as_seconds_f64()))
    }

    /// Between rollouts: the running closure's probes again. Logged as drift when a
    /// control's status changed; never rolls back.
    async fn drift(&mut self) {
        let Some(interval) = self.drift_interval() else {
            return;
        };
        let Some(current) = self.system.current_closure() else {
            return;
        };
        let later = |current: &str| Some((current.to_owned(), Instant::now() + interval));
        let set = match self.probe_set(&current) {
            Ok(Some(set)) if set.mode != ComplianceMode::Disabled => set,
            Ok(set) => {
                tracing::debug!(closure = %current, "no drift probes: {}", if set.is_some() { "compliance mode disabled" } else { "no probe set" });
                self.drift_not_before = later(&current);
                return;
            }
            Err(e) => {
                tracing::warn!(closure = %current, "no drift probes: {e}; tried again in {} s", interval.as_secs());
                self.drift_not_before = later(&current);
                return;
            }
        };
        self.drift_not_before = None;
        let previous = self
            .state
            .evidence
            .as_ref()
            .map(HeldEvidence::evidence)
            .filter(|e| e.closure_hash == current)
            .cloned();
        let rollout_id = previous
            .as_ref()
            .and_then(|e| e.rollout_id.clone())
            .or_else(|| {
                self.state
                    .machine
                    .last_activation
                    .as_ref()
                    .filter(|a| a.target.closure_hash == current)
                    .map(|a| a.target.rollout_id.clone())
            });
        // When the closure became the running system: known from its last evidence, else
        // when the current-system link was last set.
        let activated_at = previous
            .as_ref()
            .map(|e| e.activated_at)
            .or_else(|| {
                std::fs::symlink_metadata(&self.config.current_system_link)
                    .and_then(|m| m.modified())
                    .ok()
                    .map(OffsetDateTime::from)
            })
            .unwrap_or_else(now)
            .min(now());
        let context = compliance::Context {
            hostname: self.hostname.clone(),
            rollout_id,
            closure_hash: current.clone(),
            boot_id: self.boot_id.clone(),
            activated_at,
            trigger: EvidenceTrigger::Drift,
        };
        let (runs, held) = self.collect(&set, context, false).await;
        let Some(held) = held else {
            self.drift_not_before = later(&current);
            return;
        };
        let failing = compliance::describe_failing(&runs);
        match previous.map(|p| compliance::changes(&p, held.evidence())) {
            Some(changed) if !changed.is_empty() => tracing::warn!(
                closure = %current,
                controls = ?changed,
                "compliance drift on {current}: {}",
                changed.join(", ")
            ),
            _ => tracing::info!(
                closure = %current,
                "drift probes of {current}: {} passed, {} did not, no change since the last run{}",
                runs.len() - failing.len(),
                failing.len(),
                if failing.is_empty() { String::new() } else { format!(" ({})", failing.join("; ")) }
            ),
        }
        self.state.evidence = Some(held);
        self.save();
        self.send_evidence(None).await;
    }

    // ---- awaiting confirm -----------------------------------------------------------

    async fn confirm(&mut self, activation: Activation) -> Duration {
        let Some(client) = self.client.clone() else {
            self.apply(Event::ConfirmUnanswered);
            return self.confirm_retry();
        };
        // A control plane that accepts connections but never answers must not keep the
        // host past its confirm window: the rollback is due at the deadline.
        let client = match &self.state.machine.phase {
            Phase::AwaitingConfirm { deadline, .. } => {
                let left = (*deadline - now()).max(time::Duration::ZERO);
                client
                    .within(Duration::from_secs_f64(left.as_seconds_f64()).max(MIN_CONFIRM_ATTEMPT))
            }
            _ => client,
        };
        let request = ConfirmRequest {
            hostname: self.hostname.clone(),
            rollout_id: activation.target.rollout_id.clone(),
            wave_index: activation.target.wave_index,
            generation: Generation {
                closure_hash: activation.target.closure_hash.clone(),
                boot_id: self.boot_id.clone(),
            },
        };
        let event = match client.post("/v1/agent/confirm", &request).await {
            Ok(reply) if reply.status == 204 || reply.status == 200 => Event::Confirmed,
            Ok(reply) if reply.status == 410 => Event::ConfirmGone {
                reason: reply.message(),
            },
            Ok(reply) => {
                tracing::warn!(
                    "confirm not accepted ({}: {}); retrying while the window is open",
                    reply.status,
                    reply.message()
                );
                // The control plane answers but does not confirm: check in, so that a
                // rollback signal (or a lie about the rollout) is seen meanwhile.
                self.checkin_in_flight(&client, &activation).await;
                if !matches!(self.state.machine.phase, Phase::AwaitingConfirm { .. }) {
                    return Duration::ZERO;
                }
                Event::ConfirmUnanswered
            }
            Err(e) => {
                tracing::warn!("confirm not sent: {e}; retrying while the window is open");
                Event::ConfirmUnanswered
            }
        };
        let unanswered = matches!(event, Event::ConfirmUnanswered);
        self.apply(event);
        if unanswered && matches!(self.state.machine.phase, Phase::AwaitingConfirm { .. }) {
            self.confirm_retry()
        } else {
            self.failures = 0;
            Duration::ZERO
        }
    }

    /// Whether `failed_units` is over the health gate of rollout `rollout_id`, as its
    /// manifest (verified when it was cached) sets it: a rollback then says the closure
    /// is unhealthy on this host, not only that its rollout halted.
    fn over_health_gate(&self, rollout_id: &str, failed_units: u32) -> bool {
        let Some((bytes, _)) = self.dir.cached_manifest(rollout_id) else {
            return false;
        };
        let manifest = match serde_json::from_slice::<nixfleet_proto::HostProof>(&bytes) {
            Ok(proof) => proof.manifest.into_bytes(),
            Err(_) => bytes,
        };
        serde_json::from_slice::<HealthGateProbe>(&manifest)
            .ok()
            .and_then(|m| m.health_gate.systemd_failed_units)
            .is_some_and(|gate| failed_units > gate.max)
    }

    /// A check-in while an activation awaits its confirm: only a rollback signal for it,
    /// or a refusal of a target that swaps its rollout, can come of it.
    async fn checkin_in_flight(&mut self, client: &CpClient, activation: &Activation) {
        let current = self.system.current_closure().unwrap_or_default();
        let request = self.checkin_request(&current).await;
        let Ok(reply) = client.post("/v1/agent/checkin", &request).await else {
            return;
        };
        let Ok(response) = serde_json::from_slice::<CheckinResponse>(&reply.body) else {
            return;
        };
        if let Some(signal) = response.rollback {
            let unhealthy = self.over_health_gate(&signal.rollout_id, request.health.failed_units);
            self.apply(Event::RollbackSignal {
                signal,
                current,
                unhealthy,
            });
            return;
        }
        let Some(target) = response.target else {
            return;
        };
        let already_failed =
            self.state.failed_targets.iter().any(|f| {
                f.rollout_id == target.rollout_id && f.closure_hash == target.closure_hash
            });
        // The same activation re-offered (a re-sign only moves its signedAt).
        let same = target.rollout_id == activation.target.rollout_id
            && target.closure_hash == activation.target.closure_hash
            && target.wave_index == activation.target.wave_index;
        if already_failed || same {
            return;
        }
        match gate::precheck(&target, Some(activation), &self.state.failed_targets) {
            Err(refusal) => {
                self.apply(Event::TargetRefused {
                    target,
                    kind: refusal.kind,
                    reason: refusal.reason,
                });
            }
            Ok(()) => tracing::info!(
                "the control plane offers {} while {} awaits its confirm; it is considered after the confirm",
                target.closure_hash,
                activation.target.closure_hash
            ),
        }
    }

    fn confirm_retry(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff::retry_delay(
            self.failures,
            CONFIRM_RETRY_CAP.min(self.poll_cap()),
            random_unit(),
        );
        match &self.state.machine.phase {
            Phase::AwaitingConfirm { deadline, .. } => {
                let left = (*deadline - now()).max(time::Duration::ZERO);
                // Wake up right after the window closes, to roll back without delay.
                wait.min(
                    Duration::from_secs_f64(left.as_seconds_f64()) + Duration::from_millis(100),
                )
            }
            _ => wait,
        }
    }

    // ---- rolling back ----------------------------------------------------------------

    async fn roll_back(&mut self, activation: Activation) -> Duration {
        let id = format!("rb-{}", activation.id());
        let previous = activation.previous.clone();
        if !gate::is_store_basename(&previous) {
            self.apply(Event::RollbackFailed {
                reason: format!("the system running before the activation ({previous:?}) is unknown, so there is nothing to switch back to"),
            });
            return Duration::ZERO;
        }
        if self.system.switch_status(&id) == SwitchStatus::NotStarted {
            if self.system.lock_held().await {
                tracing::info!(
                    "{} is held by another switch-to-configuration; deferring the rollback",
                    self.config.switch_lock.display()
                );
                return LOCK_RETRY.min(self.poll_cap());
            }
            if let Err(reason) = self.system.set_profile(&previous).await {
                self.apply(Event::RollbackFailed { reason });
                return Duration::ZERO;
            }
            tracing::info!(
                "profile {} set back to {previous}; switching to it",
                self.config.profile.display()
            );
        }
        let event = match self.system.switch_to(&id, &previous).await {
            Ok(()) => Event::RolledBack,
            Err(reason) => Event::RollbackFailed { reason },
        };
        self.apply(event);
        Duration::ZERO
    }
}

/// The health gate of a manifest of either schema.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct HealthGateProbe {
    health_gate: nixfleet_proto::HealthGate,
}

/// Whether cached or fetched bytes are a host proof rather than a whole manifest.
fn is_host_proof(bytes: &[u8]) -> bool {
    serde_json::from_slice::<nixfleet_proto::HostProof>(bytes).is_ok()
}

/// The raw signature inside a host proof, kept beside it in the cache.
fn proof_signature(bytes: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let proof = serde_json::from_slice::<nixfleet_proto::HostProof>(bytes).ok()?;
    base64::engine::general_purpose::STANDARD
        .decode(proof.signature)
        .ok()
}

/// `meta.signedAt` of manifest bytes (or of a host proof's manifest), read without
/// verifying them (that is the gate's job).
fn signed_at_of(manifest: &[u8]) -> Option<OffsetDateTime> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        meta: nixfleet_proto::Meta,
    }
    let inner;
    let manifest = match serde_json::from_slice::<nixfleet_proto::HostProof>(manifest) {
        Ok(proof) => {
            inner = proof.manifest;
            inner.as_bytes()
        }
        Err(_) => manifest,
    };
    serde_json::from_slice::<Probe>(manifest)
        .ok()?
        .meta
        .signed_at
}
