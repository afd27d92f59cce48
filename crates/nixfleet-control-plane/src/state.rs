//! The control plane's in-memory state: the verified snapshot, revocations, agent
//! attestations and the answers the last tick prepared. Check-ins read and update only
//! this (sharded, no global lock); durable writes happen on state changes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nixfleet_proto::compliance::ComplianceSummary;
use nixfleet_proto::wire::{ActivationProgress, CheckinRequest, RollbackSignal, Target};
use nixfleet_proto::{Revocation, TrustFile};
use nixfleet_reconciler::{Attestation, Delivery, StoredState};
use time::OffsetDateTime;

use crate::artifacts::FleetSnapshot;

const SHARDS: usize = 64;

/// Latest attestation per host, sharded by hostname.
pub struct Attestations {
    /// Shared with the tick's snapshot, which copies pointers; a check-in during a tick
    /// copies only its own host's attestation ([`Arc::make_mut`]).
    shards: Vec<Mutex<HashMap<String, Arc<Attestation>>>>,
    /// Hosts whose attestation changed since it was last written to a database no other
    /// replica reads (a single control plane writes them in batches, so that after a
    /// restart it knows which hosts it has seen before).
    unsaved: Mutex<std::collections::HashSet<String>>,
    /// Compliance summaries of hosts with no attestation since this start: read from the
    /// database at start, or evidence that arrived before the host's first check-in. The
    /// host's first check-in or confirm takes its summary from here, so a restart does
    /// not forget evidence (an attestation is only made by a check-in or a confirm).
    restored: Mutex<HashMap<String, ComplianceSummary>>,
}

/// What a check-in changed, for logging at INFO only when something did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    FirstSinceStart,
    Changed,
    Unchanged,
}

fn shard_of(hostname: &str) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    hostname.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl Default for Attestations {
    fn default() -> Self {
        Attestations {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            unsaved: Mutex::new(std::collections::HashSet::new()),
            restored: Mutex::new(HashMap::new()),
        }
    }
}

/// The same activation in the same phase.
fn same_step(a: Option<&ActivationProgress>, b: Option<&ActivationProgress>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.rollout_id == b.rollout_id && a.closure_hash == b.closure_hash && a.phase == b.phase
        }
        _ => false,
    }
}

/// The progress a check-in reports, timed by this control plane's clock: `since` is when
/// it first heard of the phase, never the agent's word, so a host whose clock runs behind
/// cannot shorten its own confirm window here (the agent's window closes first).
fn progress(
    known: Option<ActivationProgress>,
    req: &CheckinRequest,
    now: OffsetDateTime,
) -> Option<ActivationProgress> {
    let reported = req.activation.as_ref()?;
    match known {
        Some(k) if same_step(Some(&k), Some(reported)) => Some(k),
        _ => Some(ActivationProgress {
            since: now,
            ..reported.clone()
        }),
    }
}

impl Attestations {
    fn with<T>(
        &self,
        hostname: &str,
        f: impl FnOnce(&mut HashMap<String, Arc<Attestation>>) -> T,
    ) -> T {
        let mut shard = match self.shards[shard_of(hostname)].lock() {
            Ok(guard) => guard,
            // A panic mid-update leaves at worst one stale attestation; keep serving.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut shard)
    }

    /// Marks a host's attestation for the next batch write.
    pub fn mark_unsaved(&self, hostname: &str) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        unsaved.insert(hostname.to_owned());
    }

    /// The attestations marked since the last call.
    pub fn take_unsaved(&self) -> Vec<(String, Attestation)> {
        let hosts = std::mem::take(&mut *self.unsaved.lock().unwrap_or_else(|e| e.into_inner()));
        hosts
            .into_iter()
            .filter_map(|h| self.get(&h).map(|a| (h, a)))
            .collect()
    }

