//! Compliance evidence (docs/compliance.md): agents post host-signed evidence of their
//! probes; the control plane verifies it against the host key the signed fleet pins,
//! refuses replays, stores it as received (a host report), keeps its summary in the
//! host's attestation for the reconciler, and shows it to operators and auditors.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nixfleet_proto::api::{ComplianceReport, HostCompliance};
use nixfleet_proto::compliance::{ComplianceSummary, EvidenceResponse, MAX_EVIDENCE_BYTES};
use nixfleet_trust::verify::{self, Limits, VerifyError};
use time::OffsetDateTime;

use crate::api::{
    audit, database_unavailable, host_of, pinned_host_key, require_fresh_database, require_host,
    require_operator, within_budget, ApiError, ApiResult, App,
};
use crate::clock::rfc3339;
use crate::metrics::Metrics;
use crate::server::Peer;
use crate::store::EVIDENCE_KIND;

/// Why evidence was refused, for the metric and the log.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Signature,
    Host,
    Replay,
    Shape,
    BeforeActivation,
    Future,
    Rate,
}

impl Refusal {
    fn counter(self, app: &App) -> &std::sync::atomic::AtomicU64 {
        let m = &app.metrics;
        match self {
            Refusal::Signature => &m.evidence_refused_signature,
            Refusal::Host => &m.evidence_refused_host,
            Refusal::Replay => &m.evidence_refused_replay,
            Refusal::Shape => &m.evidence_refused_shape,
            Refusal::BeforeActivation => &m.evidence_refused_before_activation,
            Refusal::Future => &m.evidence_refused_future,
            Refusal::Rate => &m.evidence_refused_rate,
        }
    }
}

/// Counts and logs a refusal, and makes its answer. The message can quote the agent's
/// text (a host name in the evidence): escaped, so that it cannot forge log lines.
fn refuse(app: &App, host: &str, why: Refusal, status: StatusCode, message: String) -> ApiError {
    Metrics::inc(why.counter(app));
    if matches!(why, Refusal::Rate) {
        // A flood is counted; one line per refused request would drown the log.
        tracing::debug!(host = %host, "compliance evidence refused: {}", message.escape_debug());
    } else {
        tracing::info!(host = %host, reason = ?why, "compliance evidence refused: {}", message.escape_debug());
    }
    ApiError::new(status, message)
}

/// Where a verification error puts the evidence: its answer and its metric.
fn verify_refusal(e: &VerifyError) -> (StatusCode, Refusal) {
    match e {
        VerifyError::Parse { .. } | VerifyError::Shape { .. } => {
            (StatusCode::BAD_REQUEST, Refusal::Shape)
        }
        VerifyError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Refusal::Shape),
        VerifyError::EvidenceHostMismatch { .. } => (StatusCode::FORBIDDEN, Refusal::Host),
        VerifyError::EvidenceBeforeActivation { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, Refusal::BeforeActivation)
        }
        // A bad signature, a signature of the wrong length or encoding, or a fleet key
        // that cannot be read: nothing here proves the host wrote it.
        _ => (StatusCode::UNAUTHORIZED, Refusal::Signature),
    }
}

/// The newest evidence stored for a host, as far as this replica knows: its memory, and
/// the database (another replica may have taken newer evidence, or this one restarted).
async fn latest_stored(app: &App, hostname: &str) -> ApiResult<Option<ComplianceSummary>> {
    let mut latest = app.shared.attestations.compliance_of(hostname).0;
    let rows = app
        .db
        .latest_reports(EVIDENCE_KIND.to_owned(), Some(hostname.to_owned()))
        .await
        .map_err(database_unavailable)?;
    for (_, id, body) in rows {
        let stored = serde_json::from_str::<nixfleet_proto::compliance::EvidenceRequest>(&body);
        match stored {
            Ok(request) => {
                let summary = ComplianceSummary::of(&request.evidence, &id);
                if latest
                    .as_ref()
                    .is_none_or(|l| l.collected_at < summary.collected_at)
                {
                    latest = Some(summary);
                }
            }
            // It was verified when stored; unreadable now means a damaged row, and the
            // summary in memory (if any) still orders replays.
            Err(e) => {
                tracing::warn!(host = %hostname, "stored compliance evidence {id} cannot be read ({e}); replays are checked against the summary in memory only")
            }
        }
    }
    Ok(latest)
}

