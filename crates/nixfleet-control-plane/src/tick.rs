//! The reconcile tick: gather inputs, call the pure reconciler, persist what changed in
//! one transaction, and prepare the answers check-ins will give.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use nixfleet_proto::wire::{RollbackSignal, Target};
use nixfleet_proto::RolloutManifest;
use nixfleet_reconciler::{
    self as reconciler, Action, HostState, Observed, RolloutState, StoredState,
};
use time::OffsetDateTime;

use crate::artifacts::FleetSnapshot;
use crate::hook::EventHook;
use crate::state::{replace, swap, Directives, Shared};
use crate::store::{Db, DbError, Event, TickWrites};

/// Settings of the tick that come from flags.
#[derive(Debug, Clone, Copy)]
pub struct TickConfig {
    pub confirm_window_secs: u64,
    pub activation_timeout_secs: u64,
    pub offline_after_secs: u64,
    pub late_confirm_grace_secs: u64,
}

/// Deadlines are checked at least this often while any host is mid-activation.
pub const DEADLINE_CHECK: Duration = Duration::from_secs(5);

/// Why a tick did not complete.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the reconcile computation stopped unexpectedly: {0}; the previous state is kept")]
    Compute(String),
}

/// What one tick decided, before it is persisted and published.
struct Computed {
    new: StoredState,
    writes: TickWrites,
    directives: Directives,
    in_flight: u64,
    /// For the event hook, when one is configured.
    hook_events: Vec<nixfleet_proto::api::HookEvent>,
}

/// Runs one tick. Returns the hosts in flight afterwards, or `None` when there is no
/// verified fleet yet (nothing to decide).
///
/// The reconcile and everything derived from it run on a blocking thread: at 100,000
/// hosts they take a few hundred milliseconds, and on a runtime worker they would hold
/// up the check-ins (and the accept loop) queued behind them.
pub async fn run_tick(
    shared: &Arc<Shared>,
    db: &Db,
    config: TickConfig,
    hook: Option<&EventHook>,
) -> Result<Option<u64>, TickError> {
    let now = OffsetDateTime::now_utc();
    let Some(snapshot) = shared.fleet() else {
        replace(&shared.last_tick_at, Some(now));
        return Ok(None);
    };
    let for_compute = Arc::clone(shared);
    let with_hook = hook.is_some();
    let replicated = db.shared();
    let Computed {
        new,
        writes,
        directives,
        in_flight,
        hook_events,
    } = tokio::task::spawn_blocking(move || {
        compute(&for_compute, &snapshot, config, now, with_hook, replicated)
    })
    .await
    .map_err(|e| TickError::Compute(e.to_string()))?;
    // On a shared database every tick is published: it is how followers know the leader
    // is alive, and the write fails if this replica is no longer the leader.
    if replicated || writes.changes_state() || !writes.events.is_empty() {
        db.write_tick(writes, now).await?;
    }
    // Only after the events are durable: the hook never announces what a crash could undo.
    if let Some(hook) = hook {
        hook.send(hook_events);
    }
    let old_stored = swap(&shared.stored, Arc::new(new));
    let old_directives = swap(&shared.directives, Arc::new(directives));
    replace(&shared.last_tick_at, Some(now));
    // Freeing the previous tick's maps (100,000 entries each) is work for the blocking
    // pool too, not for a runtime worker.
    tokio::task::spawn_blocking(move || drop((old_stored, old_directives)));
    Ok(Some(in_flight))
}

fn compute(
    shared: &Shared,
    snapshot: &FleetSnapshot,
    config: TickConfig,
    now: OffsetDateTime,
    with_hook: bool,
    replicated: bool,
) -> Computed {
    let old = shared.stored();
    let observed = Observed {
        attestations_since: shared.started_at,
        hosts: shared.attestations.snapshot(),
        stored: (*old).clone(),
    };
    let rc = reconciler::Config {
        confirm_window_secs: config.confirm_window_secs,
        activation_timeout_secs: config.activation_timeout_secs,
        offline_after_secs: config.offline_after_secs,
        late_confirm_grace_secs: config.late_confirm_grace_secs,
    };
    // References, not copies: each manifest's plan holds its whole host set.
    let manifests: BTreeMap<String, &RolloutManifest> = snapshot
        .manifests
        .iter()
        .map(|(id, m)| (id.clone(), &m.value))
        .collect();
    let mut plan = reconciler::reconcile(
        &snapshot.fleet.value,
        &snapshot.fleet.sha256,
        &manifests,
        &observed,
        &rc,
        now,
    );
    let mut new = observed.stored;
    reconciler::apply(&plan, &mut new, now);

    let mut writes = diff(&old, &new, &plan, now);
    for action in &plan.actions {
        log_action(action);
    }
    if replicated {
        let previous = shared.directives();
        if previous.reasons != plan.reasons || previous.channel_reasons != plan.channels {
            writes.reasons = Some(to_json(&PublishedReasons {
                hosts: &plan.reasons,
                channels: &plan.channels,
            }));
        }
    }
    let mut directives = directives(&new, &snapshot.manifests, config.confirm_window_secs);
    // Moved, not copied: at fleet scale there is a reason for most hosts.
    directives.reasons = std::mem::take(&mut plan.reasons);
    directives.channel_reasons = std::mem::take(&mut plan.channels);
    let in_flight = hosts_in_flight(&new);
    let hook_events = if with_hook {
        crate::hook::events_of(&plan.actions, &new, now)
    } else {
        Vec::new()
    };
    Computed {
        new,
        writes,
        directives,
        in_flight,
        hook_events,
    }
}

