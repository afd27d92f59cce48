//! HTTP routes (SPEC.md §5). Authorisation comes from the caller's verified client
//! certificate; every error is mapped to a status and a JSON body in one place.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use nixfleet_pki::{FleetCa, HostExpectation, Role};
use nixfleet_proto::api::{
    state_name, ChannelStatus, Healthz, HostDetail, HostRevoked, HostStatus, Provenance,
    RolloutEventRecord, RolloutStatus,
};
use nixfleet_proto::wire::{
    closure_blocked, is_rollout_id, is_store_basename, CheckinRequest, CheckinResponse,
    ConfirmRequest, EnrollRequest, EnrollResponse, ErrorBody, RenewRequest, RenewResponse,
    ReportResponse, Target, PROTOCOL_HEADER, PROTOCOL_MAJOR,
};
use nixfleet_reconciler::HostState;
use nixfleet_trust::verify::{self, Limits, VerifyError};
use time::OffsetDateTime;
use tower_http::timeout::TimeoutLayer;

use crate::clock::rfc3339;
use crate::metrics::Metrics;
use crate::server::Peer;
use crate::state::{Change, Shared};
use crate::store::Db;

/// Agent and operator request bodies are small; enrollment carries a token and a CSR.
const BODY_LIMIT: usize = 256 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct App {
    pub shared: Arc<Shared>,
    pub db: Arc<Db>,
    pub metrics: Arc<Metrics>,
    pub fleet_ca: Option<FleetCa>,
    pub cert_validity: time::Duration,
    pub audit_log: Mutex<Option<std::fs::File>>,
    pub audit_log_path: std::path::PathBuf,
    pub checkin_interval_secs: u32,
    /// This replica's name (/healthz).
    pub replica: String,
    /// Per-host report budget: `--reports-per-minute`, and each host's current window.
    pub reports_per_minute: u32,
    pub report_windows: Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
    /// The same budget for compliance evidence, counted apart: a report flood must not
    /// keep a host's evidence out.
    pub evidence_windows: Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
    /// One evidence document per host at a time: the replay check and the write that
    /// makes it the host's latest go together (bounded by the fleet, like the windows).
    pub evidence_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `--reports-per-host`: how many of a host's reports are kept.
    pub reports_per_host: usize,
    /// Revoked hosts: when a refusal of each was last logged, and the enrollment time of
    /// certificates seen since that the revocation does not cover (a host enrolled again).
    /// Both hold revoked hostnames only, so the revocation list bounds them.
    pub revoked_seen: Mutex<std::collections::HashMap<String, RevokedSeen>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RevokedSeen {
    pub refusal_logged: Option<std::time::Instant>,
    pub enrolled_again: Option<OffsetDateTime>,
}

/// A refused revoked certificate is logged at most this often per host.
const REVOKED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The largest report stored, in bytes of its signed body; a reason longer than
/// [`MAX_REPORT_REASON_CHARS`] is refused too. Both are far above what an agent writes.
const MAX_REPORT_BYTES: usize = 16 * 1024;
const MAX_REPORT_REASON_CHARS: usize = 4096;

/// Whether `host` may send another report now: at most `per_minute` in any one-minute
/// window, counted per host (a host is one enrolled certificate name, so the map is
/// bounded by the fleet).
fn report_allowed(app: &App, host: &str) -> bool {
    within_budget(app, &app.report_windows, host)
}

pub(crate) fn within_budget(
    app: &App,
    windows: &Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
    host: &str,
) -> bool {
    let Ok(mut windows) = windows.lock() else {
        return true;
    };
    let now = std::time::Instant::now();
    let entry = windows.entry(host.to_owned()).or_insert((now, 0));
    if now.duration_since(entry.0) >= std::time::Duration::from_secs(60) {
        *entry = (now, 0);
    }
    entry.1 = entry.1.saturating_add(1);
    entry.1 <= app.reports_per_minute
}

/// An error answer: status plus one sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Ask the client to reconnect (through a load balancer: to another replica).
    close: bool,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            close: false,
        }
    }

    /// A kept-alive connection would bring the agent's retry back to this same replica;
    /// closing it lets the load balancer pick another.
    fn reconnect_elsewhere(mut self) -> Self {
        self.close = true;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.close {
            response.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/enroll", post(enroll))
        .route("/v1/agent/renew", post(renew))
        .route("/v1/agent/checkin", post(checkin))
        .route("/v1/agent/confirm", post(confirm))
        .route("/v1/agent/report", post(report))
        .route("/v1/agent/evidence", post(crate::evidence::evidence))
        .route("/v1/compliance", get(crate::evidence::compliance))
        .route(
            "/v1/hosts/{name}/evidence",
            get(crate::evidence::host_evidence),
        )
        .route("/v1/rollouts", get(list_rollouts))
        .route("/v1/rollouts/{id}", get(crate::rollouts::manifest))
        .route("/v1/rollouts/{id}/sig", get(crate::rollouts::signature))
        .route(
            "/v1/rollouts/{id}/hosts/{host}",
            get(crate::rollouts::host_proof),
        )
        .route("/v1/rollouts/{id}/trace", get(rollout_trace))
        .route("/v1/channels/{name}", get(channel))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(host))
        .route("/metrics", get(metrics_operator))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::map_response(body_too_large))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            protocol_and_latency,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(app)
}

/// The loopback metrics listener's router (no client certificate there).
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_plain))
        .with_state(app)
}

/// axum answers a body over the limit with a plain-text 413 and, not having read the rest,
/// then drops the connection: the answer says so (`Connection: close`), or a kept-alive
/// client sends its next request into the closed connection; and says why in JSON, as
/// every other refusal does.
async fn body_too_large(response: Response) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body is over the {BODY_LIMIT}-byte limit"),
        close: true,
    }
    .into_response()
}