    fn take_restored(&self, hostname: &str) -> Option<ComplianceSummary> {
        self.restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hostname)
    }

    /// Compliance summaries stored before this start (the newest per host wins).
    pub fn restore_compliance(&self, rows: impl IntoIterator<Item = (String, ComplianceSummary)>) {
        let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
        for (host, summary) in rows {
            keep_newest(
                restored.entry(host).or_insert_with(|| summary.clone()),
                summary,
            );
        }
    }

    /// Records a host's newest verified compliance evidence. Returns the host's
    /// attestation to store when it has one; without one (no check-in since the start)
    /// the summary waits for the first check-in, and a bare attestation carrying only it
    /// is returned for the database (its merge keeps the stored observation).
    pub fn record_compliance(
        &self,
        hostname: &str,
        summary: ComplianceSummary,
        now: OffsetDateTime,
    ) -> Attestation {
        // Under the shard lock (then the restored map's, the order everywhere): a check-in
        // making the host's attestation right now cannot miss it.
        self.with(hostname, |map| {
            if let Some(a) = map.get_mut(hostname) {
                let a = Arc::make_mut(a);
                match &mut a.compliance {
                    Some(mine) => keep_newest(mine, summary),
                    None => a.compliance = Some(summary),
                }
                return a.clone();
            }
            let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
            let entry = restored
                .entry(hostname.to_owned())
                .or_insert_with(|| summary.clone());
            keep_newest(entry, summary);
            Attestation {
                // Not an observation: the stored row keeps its own (observed time 0 loses).
                last_seen: now,
                current_closure: None,
                last_confirmed_at: None,
                failed_targets: Vec::new(),
                failed_units: 0,
                health_at: None,
                delivered: None,
                activation: None,
                compliance: Some(entry.clone()),
                compliance_claimed_at: None,
            }
        })
    }

    /// A host's stored compliance summary and the newest evidence its agent claims to
    /// hold (None for a host not seen since the start).
    pub fn compliance_of(
        &self,
        hostname: &str,
    ) -> (Option<ComplianceSummary>, Option<OffsetDateTime>) {
        match self.get(hostname) {
            Some(a) => (a.compliance, a.compliance_claimed_at),
            None => (
                self.restored
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(hostname)
                    .cloned(),
                None,
            ),
        }
    }

    /// Every host's compliance summary, with its attestation's or the restored one.
    pub fn compliance_summaries(&self) -> Vec<(String, ComplianceSummary)> {
        let mut out: HashMap<String, ComplianceSummary> = self
            .restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (host, a) in self.snapshot() {
            if let Some(c) = &a.compliance {
                out.insert(host, c.clone());
            }
        }
        out.into_iter().collect()
    }

    /// Records a check-in.
    pub fn checkin(&self, req: &CheckinRequest, now: OffsetDateTime) -> Change {
        self.with(&req.hostname, |map| match map.get_mut(&req.hostname) {
            None => {
                map.insert(
                    req.hostname.clone(),
                    Arc::new(Attestation {
                        last_seen: now,
                        current_closure: Some(req.current_generation.closure_hash.clone()),
                        last_confirmed_at: req.last_confirmed_at,
                        failed_targets: req.failed_targets.clone(),
                        failed_units: req.health.failed_units,
                        health_at: Some(now),
                        delivered: None,
                        activation: progress(None, req, now),
                        // Taken under the shard lock: evidence arriving now waits for it.
                        compliance: self.take_restored(&req.hostname),
                        compliance_claimed_at: req.compliance_evidence_at,
                    }),
                );
                Change::FirstSinceStart
            }
            Some(a) => {
                let a = Arc::make_mut(a);
                let changed = a.current_closure.as_deref()
                    != Some(req.current_generation.closure_hash.as_str())
                    || a.failed_targets != req.failed_targets
                    || a.failed_units != req.health.failed_units
                    || (req.last_confirmed_at.is_some()
                        && a.last_confirmed_at != req.last_confirmed_at)
                    // The first health report since a confirm can let the host soak.
                    || a.health_at < a.last_confirmed_at
                    || !same_step(a.activation.as_ref(), req.activation.as_ref())
                    || a.compliance_claimed_at != req.compliance_evidence_at;
                a.last_seen = now;
                a.current_closure = Some(req.current_generation.closure_hash.clone());
                // The CP's own confirm record is at least as recent as the agent's word.
                if req.last_confirmed_at > a.last_confirmed_at {
                    a.last_confirmed_at = req.last_confirmed_at;
                }
                a.failed_targets = req.failed_targets.clone();
                a.failed_units = req.health.failed_units;
                a.health_at = Some(now);
                a.activation = progress(a.activation.take(), req, now);
                // Only the claim: the stored evidence (`compliance`) is the control
                // plane's own record and stays until newer evidence replaces it.
                a.compliance_claimed_at = req.compliance_evidence_at;
                if changed {
                    Change::Changed
                } else {
                    Change::Unchanged
                }
            }
        })
    }

    /// Records that a check-in answer carried the target of `rollout_id`; returns true
    /// the first time for that rollout.
    pub fn delivered(&self, hostname: &str, rollout_id: &str, now: OffsetDateTime) -> bool {
        self.with(hostname, |map| match map.get_mut(hostname) {
            Some(a)
                if a.delivered
                    .as_ref()
                    .is_some_and(|d| d.rollout_id == rollout_id) =>
            {
                false
            }
            Some(a) => {
                Arc::make_mut(a).delivered = Some(Delivery {
                    rollout_id: rollout_id.to_owned(),
                    at: now,
                });
                true
            }
            None => false,
        })
    }

    /// Records an accepted confirm: a confirm is an attestation of the running closure.
    pub fn confirmed(&self, hostname: &str, closure: &str, now: OffsetDateTime) {
        self.with(hostname, |map| {
            let a = map.entry(hostname.to_owned()).or_insert_with(|| {
                Arc::new(Attestation {
                    last_seen: now,
                    current_closure: None,
                    last_confirmed_at: None,
                    failed_targets: Vec::new(),
                    failed_units: 0,
                    health_at: None,
                    delivered: None,
                    activation: None,
                    compliance: self.take_restored(hostname),
                    compliance_claimed_at: None,
                })
            });
            let a = Arc::make_mut(a);
            a.last_seen = now;
            a.current_closure = Some(closure.to_owned());
            a.last_confirmed_at = Some(now);
            // Confirmed: nothing is in flight any more.
            a.activation = None;
        })
    }

    /// Merges an attestation another replica stored. Returns whether anything the
    /// reconciler acts on changed (more than `last_seen`).
    pub fn merge(&self, hostname: &str, mut remote: Attestation) -> bool {
        let known = self.with(hostname, |map| map.contains_key(hostname));
        if !known && remote.current_closure.is_none() && observed_nothing(&remote) {
            // A row written only to carry evidence is not a sighting of the host.
            if let Some(summary) = remote.compliance {
                self.restore_compliance([(hostname.to_owned(), summary)]);
            }
            return false;
        }
        if !known {
            if let Some(restored) = self.take_restored(hostname) {
                match &mut remote.compliance {
                    Some(c) => keep_newest(c, restored),
                    None => remote.compliance = Some(restored),
                }
            }
        }
        self.with(hostname, |map| match map.get_mut(hostname) {
            None => {
                map.insert(hostname.to_owned(), Arc::new(remote));
                true
            }
            Some(a) => {
                let a = Arc::make_mut(a);
                let before = a.clone();
                // The same rules as the database's upsert: times only move forward, and
                // the observed fields come from the more recent observation.
                if crate::store::observed_at(&remote) > crate::store::observed_at(a) {
                    a.current_closure = remote.current_closure;
                    a.failed_targets = remote.failed_targets;
                    a.failed_units = remote.failed_units;
                    a.health_at = remote.health_at;
                    a.activation = remote.activation;
                    a.compliance_claimed_at = remote.compliance_claimed_at;
                }
                // Evidence merges on its own: the newest collected wins.
                if let Some(theirs) = remote.compliance {
                    match &mut a.compliance {
                        Some(mine) => keep_newest(mine, theirs),
                        None => a.compliance = Some(theirs),
                    }
                }
                a.last_seen = a.last_seen.max(remote.last_seen);
                a.last_confirmed_at = a.last_confirmed_at.max(remote.last_confirmed_at);
                if let Some(d) = remote.delivered {
                    if a.delivered.as_ref().is_none_or(|mine| mine.at < d.at) {
                        a.delivered = Some(d);
                    }
                }
                let mut unseen = before;
                unseen.last_seen = a.last_seen;
                unseen != *a
            }
        })
    }

    /// Hosts that checked in here at or after `since`, with when.
    pub fn seen_since(&self, since: OffsetDateTime) -> Vec<(String, OffsetDateTime)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let guard = match shard.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            out.extend(
                guard
                    .iter()
                    .filter(|(_, a)| a.last_seen >= since)
                    .map(|(h, a)| (h.clone(), a.last_seen)),
            );
        }
        out
    }

    pub fn get(&self, hostname: &str) -> Option<Attestation> {
        self.with(hostname, |map| map.get(hostname).map(|a| (**a).clone()))
    }

    /// A consistent-enough copy for one reconcile tick.
    pub fn snapshot(&self) -> BTreeMap<String, Arc<Attestation>> {
        let mut out = BTreeMap::new();
        for shard in &self.shards {
            let guard = match shard.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            out.extend(guard.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        out
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|g| g.len()).unwrap_or(0))
            .sum()
    }
}

