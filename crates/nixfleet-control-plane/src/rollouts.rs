//! Rollout routes for agents and operators: a rollout's signed manifest and signature as
//! published, and one host's inclusion proof in a schema-2 rollout.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use nixfleet_pki::Role;
use nixfleet_proto::{HostProof, MANIFEST_SCHEMA_V1};
use nixfleet_trust::hostset;

use crate::api::{require_agent_or_operator, ApiError, ApiResult, App};
use crate::artifacts::FleetSnapshot;
use crate::metrics::Metrics;
use crate::server::Peer;

/// `GET /v1/rollouts/{id}`: the signed bytes (for schema 2, the header).
pub async fn manifest(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    published(&app, &peer, &id, "application/json", |f| {
        f.manifests.get(&id).map(|m| m.canonical.clone())
    })
}

/// `GET /v1/rollouts/{id}/sig`: the raw signature.
pub async fn signature(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    published(&app, &peer, &id, "application/octet-stream", |f| {
        f.signatures.get(&id).cloned()
    })
}

/// Bytes of a verified rollout as published, or 404.
fn published(
    app: &App,
    peer: &Peer,
    id: &str,
    content_type: &'static str,
    pick: impl FnOnce(&FleetSnapshot) -> Option<Vec<u8>>,
) -> ApiResult<Response> {
    require_agent_or_operator(app, peer)?;
    let fleet = app.shared.fleet().ok_or_else(|| not_found(id))?;
    let bytes = pick(&fleet).ok_or_else(|| not_found(id))?;
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}

/// `GET /v1/rollouts/{id}/hosts/{host}`: the host's entry in a schema-2 rollout with its
/// inclusion proof and the signed header, read off the tree built when it was loaded. A
/// host gets only its own: one host's key does not list the fleet's hosts and closures.
pub async fn host_proof(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    Path((id, host)): Path<(String, String)>,
) -> ApiResult<Json<HostProof>> {
    require_agent_or_operator(&app, &peer)?;
    if let Peer::Identified(who) = &peer {
        if let Role::Host { hostname } = &who.role {
            if *hostname != host {
                tracing::warn!(
                    caller = %hostname, asked = %host, rollout = %id,
                    "host proof refused: a host fetches only its own"
                );
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("host {hostname} may fetch only its own proof, not {host}'s"),
                ));
            }
        }
    }
    let fleet = app.shared.fleet().ok_or_else(|| not_found(&id))?;
    let proof = proof_of(&fleet, &id, &host)?;
    Metrics::inc(&app.metrics.host_proofs_served);
    Ok(Json(proof))
}

fn proof_of(fleet: &FleetSnapshot, id: &str, host: &str) -> ApiResult<HostProof> {
    let m = fleet.manifests.get(id).ok_or_else(|| not_found(id))?;
    if m.value.schema_version == MANIFEST_SCHEMA_V1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("rollout {id} has a schema-1 manifest, which carries no host-set root; fetch /v1/rollouts/{id}"),
        ));
    }
    // Every schema-2 manifest is loaded with its tree and signature.
    let (Some(tree), Some(signature)) = (fleet.trees.get(id), fleet.signatures.get(id)) else {
        return Err(not_found(id));
    };
    // The canonical bytes verify as the received ones do, and are JSON text.
    let text = std::str::from_utf8(&m.canonical).map_err(|_| not_found(id))?;
    hostset::host_proof(id, text, signature, &m.value.host_set, tree, host).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("host {host} is not in the host set of rollout {id}"),
        )
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no verified rollout manifest {id}"),
    )
}