/// Refuses another protocol major version (426); a request without the header is served,
/// so plain `curl` works. Records request latency.
async fn protocol_and_latency(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(value) = req.headers().get(PROTOCOL_HEADER) {
        let major = value.to_str().ok().and_then(|v| {
            v.trim()
                .split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
        });
        if major != Some(PROTOCOL_MAJOR) {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                format!(
                    "this control plane speaks nixfleet protocol {PROTOCOL_MAJOR}; the request asked for {:?}: upgrade the agent or the control plane so they match",
                    value.to_str().unwrap_or("?")
                ),
            )
            .into_response();
        }
    }
    let started = Instant::now();
    let response = next.run(req).await;
    app.metrics.observe_latency(started.elapsed().as_secs_f64());
    response
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body is not valid JSON for this route: {e}"),
        )
    })
}

/// Agent routes: a host certificate for `hostname`, not revoked, and a revocation list
/// applied (a wiped control plane must not accept a revoked certificate).
pub(crate) fn require_host(app: &App, peer: &Peer, hostname: &str) -> ApiResult<()> {
    if !app.shared.revocations_ready() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the revocation list has not been verified and applied yet; retry shortly",
        ));
    }
    let id = match peer {
        Peer::Identified(id) => id,
        Peer::Anonymous => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "agent routes need a client certificate from the fleet CA; enroll with a bootstrap token",
            ))
        }
        Peer::Unusable(why) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!("client certificate is not usable: {why}"),
            ))
        }
    };
    match &id.role {
        Role::Host { hostname: cn } if cn == hostname => {}
        Role::Host { hostname: cn } => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("certificate is for host {cn}, but the request is for {hostname}"),
            ))
        }
        Role::Operator { .. } => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "agent routes need a host certificate, not an operator certificate",
            ))
        }
    }
    // A resumed TLS session is not re-validated by rustls, so expiry is checked here.
    if id.not_after < OffsetDateTime::now_utc() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the certificate of {hostname} expired; re-enroll the host with a new bootstrap token"),
        ));
    }
    // Against the enrollment, which renewals carry: renewing does not outrun a cut-off.
    let enrolled = id.enrolled_at.min(id.not_before);
    let revocations = app.shared.revocations();
    if let Some(entry) = revocations.entries.get(hostname) {
        let mut seen = app.revoked_seen.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen.entry(hostname.to_owned()).or_default();
        if enrolled >= entry.not_before {
            seen.enrolled_again = Some(enrolled);
            return Ok(());
        }
        Metrics::inc(&app.metrics.revoked_refusals);
        if seen
            .refusal_logged
            .is_none_or(|t| t.elapsed() >= REVOKED_LOG_EVERY)
        {
            seen.refusal_logged = Some(std::time::Instant::now());
            tracing::warn!(
                host = hostname,
                "refused the revoked certificate of {hostname} (enrolled {}): revoked for certificates enrolled before {} ({}{}); it may enroll again with a new bootstrap token",
                crate::clock::rfc3339(enrolled),
                crate::clock::rfc3339(entry.not_before),
                entry.reason.as_deref().unwrap_or("no reason given").escape_debug(),
                entry
                    .revoked_by
                    .as_deref()
                    .map(|by| format!(", by {}", by.escape_debug()))
                    .unwrap_or_default()
            );
        }
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the certificate of {hostname} is revoked; re-enroll the host with a new bootstrap token"),
        ));
    }
    Ok(())
}

pub(crate) fn require_operator(peer: &Peer) -> ApiResult<()> {
    match peer {
        Peer::Identified(id) if id.not_after < OffsetDateTime::now_utc() => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the operator certificate expired; issue a new one with `nixfleet cert operator`",
        )),
        Peer::Identified(id) => match &id.role {
            Role::Operator { .. } => Ok(()),
            Role::Host { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "operator routes need an operator certificate (`nixfleet cert operator`), not a host certificate",
            )),
        },
        Peer::Anonymous => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "operator routes need an operator client certificate (`nixfleet cert operator`)",
        )),
        Peer::Unusable(why) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("client certificate is not usable: {why}"),
        )),
    }
}

pub(crate) fn host_of(peer: &Peer) -> Option<&str> {
    match peer {
        Peer::Identified(id) => id.role_hostname(),
        _ => None,
    }
}

trait RoleHostname {
    fn role_hostname(&self) -> Option<&str>;
}