/// Replaces `mine` with `theirs` when `theirs` was collected later.
fn keep_newest(mine: &mut ComplianceSummary, theirs: ComplianceSummary) {
    if theirs.collected_at > mine.collected_at {
        *mine = theirs;
    }
}

/// An attestation with no check-in or confirm in it.
fn observed_nothing(a: &Attestation) -> bool {
    a.health_at.is_none() && a.last_confirmed_at.is_none()
}

/// What the control plane answers a host at check-in, prepared by the last tick.
#[derive(Debug, Clone, Default)]
pub struct Directives {
    pub targets: HashMap<String, Target>,
    pub rollbacks: HashMap<String, RollbackSignal>,
    /// Hosts in a rollout's current wave: asked to check in sooner.
    pub active: std::collections::HashSet<String>,
    /// Why each host stays where it is (the reconciler's map, moved as it is).
    pub reasons: BTreeMap<String, String>,
    /// Why a channel's newest ref is not running.
    pub channel_reasons: BTreeMap<String, String>,
}

/// The applied revocation list.
#[derive(Debug, Default)]
pub struct RevocationSet {
    /// The list's entries, by hostname.
    pub entries: HashMap<String, Revocation>,
    pub signed_at: Option<OffsetDateTime>,
    /// SHA-256 of the applied list's canonical bytes: a list re-signed within the same
    /// second is still a different list.
    pub sha256: Option<String>,
    pub applied_at: Option<OffsetDateTime>,
}

