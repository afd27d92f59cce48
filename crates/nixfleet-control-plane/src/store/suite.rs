//! The storage behaviour suite: every test runs against SQLite and against PostgreSQL
//! (a throw-away database on the server in NIXFLEET_TEST_DATABASE_URL; `scripts/test`
//! sets one up).

use std::sync::Arc;

use nixfleet_harness::pg::TestDb;
use nixfleet_proto::Revocation;
use nixfleet_reconciler::{
    Attestation, Delivery, HostRecord, HostState, RolloutRecord, RolloutState,
};
use time::{Duration, OffsetDateTime};

use super::{
    postgres::PgStore, sqlite::SqliteStore, Db, DbError, Event, PgOptions, SignedArtifact, Store,
    TickWrites,
};

fn pg<'a>(url: &'a str, replica: &'a str, pool_size: usize) -> PgOptions<'a> {
    PgOptions {
        url,
        password: None,
        ca_pem: None,
        replica,
        pool_size,
    }
}

/// Keeps the backing database alive for the test's length.
enum Backing {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(TestDb),
}

struct Fixture {
    db: Arc<Db>,
    backing: Backing,
}

impl Fixture {
    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<Db> = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
        Fixture {
            db,
            backing: Backing::Sqlite(dir),
        }
    }

    async fn postgres() -> Fixture {
        let test_db = TestDb::create("nixfleet_store");
        let db: Arc<Db> = Arc::new(
            PgStore::open(pg(&test_db.url, "replica-a", 4))
                .await
                .unwrap(),
        );
        Fixture {
            db,
            backing: Backing::Postgres(test_db),
        }
    }

    /// A second replica on the same database (PostgreSQL only).
    async fn other_replica(&self) -> Arc<Db> {
        match &self.backing {
            Backing::Postgres(test_db) => Arc::new(
                PgStore::open(pg(&test_db.url, "replica-b", 4))
                    .await
                    .unwrap(),
            ),
            Backing::Sqlite(_) => panic!("SQLite has no replicas"),
        }
    }
}

/// Runs one behaviour against both backends.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::Fixture::sqlite().await;
                    super::$name(&f).await;
                    f.db.close().await.unwrap();
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let f = super::Fixture::postgres().await;
                    super::$name(&f).await;
                    f.db.close().await.unwrap();
                }
            )*
        }
    };
}

on_both!(
    token_nonce_is_claimed_once,
    revocations_become_exactly_the_newest_list,
    tick_writes_round_trip,
    published_tick_versions,
    dispatch_events_are_recorded_once,
    reports_are_stored_once,
    attestations_merge_forward_only,
    attestations_since_a_cursor,
    the_leader_writes_ticks,
    signed_artifacts_only_move_forward,
    manifest_lists_go_with_their_manifest,
    concurrent_saves_all_land_and_merge,
    latest_evidence_per_host_is_kept,
    compliance_survives_a_later_check_in,
);

fn now() -> OffsetDateTime {
    // Whole seconds: RFC 3339 round trips exactly.
    OffsetDateTime::now_utc().replace_nanosecond(0).unwrap()
}

fn artifact(name: &str, body: &str, signed_at: OffsetDateTime) -> SignedArtifact {
    SignedArtifact {
        name: name.into(),
        body: body.as_bytes().to_vec(),
        signature: vec![7; 64],
        sha256: format!("sha-of-{body}"),
        signed_at,
    }
}

async fn stored_artifacts(f: &Fixture) -> (i64, Vec<String>) {
    let (version, rows) = f.db.signed_artifacts().await.unwrap();
    assert_eq!(f.db.artifacts_version().await.unwrap(), version);
    let names = rows
        .iter()
        .map(|a| format!("{}={}", a.name, String::from_utf8_lossy(&a.body)))
        .collect();
    (version, names)
}