impl RoleHostname for nixfleet_pki::ClientIdentity {
    fn role_hostname(&self) -> Option<&str> {
        match &self.role {
            Role::Host { hostname } => Some(hostname),
            Role::Operator { .. } => None,
        }
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Json<Healthz> {
    let fleet = app.shared.fleet();
    let revocations = app.shared.revocations();
    let replicated = app.shared.replicated();
    Json(Healthz {
        // Whether agents are served here: a load balancer's check reads it.
        ok: fleet.is_some() && app.shared.database_fresh() && app.shared.revocations_ready(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        primed: fleet.is_some(),
        last_tick_at: app.shared.last_tick_at(),
        fleet_signed_at: fleet.map(|f| f.signed_at()),
        revocations_applied_at: revocations.applied_at,
        role: app.shared.role().name().to_owned(),
        replica: replicated.then(|| app.replica.clone()),
        leader: app.shared.leader(),
        database_ok: app.shared.database_fresh(),
    })
}

/// Spreads check-ins over the interval: the same host always gets the same offset.
fn next_checkin_secs(base: u32, hostname: &str, active: bool) -> u32 {
    let base = if active {
        (base / 4).max(5)
    } else {
        base.max(1)
    };
    let mut h = DefaultHasher::new();
    hostname.hash(&mut h);
    let spread = (base / 10).max(1);
    base - spread / 2 + (h.finish() % u64::from(spread)) as u32
}

async fn checkin(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<Json<CheckinResponse>> {
    let mut req: CheckinRequest = parse_json(&body)?;
    sanitize_failed_targets(&mut req);
    if let Err(e) = require_host(&app, &peer, &req.hostname) {
        Metrics::inc(&app.metrics.checkins_refused);
        return Err(e);
    }
    require_fresh_database(&app)?;
    let now = OffsetDateTime::now_utc();
    let change = app.shared.attestations.checkin(&req, now);
    match change {
        Change::FirstSinceStart | Change::Changed => {
            tracing::info!("checkin received {}", req.hostname)
        }
        Change::Unchanged => tracing::debug!("checkin received {}", req.hostname),
    }
    // The newest evidence stored; an agent holding newer sends it again (after a wipe).
    let stored_evidence_at = app
        .shared
        .attestations
        .get(&req.hostname)
        .and_then(|a| a.compliance)
        .map(|c| c.collected_at);
    if let Some(claimed) = req
        .compliance_evidence_at
        .filter(|c| stored_evidence_at.is_none_or(|s| s < *c))
    {
        tracing::debug!(
            host = %req.hostname,
            "compliance evidence pending: the agent holds evidence collected at {}, the control plane {}; the agent sends it again",
            rfc3339(claimed),
            stored_evidence_at.map_or_else(|| "has none".to_owned(), |s| format!("has {}", rfc3339(s)))
        );
    }
    let directives = app.shared.directives();
    let mut response = CheckinResponse {
        target: None,
        rollback: None,
        next_checkin_secs: next_checkin_secs(
            app.checkin_interval_secs,
            &req.hostname,
            directives.active.contains(&req.hostname),
        ),
        compliance_evidence_at: stored_evidence_at,
    };
    let mut delivered_now = false;
    if let Some(signal) = directives.rollbacks.get(&req.hostname) {
        response.rollback = Some(signal.clone());
    } else if let Some(target) = directives.targets.get(&req.hostname) {
        let failed_here = closure_blocked(
            &req.failed_targets,
            &target.rollout_id,
            &target.closure_hash,
        )
        .is_some();
        // A host already on the target needs nothing; one that failed it is never re-sent it.
        if target.closure_hash != req.current_generation.closure_hash
            && !failed_here
            && !held_stale(target, now)
            && still_dispatched(&app, &req.hostname, &target.rollout_id).await?
        {
            delivered_now =
                app.shared
                    .attestations
                    .delivered(&req.hostname, &target.rollout_id, now);
            response.target = Some(target.clone());
        }
    }
    // Replicas share check-ins through the database: what the leader acts on is durable
    // before the answer (a target is handed out only once its delivery is recorded).
    if change != Change::Unchanged || delivered_now {
        share_attestation(&app, &req.hostname).await?;
    }
    Metrics::inc(&app.metrics.checkins_ok);
    if let Some(signal) = &response.rollback {
        Metrics::inc(&app.metrics.rollbacks_sent);
        tracing::info!(host = %req.hostname, rollout = %signal.rollout_id, "rollback signal sent");
    }
    if let Some(target) = &response.target {
        if delivered_now {
            tracing::info!(host = %req.hostname, rollout = %target.rollout_id, closure = %target.closure_hash, "target delivered");
            let db = app.db.clone();
            let (host, rollout, closure) = (
                req.hostname.clone(),
                target.rollout_id.clone(),
                target.closure_hash.clone(),
            );
            // The delivery is also held in memory for the tick; the row is the audit trail.
            tokio::spawn(async move {
                if let Err(e) = db
                    .record_dispatch_event(host, rollout, closure, "delivered", now)
                    .await
                {
                    tracing::warn!(error = %e, "could not record a delivery");
                }
            });
            app.shared.tick_now.notify_one();
        }
        Metrics::inc(&app.metrics.targets_sent);
    }
    Ok(Json(response))
}

/// Replicas learn of each other's check-ins and confirms through the database; the write
/// is durable before the agent hears back.
async fn share_attestation(app: &App, hostname: &str) -> ApiResult<()> {
    if !app.shared.replicated() {
        // Written in batches by the tick loop: only this process reads it, after a restart.
        app.shared.attestations.mark_unsaved(hostname);
        return Ok(());
    }
    let Some(attestation) = app.shared.attestations.get(hostname) else {
        return Ok(());
    };
    app.db
        .save_attestations(vec![(hostname.to_owned(), attestation)])
        .await
        .map_err(database_unavailable)
}

/// Longest failure reason kept from a check-in, in characters.
const MAX_REASON_CHARS: usize = 1024;

/// A host's failed targets end up in decisions, logs and `nixfleet status`: entries that
/// do not name a rollout id and a store path are dropped (no rollout can match them), and
/// reasons lose control characters and are bounded.
fn sanitize_failed_targets(req: &mut CheckinRequest) {
    let before = req.failed_targets.len();
    req.failed_targets
        .retain(|f| is_rollout_id(&f.rollout_id) && is_store_basename(&f.closure_hash));
    if req
        .activation
        .as_ref()
        .is_some_and(|p| !is_rollout_id(&p.rollout_id) || !is_store_basename(&p.closure_hash))
    {
        tracing::debug!("activation progress without a rollout id or a store path ignored");
        req.activation = None;
    }
    if req.failed_targets.len() != before {
        tracing::debug!(
            dropped = before - req.failed_targets.len(),
            "failed targets without a rollout id or a store path ignored"
        );
    }
    for f in &mut req.failed_targets {
        if f.reason.chars().count() > MAX_REASON_CHARS || f.reason.chars().any(breaks_lines) {
            f.reason = f
                .reason
                .chars()
                .take(MAX_REASON_CHARS)
                .map(|c| if breaks_lines(c) { ' ' } else { c })
                .collect();
        }
    }
}

/// Control characters, and the Unicode line and paragraph separators, which JSON leaves
/// raw and which some log readers take for the end of a line.
fn breaks_lines(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Whether the newest signature of a target's rollout is past its freshness window (and
/// the verifiers' 60 s of grace). The agent would refuse it and the refusal would fail
/// the host, halting the rollout over a signing outage; the target is held instead (the
/// host stays dispatched, with no confirm deadline running) until CI signs again.
fn held_stale(target: &Target, now: OffsetDateTime) -> bool {
    static WARN: Throttle = Throttle::new();
    let window = i64::try_from(target.freshness_window_secs).unwrap_or(i64::MAX);
    let stale = window > 0
        && now > nixfleet_proto::stale_after(target.signed_at, time::Duration::seconds(window));
    if stale && WARN.allow() {
        tracing::warn!(
            rollout = %target.rollout_id,
            "target held back: the newest signature of rollout {} (signed {}) is past its freshness window; CI must re-sign the release (logged at most every 10 s)",
            target.rollout_id,
            crate::clock::rfc3339(target.signed_at)
        );
    }
    stale
}

/// Lets a warning through at most once every 10 s: at fleet scale a line per refused
/// request would drown the log.
struct Throttle(std::sync::atomic::AtomicU64);

impl Throttle {
    const fn new() -> Throttle {
        Throttle(std::sync::atomic::AtomicU64::new(0))
    }

    fn allow(&self) -> bool {
        use std::sync::atomic::Ordering;
        let now = crate::clock::unix(OffsetDateTime::now_utc());
        let last = self.0.load(Ordering::Relaxed);
        now >= last + 10
            && self
                .0
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

pub(crate) fn database_unavailable(e: crate::store::DbError) -> ApiError {
    static WARN: Throttle = Throttle::new();
    if WARN.allow() {
        tracing::warn!(
            "answering 503: a database write or read failed: {e} (logged at most every 10 s)"
        );
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("this control plane cannot record the request: {e}; retry later"),
    )
    .reconnect_elsewhere()
}

/// A replica that has lost its shared database answers 503 rather than from state that
/// may be stale; the agent retries (through the load balancer, another replica).
pub(crate) fn require_fresh_database(app: &App) -> ApiResult<()> {
    static WARN: Throttle = Throttle::new();
    if app.shared.database_fresh() {
        Ok(())
    } else {
        if WARN.allow() {
            tracing::warn!(
                "answering agents 503: the database has not answered this replica for {:?} (logged at most every 10 s)",
                crate::state::DB_STALE_AFTER
            );
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this control-plane replica cannot reach its database, so its answers could be stale; retry later",
        )
        .reconnect_elsewhere())
    }
}

/// Before a replica first hands out a target, the leader's newest word on the host: a
/// replica's copy can be a second behind a requeue or a halt.
async fn still_dispatched(app: &App, hostname: &str, rollout_id: &str) -> ApiResult<bool> {
    if !app.shared.replicated()
        || app
            .shared
            .attestations
            .get(hostname)
            .and_then(|a| a.delivered)
            .is_some_and(|d| d.rollout_id == rollout_id)
    {
        return Ok(true);
    }
    let record = app
        .db
        .host_record(rollout_id.to_owned(), hostname.to_owned())
        .await
        .map_err(database_unavailable)?;
    let dispatched = matches!(
        record.map(|r| r.state),
        Some(HostState::Dispatched | HostState::ConfirmWindow { .. })
    );
    if !dispatched {
        tracing::info!(host = %hostname, rollout = %rollout_id, "target held back: the leader no longer has the host dispatched");
    }
    Ok(dispatched)
}

async fn confirm(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let req: ConfirmRequest = parse_json(&body)?;
    require_host(&app, &peer, &req.hostname)?;
    require_fresh_database(&app)?;
    // Identifiers are checked where they arrive: they end up in logs and file names.
    if !is_rollout_id(&req.rollout_id) || !is_store_basename(&req.generation.closure_hash) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "confirm refused: rolloutId must be 64 lowercase hex digits and generation.closureHash a Nix store basename",
        ));
    }
    let gone = |why: String| {
        Metrics::inc(&app.metrics.confirms_gone);
        tracing::info!(host = %req.hostname, rollout = %req.rollout_id, "confirm refused: {why}");
        ApiError::new(StatusCode::GONE, why)
    };
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    let Some(manifest) = fleet.manifests.get(&req.rollout_id) else {
        if app.shared.stored().rollouts.contains_key(&req.rollout_id) {
            // The leader runs it; this replica has not verified its manifest yet.
            app.shared.poll_now.notify_one();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "rollout {} is not verified on this replica yet; retry",
                    req.rollout_id
                ),
            ));
        }
        return Err(gone(format!(
            "rollout {} is not part of the current signed release; roll back",
            req.rollout_id
        )));
    };
    if !manifest
        .value
        .contains(&req.hostname, req.wave_index, &req.generation.closure_hash)
    {
        return Err(gone(format!(
            "rollout {} does not give {} closure {} in wave {}; roll back",
            req.rollout_id, req.hostname, req.generation.closure_hash, req.wave_index
        )));
    }
    let state = if app.shared.replicated() {
        // The leader's newest word, not this replica's copy of it.
        app.db
            .host_record(req.rollout_id.clone(), req.hostname.clone())
            .await
            .map_err(database_unavailable)?
            .map(|h| h.state)
    } else {
        app.shared
            .stored()
            .rollouts
            .get(&req.rollout_id)
            .and_then(|r| r.hosts.get(&req.hostname))
            .map(|h| h.state.clone())
    };
    if let Some(HostState::Failed { reason, .. }) = &state {
        return Err(gone(format!(
            "{} already failed in rollout {}: {reason}; roll back",
            req.hostname, req.rollout_id
        )));
    }
    if matches!(state, Some(HostState::RollingBack | HostState::Reverted)) {
        return Err(gone(format!(
            "rollout {} is being rolled back; roll back",
            req.rollout_id
        )));
    }
    let now = OffsetDateTime::now_utc();
    // With replicas the leader fails the host a grace period after the deadline, and only
    // a confirm taken before the deadline is sure to reach it by then.
    if let (true, Some(HostState::ConfirmWindow { deadline })) = (app.shared.replicated(), &state) {
        if now >= *deadline {
            return Err(gone(format!(
                "the confirm window of {} in rollout {} closed at {}; roll back",
                req.hostname,
                req.rollout_id,
                crate::clock::rfc3339(*deadline)
            )));
        }
    }
    // No dispatch record (e.g. after a wipe) is an orphan confirm: accepted, because the
    // signed manifest says this host should run this closure.
    let event = if state.is_none() {
        "orphan-confirm"
    } else {
        "confirmed"
    };
    app.db
        .record_dispatch_event(
            req.hostname.clone(),
            req.rollout_id.clone(),
            req.generation.closure_hash.clone(),
            event,
            now,
        )
        .await
        .map_err(database_unavailable)?;
    app.shared
        .attestations
        .confirmed(&req.hostname, &req.generation.closure_hash, now);
    share_attestation(&app, &req.hostname).await?;
    Metrics::inc(&app.metrics.confirms_ok);
    tracing::info!(host = %req.hostname, rollout = %req.rollout_id, closure = %req.generation.closure_hash, "{event}");
    app.shared.tick_now.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

async fn report(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<Json<ReportResponse>> {
    let hostname = host_of(&peer)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "reports need a host certificate"))?
        .to_owned();
    require_host(&app, &peer, &hostname)?;
    require_fresh_database(&app)?;
    if body.len() > MAX_REPORT_BYTES {
        Metrics::inc(&app.metrics.reports_dropped_size);
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "report refused: {} bytes, over the {MAX_REPORT_BYTES}-byte limit for one report",
                body.len()
            ),
        ));
    }
    if !report_allowed(&app, &hostname) {
        Metrics::inc(&app.metrics.reports_dropped_rate);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "report refused: over {} reports a minute from this host; send it later",
                app.reports_per_minute
            ),
        ));
    }
    let pubkey = pinned_host_key(&app, &hostname, "reports")?;
    let verified = verify::verify_report(&body, &hostname, &pubkey, &Limits::default()).map_err(
        |e| match e {
            VerifyError::Parse { .. }
            | VerifyError::Shape { .. }
            | VerifyError::TooLarge { .. } => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            VerifyError::ReportHostMismatch { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, e.to_string())
            }
            _ => ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()),
        },
    )?;
    let report = &verified.value.report;
    if report.reason.chars().count() > MAX_REPORT_REASON_CHARS {
        Metrics::inc(&app.metrics.reports_dropped_size);
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("report refused: its reason is over {MAX_REPORT_REASON_CHARS} characters"),
        ));
    }
    if report
        .rollout_id
        .as_deref()
        .is_some_and(|id| !is_rollout_id(id))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "report refused: rolloutId must be null or 64 lowercase hex digits",
        ));
    }
    let kind = serde_json::to_value(report.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let event_id = app
        .db
        .record_report(
            hostname.clone(),
            report.report_id.clone(),
            kind.clone(),
            report.rollout_id.clone(),
            String::from_utf8_lossy(&body).into_owned(),
            OffsetDateTime::now_utc(),
            app.reports_per_host,
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Metrics::inc(&app.metrics.reports);
    // The reason is the agent's own text: escaped, so that it cannot forge log lines.
    tracing::info!(host = %hostname, kind = %kind, rollout = ?report.rollout_id, "report received: {}", report.reason.escape_debug());
    Ok(Json(ReportResponse {
        event_id: event_id.to_string(),
    }))
}

/// The host key the verified fleet pins for `hostname` (`hosts.<name>.pubkey`), which
/// signs its `what` (reports, compliance evidence).
pub(crate) fn pinned_host_key(app: &App, hostname: &str, what: &str) -> ApiResult<String> {
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    fleet
        .fleet
        .value
        .hosts
        .get(hostname)
        .and_then(|h| h.pubkey.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("fleet.resolved has no pubkey for {hostname}, so its {what} cannot be verified; add the host key to the fleet"),
            )
        })
}

