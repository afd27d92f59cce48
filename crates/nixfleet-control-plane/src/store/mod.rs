//! Durable state behind one narrow interface, with two implementations: SQLite (the
//! embedded default, one control plane) and PostgreSQL (N replicas share it).
//! Everything here is rebuildable from signed artifacts plus agent check-ins (SPEC.md §5),
//! so a wiped database is an outage, never a breach.

use std::future::Future;
use std::pin::Pin;

use nixfleet_proto::Revocation;
use nixfleet_reconciler::{Attestation, HostRecord, StoredState};
use time::OffsetDateTime;

pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod suite;

/// A boxed storage future: the interface is used as `dyn Store`.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, DbError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {message}")]
    Open { path: String, message: String },
    #[error("database {path} has schema version {found}, newer than this binary understands ({known}); run a newer nixfleet-control-plane or restore the matching database (it is never rewritten silently)")]
    TooNew {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("database {path} holds tables nixfleet did not create ({tables}); point the control plane at a nixfleet database or an empty one")]
    Foreign { path: String, tables: String },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database write failed: {0}")]
    Write(String),
    #[error("{0}")]
    Postgres(String),
    #[error("PostgreSQL did not answer within {0:?}; check the server and the network to it")]
    Timeout(std::time::Duration),
    #[error("the database holds a record this binary cannot read ({0}); restore a backup or wipe the database (it is rebuilt from signed artifacts)")]
    Corrupt(String),
    #[error("this replica is not the leader; only the leader writes rollout state")]
    NotLeader,
    #[error("the database writer has stopped; the control plane is shutting down")]
    WriterGone,
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        DbError::Postgres(match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let advice = if code.starts_with("28") || code == "42501" {
                    "check the role, its password and its rights on the database"
                } else if code == "3D000" {
                    "create the database (docs/high-availability.md)"
                } else if code == "42P01" {
                    "the schema is missing (was the database recreated?); restart the control plane to create it"
                } else {
                    "see the PostgreSQL server's log"
                };
                format!(
                    "PostgreSQL refused: {}: {} ({code}); {advice}",
                    db.severity(),
                    db.message()
                )
            }
            None => format!(
                "PostgreSQL: {}; check that the server is up and reachable",
                nixfleet_pki::error_chain(&e)
            ),
        })
    }
}

/// Rows to write after one tick: what changed in the stored rollout state, and the
/// events (with reasons) for the rollout trail.
#[derive(Debug, Default)]
pub struct TickWrites {
    pub rollouts: Vec<(String, String, String)>,
    pub hosts: Vec<(String, String, String)>,
    pub removed_hosts: Vec<(String, String)>,
    pub events: Vec<Event>,
    /// The waiting reasons, as JSON, when they changed (replicas answer status from them).
    pub reasons: Option<String>,
}

impl TickWrites {
    pub fn changes_state(&self) -> bool {
        !self.rollouts.is_empty() || !self.hosts.is_empty() || !self.removed_hosts.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub rollout_id: String,
    pub hostname: Option<String>,
    pub kind: String,
    pub reason: String,
    pub at: OffsetDateTime,
}

/// Whose events a trail query reads.
#[derive(Debug, Clone, Copy)]
pub enum EventsOf {
    /// One rollout's, oldest first.
    Rollout,
    /// One host's, newest first.
    Host,
}

impl EventsOf {
    pub fn column(self) -> &'static str {
        match self {
            EventsOf::Rollout => "rollout_id",
            EventsOf::Host => "hostname",
        }
    }

    pub fn order(self) -> &'static str {
        match self {
            EventsOf::Rollout => "id",
            EventsOf::Host => "id DESC",
        }
    }
}

/// What the leader last published: followers reload what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub replica: String,
    /// Bumped by every tick that changed the stored rollout state.
    pub state_version: i64,
    pub reasons_version: i64,
    pub last_tick_at: Option<OffsetDateTime>,
}

/// A signed artifact as a leader verified it, kept so that followers verify the same
/// bytes themselves rather than fetch them again. The database is not trusted with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedArtifact {
    /// [`FLEET_ARTIFACT`], [`REVOCATIONS_ARTIFACT`], or [`MANIFEST_PREFIX`] or
    /// [`LISTS_PREFIX`] and a rollout id.
    pub name: String,
    /// The bytes the signature covers, as received.
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    pub sha256: String,
    pub signed_at: OffsetDateTime,
}