async fn signed_artifacts_only_move_forward(f: &Fixture) {
    let t = now();
    let (t0, t1, t2) = (t - Duration::hours(1), t, t + Duration::hours(1));
    assert_eq!(stored_artifacts(f).await, (0, vec![]));
    let first = vec![
        artifact("fleet", "f1", t1),
        artifact("manifest/a", "a1", t1),
        artifact("revocations", "r1", t1),
    ];
    assert!(f.db.publish_artifacts(first.clone()).await.unwrap());
    let (v1, names) = stored_artifacts(f).await;
    assert_eq!(names, ["fleet=f1", "manifest/a=a1", "revocations=r1"]);
    // The bytes come back as stored.
    let (_, rows) = f.db.signed_artifacts().await.unwrap();
    assert_eq!(rows, {
        let mut sorted = first.clone();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        sorted
    });
    // The same set again changes nothing, and the version stays.
    assert!(!f.db.publish_artifacts(first).await.unwrap());
    assert_eq!(stored_artifacts(f).await.0, v1);
    // A manifest published later for the same fleet is added.
    let more = vec![
        artifact("fleet", "f1", t1),
        artifact("manifest/a", "a1", t1),
        artifact("manifest/b", "b1", t1),
    ];
    assert!(f.db.publish_artifacts(more).await.unwrap());
    let (v2, names) = stored_artifacts(f).await;
    assert!(v2 > v1);
    assert_eq!(names.len(), 4);
    // A new leader that has not loaded every manifest yet removes none.
    assert!(!f
        .db
        .publish_artifacts(vec![artifact("fleet", "f1", t1)])
        .await
        .unwrap());
    // A replica publishing an older fleet late changes nothing.
    let stale = vec![
        artifact("fleet", "f0", t0),
        artifact("manifest/z", "z0", t0),
    ];
    assert!(!f.db.publish_artifacts(stale).await.unwrap());
    assert_eq!(stored_artifacts(f).await.0, v2);
    // A newer fleet takes its own manifests; the old fleet's go.
    let newer = vec![
        artifact("fleet", "f2", t2),
        artifact("manifest/c", "c2", t2),
    ];
    assert!(f.db.publish_artifacts(newer).await.unwrap());
    let (_, names) = stored_artifacts(f).await;
    assert_eq!(names, ["fleet=f2", "manifest/c=c2", "revocations=r1"]);
    // Revocation lists: never an older one, always a newer one.
    assert!(!f
        .db
        .publish_artifacts(vec![artifact("revocations", "r0", t0)])
        .await
        .unwrap());
    assert!(f
        .db
        .publish_artifacts(vec![artifact("revocations", "r2", t2)])
        .await
        .unwrap());
    let (_, names) = stored_artifacts(f).await;
    assert_eq!(names, ["fleet=f2", "manifest/c=c2", "revocations=r2"]);
    // CI's re-sign: a newer fleet with the same rollout id, newer bytes under it.
    let t3 = t2 + Duration::hours(1);
    let resigned = vec![
        artifact("fleet", "f3", t3),
        artifact("manifest/c", "c3", t3),
    ];
    assert!(f.db.publish_artifacts(resigned).await.unwrap());
    let (v3, names) = stored_artifacts(f).await;
    assert_eq!(names, ["fleet=f3", "manifest/c=c3", "revocations=r2"]);
    // An older signature of that rollout never replaces the newer one.
    let older = vec![
        artifact("fleet", "f3", t3),
        artifact("manifest/c", "c2", t2),
    ];
    assert!(!f.db.publish_artifacts(older).await.unwrap());
    assert_eq!(stored_artifacts(f).await, (v3, names));
}

async fn manifest_lists_go_with_their_manifest(f: &Fixture) {
    let t = now();
    let (t1, t2) = (t, t + Duration::hours(1));
    let first = vec![
        artifact("fleet", "f1", t1),
        artifact("manifest/a", "a1", t1),
        artifact("manifest-lists/a", "la", t1),
        artifact("manifest/b", "b1", t1),
        // Lists whose manifest is not there are not kept.
        artifact("manifest-lists/x", "lx", t1),
    ];
    assert!(f.db.publish_artifacts(first).await.unwrap());
    let (v1, names) = sorted(stored_artifacts(f).await);
    assert_eq!(
        names,
        [
            "fleet=f1",
            "manifest-lists/a=la",
            "manifest/a=a1",
            "manifest/b=b1"
        ]
    );
    // A new leader still loading its manifests removes no lists either.
    assert!(!f
        .db
        .publish_artifacts(vec![artifact("fleet", "f1", t1)])
        .await
        .unwrap());
    assert_eq!(stored_artifacts(f).await.0, v1);
    // A newer fleet: the old rollouts go with their lists, the new ones come with theirs.
    let newer = vec![
        artifact("fleet", "f2", t2),
        artifact("manifest/c", "c2", t2),
        artifact("manifest-lists/c", "lc", t2),
    ];
    assert!(f.db.publish_artifacts(newer).await.unwrap());
    let (_, names) = sorted(stored_artifacts(f).await);
    assert_eq!(names, ["fleet=f2", "manifest-lists/c=lc", "manifest/c=c2"]);
}

/// Stored names in byte order (a PostgreSQL collation may order `-` and `/` otherwise).
fn sorted((version, mut names): (i64, Vec<String>)) -> (i64, Vec<String>) {
    names.sort();
    (version, names)
}

async fn token_nonce_is_claimed_once(f: &Fixture) {
    let t = now();
    let expires = t + Duration::hours(1);
    assert!(f
        .db
        .claim_token_nonce("n1".into(), "web-01".into(), expires, t)
        .await
        .unwrap());
    assert!(!f
        .db
        .claim_token_nonce("n1".into(), "web-01".into(), expires, t)
        .await
        .unwrap());
    assert!(f
        .db
        .claim_token_nonce("n2".into(), "web-01".into(), expires, t)
        .await
        .unwrap());
}