pub(crate) fn audit(app: &App, entry: serde_json::Value) -> ApiResult<()> {
    let mut guard = app
        .audit_log
        .lock()
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable"))?;
    if guard.is_none() {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&app.audit_log_path)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "cannot open the audit log {}: {e}",
                        app.audit_log_path.display()
                    ),
                )
            })?;
        *guard = Some(file);
    }
    let mut line = entry.to_string();
    line.push('\n');
    let file = guard
        .as_mut()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable"))?;
    // Issuance is not acknowledged until its audit line is on disk.
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_data())
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cannot write the audit log {}: {e}",
                    app.audit_log_path.display()
                ),
            )
        })
}

fn no_ca() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "this control plane has no fleet CA key (--fleet-ca-key), so it cannot issue certificates; enrolled agents keep working",
    )
}

fn pki_error(e: nixfleet_pki::PkiError) -> ApiError {
    use nixfleet_pki::PkiError as P;
    let status = match e {
        P::CsrHostnameMismatch { .. }
        | P::CsrFingerprintMismatch { .. }
        | P::InvalidHostname { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, e.to_string())
}

async fn enroll(State(app): State<Arc<App>>, body: Bytes) -> ApiResult<Json<EnrollResponse>> {
    let ca = app.fleet_ca.as_ref().ok_or_else(no_ca)?;
    let req: EnrollRequest = parse_json(&body)?;
    let value: serde_json::Value = parse_json(&body)?;
    let token_bytes = serde_json::to_vec(&value["token"]).unwrap_or_default();
    let now = OffsetDateTime::now_utc();
    let trust = app.shared.trust();
    let claims = verify::verify_token(&token_bytes, &trust, now, &Limits::default())
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?
        .value;
    if let Err(e) = nixfleet_pki::validate_hostname(&claims.hostname) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string()));
    }
    let expectation = HostExpectation {
        hostname: claims.hostname.clone(),
        ssh_fingerprint: Some(claims.expected_pubkey_fingerprint.clone()),
    };
    let issued =
        nixfleet_pki::issue_host_cert(ca, &req.csr_pem, &expectation, now, app.cert_validity)
            .map_err(pki_error)?;
    // The nonce is durable before the certificate leaves: a replay, even concurrent, gets 409.
    let claimed = app
        .db
        .claim_token_nonce(
            claims.nonce.clone(),
            claims.hostname.clone(),
            claims.expires_at,
            now,
        )
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if !claimed {
        // The nonce is whatever text the token's signer chose: escaped, like all such text.
        tracing::warn!(host = %claims.hostname, nonce = ?claims.nonce, "enrollment refused: token already used");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this bootstrap token was already used; mint a new one with `nixfleet mint-token`",
        ));
    }
    audit(
        &app,
        serde_json::json!({
            "time": rfc3339(now), "how": "enroll", "cn": claims.hostname,
            "serial": issued.serial_hex, "notAfter": rfc3339(issued.not_after),
            "fingerprint": issued.ssh_fingerprint, "nonce": claims.nonce,
            "tokenExpiresAt": rfc3339(claims.expires_at),
        }),
    )?;
    Metrics::inc(&app.metrics.enrollments);
    tracing::info!(host = %claims.hostname, serial = %issued.serial_hex, not_after = %rfc3339(issued.not_after), "certificate issued at enrollment");
    Ok(Json(EnrollResponse {
        cert_pem: issued.cert_pem,
        ca_pem: ca.cert_pem().to_owned(),
        not_after: issued.not_after,
    }))
}

