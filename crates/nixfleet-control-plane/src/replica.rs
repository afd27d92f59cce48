//! Replicas on a shared (PostgreSQL) database: who leads, and how every replica keeps
//! the shared state it answers from current. The leader alone ticks, polls deadlines
//! and writes rollout state; every replica verifies the signed artifacts itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::state::{replace, swap, Role, Shared};
use crate::store::Db;
use crate::tick;

/// How often a replica tries to take (or confirms it keeps) the leadership, at most.
/// With the leader's session gone, a follower takes over within this; it is also kept
/// under half a tick interval, so a takeover costs at most two tick intervals.
const LEAD_INTERVAL: Duration = Duration::from_secs(1);
/// How often a replica exchanges check-in state with the database.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Replicas take confirms only before a host's deadline, and the leader fails the host
/// this long after it. A confirm taken in time is written before it is answered and
/// reaches the leader at its next sync, a second later; the rest is room for a slow
/// database and for clocks that disagree.
pub const LATE_CONFIRM_GRACE: Duration = Duration::from_secs(10);
/// Incremental reads can miss a row committed very late; re-read everything this often.
const FULL_RESYNC: Duration = Duration::from_secs(60);

async fn pause(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = stop.changed() => true,
    }
}

/// Takes the leadership when it is free and notices when it is lost.
pub async fn lead_loop(
    shared: Arc<Shared>,
    db: Arc<Db>,
    tick_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let interval = LEAD_INTERVAL.min(tick_interval / 2);
    let mut last_error: Option<String> = None;
    loop {
        let leads = match db.lead().await {
            Ok(leads) => {
                last_error = None;
                leads
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(
                        "cannot reach the database to hold or take the leadership: {text}"
                    );
                }
                last_error = Some(text);
                false
            }
        };
        match (shared.role(), leads) {
            (Role::Leader, true) => {}
            (_, true) => {
                // Decide only from what the previous leader last wrote.
                match db.load_stored().await {
                    Ok(stored) => {
                        let rollouts = stored.rollouts.len();
                        replace(&shared.stored, Arc::new(stored));
                        shared.set_role(Role::Leader);
                        tracing::info!(
                            rollouts,
                            "became the leader: this replica holds the database's leadership lock; it now ticks, polls deadlines and writes rollout state"
                        );
                        shared.tick_now.notify_one();
                    }
                    Err(e) => tracing::warn!(
                        "took the leadership lock but cannot load the stored state: {e}; not ticking until it loads"
                    ),
                }
            }
            (Role::Leader, false) => {
                shared.set_role(Role::Follower);
                tracing::warn!(
                    "lost the leadership (its database session failed or was taken over); following and serving from the database"
                );
            }
            (Role::Single, false) => {
                shared.set_role(Role::Follower);
                tracing::info!("following: another replica holds the leadership");
            }
            (Role::Follower, false) => {}
        }
        if pause(interval, &mut stop).await {
            return;
        }
    }
}

/// What a replica last took from the database.
struct Synced {
    cursor: i64,
    full_at: Instant,
    pushed_since: OffsetDateTime,
    state_version: Option<i64>,
    reasons_version: Option<i64>,
    /// The fleet snapshot the follower's directives were derived from.
    fleet_seen: Option<usize>,
}

