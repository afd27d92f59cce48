//! PostgreSQL state, shared by N control-plane replicas. Leadership is a session-level
//! advisory lock held on one dedicated connection, and the leader's writes of rollout
//! state go through that same session: a replica that lost the lock cannot write.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use nixfleet_proto::Revocation;
use nixfleet_reconciler::{Attestation, HostRecord, RolloutRecord, StoredState};
use time::OffsetDateTime;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    decode_json, plan_artifacts, AttestationPage, AttestationRow, DbError, Event, EventsOf, Fut,
    LeaderInfo, PgOptions, SignedArtifact, Store, TickWrites, ATTESTATION_OVERLAP_US,
    EVIDENCE_KIND,
};
use crate::clock::{from_micros, micros, rfc3339 as ts};

/// Advisory lock keys (per database): the leadership, and schema migration.
const LEADER_KEY: i64 = 0x6e69_7866_6c65_6574; // "nixfleet"
const MIGRATE_KEY: i64 = LEADER_KEY + 1;

/// Every statement gets this long; a database slower than that is treated as down.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// A tick's write can be large (a new rollout over the whole fleet).
const TICK_TIMEOUT: Duration = Duration::from_secs(30);

const SERVER_NOW_US: &str = "(extract(epoch from clock_timestamp()) * 1000000)::bigint";

/// Migrations, applied in order; `nixfleet_schema.version` is the number applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE cert_revocations (
    hostname    TEXT PRIMARY KEY,
    not_before  TEXT NOT NULL,
    reason      TEXT,
    revoked_by  TEXT
);
CREATE TABLE revocations_applied (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    signed_at   TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    applied_at  TEXT NOT NULL
);
CREATE TABLE rollouts (
    rollout_id  TEXT PRIMARY KEY,
    channel     TEXT NOT NULL,
    record      TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE host_rollout_state (
    rollout_id  TEXT NOT NULL,
    hostname    TEXT NOT NULL,
    record      TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (rollout_id, hostname)
);
CREATE TABLE dispatch_history (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname        TEXT NOT NULL,
    rollout_id      TEXT NOT NULL,
    closure_hash    TEXT NOT NULL,
    event           TEXT NOT NULL,
    at              TEXT NOT NULL
);
CREATE UNIQUE INDEX dispatch_history_once ON dispatch_history (hostname, rollout_id, event);
CREATE TABLE token_replay (
    nonce       TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    used_at     TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE TABLE host_reports (
    event_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname    TEXT NOT NULL,
    report_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    rollout_id  TEXT,
    body        TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (hostname, report_id)
);
CREATE TABLE rollout_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id  TEXT NOT NULL,
    hostname    TEXT,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE INDEX rollout_events_host ON rollout_events (hostname, id);
CREATE TABLE host_attestations (
    hostname          TEXT PRIMARY KEY,
    body              TEXT NOT NULL,
    observed_us       BIGINT NOT NULL,
    last_seen_us      BIGINT NOT NULL,
    confirmed_us      BIGINT NOT NULL,
    delivered_rollout TEXT,
    delivered_us      BIGINT NOT NULL,
    updated_us        BIGINT NOT NULL
);
CREATE INDEX host_attestations_updated ON host_attestations (updated_us);
CREATE TABLE cp_leader (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    replica         TEXT NOT NULL,
    state_version   BIGINT NOT NULL,
    reasons_version BIGINT NOT NULL,
    reasons         TEXT,
    last_tick_at    TEXT
);
"#,
    r#"
CREATE TABLE signed_artifacts (
    name         TEXT PRIMARY KEY,
    body         BYTEA NOT NULL,
    signature    BYTEA NOT NULL,
    sha256       TEXT NOT NULL,
    signed_at_us BIGINT NOT NULL
);
CREATE TABLE signed_artifacts_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO signed_artifacts_version VALUES (1, 0);
"#,
    r#"
ALTER TABLE host_attestations ADD COLUMN compliance TEXT;
ALTER TABLE host_attestations ADD COLUMN compliance_us BIGINT NOT NULL DEFAULT 0;
CREATE INDEX host_reports_kind ON host_reports (hostname, kind, event_id);
"#,
];

/// The dedicated leadership session.
struct Lease {
    client: Client,
    held: bool,
}

/// How connections to the server are made.
enum Tls {
    Plain,
    /// TLS, the server's certificate verified against the configured CA.
    Verified(MakeRustlsConnect),
}

/// Server-side keep-alives for the leadership session: silent for 5 s, then 3 probes 2 s
/// apart, and at most 10 s of unacknowledged data.
const LEASE_KEEPALIVES: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000";

pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: Tls,
    /// Where the database is, for messages (no password).
    target: String,
    replica: String,
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// Check-ins' attestations, written in batches: one transaction for all the requests
    /// waiting at that moment, rather than one each.
    attestations: tokio::sync::mpsc::UnboundedSender<AttestationWrite>,
}