pub const FLEET_ARTIFACT: &str = "fleet";
pub const REVOCATIONS_ARTIFACT: &str = "revocations";
pub const MANIFEST_PREFIX: &str = "manifest/";
/// A schema-2 manifest's host set and budget lists, unsigned (the manifest signs their
/// root and hashes), stored and pruned with the manifest of the same rollout id.
pub const LISTS_PREFIX: &str = "manifest-lists/";

/// The report kind a host's signed compliance evidence is stored under.
pub const EVIDENCE_KIND: &str = "compliance-evidence";

/// What publishing `set` changes, given the stored `(name, sha256, signed_at)` rows:
/// the artifacts to write and the names to remove. A fleet older than the stored one
/// changes nothing (a replica that lost the leadership may publish late). Manifests and
/// their lists are added, or replaced by a newer signature under the same rollout id (a
/// re-sign); those of a replaced fleet are removed, while a set with the same fleet but
/// fewer manifests (a new leader still loading them) removes none. Lists never outlive
/// their manifest. A revocation list replaces only an older one.
pub fn plan_artifacts<'a>(
    stored: &[(String, String, OffsetDateTime)],
    set: &'a [SignedArtifact],
) -> (Vec<&'a SignedArtifact>, Vec<String>) {
    let find = |name: &str| stored.iter().find(|(n, _, _)| n == name);
    let replaces = |a: &SignedArtifact| match find(&a.name) {
        None => true,
        Some((_, sha, at)) => *sha != a.sha256 && a.signed_at >= *at,
    };
    let per_rollout =
        |name: &str| name.starts_with(MANIFEST_PREFIX) || name.starts_with(LISTS_PREFIX);
    let mut write = Vec::new();
    let mut remove = Vec::new();
    if let Some(fleet) = set.iter().find(|a| a.name == FLEET_ARTIFACT) {
        let stale = find(FLEET_ARTIFACT).is_some_and(|(_, _, at)| fleet.signed_at < *at);
        if !stale {
            if replaces(fleet) {
                write.push(fleet);
            }
            // A re-sign keeps a rollout's id: the newer signature replaces the stored one,
            // an older one never does.
            for a in set.iter().filter(|a| a.name.starts_with(MANIFEST_PREFIX)) {
                if replaces(a) {
                    write.push(a);
                }
            }
            let same_fleet = find(FLEET_ARTIFACT).is_some_and(|(_, sha, _)| *sha == fleet.sha256);
            if !same_fleet {
                remove.extend(
                    stored
                        .iter()
                        .filter(|(n, _, _)| per_rollout(n) && !set.iter().any(|a| &a.name == n))
                        .map(|(n, _, _)| n.clone()),
                );
            }
        }
    }
    // Lists go with their manifest: written while it is (or stays) stored, removed with it.
    let manifest_stays = |lists_name: &str| {
        let Some(id) = lists_name.strip_prefix(LISTS_PREFIX) else {
            return false;
        };
        let name = format!("{MANIFEST_PREFIX}{id}");
        write.iter().any(|a| a.name == name) || (find(&name).is_some() && !remove.contains(&name))
    };
    let lists_written: Vec<&SignedArtifact> = set
        .iter()
        .filter(|a| a.name.starts_with(LISTS_PREFIX) && manifest_stays(&a.name) && replaces(a))
        .collect();
    let orphans: Vec<String> = stored
        .iter()
        .map(|(n, _, _)| n)
        .filter(|n| n.starts_with(LISTS_PREFIX) && !manifest_stays(n) && !remove.contains(n))
        .cloned()
        .collect();
    write.extend(lists_written);
    remove.extend(orphans);
    if let Some(list) = set.iter().find(|a| a.name == REVOCATIONS_ARTIFACT) {
        if replaces(list) {
            write.push(list);
        }
    }
    (write, remove)
}

/// Attestations changed since a cursor, and the cursor to pass next time.
#[derive(Debug, Default)]
pub struct AttestationPage {
    pub rows: Vec<(String, Attestation)>,
    pub next: i64,
}

/// How far back each incremental attestation read looks again, so a row whose
/// transaction committed late is still seen (microseconds).
pub const ATTESTATION_OVERLAP_US: i64 = 10_000_000;