/// This replica's part in deciding rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The only control plane on its own SQLite database.
    Single = 0,
    /// Holds the leadership of a shared database: ticks, expires deadlines.
    Leader = 1,
    /// Serves from what the leader published in the shared database.
    Follower = 2,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Follower => "follower",
        }
    }
}

/// A replica that has not heard from a shared database for this long answers agents
/// with 503 rather than from state that may be stale.
pub const DB_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything the request handlers and background tasks share.
pub struct Shared {
    pub started_at: OffsetDateTime,
    /// Each host's last check-in recorded in the database when this process started, so
    /// that a host that has not checked in since reads as seen before, not as never seen.
    pub seen_before: RwLock<Arc<HashMap<String, OffsetDateTime>>>,
    pub trust: RwLock<Arc<TrustFile>>,
    pub fleet: RwLock<Option<Arc<FleetSnapshot>>>,
    pub revocations: RwLock<Arc<RevocationSet>>,
    /// False until a verified revocation list is applied, when one is configured.
    pub revocations_ready: AtomicBool,
    pub attestations: Attestations,
    pub stored: RwLock<Arc<StoredState>>,
    pub directives: RwLock<Arc<Directives>>,
    pub last_tick_at: RwLock<Option<OffsetDateTime>>,
    /// Wakes the tick early (a confirm arrived, a deadline passed, a new fleet).
    pub tick_now: tokio::sync::Notify,
    /// Wakes the fleet poll early (the leader started a rollout this replica has not
    /// verified yet).
    pub poll_now: tokio::sync::Notify,
    role: std::sync::atomic::AtomicU8,
    /// Last time a shared database answered (None: not yet, or not shared).
    db_ok_at: RwLock<Option<std::time::Instant>>,
    /// The replica that last published a tick (shared database only).
    leader: RwLock<Option<String>>,
}