async fn renew(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<Json<RenewResponse>> {
    let hostname = host_of(&peer)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "renewal needs the host's current certificate",
            )
        })?
        .to_owned();
    require_host(&app, &peer, &hostname)?;
    require_fresh_database(&app)?;
    let Peer::Identified(caller) = &peer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "renewal needs the host's current certificate",
        ));
    };
    let ca = app.fleet_ca.as_ref().ok_or_else(no_ca)?;
    let req: RenewRequest = parse_json(&body)?;
    let now = OffsetDateTime::now_utc();
    let pinned = app
        .shared
        .fleet()
        .and_then(|f| {
            f.fleet
                .value
                .hosts
                .get(&hostname)
                .and_then(|h| h.pubkey.clone())
        })
        .and_then(|line| nixfleet_trust::keys::ssh_fingerprint(&line).ok());
    // A renewal keeps the key: the fleet's pinned one, else the renewed certificate's. A
    // thief with a stolen certificate cannot move the identity to a key of its own.
    let expectation = HostExpectation {
        hostname: hostname.clone(),
        ssh_fingerprint: pinned.or_else(|| caller.ssh_fingerprint.clone()),
    };
    if expectation.ssh_fingerprint.is_none() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "renewal refused: neither the fleet nor the current certificate names an ed25519 host key to keep; enroll again with a new token",
        ));
    }
    // The enrollment time goes forward with the identity, so a revocation cut-off after
    // it still applies to every renewal of it.
    let issued = nixfleet_pki::renew_host_cert(
        ca,
        &req.csr_pem,
        &expectation,
        caller.enrolled_at,
        now,
        app.cert_validity,
    )
    .map_err(pki_error)?;
    audit(
        &app,
        serde_json::json!({
            "time": rfc3339(now), "how": "renew", "cn": hostname,
            "serial": issued.serial_hex, "notAfter": rfc3339(issued.not_after),
            "fingerprint": issued.ssh_fingerprint,
            "enrolledAt": rfc3339(caller.enrolled_at),
        }),
    )?;
    Metrics::inc(&app.metrics.renewals);
    tracing::info!(host = %hostname, serial = %issued.serial_hex, "certificate issued at renewal");
    Ok(Json(RenewResponse {
        cert_pem: issued.cert_pem,
        not_after: issued.not_after,
    }))
}