/// `POST /v1/agent/evidence`.
pub async fn evidence(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<Json<EvidenceResponse>> {
    let hostname = host_of(&peer)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "compliance evidence needs the host's certificate (enroll the host first)",
            )
        })?
        .to_owned();
    require_host(&app, &peer, &hostname)?;
    require_fresh_database(&app)?;
    // The route's body limit is the same today; this check holds should either change.
    if body.len() > MAX_EVIDENCE_BYTES {
        return Err(refuse(
            &app,
            &hostname,
            Refusal::Shape,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "compliance evidence refused: {} bytes, over the {MAX_EVIDENCE_BYTES}-byte limit",
                body.len()
            ),
        ));
    }
    if !within_budget(&app, &app.evidence_windows, &hostname) {
        return Err(refuse(
            &app,
            &hostname,
            Refusal::Rate,
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "compliance evidence refused: over {} a minute from this host; send it later",
                app.reports_per_minute
            ),
        ));
    }
    // Evidence naming another host is refused as such before its signature is checked:
    // another host's genuine evidence relayed with this certificate would otherwise read
    // as a forgery (401), when what it is, is the wrong host (403).
    let named = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["evidence"]["hostname"].as_str().map(str::to_owned));
    if let Some(named) = named.filter(|n| *n != hostname) {
        return Err(refuse(
            &app,
            &hostname,
            Refusal::Host,
            StatusCode::FORBIDDEN,
            format!(
                "compliance evidence refused: it is for host {:?}, but the certificate is {hostname}'s; a host sends only its own evidence",
                named
            ),
        ));
    }
    let pubkey = pinned_host_key(&app, &hostname, "compliance evidence")?;
    let verified =
        verify::verify_evidence(&body, &hostname, &pubkey, &Limits::default()).map_err(|e| {
            let (status, why) = verify_refusal(&e);
            refuse(&app, &hostname, why, status, e.to_string())
        })?;
    let id = verified.id.clone();
    let evidence = &verified.value.evidence;
    let now = OffsetDateTime::now_utc();
    // The agent's clock is not trusted ahead of ours: evidence from the future would
    // outrank every real one that follows and make them look like replays.
    if evidence.collected_at > now + nixfleet_proto::CLOCK_SLACK {
        return Err(refuse(
            &app,
            &hostname,
            Refusal::Future,
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "compliance evidence refused: collected at {}, ahead of this control plane's clock ({}) by more than {} s; fix the host's clock",
                rfc3339(evidence.collected_at),
                rfc3339(now),
                nixfleet_proto::CLOCK_SLACK.whole_seconds()
            ),
        ));
    }
    let summary = ComplianceSummary::of(evidence, &id);
    let host_lock = app
        .evidence_locks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(hostname.clone())
        .or_default()
        .clone();
    let _one_at_a_time = host_lock.lock().await;
    let latest = latest_stored(&app, &hostname).await?;
    if let Some(latest) = &latest {
        if latest.evidence_id == id {
            // A resend (the agent missed the answer, or the control plane asked again):
            // the same answer, and the summary made sure of.
            remember(&app, &hostname, summary, now).await?;
            tracing::info!(host = %hostname, evidence = %id, "compliance evidence resent: already stored");
            return Ok(Json(EvidenceResponse { evidence_id: id }));
        }
        // Only strictly newer evidence replaces the stored one: an older one is a replay
        // (of a passing result over a failing one, say).
        if evidence.collected_at <= latest.collected_at {
            return Err(refuse(
                &app,
                &hostname,
                Refusal::Replay,
                StatusCode::CONFLICT,
                format!(
                    "evidence replayed: collected at {}, older than the host's latest {} (evidence {}); send newer evidence",
                    rfc3339(evidence.collected_at),
                    rfc3339(latest.collected_at),
                    latest.evidence_id
                ),
            ));
        }
    }
    let failing: Vec<&str> = evidence.failing().map(|c| c.id.as_str()).collect();
    let signed: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    // On disk before it is stored or acted on: a retry after a failed write below adds a
    // second line, never none.
    audit(
        &app,
        serde_json::json!({
            "time": rfc3339(now), "event": "compliance-evidence", "host": hostname,
            "evidenceId": id, "collectedAt": rfc3339(evidence.collected_at),
            "closureHash": evidence.closure_hash, "rolloutId": evidence.rollout_id,
            "failing": failing, "evidence": signed,
        }),
    )?;
    app.db
        .record_report(
            hostname.clone(),
            id.clone(),
            EVIDENCE_KIND.to_owned(),
            evidence.rollout_id.clone(),
            String::from_utf8_lossy(&body).into_owned(),
            now,
            app.reports_per_host,
        )
        .await
        .map_err(database_unavailable)?;
    Metrics::inc(&app.metrics.evidence_ok);
    tracing::info!(
        host = %hostname,
        closure = %evidence.closure_hash,
        trigger = ?evidence.trigger,
        rollout = ?evidence.rollout_id,
        evidence = %id,
        failing = ?failing,
        "compliance evidence received: {} passed, {} did not",
        summary.passed,
        failing.len()
    );
    remember(&app, &hostname, summary, now).await?;
    Ok(Json(EvidenceResponse { evidence_id: id }))
}