/// The storage interface. Every method is one transaction.
pub trait Store: Send + Sync {
    /// Whether other control-plane replicas share this database.
    fn shared(&self) -> bool;
    /// Finishes queued writes and closes connections.
    fn close(&self) -> Fut<'_, ()>;

    /// Makes the revocation table exactly `list`, unless a list signed later is already
    /// stored (a slower replica never undoes a newer list). Returns the stored count.
    fn replace_revocations(
        &self,
        list: Vec<Revocation>,
        signed_at: OffsetDateTime,
        sha256: String,
        now: OffsetDateTime,
    ) -> Fut<'_, usize>;
    /// The applied revocation list and its `signedAt`, if one was applied.
    fn revocations(&self) -> Fut<'_, (Vec<Revocation>, Option<OffsetDateTime>)>;

    /// Records a token nonce; false when it was already used. Durable before returning,
    /// so a certificate is never issued twice for one token.
    fn claim_token_nonce(
        &self,
        nonce: String,
        hostname: String,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Fut<'_, bool>;

    /// The reconciler's stored state as last written (empty after a wipe).
    fn load_stored(&self) -> Fut<'_, StoredState>;
    /// One host's record in one rollout, as last written.
    fn host_record(&self, rollout_id: String, hostname: String) -> Fut<'_, Option<HostRecord>>;
    /// Writes one tick's changes in one transaction and publishes the tick. On a shared
    /// database only the leader may, through the session that holds the leadership.
    fn write_tick(&self, writes: TickWrites, now: OffsetDateTime) -> Fut<'_, ()>;
    /// What the leader last published.
    fn leader_info(&self) -> Fut<'_, Option<LeaderInfo>>;
    /// The waiting reasons the leader last published, as JSON.
    fn load_reasons(&self) -> Fut<'_, Option<String>>;
    /// Takes or keeps the leadership; false while another replica holds it.
    fn lead(&self) -> Fut<'_, bool>;

    /// Records a dispatch event (delivery, confirm, orphan confirm) once per host,
    /// rollout and kind; false when it was already recorded.
    fn record_dispatch_event(
        &self,
        hostname: String,
        rollout_id: String,
        closure_hash: String,
        event: &'static str,
        now: OffsetDateTime,
    ) -> Fut<'_, bool>;
    /// The rollout's event trail, oldest first.
    fn rollout_events(&self, rollout_id: String, limit: usize) -> Fut<'_, Vec<Event>>;
    /// A host's most recent events, newest first.
    fn host_events(&self, hostname: String, limit: usize) -> Fut<'_, Vec<Event>>;
    /// Stores a verified host report once per (host, reportId) and keeps only the host's
    /// `keep` newest reports, and always its newest compliance evidence (the one
    /// `GET /v1/compliance` shows); returns its event id.
    #[allow(clippy::too_many_arguments)]
    fn record_report(
        &self,
        hostname: String,
        report_id: String,
        kind: String,
        rollout_id: Option<String>,
        body: String,
        now: OffsetDateTime,
        keep: usize,
    ) -> Fut<'_, i64>;

    /// The newest stored report of `kind` of each host (of `hostname` only, when given):
    /// `(hostname, report_id, body)`.
    fn latest_reports(
        &self,
        kind: String,
        hostname: Option<String>,
    ) -> Fut<'_, Vec<(String, String, String)>>;

    /// Stores attestations, merged with what is stored: times only move forward, and the
    /// observed fields come from the more recent observation.
    fn save_attestations(&self, rows: Vec<(String, Attestation)>) -> Fut<'_, ()>;
    /// Moves hosts' `last_seen` forward.
    fn touch_attestations(&self, rows: Vec<(String, OffsetDateTime)>) -> Fut<'_, ()>;
    /// Attestations written since `cursor` (0: all of them).
    fn attestations_since(&self, cursor: i64) -> Fut<'_, AttestationPage>;

    /// Stores what [`plan_artifacts`] says `set` changes, in one transaction, and moves
    /// the artifacts' version when anything changed. Returns whether anything did.
    fn publish_artifacts(&self, set: Vec<SignedArtifact>) -> Fut<'_, bool>;
    /// The stored artifacts' version: it moves whenever they change.
    fn artifacts_version(&self) -> Fut<'_, i64>;
    /// Every stored artifact, with the version they make up.
    fn signed_artifacts(&self) -> Fut<'_, (i64, Vec<SignedArtifact>)>;
}

pub type Db = dyn Store;

/// How to reach a shared PostgreSQL database.
pub struct PgOptions<'a> {
    /// `postgres://user[:password]@host:port/database[?sslmode=…]`.
    pub url: &'a str,
    /// Overrides the URL's password.
    pub password: Option<String>,
    /// CA certificate(s) the server's certificate must chain to; set, only TLS is used.
    pub ca_pem: Option<String>,
    /// This replica's name (application_name, the leader's mark).
    pub replica: &'a str,
    pub pool_size: usize,
}