pub(crate) fn require_agent_or_operator(app: &App, peer: &Peer) -> ApiResult<()> {
    match peer {
        Peer::Identified(id) => match &id.role {
            Role::Operator { .. } => Ok(()),
            Role::Host { hostname } => require_host(app, peer, hostname),
        },
        _ => require_operator(peer),
    }
}

async fn channel(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<Json<ChannelStatus>> {
    require_operator(&peer)?;
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    let value = &fleet.fleet.value;
    let channel = value.channels.get(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no channel {name} in the verified fleet"),
        )
    })?;
    let stored = app.shared.stored();
    let current_rollout = stored
        .rollouts
        .iter()
        .filter(|(_, r)| r.channel == name)
        .max_by_key(|(_, r)| r.opened_at)
        .map(|(id, _)| id.clone());
    let mut total = 0u64;
    let mut converged = 0u64;
    for (host_name, host) in value.channel_hosts(&name) {
        total += 1;
        let current = app
            .shared
            .attestations
            .get(host_name)
            .and_then(|a| a.current_closure);
        if current.is_some() && current == host.closure_hash {
            converged += 1;
        }
    }
    Ok(Json(ChannelStatus {
        signed_at: Some(fleet.signed_at()),
        ci_commit: value.meta.ci_commit.clone(),
        freshness_window_minutes: channel.freshness_window,
        rollout_policy: channel.rollout_policy.clone(),
        current_rollout,
        hosts_total: total,
        hosts_converged: converged,
        waiting: app.shared.directives().channel_reasons.get(&name).cloned(),
        name,
    }))
}