/// Rows to save, and who waits for them to be durable.
type AttestationWrite = (
    Vec<(String, Attestation)>,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// At most this many rows go into one batch.
const ATTESTATION_BATCH: usize = 5_000;

/// Saves queued attestations until every sender is gone. A batch holds whatever was
/// queued when the previous one finished; every waiter hears the batch's outcome.
async fn attestation_writer(
    pool: Pool,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<AttestationWrite>,
) {
    while let Some(first) = queue.recv().await {
        let mut rows = first.0;
        let mut waiters = vec![first.1];
        while rows.len() < ATTESTATION_BATCH {
            match queue.try_recv() {
                Ok((more, waiter)) => {
                    rows.extend(more);
                    waiters.push(waiter);
                }
                Err(_) => break,
            }
        }
        let outcome = save_attestation_rows(&pool, rows)
            .await
            .map_err(|e| e.to_string());
        for waiter in waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// One upsert per round of distinct hosts (a statement may touch a row only once).
async fn save_attestation_rows(
    pool: &Pool,
    rows: Vec<(String, Attestation)>,
) -> Result<(), DbError> {
    // The hosts in a round, and its rows.
    type Round = (
        std::collections::HashSet<String>,
        Vec<(String, Attestation)>,
    );
    let mut rounds: Vec<Round> = Vec::new();
    for row in rows {
        match rounds.iter_mut().find(|(hosts, _)| !hosts.contains(&row.0)) {
            Some((hosts, round)) => {
                hosts.insert(row.0.clone());
                round.push(row);
            }
            None => rounds.push((std::collections::HashSet::from([row.0.clone()]), vec![row])),
        }
    }
    let rounds = rounds.into_iter().map(|(_, round)| round);
    let client = timed(OP_TIMEOUT, pool.get()).await?;
    for round in rounds {
        let mut hosts = Vec::with_capacity(round.len());
        let mut bodies = Vec::with_capacity(round.len());
        let mut observed = Vec::with_capacity(round.len());
        let mut seen = Vec::with_capacity(round.len());
        let mut confirmed = Vec::with_capacity(round.len());
        let mut d_rollout = Vec::with_capacity(round.len());
        let mut d_us = Vec::with_capacity(round.len());
        let mut compliance = Vec::with_capacity(round.len());
        let mut compliance_us = Vec::with_capacity(round.len());
        for (host, a) in &round {
            let row = AttestationRow::of(a);
            hosts.push(host.as_str());
            bodies.push(row.body);
            observed.push(row.observed_us);
            seen.push(row.last_seen_us);
            confirmed.push(row.confirmed_us);
            d_rollout.push(row.delivered_rollout);
            d_us.push(row.delivered_us);
            compliance.push(row.compliance);
            compliance_us.push(row.compliance_us);
        }
        timed(
            OP_TIMEOUT,
            client.execute(
                &format!(
                    "INSERT INTO host_attestations AS h (hostname, body, observed_us, last_seen_us, confirmed_us, delivered_rollout, delivered_us, compliance, compliance_us, updated_us)
                     SELECT v.*, {SERVER_NOW_US} FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], $7::int8[], $8::text[], $9::int8[]) AS v
                     ON CONFLICT (hostname) DO UPDATE SET
                       body = CASE WHEN excluded.observed_us >= h.observed_us THEN excluded.body ELSE h.body END,
                       observed_us = GREATEST(h.observed_us, excluded.observed_us),
                       last_seen_us = GREATEST(h.last_seen_us, excluded.last_seen_us),
                       confirmed_us = GREATEST(h.confirmed_us, excluded.confirmed_us),
                       delivered_rollout = CASE WHEN excluded.delivered_us > h.delivered_us THEN excluded.delivered_rollout ELSE h.delivered_rollout END,
                       delivered_us = GREATEST(h.delivered_us, excluded.delivered_us),
                       compliance = CASE WHEN excluded.compliance_us > h.compliance_us THEN excluded.compliance ELSE h.compliance END,
                       compliance_us = GREATEST(h.compliance_us, excluded.compliance_us),
                       updated_us = excluded.updated_us"
                ),
                &[&hosts, &bodies, &observed, &seen, &confirmed, &d_rollout, &d_us, &compliance, &compliance_us],
            ),
        )
        .await?;
    }
    Ok(())
}

async fn timed<T, E: Into<DbError>>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, DbError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(DbError::Timeout(limit)),
    }
}