pub fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

pub fn replace<T>(lock: &RwLock<T>, value: T) {
    drop(swap(lock, value));
}

/// Like [`replace`], and returns the old value (to drop it elsewhere).
pub fn swap<T>(lock: &RwLock<T>, value: T) -> T {
    match lock.write() {
        Ok(mut g) => std::mem::replace(&mut *g, value),
        Err(p) => std::mem::replace(&mut *p.into_inner(), value),
    }
}

impl Shared {
    pub fn new(trust: TrustFile, revocations_configured: bool, now: OffsetDateTime) -> Shared {
        Shared {
            started_at: now,
            seen_before: RwLock::new(Arc::new(HashMap::new())),
            trust: RwLock::new(Arc::new(trust)),
            fleet: RwLock::new(None),
            revocations: RwLock::new(Arc::new(RevocationSet::default())),
            revocations_ready: AtomicBool::new(!revocations_configured),
            attestations: Attestations::default(),
            stored: RwLock::new(Arc::new(StoredState::default())),
            directives: RwLock::new(Arc::new(Directives::default())),
            last_tick_at: RwLock::new(None),
            tick_now: tokio::sync::Notify::new(),
            poll_now: tokio::sync::Notify::new(),
            role: std::sync::atomic::AtomicU8::new(Role::Single as u8),
            db_ok_at: RwLock::new(None),
            leader: RwLock::new(None),
        }
    }

    pub fn leader(&self) -> Option<String> {
        read(&self.leader)
    }