/// Exchanges check-in state with the database; followers also take the leader's
/// published rollout state. Answers to agents wait on this being current.
pub async fn sync_loop(
    shared: Arc<Shared>,
    db: Arc<Db>,
    confirm_window_secs: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut synced = Synced {
        cursor: 0,
        full_at: Instant::now(),
        pushed_since: shared.started_at,
        state_version: None,
        reasons_version: None,
        fleet_seen: None,
    };
    let mut failing: Option<String> = None;
    loop {
        match sync_once(&shared, &db, confirm_window_secs, &mut synced).await {
            Ok(()) => {
                shared.database_answered();
                if failing.take().is_some() {
                    tracing::info!("the database answers again; serving agents");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_deref() != Some(text.as_str()) {
                    tracing::warn!(
                        "cannot sync with the database: {text}; agents get 503 from this replica after {:?} without it",
                        crate::state::DB_STALE_AFTER
                    );
                }
                failing = Some(text);
            }
        }
        if pause(SYNC_INTERVAL, &mut stop).await {
            return;
        }
    }
}

async fn sync_once(
    shared: &Arc<Shared>,
    db: &Arc<Db>,
    confirm_window_secs: u64,
    synced: &mut Synced,
) -> Result<(), crate::store::DbError> {
    // Check-ins this replica answered: their last_seen, for the leader's online check.
    let scan_from = OffsetDateTime::now_utc();
    let seen = shared.attestations.seen_since(synced.pushed_since);
    db.touch_attestations(seen).await?;
    synced.pushed_since = scan_from;
    // Every answer counts: a slow reload further down must not look like a lost database.
    shared.database_answered();

    // Check-ins and confirms any replica answered.
    if synced.full_at.elapsed() > FULL_RESYNC {
        synced.cursor = 0;
        synced.full_at = Instant::now();
    }
    let page = db.attestations_since(synced.cursor).await?;
    shared.database_answered();
    synced.cursor = page.next;
    let mut material = false;
    for (host, attestation) in page.rows {
        material |= shared.attestations.merge(&host, attestation);
    }
    if material && shared.role() == Role::Leader {
        shared.tick_now.notify_one();
    }

    let info = db.leader_info().await?;
    // Answered before the leader's tick is shown: /healthz never shows a tick while
    // agents would still get 503.
    shared.database_answered();
    let Some(info) = info else {
        return Ok(());
    };
    shared.set_leader(info.replica.clone());
    if shared.role() == Role::Leader {
        // The leader's own memory is the newest state; reload it all after stepping down.
        synced.state_version = None;
        synced.reasons_version = None;
        synced.fleet_seen = None;
        return Ok(());
    }
    replace(&shared.last_tick_at, info.last_tick_at);
    let fleet = shared.fleet();
    let fleet_seen = fleet.as_ref().map(|f| Arc::as_ptr(f) as usize);
    let state_changed = synced.state_version != Some(info.state_version);
    if state_changed {
        let stored = db.load_stored().await?;
        shared.database_answered();
        replace(&shared.stored, Arc::new(stored));
    }
    let reasons = if synced.reasons_version != Some(info.reasons_version) {
        let text = db.load_reasons().await?;
        shared.database_answered();
        Some(text)
    } else {
        None
    };
    if state_changed || reasons.is_some() || synced.fleet_seen != fleet_seen {
        let stored = shared.stored();
        let previous = shared.directives();
        let manifests = fleet.clone();
        // At 100,000 hosts this is a large computation: off the threads that answer agents.
        let directives = tokio::task::spawn_blocking(move || {
            let mut directives = match &manifests {
                Some(f) => tick::directives(&stored, &f.manifests, confirm_window_secs),
                None => Default::default(),
            };
            match reasons {
                Some(text) => {
                    let r = text
                        .and_then(|t| serde_json::from_str::<tick::Reasons>(&t).ok())
                        .unwrap_or_default();
                    directives.reasons = r.hosts;
                    directives.channel_reasons = r.channels;
                }
                None => {
                    directives.reasons = previous.reasons.clone();
                    directives.channel_reasons = previous.channel_reasons.clone();
                }
            }
            directives
        })
        .await;
        let directives = match directives {
            Ok(d) => d,
            Err(e) => {
                // Versions stay unrecorded, so the next sync derives them again.
                tracing::error!("deriving the targets from the leader's state stopped: {e}; keeping the previous targets");
                return Ok(());
            }
        };
        let stored = shared.stored();
        let unverified = stored
            .rollouts
            .keys()
            .filter(|id| {
                fleet
                    .as_ref()
                    .is_none_or(|f| !f.manifests.contains_key(*id))
            })
            .count();
        if unverified > 0 {
            tracing::info!(
                unverified,
                "the leader runs rollouts this replica has not verified yet; looking for newly published artifacts now"
            );
            shared.poll_now.notify_one();
        }
        let old = swap(&shared.directives, Arc::new(directives));
        tokio::task::spawn_blocking(move || drop(old));
        synced.fleet_seen = fleet_seen;
    }
    synced.state_version = Some(info.state_version);
    synced.reasons_version = Some(info.reasons_version);
    Ok(())
}