fn parse_ts(s: &str) -> Result<OffsetDateTime, DbError> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| DbError::Corrupt(format!("timestamp {s:?}: {e}")))
}

fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "postgres://{}:{}/{}",
        hosts.join(","),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or("")
    )
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            deadpool_postgres::PoolError::Timeout(_) => DbError::Timeout(OP_TIMEOUT),
            other => DbError::Postgres(format!("PostgreSQL connection pool: {other}")),
        }
    }
}

impl PgStore {
    /// Connects, migrating the schema; `password` overrides the URL's.
    /// Connects, migrating the schema.
    pub async fn open(options: PgOptions<'_>) -> Result<PgStore, DbError> {
        let bad = |message: String| DbError::Open {
            path: "--database-url".into(),
            message,
        };
        let mut config: tokio_postgres::Config = options.url.parse().map_err(|e| {
            bad(format!(
                "not a PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"
            ))
        })?;
        if let Some(password) = options.password {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(OP_TIMEOUT);
        }
        config.application_name(format!("nixfleet-control-plane {}", options.replica));
        config.keepalives_idle(Duration::from_secs(10));
        let target = describe(&config);
        let tls = match (options.ca_pem, config.get_ssl_mode()) {
            (Some(ca_pem), _) => {
                // A CA given means TLS, verified against it, and nothing else.
                config.ssl_mode(SslMode::Require);
                let tls = nixfleet_pki::client_tls_config(&ca_pem, None)
                    .map_err(|e| bad(format!("--database-ca-file: {e}")))?;
                Tls::Verified(MakeRustlsConnect::new(tls))
            }
            (None, SslMode::Require) => {
                return Err(bad(
                    "sslmode=require needs --database-ca-file, the CA certificate that issued the server's certificate (the connection is always verified)".into(),
                ))
            }
            // `prefer`, the default, is plain text here: nothing unverified is called TLS.
            (None, _) => {
                config.ssl_mode(SslMode::Disable);
                Tls::Plain
            }
        };
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Tls::Plain => Manager::from_config(config.clone(), NoTls, manager_config),
            Tls::Verified(connect) => {
                Manager::from_config(config.clone(), connect.clone(), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(OP_TIMEOUT))
            .recycle_timeout(Some(OP_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Open {
                path: target.clone(),
                message: e.to_string(),
            })?;
        let (attestations, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(attestation_writer(pool.clone(), queue));
        let store = PgStore {
            pool,
            config,
            tls,
            target,
            replica: options.replica.to_owned(),
            lease: tokio::sync::Mutex::new(None),
            attestations,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        timed(OP_TIMEOUT, self.pool.get()).await
    }

    /// Applies missing migrations under a lock, so replicas starting together agree.
    async fn migrate(&self) -> Result<(), DbError> {
        let open = |e: DbError| DbError::Open {
            path: self.target.clone(),
            message: e.to_string(),
        };
        let mut client = self.client().await.map_err(open)?;
        let tx = timed(OP_TIMEOUT, client.transaction()).await?;
        timed(
            OP_TIMEOUT,
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_KEY]),
        )
        .await?;
        let tables: Vec<String> = timed(
            OP_TIMEOUT,
            tx.query(
                "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1",
                &[],
            ),
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        if !tables.iter().any(|t| t == "nixfleet_schema") {
            if !tables.is_empty() {
                return Err(DbError::Foreign {
                    path: self.target.clone(),
                    tables: tables.join(", "),
                });
            }
            timed(
                OP_TIMEOUT,
                tx.batch_execute(
                    "CREATE TABLE nixfleet_schema (version BIGINT NOT NULL); INSERT INTO nixfleet_schema VALUES (0);",
                ),
            )
            .await?;
        }
        let version: i64 = timed(
            OP_TIMEOUT,
            tx.query_one("SELECT version FROM nixfleet_schema", &[]),
        )
        .await?
        .get(0);
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(DbError::TooNew {
                path: self.target.clone(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            timed(TICK_TIMEOUT, tx.batch_execute(sql)).await?;
            let applied = i as i64 + 1;
            timed(
                OP_TIMEOUT,
                tx.execute("UPDATE nixfleet_schema SET version = $1", &[&applied]),
            )
            .await?;
            tracing::info!(version = applied, database = %self.target, "database migrated");
        }
        timed(OP_TIMEOUT, tx.commit()).await?;
        Ok(())
    }

    async fn connect_lease(&self) -> Result<Client, DbError> {
        fn watch<S, T>(connection: tokio_postgres::Connection<S, T>)
        where
            S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "leadership session to PostgreSQL closed");
                }
            });
        }
        let client = match &self.tls {
            Tls::Plain => {
                let (client, connection) = timed(OP_TIMEOUT, self.config.connect(NoTls)).await?;
                watch(connection);
                client
            }
            Tls::Verified(connect) => {
                let (client, connection) =
                    timed(OP_TIMEOUT, self.config.connect(connect.clone())).await?;
                watch(connection);
                client
            }
        };
        // The lock lives as long as this session on the server. A leader that vanishes
        // without closing it (a network cut, a machine powered off) would keep it until
        // the server's own keep-alives gave up, two hours by default; these settings
        // apply to this session only and end it about 11 s after the leader goes silent.
        if let Err(e) = timed(OP_TIMEOUT, client.simple_query(LEASE_KEEPALIVES)).await {
            tracing::warn!(
                error = %e,
                "could not shorten the leadership session's TCP keep-alives; a leader cut off \
                 from PostgreSQL keeps the leadership until the server's keep-alives end its \
                 session (set tcp_keepalives_idle in postgresql.conf)"
            );
        }
        Ok(client)
    }