/// Opens the database a control plane is configured with: PostgreSQL when a
/// `postgres://` URL is given, else SQLite at `path`.
pub async fn open(
    postgres: Option<PgOptions<'_>>,
    path: &std::path::Path,
) -> Result<std::sync::Arc<Db>, DbError> {
    match postgres {
        Some(options) => Ok(std::sync::Arc::new(postgres::PgStore::open(options).await?)),
        None => Ok(std::sync::Arc::new(sqlite::SqliteStore::open(path)?)),
    }
}

pub use crate::clock::{from_micros, micros};

/// The columns an attestation is stored as. Times merge with max(); 0 means none.
pub struct AttestationRow {
    pub body: String,
    /// When the observed fields (closure, failures, health) were observed.
    pub observed_us: i64,
    pub last_seen_us: i64,
    pub confirmed_us: i64,
    pub delivered_rollout: Option<String>,
    pub delivered_us: i64,
    /// The compliance summary as JSON, and its evidence's `collectedAt` (0: none). Merged
    /// on its own, newest evidence wins: a check-in that another replica answered from an
    /// attestation without it must not erase it.
    pub compliance: Option<String>,
    pub compliance_us: i64,
}

pub fn observed_at(a: &Attestation) -> Option<OffsetDateTime> {
    a.health_at.max(a.last_confirmed_at)
}

impl AttestationRow {
    pub fn of(a: &Attestation) -> AttestationRow {
        AttestationRow {
            body: serde_json::to_string(a).unwrap_or_default(),
            observed_us: observed_at(a).map(micros).unwrap_or(0),
            last_seen_us: micros(a.last_seen),
            confirmed_us: a.last_confirmed_at.map(micros).unwrap_or(0),
            delivered_rollout: a.delivered.as_ref().map(|d| d.rollout_id.clone()),
            delivered_us: a.delivered.as_ref().map(|d| micros(d.at)).unwrap_or(0),
            compliance: a
                .compliance
                .as_ref()
                .and_then(|c| serde_json::to_string(c).ok()),
            compliance_us: a
                .compliance
                .as_ref()
                .map(|c| micros(c.collected_at))
                .unwrap_or(0),
        }
    }

    /// The attestation, with the separately merged columns laid over the body.
    pub fn decode(
        body: &str,
        last_seen_us: i64,
        confirmed_us: i64,
        delivered_rollout: Option<String>,
        delivered_us: i64,
        compliance: Option<String>,
    ) -> Result<Attestation, DbError> {
        let mut a: Attestation = serde_json::from_str(body)
            .map_err(|e| DbError::Corrupt(format!("attestation: {e}")))?;
        if let Some(t) = from_micros(last_seen_us) {
            a.last_seen = a.last_seen.max(t);
        }
        if confirmed_us > 0 {
            a.last_confirmed_at = a.last_confirmed_at.max(from_micros(confirmed_us));
        }
        if let (Some(rollout_id), Some(at)) = (
            delivered_rollout,
            Some(delivered_us)
                .filter(|us| *us > 0)
                .and_then(from_micros),
        ) {
            if a.delivered.as_ref().is_none_or(|d| d.at < at) {
                a.delivered = Some(nixfleet_reconciler::Delivery { rollout_id, at });
            }
        }
        if let Some(text) = compliance {
            let summary: nixfleet_proto::compliance::ComplianceSummary =
                serde_json::from_str(&text)
                    .map_err(|e| DbError::Corrupt(format!("compliance summary: {e}")))?;
            if a.compliance
                .as_ref()
                .is_none_or(|c| c.collected_at < summary.collected_at)
            {
                a.compliance = Some(summary);
            }
        }
        Ok(a)
    }
}

/// Decodes a stored rollout-state row.
pub fn decode_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Corrupt(format!("{what}: {e}")))
}