fn log_action(action: &Action) {
    match serde_json::to_string(action) {
        Ok(text) => tracing::info!(action = %text, "reconcile decision"),
        Err(_) => tracing::info!(?action, "reconcile decision"),
    }
}

/// Whether a host is mid-activation somewhere (its deadline needs watching).
pub fn anything_in_flight(stored: &StoredState) -> bool {
    stored.rollouts.values().any(|r| {
        r.hosts.values().any(|h| {
            matches!(
                h.state,
                HostState::Dispatched | HostState::ConfirmWindow { .. } | HostState::RollingBack
            )
        })
    })
}

/// Hosts in flight (Dispatched through Healthy) across every rollout, as budgets count them.
pub fn hosts_in_flight(stored: &StoredState) -> u64 {
    stored
        .rollouts
        .values()
        .flat_map(|r| r.hosts.values())
        .filter(|h| h.state.in_flight())
        .count() as u64
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// Rows that changed between two stored states, plus one event per action.
fn diff(
    old: &StoredState,
    new: &StoredState,
    plan: &reconciler::Plan,
    now: OffsetDateTime,
) -> TickWrites {
    let mut writes = TickWrites::default();
    for (id, record) in &new.rollouts {
        let before = old.rollouts.get(id);
        let head_changed = before.is_none_or(|b| {
            b.state != record.state || b.since != record.since || b.opened_at != record.opened_at
        });
        if head_changed {
            let mut head = record.clone();
            head.hosts.clear();
            writes
                .rollouts
                .push((id.clone(), record.channel.clone(), to_json(&head)));
        }
        for (host, h) in &record.hosts {
            if before.and_then(|b| b.hosts.get(host)) != Some(h) {
                writes.hosts.push((id.clone(), host.clone(), to_json(h)));
            }
        }
        if let Some(before) = before {
            for host in before
                .hosts
                .keys()
                .filter(|h| !record.hosts.contains_key(*h))
            {
                writes.removed_hosts.push((id.clone(), host.clone()));
            }
        }
    }
    for action in &plan.actions {
        let (rollout_id, hostname, kind) = match action {
            Action::Host {
                event,
                rollout,
                host,
            } => (rollout.clone(), Some(host.clone()), kind_of(event)),
            Action::Rollout { event, rollout } => (rollout.clone(), None, kind_of(event)),
        };
        writes.events.push(Event {
            rollout_id,
            hostname,
            kind,
            reason: to_json(action),
            at: now,
        });
    }
    writes
}

fn kind_of<T: serde::Serialize>(event: &T) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.get("action").and_then(|a| a.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// The waiting reasons as the leader publishes them to the other replicas.
#[derive(serde::Serialize)]
struct PublishedReasons<'a> {
    hosts: &'a BTreeMap<String, String>,
    channels: &'a BTreeMap<String, String>,
}

/// [`PublishedReasons`] as a follower reads them back.
#[derive(serde::Deserialize, Default)]
pub struct Reasons {
    pub hosts: BTreeMap<String, String>,
    pub channels: BTreeMap<String, String>,
}

/// The answers for the next check-ins: targets for dispatched hosts and rollback signals
/// (the waiting reasons come from the tick's plan, or from the leader).
pub fn directives(
    stored: &StoredState,
    manifests: &BTreeMap<String, Arc<nixfleet_trust::verify::Verified<RolloutManifest>>>,
    confirm_window_secs: u64,
) -> Directives {
    let mut targets = HashMap::new();
    let mut rollbacks = HashMap::new();
    let mut active = HashSet::new();
    for (rollout_id, record) in &stored.rollouts {
        let current_wave = match record.state {
            RolloutState::Executing { wave, .. } => Some(wave),
            _ => None,
        };
        let manifest = manifests.get(rollout_id);
        for (host, h) in &record.hosts {
            match &h.state {
                HostState::Dispatched | HostState::ConfirmWindow { .. } => {
                    let Some(m) = manifest else { continue };
                    let Some(entry) = m.value.entry(host) else {
                        continue;
                    };
                    targets.insert(
                        host.clone(),
                        Target {
                            closure_hash: entry.target_closure.clone(),
                            rollout_id: rollout_id.clone(),
                            wave_index: entry.wave_index,
                            signed_at: m.signed_at,
                            freshness_window_secs: u64::from(m.value.freshness_window.unwrap_or(0))
                                * 60,
                            confirm_window_secs,
                        },
                    );
                    active.insert(host.clone());
                }
                HostState::RollingBack => {
                    rollbacks.insert(
                        host.clone(),
                        RollbackSignal {
                            rollout_id: rollout_id.clone(),
                            reason: format!("rollout {rollout_id} tripped its health gate; roll back to the previous generation"),
                        },
                    );
                }
                _ => {}
            }
        }
        if let (Some(wave), Some(m)) = (current_wave, manifest) {
            active.extend(
                m.value
                    .host_set
                    .iter()
                    .filter(|e| e.wave_index == wave)
                    .map(|e| e.hostname.clone()),
            );
        }
    }
    Directives {
        targets,
        rollbacks,
        active,
        reasons: BTreeMap::new(),
        channel_reasons: BTreeMap::new(),
    }
}