    /// A setting as the leadership session sees it.
    #[cfg(test)]
    pub(super) async fn lease_setting(&self, name: &str) -> Option<String> {
        let guard = self.lease.lock().await;
        let lease = guard.as_ref()?;
        let row = lease
            .client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .ok()?;
        row.get(0)
    }

    async fn write_tick_on(
        client: &mut Client,
        replica: &str,
        writes: &TickWrites,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        let now = ts(now);
        let tx = client.transaction().await?;
        // Still the holder? The session is the lock, so this only fails if it was lost
        // in a way the connection has not noticed yet.
        let held: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND ((classid::bigint << 32) | objid::bigint) = $1)",
                &[&LEADER_KEY],
            )
            .await?
            .get(0);
        if !held {
            return Err(DbError::NotLeader);
        }
        if !writes.rollouts.is_empty() {
            let (ids, channels, records) = unzip3(&writes.rollouts);
            tx.execute(
                "INSERT INTO rollouts (rollout_id, channel, record, updated_at)
                 SELECT id, channel, record, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, channel, record)
                 ON CONFLICT (rollout_id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
                &[&ids, &channels, &records, &now],
            )
            .await?;
        }
        if !writes.hosts.is_empty() {
            let (ids, hosts, records) = unzip3(&writes.hosts);
            tx.execute(
                "INSERT INTO host_rollout_state (rollout_id, hostname, record, updated_at)
                 SELECT id, host, record, $4 FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, host, record)
                 ON CONFLICT (rollout_id, hostname) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
                &[&ids, &hosts, &records, &now],
            )
            .await?;
        }
        if !writes.removed_hosts.is_empty() {
            let ids: Vec<&str> = writes.removed_hosts.iter().map(|r| r.0.as_str()).collect();
            let hosts: Vec<&str> = writes.removed_hosts.iter().map(|r| r.1.as_str()).collect();
            tx.execute(
                "DELETE FROM host_rollout_state s USING unnest($1::text[], $2::text[]) AS v(id, host)
                 WHERE s.rollout_id = v.id AND s.hostname = v.host",
                &[&ids, &hosts],
            )
            .await?;
        }
        if !writes.events.is_empty() {
            let ids: Vec<&str> = writes
                .events
                .iter()
                .map(|e| e.rollout_id.as_str())
                .collect();
            let hosts: Vec<Option<&str>> = writes
                .events
                .iter()
                .map(|e| e.hostname.as_deref())
                .collect();
            let kinds: Vec<&str> = writes.events.iter().map(|e| e.kind.as_str()).collect();
            let reasons: Vec<&str> = writes.events.iter().map(|e| e.reason.as_str()).collect();
            let ats: Vec<String> = writes.events.iter().map(|e| ts(e.at)).collect();
            tx.execute(
                "INSERT INTO rollout_events (rollout_id, hostname, kind, reason, at)
                 SELECT id, host, kind, reason, at
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS v(id, host, kind, reason, at, n)
                 ORDER BY n",
                &[&ids, &hosts, &kinds, &reasons, &ats],
            )
            .await?;
        }
        let state_bump = i64::from(writes.changes_state());
        let reasons_bump = i64::from(writes.reasons.is_some());
        tx.execute(
            "INSERT INTO cp_leader (id, replica, state_version, reasons_version, reasons, last_tick_at)
             VALUES (1, $1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET
               replica = excluded.replica,
               state_version = cp_leader.state_version + excluded.state_version,
               reasons_version = cp_leader.reasons_version + excluded.reasons_version,
               reasons = coalesce(excluded.reasons, cp_leader.reasons),
               last_tick_at = excluded.last_tick_at",
            &[&replica, &state_bump, &reasons_bump, &writes.reasons, &now],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl PgStore {
    async fn events(&self, of: EventsOf, key: String, limit: usize) -> Result<Vec<Event>, DbError> {
        let client = self.client().await?;
        let limit = limit as i64;
        timed(
            OP_TIMEOUT,
            client.query(
                &format!(
                    "SELECT rollout_id, hostname, kind, reason, at FROM rollout_events WHERE {} = $1 ORDER BY {} LIMIT $2",
                    of.column(),
                    of.order()
                ),
                &[&key, &limit],
            ),
        )
        .await?
        .iter()
        .map(event_of)
        .collect()
    }
}

fn unzip3(rows: &[(String, String, String)]) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
    let mut a = Vec::with_capacity(rows.len());
    let mut b = Vec::with_capacity(rows.len());
    let mut c = Vec::with_capacity(rows.len());
    for (x, y, z) in rows {
        a.push(x.as_str());
        b.push(y.as_str());
        c.push(z.as_str());
    }
    (a, b, c)
}

fn event_of(r: &tokio_postgres::Row) -> Result<Event, DbError> {
    Ok(Event {
        rollout_id: r.get(0),
        hostname: r.get(1),
        kind: r.get(2),
        reason: r.get(3),
        at: parse_ts(r.get(4))?,
    })
}

impl Store for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn close(&self) -> Fut<'_, ()> {
        Box::pin(async move {
            // Released before returning, so another replica can take over at once (a
            // dropped session releases it too, but the server notices a moment later).
            if let Some(lease) = self.lease.lock().await.take() {
                if lease.held {
                    let unlock = lease
                        .client
                        .execute("SELECT pg_advisory_unlock($1)", &[&LEADER_KEY]);
                    if let Err(e) = timed(OP_TIMEOUT, unlock).await {
                        tracing::warn!(
                            "releasing the leadership: {e}; the session's end releases it"
                        );
                    }
                }
            }
            self.pool.close();
            Ok(())
        })
    }

    fn replace_revocations(
        &self,
        list: Vec<Revocation>,
        signed_at: OffsetDateTime,
        sha256: String,
        now: OffsetDateTime,
    ) -> Fut<'_, usize> {
        Box::pin(async move {
            let mut client = self.client().await?;
            timed(OP_TIMEOUT, async {
                let tx = client.transaction().await?;
                // Serialises replicas applying lists at the same moment.
                tx.execute("LOCK TABLE revocations_applied IN EXCLUSIVE MODE", &[])
                    .await?;
                let stored: Option<String> = tx
                    .query_opt("SELECT signed_at FROM revocations_applied WHERE id = 1", &[])
                    .await?
                    .map(|r| r.get(0));
                let newer_stored = match stored {
                    Some(s) => parse_ts(&s)? > signed_at,
                    None => false,
                };
                if !newer_stored {
                    tx.execute("DELETE FROM cert_revocations", &[]).await?;
                    let hosts: Vec<&str> = list.iter().map(|r| r.hostname.as_str()).collect();
                    let not_before: Vec<String> = list.iter().map(|r| ts(r.not_before)).collect();
                    let reasons: Vec<Option<&str>> =
                        list.iter().map(|r| r.reason.as_deref()).collect();
                    let by: Vec<Option<&str>> =
                        list.iter().map(|r| r.revoked_by.as_deref()).collect();
                    tx.execute(
                        "INSERT INTO cert_revocations (hostname, not_before, reason, revoked_by)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                         ON CONFLICT (hostname) DO UPDATE SET not_before = excluded.not_before, reason = excluded.reason, revoked_by = excluded.revoked_by",
                        &[&hosts, &not_before, &reasons, &by],
                    )
                    .await?;
                    tx.execute(
                        "INSERT INTO revocations_applied (id, signed_at, sha256, applied_at) VALUES (1, $1, $2, $3)
                         ON CONFLICT (id) DO UPDATE SET signed_at = excluded.signed_at, sha256 = excluded.sha256, applied_at = excluded.applied_at",
                        &[&ts(signed_at), &sha256, &ts(now)],
                    )
                    .await?;
                }
                let n: i64 = tx
                    .query_one("SELECT COUNT(*) FROM cert_revocations", &[])
                    .await?
                    .get(0);
                tx.commit().await?;
                Ok::<_, DbError>(n as usize)
            })
            .await
        })
    }

    fn revocations(&self) -> Fut<'_, (Vec<Revocation>, Option<OffsetDateTime>)> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = timed(
                OP_TIMEOUT,
                client.query(
                    "SELECT hostname, not_before, reason, revoked_by FROM cert_revocations ORDER BY hostname",
                    &[],
                ),
            )
            .await?;
            let list = rows
                .iter()
                .map(|r| {
                    Ok(Revocation {
                        hostname: r.get(0),
                        not_before: parse_ts(r.get(1))?,
                        reason: r.get(2),
                        revoked_by: r.get(3),
                    })
                })
                .collect::<Result<Vec<_>, DbError>>()?;
            let signed_at = timed(
                OP_TIMEOUT,
                client.query_opt(
                    "SELECT signed_at FROM revocations_applied WHERE id = 1",
                    &[],
                ),
            )
            .await?
            .map(|r| parse_ts(r.get(0)))
            .transpose()?;
            Ok((list, signed_at))
        })
    }

    fn claim_token_nonce(
        &self,
        nonce: String,
        hostname: String,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Fut<'_, bool> {
        Box::pin(async move {
            let client = self.client().await?;
            timed(OP_TIMEOUT, async {
                client
                    .execute(
                        "DELETE FROM token_replay WHERE expires_at < $1",
                        &[&ts(now - time::Duration::days(1))],
                    )
                    .await?;
                let inserted = client
                    .execute(
                        "INSERT INTO token_replay (nonce, hostname, used_at, expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT (nonce) DO NOTHING",
                        &[&nonce, &hostname, &ts(now), &ts(expires_at)],
                    )
                    .await?;
                Ok::<_, DbError>(inserted == 1)
            })
            .await
        })
    }

    fn load_stored(&self) -> Fut<'_, StoredState> {
        Box::pin(async move {
            let mut client = self.client().await?;
            timed(TICK_TIMEOUT, async {
                // One snapshot for both tables.
                let tx = read_snapshot(&mut client).await?;
                let mut stored = StoredState::default();
                for r in tx
                    .query("SELECT rollout_id, record FROM rollouts", &[])
                    .await?
                {
                    let record: RolloutRecord = decode_json("rollout record", r.get(1))?;
                    stored.rollouts.insert(r.get(0), record);
                }
                for r in tx
                    .query(
                        "SELECT rollout_id, hostname, record FROM host_rollout_state",
                        &[],
                    )
                    .await?
                {
                    let id: &str = r.get(0);
                    let record: HostRecord = decode_json("host record", r.get(2))?;
                    if let Some(rollout) = stored.rollouts.get_mut(id) {
                        rollout.hosts.insert(r.get(1), record);
                    }
                }
                tx.commit().await?;
                Ok::<_, DbError>(stored)
            })
            .await
        })
    }

    fn host_record(&self, rollout_id: String, hostname: String) -> Fut<'_, Option<HostRecord>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = timed(
                OP_TIMEOUT,
                client.query_opt(
                    "SELECT record FROM host_rollout_state WHERE rollout_id = $1 AND hostname = $2",
                    &[&rollout_id, &hostname],
                ),
            )
            .await?;
            row.map(|r| decode_json("host record", r.get(0)))
                .transpose()
        })
    }

    fn write_tick(&self, writes: TickWrites, now: OffsetDateTime) -> Fut<'_, ()> {
        Box::pin(async move {
            let mut guard = self.lease.lock().await;
            let Some(lease) = guard.as_mut().filter(|l| l.held) else {
                return Err(DbError::NotLeader);
            };
            let result = timed(
                TICK_TIMEOUT,
                PgStore::write_tick_on(&mut lease.client, &self.replica, &writes, now),
            )
            .await;
            if result.is_err() {
                // Unsure whether the session still holds the lock: give it up.
                guard.take();
            }
            result
        })
    }

    fn leader_info(&self) -> Fut<'_, Option<LeaderInfo>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = timed(
                OP_TIMEOUT,
                client.query_opt(
                    "SELECT replica, state_version, reasons_version, last_tick_at FROM cp_leader WHERE id = 1",
                    &[],
                ),
            )
            .await?;
            row.map(|r| {
                Ok(LeaderInfo {
                    replica: r.get(0),
                    state_version: r.get(1),
                    reasons_version: r.get(2),
                    last_tick_at: r.get::<_, Option<&str>>(3).map(parse_ts).transpose()?,
                })
            })
            .transpose()
        })
    }

    fn load_reasons(&self) -> Fut<'_, Option<String>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = timed(
                TICK_TIMEOUT,
                client.query_opt("SELECT reasons FROM cp_leader WHERE id = 1", &[]),
            )
            .await?;
            Ok(row.and_then(|r| r.get(0)))
        })
    }

    fn lead(&self) -> Fut<'_, bool> {
        Box::pin(async move {
            let mut guard = self.lease.lock().await;
            if guard.as_ref().is_some_and(|l| l.client.is_closed()) {
                guard.take();
            }
            if guard.is_none() {
                let client = self.connect_lease().await?;
                *guard = Some(Lease {
                    client,
                    held: false,
                });
            }
            let Some(lease) = guard.as_mut() else {
                return Ok(false);
            };
            let result = if lease.held {
                timed(OP_TIMEOUT, lease.client.simple_query("SELECT 1"))
                    .await
                    .map(|_| true)
            } else {
                timed(
                    OP_TIMEOUT,
                    lease
                        .client
                        .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_KEY]),
                )
                .await
                .map(|r| r.get::<_, bool>(0))
            };
            match result {
                Ok(held) => {
                    lease.held = held;
                    Ok(held)
                }
                Err(e) => {
                    guard.take();
                    Err(e)
                }
            }
        })
    }

    fn record_dispatch_event(
        &self,
        hostname: String,
        rollout_id: String,
        closure_hash: String,
        event: &'static str,
        now: OffsetDateTime,
    ) -> Fut<'_, bool> {
        Box::pin(async move {
            let client = self.client().await?;
            let inserted = timed(
                OP_TIMEOUT,
                client.execute(
                    "INSERT INTO dispatch_history (hostname, rollout_id, closure_hash, event, at) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (hostname, rollout_id, event) DO NOTHING",
                    &[&hostname, &rollout_id, &closure_hash, &event, &ts(now)],
                ),
            )
            .await?;
            Ok(inserted == 1)
        })
    }

    fn rollout_events(&self, rollout_id: String, limit: usize) -> Fut<'_, Vec<Event>> {
        Box::pin(self.events(EventsOf::Rollout, rollout_id, limit))
    }

    fn host_events(&self, hostname: String, limit: usize) -> Fut<'_, Vec<Event>> {
        Box::pin(self.events(EventsOf::Host, hostname, limit))
    }

    fn record_report(
        &self,
        hostname: String,
        report_id: String,
        kind: String,
        rollout_id: Option<String>,
        body: String,
        now: OffsetDateTime,
        keep: usize,
    ) -> Fut<'_, i64> {
        Box::pin(async move {
            let client = self.client().await?;
            let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
            timed(OP_TIMEOUT, async {
                client
                    .execute(
                        "INSERT INTO host_reports (hostname, report_id, kind, rollout_id, body, received_at) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (hostname, report_id) DO NOTHING",
                        &[&hostname, &report_id, &kind, &rollout_id, &body, &ts(now)],
                    )
                    .await?;
                let id: i64 = client
                    .query_one(
                        "SELECT event_id FROM host_reports WHERE hostname = $1 AND report_id = $2",
                        &[&hostname, &report_id],
                    )
                    .await?
                    .get(0);
                client
                    .execute(
                        "DELETE FROM host_reports WHERE hostname = $1 AND event_id <= (
                             SELECT event_id FROM host_reports WHERE hostname = $1
                             ORDER BY event_id DESC LIMIT 1 OFFSET $2)
                           AND event_id IS DISTINCT FROM (
                             SELECT max(event_id) FROM host_reports WHERE hostname = $1 AND kind = $3)",
                        &[&hostname, &keep, &EVIDENCE_KIND],
                    )
                    .await?;
                Ok::<_, DbError>(id)
            })
            .await
        })
    }

    fn latest_reports(
        &self,
        kind: String,
        hostname: Option<String>,
    ) -> Fut<'_, Vec<(String, String, String)>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = timed(
                TICK_TIMEOUT,
                client.query(
                    "SELECT hostname, report_id, body FROM host_reports WHERE event_id IN (
                       SELECT max(event_id) FROM host_reports
                       WHERE kind = $1 AND ($2::text IS NULL OR hostname = $2) GROUP BY hostname)
                     ORDER BY hostname",
                    &[&kind, &hostname],
                ),
            )
            .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    fn save_attestations(&self, rows: Vec<(String, Attestation)>) -> Fut<'_, ()> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            let (done, wait) = tokio::sync::oneshot::channel();
            self.attestations
                .send((rows, done))
                .map_err(|_| DbError::WriterGone)?;
            match wait.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(DbError::Write(e)),
                Err(_) => Err(DbError::WriterGone),
            }
        })
    }

    fn touch_attestations(&self, rows: Vec<(String, OffsetDateTime)>) -> Fut<'_, ()> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(());
            }
            let hosts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            let seen: Vec<i64> = rows.iter().map(|r| super::micros(r.1)).collect();
            let client = self.client().await?;
            timed(
                OP_TIMEOUT,
                client.execute(
                    &format!(
                        "UPDATE host_attestations h SET last_seen_us = v.seen, updated_us = {SERVER_NOW_US}
                         FROM unnest($1::text[], $2::int8[]) AS v(hostname, seen)
                         WHERE h.hostname = v.hostname AND h.last_seen_us < v.seen"
                    ),
                    &[&hosts, &seen],
                ),
            )
            .await?;
            Ok(())
        })
    }

    fn attestations_since(&self, cursor: i64) -> Fut<'_, AttestationPage> {
        Box::pin(async move {
            let client = self.client().await?;
            let now: i64 = timed(
                OP_TIMEOUT,
                client.query_one(&format!("SELECT {SERVER_NOW_US}"), &[]),
            )
            .await?
            .get(0);
            let rows = timed(
                TICK_TIMEOUT,
                client.query(
                    "SELECT hostname, body, last_seen_us, confirmed_us, delivered_rollout, delivered_us, compliance FROM host_attestations WHERE updated_us > $1",
                    &[&cursor],
                ),
            )
            .await?;
            let mut page = AttestationPage {
                rows: Vec::with_capacity(rows.len()),
                next: now - ATTESTATION_OVERLAP_US,
            };
            for r in &rows {
                page.rows.push((
                    r.get(0),
                    AttestationRow::decode(
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                    )?,
                ));
            }
            Ok(page)
        })
    }

    fn publish_artifacts(&self, set: Vec<SignedArtifact>) -> Fut<'_, bool> {
        Box::pin(async move {
            let mut client = self.client().await?;
            timed(TICK_TIMEOUT, async {
                let tx = client.transaction().await?;
                // Serialises replicas publishing at the same moment.
                let version: i64 = tx
                    .query_one(
                        "SELECT version FROM signed_artifacts_version WHERE id = 1 FOR UPDATE",
                        &[],
                    )
                    .await?
                    .get(0);
                let mut stored = Vec::new();
                for r in tx
                    .query("SELECT name, sha256, signed_at_us FROM signed_artifacts", &[])
                    .await?
                {
                    stored.push((r.get(0), r.get(1), artifact_time(r.get(2))?));
                }
                let (write, remove) = plan_artifacts(&stored, &set);
                if write.is_empty() && remove.is_empty() {
                    return Ok(false);
                }
                for a in write {
                    tx.execute(
                        "INSERT INTO signed_artifacts (name, body, signature, sha256, signed_at_us) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (name) DO UPDATE SET body = excluded.body, signature = excluded.signature, sha256 = excluded.sha256, signed_at_us = excluded.signed_at_us",
                        &[&a.name, &a.body, &a.signature, &a.sha256, &micros(a.signed_at)],
                    )
                    .await?;
                }
                tx.execute("DELETE FROM signed_artifacts WHERE name = ANY($1)", &[&remove])
                    .await?;
                tx.execute(
                    "UPDATE signed_artifacts_version SET version = $1 WHERE id = 1",
                    &[&(version + 1)],
                )
                .await?;
                tx.commit().await?;
                Ok::<_, DbError>(true)
            })
            .await
        })
    }

    fn artifacts_version(&self) -> Fut<'_, i64> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = timed(
                OP_TIMEOUT,
                client.query_one(
                    "SELECT version FROM signed_artifacts_version WHERE id = 1",
                    &[],
                ),
            )
            .await?;
            Ok(row.get(0))
        })
    }

    fn signed_artifacts(&self) -> Fut<'_, (i64, Vec<SignedArtifact>)> {
        Box::pin(async move {
            let mut client = self.client().await?;
            timed(TICK_TIMEOUT, async {
                let tx = read_snapshot(&mut client).await?;
                let version: i64 = tx
                    .query_one("SELECT version FROM signed_artifacts_version WHERE id = 1", &[])
                    .await?
                    .get(0);
                let mut out = Vec::new();
                for r in tx
                    .query(
                        "SELECT name, body, signature, sha256, signed_at_us FROM signed_artifacts ORDER BY name",
                        &[],
                    )
                    .await?
                {
                    out.push(SignedArtifact {
                        name: r.get(0),
                        body: r.get(1),
                        signature: r.get(2),
                        sha256: r.get(3),
                        signed_at: artifact_time(r.get(4))?,
                    });
                }
                tx.commit().await?;
                Ok::<_, DbError>((version, out))
            })
            .await
        })
    }
}

/// A read-only transaction that sees every table as of one moment.
async fn read_snapshot(
    client: &mut Client,
) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

fn artifact_time(us: i64) -> Result<OffsetDateTime, DbError> {
    from_micros(us)
        .ok_or_else(|| DbError::Corrupt(format!("signed_artifacts: time {us} out of range")))
}