fn host_view(app: &App, fleet: &crate::artifacts::FleetSnapshot, name: &str) -> Option<HostStatus> {
    let host = fleet.fleet.value.hosts.get(name)?;
    let attestation = app.shared.attestations.get(name);
    let now = OffsetDateTime::now_utc();
    let online = attestation.as_ref().is_some_and(|a| {
        (now - a.last_seen).whole_seconds() <= i64::from(app.checkin_interval_secs) * 3
    });
    let stored = app.shared.stored();
    let newest = stored
        .rollouts
        .iter()
        .filter(|(_, r)| r.channel == host.channel)
        .max_by_key(|(_, r)| r.opened_at);
    let host_state = newest.and_then(|(_, r)| r.hosts.get(name).map(|h| &h.state));
    let rollout = newest.map(|(id, _)| id.clone());
    let rollout_state = newest.map(|_| {
        host_state
            .and_then(|s| serde_json::to_value(s).ok())
            .map_or_else(|| "queued".to_owned(), |s| state_name(&s))
    });
    let current_closure = attestation.as_ref().and_then(|a| a.current_closure.clone());
    let revoked = revoked_status(app, name);
    let converged =
        revoked.is_none() && current_closure.is_some() && current_closure == host.closure_hash;
    let directives = app.shared.directives();
    let revoked_reason = revoked.as_ref().map(|r| {
        format!(
            "revoked: {}; certificates enrolled before {} are refused, enroll it again with a new bootstrap token",
            r.reason.as_deref().unwrap_or("no reason given"),
            crate::clock::rfc3339(r.not_before)
        )
    });
    let seen_before = attestation
        .is_none()
        .then(|| read_seen_before(app, name))
        .flatten();
    let waiting = revoked_reason
        .or_else(|| {
            directives.reasons.get(name).map(|r| {
                if attestation.is_none() && r.starts_with(NOT_SEEN_PREFIX) {
                    unseen_reason(app, seen_before)
                } else {
                    r.clone()
                }
            })
        })
        .or_else(|| {
            (!converged).then(|| {
                fallback_reason(
                    app,
                    attestation.as_ref(),
                    seen_before,
                    online,
                    host.closure_hash.is_none(),
                    host_state,
                    directives.channel_reasons.get(&host.channel),
                )
            })
        });
    Some(HostStatus {
        name: name.to_owned(),
        channel: host.channel.clone(),
        system: Some(host.system.clone()),
        declared_closure: host.closure_hash.clone(),
        current_closure,
        last_checkin: attestation.as_ref().map(|a| a.last_seen).or(seen_before),
        online,
        converged,
        rollout,
        rollout_state,
        waiting,
        revoked,
        compliance: attestation.as_ref().and_then(|a| a.compliance.clone()),
    })
}

/// How the reconciler starts the reason of a host with no check-in since the start.
const NOT_SEEN_PREFIX: &str = "waiting: no check-in since the control plane started";

fn read_seen_before(app: &App, name: &str) -> Option<OffsetDateTime> {
    crate::state::read(&app.shared.seen_before)
        .get(name)
        .copied()
}

/// A host with no check-in since this control plane started: seen before the start
/// (the database says when), or never.
fn unseen_reason(app: &App, seen_before: Option<OffsetDateTime>) -> String {
    match seen_before {
        Some(at) => format!(
            "waiting: no check-in since the control plane started at {} (last seen {})",
            rfc3339(app.shared.started_at),
            rfc3339(at)
        ),
        None => "waiting: never seen".to_owned(),
    }
}

/// The revocation that keeps `name` out, unless a certificate from a later enrollment
/// has been seen since.
fn revoked_status(app: &App, name: &str) -> Option<HostRevoked> {
    let revocations = app.shared.revocations();
    let entry = revocations.entries.get(name)?;
    let enrolled_again = app
        .revoked_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .and_then(|seen| seen.enrolled_again);
    if enrolled_again.is_some_and(|t| t >= entry.not_before) {
        return None;
    }
    Some(HostRevoked {
        not_before: entry.not_before,
        reason: entry.reason.clone(),
        revoked_by: entry.revoked_by.clone(),
    })
}

/// Why a host that is not on its declared closure, and that the last tick gave no reason
/// for (it acted on the host, or the host is in no live rollout), is where it is: its
/// state in the channel's newest rollout first, then what the check-ins say.
fn fallback_reason(
    app: &App,
    attestation: Option<&nixfleet_reconciler::Attestation>,
    seen_before: Option<OffsetDateTime>,
    online: bool,
    undeclared: bool,
    host_state: Option<&HostState>,
    channel_reason: Option<&String>,
) -> String {
    match host_state {
        Some(HostState::Dispatched) => {
            return "dispatched: target goes out at the next check-in".to_owned()
        }
        Some(HostState::ConfirmWindow { deadline }) => {
            return format!("confirming: deadline {}", rfc3339(*deadline))
        }
        Some(HostState::Failed { reason, .. }) => return format!("failed: {reason}"),
        Some(HostState::RollingBack) => return "rolling back: rollback signal sent".to_owned(),
        Some(HostState::Reverted) => return "reverted".to_owned(),
        _ => {}
    }
    match attestation {
        _ if undeclared => "waiting: the fleet declares no closure for this host".to_owned(),
        None => unseen_reason(app, seen_before),
        Some(a) if !online => format!("waiting: offline since {}", rfc3339(a.last_seen)),
        Some(_) => match channel_reason {
            Some(why) => why.clone(),
            None => "waiting: next reconcile tick".to_owned(),
        },
    }
}