    pub fn set_leader(&self, replica: String) {
        replace(&self.leader, Some(replica));
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            1 => Role::Leader,
            2 => Role::Follower,
            _ => Role::Single,
        }
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Release);
    }

    /// Whether this replica decides: the single control plane, or the leader.
    pub fn decides(&self) -> bool {
        self.role() != Role::Follower
    }

    /// Whether this replica shares its database with others.
    pub fn replicated(&self) -> bool {
        self.role() != Role::Single
    }

    pub fn database_answered(&self) {
        replace(&self.db_ok_at, Some(std::time::Instant::now()));
    }

    /// False when a shared database has not answered for [`DB_STALE_AFTER`].
    pub fn database_fresh(&self) -> bool {
        !self.replicated() || read(&self.db_ok_at).is_some_and(|t| t.elapsed() < DB_STALE_AFTER)
    }

    pub fn trust(&self) -> Arc<TrustFile> {
        read(&self.trust)
    }

    pub fn fleet(&self) -> Option<Arc<FleetSnapshot>> {
        read(&self.fleet)
    }

    pub fn revocations(&self) -> Arc<RevocationSet> {
        read(&self.revocations)
    }

    pub fn revocations_ready(&self) -> bool {
        self.revocations_ready.load(Ordering::Acquire)
    }

    pub fn stored(&self) -> Arc<StoredState> {
        read(&self.stored)
    }

    pub fn directives(&self) -> Arc<Directives> {
        read(&self.directives)
    }

    pub fn last_tick_at(&self) -> Option<OffsetDateTime> {
        read(&self.last_tick_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::compliance::{ComplianceMode, EvidenceTrigger};
    use nixfleet_proto::wire::{CurrentGeneration, Health};

    fn summary(id: &str, at: OffsetDateTime) -> ComplianceSummary {
        ComplianceSummary {
            evidence_id: id.into(),
            rollout_id: None,
            closure_hash: "c".into(),
            mode: ComplianceMode::Enforce,
            trigger: EvidenceTrigger::Activation,
            collected_at: at,
            passed: 3,
            failing: Vec::new(),
        }
    }

    fn checkin(claimed: Option<OffsetDateTime>) -> CheckinRequest {
        CheckinRequest {
            hostname: "web-01".into(),
            agent_version: "test".into(),
            boot_id: "b".into(),
            current_generation: CurrentGeneration {
                closure_hash: "c".into(),
            },
            last_confirmed_at: None,
            failed_targets: Vec::new(),
            health: Health {
                failed_units: 0,
                uptime_secs: 1,
            },
            activation: None,
            compliance_evidence_at: claimed,
        }
    }

    fn evidence_of(a: &Attestations) -> Option<String> {
        a.compliance_of("web-01").0.map(|c| c.evidence_id)
    }

    #[test]
    fn check_ins_keep_the_stored_evidence_and_record_the_claim() {
        let t = OffsetDateTime::now_utc();
        let a = Attestations::default();
        a.checkin(&checkin(None), t);
        a.record_compliance("web-01", summary("ev-1", t), t);
        // The claim moving is a change worth storing; the evidence stays.
        assert_eq!(a.checkin(&checkin(Some(t)), t), Change::Changed);
        assert_eq!(a.checkin(&checkin(Some(t)), t), Change::Unchanged);
        assert_eq!(evidence_of(&a).as_deref(), Some("ev-1"));
        assert_eq!(a.compliance_of("web-01").1, Some(t));
        // Older evidence never replaces newer.
        a.record_compliance("web-01", summary("ev-0", t - time::Duration::seconds(5)), t);
        assert_eq!(evidence_of(&a).as_deref(), Some("ev-1"));
    }

    #[test]
    fn evidence_before_the_first_check_in_waits_for_it() {
        let t = OffsetDateTime::now_utc();
        let a = Attestations::default();
        // Stored before a restart, or sent before the host's first check-in since.
        a.restore_compliance([("web-01".to_owned(), summary("ev-1", t))]);
        let bare =
            a.record_compliance("web-01", summary("ev-2", t + time::Duration::seconds(1)), t);
        assert!(a.get("web-01").is_none(), "evidence is not a check-in");
        assert!(bare.health_at.is_none() && bare.current_closure.is_none());
        assert_eq!(evidence_of(&a).as_deref(), Some("ev-2"));
        a.checkin(&checkin(None), t);
        assert_eq!(
            a.get("web-01")
                .and_then(|x| x.compliance)
                .map(|c| c.evidence_id),
            Some("ev-2".into())
        );
    }

    #[test]
    fn merging_another_replicas_attestation_keeps_the_newest_evidence() {
        let t = OffsetDateTime::now_utc();
        let a = Attestations::default();
        a.checkin(&checkin(None), t);
        a.record_compliance("web-01", summary("ev-2", t), t);
        // Another replica's newer check-in, from before it saw the evidence.
        let mut remote = a.get("web-01").unwrap();
        remote.compliance = None;
        remote.health_at = Some(t + time::Duration::seconds(10));
        remote.compliance_claimed_at = Some(t);
        a.merge("web-01", remote.clone());
        assert_eq!(evidence_of(&a).as_deref(), Some("ev-2"));
        assert_eq!(a.compliance_of("web-01").1, Some(t));
        // Its newer evidence wins.
        remote.compliance = Some(summary("ev-3", t + time::Duration::seconds(1)));
        a.merge("web-01", remote);
        assert_eq!(evidence_of(&a).as_deref(), Some("ev-3"));
        // A row that only carries evidence is not a sighting of a host.
        let bare = Attestations::default().record_compliance("db-01", summary("ev-9", t), t);
        assert!(!a.merge("db-01", bare));
        assert!(a.get("db-01").is_none());
        assert_eq!(
            a.compliance_of("db-01").0.map(|c| c.evidence_id).as_deref(),
            Some("ev-9")
        );
    }
}