fn revocation(host: &str, at: OffsetDateTime) -> Revocation {
    Revocation {
        hostname: host.into(),
        not_before: at,
        reason: Some("lost".into()),
        revoked_by: None,
    }
}

async fn revocations_become_exactly_the_newest_list(f: &Fixture) {
    let t = now();
    let (list, signed_at) = f.db.revocations().await.unwrap();
    assert!(list.is_empty() && signed_at.is_none());
    let n =
        f.db.replace_revocations(
            vec![revocation("a", t), revocation("b", t)],
            t,
            "one".into(),
            t,
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let later = t + Duration::minutes(1);
    let n =
        f.db.replace_revocations(vec![revocation("b", t)], later, "two".into(), later)
            .await
            .unwrap();
    assert_eq!(n, 1, "removals are applied");
    // A replica still applying the older list must not undo the newer one.
    let n =
        f.db.replace_revocations(
            vec![revocation("a", t), revocation("b", t)],
            t,
            "one".into(),
            later,
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let (list, signed_at) = f.db.revocations().await.unwrap();
    assert_eq!(list, vec![revocation("b", t)]);
    assert_eq!(signed_at, Some(later));
}

fn rollout(channel: &str, t: OffsetDateTime) -> RolloutRecord {
    RolloutRecord {
        channel: channel.into(),
        state: RolloutState::Converged,
        opened_at: t,
        since: t,
        hosts: Default::default(),
    }
}

fn host_record(state: HostState, t: OffsetDateTime) -> HostRecord {
    HostRecord {
        state,
        since: t,
        dispatched_at: Some(t),
        confirmed_at: None,
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

fn event(rollout: &str, host: Option<&str>, kind: &str, t: OffsetDateTime) -> Event {
    Event {
        rollout_id: rollout.into(),
        hostname: host.map(Into::into),
        kind: kind.into(),
        reason: format!("{{\"action\":\"{kind}\"}}"),
        at: t,
    }
}

async fn tick_writes_round_trip(f: &Fixture) {
    let t = now();
    assert!(f.db.load_stored().await.unwrap().rollouts.is_empty());
    let writes = TickWrites {
        rollouts: vec![("r1".into(), "stable".into(), json(&rollout("stable", t)))],
        hosts: vec![
            (
                "r1".into(),
                "web-01".into(),
                json(&host_record(HostState::Dispatched, t)),
            ),
            (
                "r1".into(),
                "web-02".into(),
                json(&host_record(HostState::Dispatched, t)),
            ),
        ],
        events: vec![
            event("r1", Some("web-01"), "dispatch", t),
            event("r1", Some("web-02"), "dispatch", t),
            event("r1", None, "converge", t),
        ],
        ..Default::default()
    };
    lead(f).await;
    f.db.write_tick(writes, t).await.unwrap();
    let writes = TickWrites {
        hosts: vec![(
            "r1".into(),
            "web-01".into(),
            json(&host_record(HostState::Soaked, t)),
        )],
        removed_hosts: vec![("r1".into(), "web-02".into())],
        events: vec![event("r1", Some("web-01"), "soak", t)],
        ..Default::default()
    };
    f.db.write_tick(writes, t).await.unwrap();

    let stored = f.db.load_stored().await.unwrap();
    let r1 = &stored.rollouts["r1"];
    assert_eq!(r1.channel, "stable");
    assert_eq!(r1.hosts.len(), 1);
    assert_eq!(r1.hosts["web-01"].state, HostState::Soaked);
    assert_eq!(
        f.db.host_record("r1".into(), "web-01".into())
            .await
            .unwrap()
            .map(|h| h.state),
        Some(HostState::Soaked)
    );
    assert!(f
        .db
        .host_record("r1".into(), "web-02".into())
        .await
        .unwrap()
        .is_none());
    let trail: Vec<String> =
        f.db.rollout_events("r1".into(), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| format!("{}:{}", e.kind, e.hostname.unwrap_or_default()))
            .collect();
    assert_eq!(
        trail,
        [
            "dispatch:web-01",
            "dispatch:web-02",
            "converge:",
            "soak:web-01"
        ]
    );
    let newest_first: Vec<String> =
        f.db.host_events("web-01".into(), 1)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
    assert_eq!(newest_first, ["soak"]);
}

async fn lead(f: &Fixture) {
    assert!(
        f.db.lead().await.unwrap(),
        "a lone store takes the leadership"
    );
}

async fn published_tick_versions(f: &Fixture) {
    let t = now();
    assert!(f.db.leader_info().await.unwrap().is_none());
    lead(f).await;
    f.db.write_tick(TickWrites::default(), t).await.unwrap();
    let first = f.db.leader_info().await.unwrap().unwrap();
    assert_eq!(first.last_tick_at, Some(t));
    // A tick that changed nothing is published (liveness) without a new state version.
    let later = t + Duration::seconds(5);
    f.db.write_tick(TickWrites::default(), later).await.unwrap();
    let second = f.db.leader_info().await.unwrap().unwrap();
    assert_eq!(second.state_version, first.state_version);
    assert_eq!(second.last_tick_at, Some(later));
    let writes = TickWrites {
        rollouts: vec![("r1".into(), "stable".into(), json(&rollout("stable", t)))],
        reasons: Some("{\"hosts\":{\"web-01\":\"waiting\"},\"channels\":{}}".into()),
        ..Default::default()
    };
    f.db.write_tick(writes, later).await.unwrap();
    let third = f.db.leader_info().await.unwrap().unwrap();
    assert_eq!(third.state_version, first.state_version + 1);
    assert_eq!(third.reasons_version, first.reasons_version + 1);
    assert_eq!(
        f.db.load_reasons().await.unwrap().as_deref(),
        Some("{\"hosts\":{\"web-01\":\"waiting\"},\"channels\":{}}")
    );
    // Reasons are kept when a tick does not change them.
    f.db.write_tick(TickWrites::default(), later).await.unwrap();
    assert!(f.db.load_reasons().await.unwrap().is_some());
}

async fn dispatch_events_are_recorded_once(f: &Fixture) {
    let t = now();
    let record = |event: &'static str| {
        f.db.record_dispatch_event(
            "web-01".into(),
            "r1".into(),
            "/nix/store/a".into(),
            event,
            t,
        )
    };
    assert!(record("delivered").await.unwrap());
    assert!(
        !record("delivered").await.unwrap(),
        "a second delivery is not recorded"
    );
    assert!(record("confirmed").await.unwrap());
    assert!(
        !record("confirmed").await.unwrap(),
        "a retried confirm is not recorded twice"
    );
    assert!(f
        .db
        .record_dispatch_event(
            "web-01".into(),
            "r2".into(),
            "/nix/store/b".into(),
            "delivered",
            t
        )
        .await
        .unwrap());
}

async fn reports_are_stored_once(f: &Fixture) {
    let t = now();
    let report = |id: &str| {
        f.db.record_report(
            "web-01".into(),
            id.into(),
            "activation-failed".into(),
            Some("r1".into()),
            "{}".into(),
            t,
            3,
        )
    };
    let first = report("rep-1").await.unwrap();
    assert_eq!(report("rep-1").await.unwrap(), first);
    assert_ne!(report("rep-2").await.unwrap(), first);
    // Only the host's 3 newest reports are kept: a flood cannot grow the database.
    let mut ids = Vec::new();
    for i in 3..=10 {
        ids.push(report(&format!("rep-{i}")).await.unwrap());
    }
    // The newest are still there (a resend gets the same event)...
    assert_eq!(report("rep-10").await.unwrap(), ids[7]);
    assert_eq!(report("rep-8").await.unwrap(), ids[5]);
    // ...while an old one was pruned: sent again, it is stored anew.
    assert_ne!(report("rep-1").await.unwrap(), first);
}

fn attestation(t: OffsetDateTime, closure: &str) -> Attestation {
    Attestation {
        last_seen: t,
        current_closure: Some(closure.into()),
        last_confirmed_at: None,
        failed_targets: Vec::new(),
        failed_units: 0,
        health_at: Some(t),
        delivered: None,
        activation: None,
        compliance: None,
        compliance_claimed_at: None,
    }
}

async fn stored_attestation(db: &Db, host: &str) -> Attestation {
    db.attestations_since(0)
        .await
        .unwrap()
        .rows
        .into_iter()
        .find(|(h, _)| h == host)
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("no attestation for {host}"))
}

async fn concurrent_saves_all_land_and_merge(f: &Fixture) {
    // Many check-ins at once, several of them about one host (as replicas batch them).
    let t = now();
    let saves: Vec<_> = (0..200i64)
        .map(|i| {
            let db = f.db.clone();
            let host = if i % 4 == 0 {
                "busy".to_owned()
            } else {
                format!("host-{i}")
            };
            let seen = t + Duration::seconds(i);
            tokio::spawn(async move {
                db.save_attestations(vec![(host, attestation(seen, "/nix/store/x"))])
                    .await
            })
        })
        .collect();
    for save in saves {
        save.await.unwrap().unwrap();
    }
    let page = f.db.attestations_since(0).await.unwrap();
    assert_eq!(page.rows.len(), 151, "150 distinct hosts and the busy one");
    assert_eq!(
        stored_attestation(f.db.as_ref(), "busy").await.last_seen,
        t + Duration::seconds(196),
        "the newest of the busy host's check-ins wins"
    );
}

async fn attestations_merge_forward_only(f: &Fixture) {
    let t = now();
    let newer = t + Duration::seconds(10);
    let mut fresh = attestation(newer, "/nix/store/new");
    fresh.delivered = Some(Delivery {
        rollout_id: "r1".into(),
        at: newer,
    });
    f.db.save_attestations(vec![("web-01".into(), fresh.clone())])
        .await
        .unwrap();
    // A replica that had not seen the newer check-in writes an older view of the host.
    let mut stale = attestation(t, "/nix/store/old");
    stale.last_confirmed_at = Some(t);
    f.db.save_attestations(vec![("web-01".into(), stale)])
        .await
        .unwrap();
    let stored = stored_attestation(f.db.as_ref(), "web-01").await;
    assert_eq!(stored.current_closure.as_deref(), Some("/nix/store/new"));
    assert_eq!(stored.last_seen, newer, "last_seen never moves back");
    assert_eq!(stored.last_confirmed_at, Some(t), "a confirm is never lost");
    assert_eq!(
        stored.delivered, fresh.delivered,
        "a delivery is never lost"
    );

    f.db.touch_attestations(vec![("web-01".into(), newer + Duration::seconds(30))])
        .await
        .unwrap();
    f.db.touch_attestations(vec![("web-01".into(), t)])
        .await
        .unwrap();
    let stored = stored_attestation(f.db.as_ref(), "web-01").await;
    assert_eq!(stored.last_seen, newer + Duration::seconds(30));
    assert_eq!(stored.current_closure.as_deref(), Some("/nix/store/new"));
}

async fn attestations_since_a_cursor(f: &Fixture) {
    let t = now();
    f.db.save_attestations(vec![("web-01".into(), attestation(t, "/nix/store/a"))])
        .await
        .unwrap();
    let page = f.db.attestations_since(0).await.unwrap();
    assert_eq!(page.rows.len(), 1);
    // The cursor looks back a little (late commits); far past it nothing is returned.
    let far_ahead = page.next + 2 * super::ATTESTATION_OVERLAP_US;
    assert!(f
        .db
        .attestations_since(far_ahead)
        .await
        .unwrap()
        .rows
        .is_empty());
    f.db.save_attestations(vec![("web-02".into(), attestation(t, "/nix/store/b"))])
        .await
        .unwrap();
    let hosts: Vec<String> =
        f.db.attestations_since(page.next)
            .await
            .unwrap()
            .rows
            .into_iter()
            .map(|(h, _)| h)
            .collect();
    assert!(hosts.contains(&"web-02".to_owned()), "{hosts:?}");
}

async fn the_leader_writes_ticks(f: &Fixture) {
    let t = now();
    lead(f).await;
    assert!(
        f.db.lead().await.unwrap(),
        "the leader keeps its leadership"
    );
    f.db.write_tick(TickWrites::default(), t).await.unwrap();
    if let Backing::Postgres(_) = f.backing {
        let other = f.other_replica().await;
        assert!(!other.lead().await.unwrap(), "one leader at a time");
        assert!(matches!(
            other.write_tick(TickWrites::default(), t).await,
            Err(DbError::NotLeader)
        ));
        // The leader shuts down, releasing the leadership as it closes: the other takes over.
        f.db.close().await.unwrap();
        assert!(other.lead().await.unwrap());
        other.write_tick(TickWrites::default(), t).await.unwrap();
        assert_eq!(
            other
                .leader_info()
                .await
                .unwrap()
                .map(|i| i.replica)
                .as_deref(),
            Some("replica-b")
        );
        other.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_claim_a_nonce_once_between_them() {
    let f = Fixture::postgres().await;
    let other = f.other_replica().await;
    let t = now();
    let expires = t + Duration::hours(1);
    let mut claims = Vec::new();
    for i in 0..20 {
        let db = if i % 2 == 0 {
            f.db.clone()
        } else {
            other.clone()
        };
        claims.push(tokio::spawn(async move {
            db.claim_token_nonce("shared".into(), "web-01".into(), expires, t)
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for c in claims {
        won += usize::from(c.await.unwrap());
    }
    assert_eq!(won, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_backends_refuse_foreign_and_newer_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE stuff (x)")
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&foreign),
        Err(DbError::Foreign { .. })
    ));
    let newer = dir.path().join("newer.db");
    rusqlite::Connection::open(&newer)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        SqliteStore::open(&newer),
        Err(DbError::TooNew { found: 99, .. })
    ));

    let test_db = TestDb::create("nixfleet_foreign");
    test_db.query("CREATE TABLE stuff (x int)");
    assert!(matches!(
        PgStore::open(pg(&test_db.url, "a", 2)).await,
        Err(DbError::Foreign { .. })
    ));
    test_db.recreate();
    PgStore::open(pg(&test_db.url, "a", 2))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    test_db.query("UPDATE nixfleet_schema SET version = 99");
    assert!(matches!(
        PgStore::open(pg(&test_db.url, "a", 2)).await,
        Err(DbError::TooNew { found: 99, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrate_one_database_together() {
    let test_db = TestDb::create("nixfleet_migrate");
    let opens: Vec<_> = (0..3)
        .map(|i| {
            let url = test_db.url.clone();
            tokio::spawn(async move { PgStore::open(pg(&url, &format!("r{i}"), 2)).await })
        })
        .collect();
    for open in opens {
        open.await.unwrap().unwrap().close().await.unwrap();
    }
    assert_eq!(
        test_db.query("SELECT version FROM nixfleet_schema"),
        vec![vec!["3".to_owned()]]
    );
    // A database of the first schema is brought forward when a newer replica opens it.
    test_db.query(
        "DROP TABLE signed_artifacts, signed_artifacts_version; DROP INDEX host_reports_kind;
         ALTER TABLE host_attestations DROP COLUMN compliance, DROP COLUMN compliance_us;
         UPDATE nixfleet_schema SET version = 1",
    );
    let store = PgStore::open(pg(&test_db.url, "r3", 2)).await.unwrap();
    assert_eq!(store.artifacts_version().await.unwrap(), 0);
    store.close().await.unwrap();
    assert_eq!(
        test_db.query("SELECT version FROM nixfleet_schema"),
        vec![vec!["3".to_owned()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_password_can_come_apart_from_the_url() {
    let test_db = TestDb::create("nixfleet_password");
    // The test role's URL carries user:password@; the same without the password.
    let (scheme, rest) = test_db.url.split_once("://").unwrap();
    let (credentials, host) = rest.split_once('@').unwrap();
    let (user, password) = credentials.split_once(':').unwrap();
    let bare = format!("{scheme}://{user}@{host}");
    PgStore::open(PgOptions {
        password: Some(password.to_owned()),
        ..pg(&bare, "a", 2)
    })
    .await
    .unwrap()
    .close()
    .await
    .unwrap();
    let Err(e) = PgStore::open(PgOptions {
        password: Some("wrong".into()),
        ..pg(&bare, "a", 2)
    })
    .await
    else {
        panic!("a wrong password was accepted");
    };
    assert!(matches!(e, DbError::Open { .. }), "{e}");
    assert!(e.to_string().contains("password"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_is_verified_against_the_given_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = nixfleet_harness::Pki::new(&tmp.path().join("pki"));
    let server = nixfleet_harness::pg::TlsServer::start(
        &pki.read("etc/server-cert.pem"),
        &pki.read("etc/server-key.pem"),
        "nixfleet",
    );
    let url = format!("postgres://nixfleet@localhost:{}/postgres", server.port);
    let with_ca = |ca: String| PgOptions {
        ca_pem: Some(ca),
        ..pg(&url, "a", 2)
    };
    PgStore::open(with_ca(pki.read("etc/ca.pem")))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log_text()))
        .close()
        .await
        .unwrap();
    // This server refuses plain text, so what just worked was TLS.
    assert!(PgStore::open(pg(&url, "a", 2)).await.is_err());
    // A certificate from another CA is refused.
    let other = nixfleet_harness::Pki::new(&tmp.path().join("other"));
    let Err(e) = PgStore::open(with_ca(other.read("etc/ca.pem"))).await else {
        panic!("a server certificate from another CA was accepted");
    };
    assert!(e.to_string().contains("certificate"), "{e}");
    // sslmode=require without a CA is refused before connecting, saying what is missing.
    let Err(e) = PgStore::open(pg(&format!("{url}?sslmode=require"), "a", 2)).await else {
        panic!("sslmode=require without a CA was accepted");
    };
    assert!(e.to_string().contains("--database-ca-file"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leadership_session_asks_the_server_to_drop_it_soon_after_it_goes_silent() {
    let test_db = TestDb::create("nixfleet_keepalive");
    let store = PgStore::open(pg(&test_db.url, "replica-a", 2))
        .await
        .unwrap();
    assert!(store.lead().await.unwrap());
    // Server defaults (two hours of silence before the first probe) would leave a leader
    // behind a network cut holding the lock for that long.
    for (name, want) in [
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "10000"),
    ] {
        assert_eq!(
            store.lease_setting(name).await.as_deref(),
            Some(want),
            "{name} on the leadership session"
        );
    }
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_session_is_ended_cannot_write_and_another_takes_over() {
    let f = Fixture::postgres().await;
    let Backing::Postgres(test_db) = &f.backing else {
        unreachable!()
    };
    let other = f.other_replica().await;
    assert!(f.db.lead().await.unwrap());
    assert!(!other.lead().await.unwrap());
    // The server ends the leader's sessions (an administrator, or its TCP keep-alives
    // giving up on a leader behind a network cut).
    test_db.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'nixfleet-control-plane replica-a'",
    );
    assert!(
        f.db.write_tick(TickWrites::default(), now()).await.is_err(),
        "a leader that lost its session wrote a tick"
    );
    let start = std::time::Instant::now();
    while !other.lead().await.unwrap() {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    other
        .write_tick(TickWrites::default(), now())
        .await
        .unwrap();
    assert!(
        !f.db.lead().await.unwrap(),
        "the old leader took the lock back"
    );
    assert!(matches!(
        f.db.write_tick(TickWrites::default(), now()).await,
        Err(DbError::NotLeader)
    ));
    other.close().await.unwrap();
}

/// Prints the median of three runs of `op`.
async fn timed_median<T, F: std::future::Future<Output = T>>(
    what: &str,
    mut op: impl FnMut() -> F,
) {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        op().await;
        runs.push(start.elapsed());
    }
    runs.sort();
    eprintln!("| {what} | {:.1} ms |", runs[1].as_secs_f64() * 1e3);
}

/// What a replica's database work costs at 100,000 hosts (PostgreSQL): the leader's
/// writes, and what every follower reads each second. Run it in release mode:
/// `cargo test --release -p nixfleet-control-plane --bin nixfleet-control-plane
/// replica_sync_at_100k_hosts -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; see docs/benchmarks.md"]
async fn replica_sync_at_100k_hosts() {
    const HOSTS: usize = 100_000;
    let f = Fixture::postgres().await;
    let t = now();
    lead(&f).await;
    let name = |i: usize| format!("host-{i:06}");
    let writes = TickWrites {
        rollouts: (0..10)
            .map(|i| {
                (
                    format!("r{i}"),
                    format!("ch-{i}"),
                    json(&rollout("stable", t)),
                )
            })
            .collect(),
        hosts: (0..HOSTS)
            .map(|i| {
                (
                    format!("r{}", i % 10),
                    name(i),
                    json(&host_record(HostState::Healthy, t)),
                )
            })
            .collect(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    f.db.write_tick(writes, t).await.unwrap();
    eprintln!(
        "| leader: a tick writing every host's record (once) | {:.1} ms |",
        start.elapsed().as_secs_f64() * 1e3
    );
    timed_median(
        "follower: reload the rollout state (on every state change)",
        || async {
            assert_eq!(f.db.load_stored().await.unwrap().rollouts.len(), 10);
        },
    )
    .await;
    let closure = "0123456789abcdfghijklmnpqrsvwxyz-nixos-system";
    let rows: Vec<(String, Attestation)> = (0..HOSTS)
        .map(|i| (name(i), attestation(t, closure)))
        .collect();
    let start = std::time::Instant::now();
    for chunk in rows.chunks(5_000) {
        f.db.save_attestations(chunk.to_vec()).await.unwrap();
    }
    eprintln!(
        "| every host's attestation saved, 5,000 a statement (once) | {:.1} ms |",
        start.elapsed().as_secs_f64() * 1e3
    );
    timed_median(
        "any replica: re-read every attestation (every 60 s)",
        || async {
            assert_eq!(f.db.attestations_since(0).await.unwrap().rows.len(), HOSTS);
        },
    )
    .await;
    // Steady state at a 60 s interval: about 1,700 check-ins a second across the
    // replicas, and each replica re-reads the last 10 s of them.
    let touched = |at: OffsetDateTime, offset: usize| -> Vec<(String, OffsetDateTime)> {
        (0..1_700).map(|i| (name(i * 50 + offset), at)).collect()
    };
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let cursor = f.db.attestations_since(0).await.unwrap().next;
    let mut offset = 0;
    for _ in 0..10 {
        f.db.touch_attestations(touched(OffsetDateTime::now_utc(), offset))
            .await
            .unwrap();
        offset += 1;
    }
    timed_median(
        "any replica: push 1,700 check-ins' last_seen (every second)",
        || {
            offset += 1;
            let rows = touched(OffsetDateTime::now_utc(), offset);
            async { f.db.touch_attestations(rows).await.unwrap() }
        },
    )
    .await;
    timed_median(
        "any replica: read the attestations changed in the last 10 s (every second)",
        || async {
            assert!(f.db.attestations_since(cursor).await.unwrap().rows.len() >= 17_000);
        },
    )
    .await;
    let reasons: std::collections::BTreeMap<String, String> = (0..HOSTS)
        .map(|i| (name(i), "waiting: wave 2 not reached".to_owned()))
        .collect();
    let text = serde_json::to_string(&reasons).unwrap();
    timed_median(
        "leader: publish every host's waiting reason (when they change)",
        || {
            let writes = TickWrites {
                reasons: Some(text.clone()),
                ..Default::default()
            };
            async { f.db.write_tick(writes, t).await.unwrap() }
        },
    )
    .await;
    timed_median(
        "follower: load and parse them (when they change)",
        || async {
            let text = f.db.load_reasons().await.unwrap().unwrap();
            let parsed: std::collections::BTreeMap<String, String> =
                serde_json::from_str(&text).unwrap();
            assert_eq!(parsed.len(), HOSTS);
        },
    )
    .await;
}

async fn latest_evidence_per_host_is_kept(f: &Fixture) {
    let t = now();
    let store = |host: &str, id: &str, kind: &str, keep: usize| {
        f.db.record_report(
            host.into(),
            id.into(),
            kind.into(),
            None,
            format!("body of {id}"),
            t,
            keep,
        )
    };
    let pruned = store("web-01", "ev-1", super::EVIDENCE_KIND, 3)
        .await
        .unwrap();
    let kept = store("web-01", "ev-2", super::EVIDENCE_KIND, 3)
        .await
        .unwrap();
    store("web-02", "ev-a", super::EVIDENCE_KIND, 3)
        .await
        .unwrap();
    // A flood of other reports prunes older evidence, never the newest.
    for i in 0..5 {
        store("web-01", &format!("rep-{i}"), "rolled-back", 3)
            .await
            .unwrap();
    }
    let all =
        f.db.latest_reports(super::EVIDENCE_KIND.into(), None)
            .await
            .unwrap();
    assert_eq!(
        all,
        vec![
            ("web-01".into(), "ev-2".into(), "body of ev-2".into()),
            ("web-02".into(), "ev-a".into(), "body of ev-a".into()),
        ]
    );
    let one =
        f.db.latest_reports(super::EVIDENCE_KIND.into(), Some("web-02".into()))
            .await
            .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1, "ev-a");
    assert!(f
        .db
        .latest_reports(super::EVIDENCE_KIND.into(), Some("db-01".into()))
        .await
        .unwrap()
        .is_empty());
    // The newest evidence was kept through the flood (a resend finds it); the older was
    // pruned (sent again, it is stored anew).
    assert_eq!(
        store("web-01", "ev-2", super::EVIDENCE_KIND, 3)
            .await
            .unwrap(),
        kept
    );
    assert_ne!(
        store("web-01", "ev-1", super::EVIDENCE_KIND, 3)
            .await
            .unwrap(),
        pruned
    );
}

fn summary(id: &str, at: OffsetDateTime) -> nixfleet_proto::compliance::ComplianceSummary {
    use nixfleet_proto::compliance::{ComplianceMode, ComplianceSummary, EvidenceTrigger};
    ComplianceSummary {
        evidence_id: id.into(),
        rollout_id: None,
        closure_hash: "c".into(),
        mode: ComplianceMode::Enforce,
        trigger: EvidenceTrigger::Drift,
        collected_at: at,
        passed: 1,
        failing: Vec::new(),
    }
}

async fn compliance_survives_a_later_check_in(f: &Fixture) {
    let t = now();
    let mut with_evidence = attestation(t, "/nix/store/a");
    with_evidence.compliance = Some(summary("ev-1", t));
    f.db.save_attestations(vec![("web-01".into(), with_evidence)])
        .await
        .unwrap();
    // A later check-in written by a replica that never saw the evidence.
    let later = attestation(t + Duration::seconds(30), "/nix/store/a");
    f.db.save_attestations(vec![("web-01".into(), later)])
        .await
        .unwrap();
    let stored = stored_attestation(f.db.as_ref(), "web-01").await;
    assert_eq!(stored.last_seen, t + Duration::seconds(30));
    assert_eq!(
        stored.compliance.map(|c| c.evidence_id).as_deref(),
        Some("ev-1"),
        "a check-in does not erase stored evidence"
    );
    // Older evidence does not replace newer; newer does.
    let mut older = attestation(t, "/nix/store/a");
    older.compliance = Some(summary("ev-0", t - Duration::seconds(60)));
    f.db.save_attestations(vec![("web-01".into(), older)])
        .await
        .unwrap();
    let stored = stored_attestation(f.db.as_ref(), "web-01").await;
    assert_eq!(stored.compliance.unwrap().evidence_id, "ev-1");
    let mut newer = attestation(t, "/nix/store/a");
    newer.compliance = Some(summary("ev-2", t + Duration::seconds(60)));
    f.db.save_attestations(vec![("web-01".into(), newer)])
        .await
        .unwrap();
    let stored = stored_attestation(f.db.as_ref(), "web-01").await;
    assert_eq!(stored.compliance.unwrap().evidence_id, "ev-2");
    assert_eq!(
        stored.current_closure.as_deref(),
        Some("/nix/store/a"),
        "the observation stays the newer check-in's"
    );
}