async fn list_hosts(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Json<Vec<HostStatus>>> {
    require_operator(&peer)?;
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    Ok(Json(
        fleet
            .fleet
            .value
            .hosts
            .keys()
            .filter_map(|name| host_view(&app, &fleet, name))
            .collect(),
    ))
}

fn event_view(e: crate::store::Event) -> RolloutEventRecord {
    RolloutEventRecord {
        detail: serde_json::from_str(&e.reason).unwrap_or(serde_json::Value::String(e.reason)),
        rollout_id: e.rollout_id,
        hostname: e.hostname,
        kind: e.kind,
        at: e.at,
    }
}

async fn host(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<Json<HostDetail>> {
    require_operator(&peer)?;
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    let host = host_view(&app, &fleet, &name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no host {name} in the verified fleet"),
        )
    })?;
    let events = app
        .db
        .host_events(name.clone(), 50)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .into_iter()
        .map(event_view)
        .collect();
    Ok(Json(HostDetail { host, events }))
}

async fn list_rollouts(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Json<Vec<RolloutStatus>>> {
    require_operator(&peer)?;
    let fleet = app.shared.fleet();
    let stored = app.shared.stored();
    Ok(Json(
        stored
            .rollouts
            .iter()
            .map(|(id, r)| {
                let manifest = fleet.as_ref().and_then(|f| f.manifests.get(id));
                RolloutStatus {
                    rollout_id: id.clone(),
                    channel: r.channel.clone(),
                    display_name: manifest.map(|m| m.value.display_name.clone()),
                    introduced: manifest.and_then(|m| {
                        m.value.introduced.as_ref().map(|i| Provenance {
                            ci_commit: i.ci_commit.clone(),
                            signed_at: i.signed_at,
                        })
                    }),
                    latest: manifest.map(|m| Provenance {
                        ci_commit: m.value.meta.ci_commit.clone(),
                        signed_at: m.signed_at,
                    }),
                    state: serde_json::to_value(&r.state).unwrap_or_default(),
                    opened_at: r.opened_at,
                    hosts: r
                        .hosts
                        .iter()
                        .map(|(h, rec)| {
                            (
                                h.clone(),
                                serde_json::to_value(&rec.state).unwrap_or_default(),
                            )
                        })
                        .collect(),
                }
            })
            .collect(),
    ))
}

async fn rollout_trace(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<RolloutEventRecord>>> {
    require_operator(&peer)?;
    let events = app
        .db
        .rollout_events(id, 10_000)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(events.into_iter().map(event_view).collect()))
}

fn render_metrics(app: &App) -> Response {
    let mut text = app.metrics.render(
        app.shared.fleet().map(|f| f.signed_at()),
        app.shared.revocations().entries.len(),
        app.shared.attestations.len(),
    );
    // Hosts still in the signed fleet: a removed host's evidence no longer counts.
    let fleet = app.shared.fleet();
    let summaries: Vec<_> = app
        .shared
        .attestations
        .compliance_summaries()
        .into_iter()
        .filter(|(host, _)| {
            fleet
                .as_ref()
                .is_none_or(|f| f.fleet.value.hosts.contains_key(host))
        })
        .map(|(_, summary)| summary)
        .collect();
    text.push_str(&crate::metrics::render_compliance(&summaries));
    let role = app.shared.role();
    text.push_str(&format!(
        "# HELP nixfleet_leader 1 while this control plane decides rollouts (the leader, or a single control plane).\n# TYPE nixfleet_leader gauge\nnixfleet_leader{{role=\"{}\"}} {}\n",
        role.name(),
        u8::from(app.shared.decides())
    ));
    text.push_str(&format!(
        "# HELP nixfleet_database_ok 0 while a replica cannot reach its shared database (agents get 503).\n# TYPE nixfleet_database_ok gauge\nnixfleet_database_ok {}\n",
        u8::from(app.shared.database_fresh())
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn metrics_operator(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Response> {
    require_operator(&peer)?;
    Ok(render_metrics(&app))
}

async fn metrics_plain(State(app): State<Arc<App>>, _headers: HeaderMap) -> Response {
    render_metrics(&app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkin_interval_is_spread_and_stable() {
        let a = next_checkin_secs(60, "web-01", false);
        assert_eq!(a, next_checkin_secs(60, "web-01", false));
        assert!((57..=63).contains(&a), "{a}");
        let active = next_checkin_secs(60, "web-01", true);
        assert!(active <= 16, "{active}");
        assert!(next_checkin_secs(5, "x", false) >= 4);
    }

    #[test]
    fn a_target_whose_newest_signature_is_stale_is_held_back() {
        let signed = time::macros::datetime!(2026-11-27 10:00 UTC);
        let target = Target {
            closure_hash: "c".into(),
            rollout_id: "r".into(),
            wave_index: 0,
            signed_at: signed,
            freshness_window_secs: 3600,
            confirm_window_secs: 300,
        };
        let at = |secs| signed + time::Duration::seconds(secs);
        assert!(!held_stale(&target, at(3600 + 60)), "the verifiers' grace");
        assert!(held_stale(&target, at(3600 + 61)));
        let unbounded = Target {
            freshness_window_secs: 0,
            ..target
        };
        assert!(!held_stale(&unbounded, at(86_400)));
    }
}