/// Puts the summary in the host's attestation and stores it before the answer, so the
/// reconciler sees it now and after a restart.
async fn remember(
    app: &App,
    hostname: &str,
    summary: ComplianceSummary,
    now: OffsetDateTime,
) -> ApiResult<()> {
    let attestation = app
        .shared
        .attestations
        .record_compliance(hostname, summary, now);
    app.db
        .save_attestations(vec![(hostname.to_owned(), attestation)])
        .await
        .map_err(database_unavailable)?;
    app.shared.tick_now.notify_one();
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
pub struct ComplianceQuery {
    channel: Option<String>,
}

/// `GET /v1/compliance[?channel=C]`.
pub async fn compliance(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Query(query): Query<ComplianceQuery>,
) -> ApiResult<Json<ComplianceReport>> {
    require_operator(&peer)?;
    let fleet = app
        .shared
        .fleet()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no verified fleet yet"))?;
    let value = &fleet.fleet.value;
    if let Some(channel) = &query.channel {
        if !value.channels.contains_key(channel) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no channel {} in the verified fleet",
                    channel.escape_debug()
                ),
            ));
        }
    }
    let mut evidence: BTreeMap<String, String> = app
        .db
        .latest_reports(EVIDENCE_KIND.to_owned(), None)
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .into_iter()
        .map(|(host, _, body)| (host, body))
        .collect();
    let mut hosts = Vec::new();
    for (name, host) in &value.hosts {
        if query.channel.as_ref().is_some_and(|c| *c != host.channel) {
            continue;
        }
        let (mode, frameworks) = value
            .channels
            .get(&host.channel)
            .map(|c| (c.compliance.mode.clone(), c.compliance.frameworks.clone()))
            .unwrap_or_else(|| ("disabled".to_owned(), Vec::new()));
        let (summary, claimed) = app.shared.attestations.compliance_of(name);
        let pending =
            claimed.is_some_and(|at| summary.as_ref().is_none_or(|s| at > s.collected_at));
        hosts.push(HostCompliance {
            hostname: name.clone(),
            channel: host.channel.clone(),
            mode,
            frameworks,
            pending,
            summary,
            evidence: evidence
                .remove(name)
                .and_then(|body| serde_json::from_str(&body).ok()),
        });
    }
    hosts.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    Ok(Json(ComplianceReport { hosts }))
}

/// `GET /v1/hosts/{name}/evidence`: the newest stored evidence, byte for byte as the
/// host signed it, for `nixfleet verify evidence`.
pub async fn host_evidence(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    require_operator(&peer)?;
    let rows = app
        .db
        .latest_reports(EVIDENCE_KIND.to_owned(), Some(name.clone()))
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let Some((_, _, body)) = rows.into_iter().next() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no compliance evidence stored for {}: the host sends it after its probes run (after an activation, or at its next drift run), and again when its check-in finds the control plane without it",
                name.escape_debug()
            ),
        ));
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}
