//! SQLite state (WAL): the embedded default, for one control plane.
//!
//! Writes go through one writer thread that batches queued jobs into one transaction, each
//! job in its own savepoint so one failing job does not undo the others. A job's caller
//! hears back only after the batch has committed.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use nixfleet_proto::Revocation;
use nixfleet_reconciler::{Attestation, HostRecord, RolloutRecord, StoredState};

use super::{
    decode_json, micros, plan_artifacts, AttestationPage, AttestationRow, DbError, Event, EventsOf,
    Fut, LeaderInfo, SignedArtifact, Store, TickWrites, ATTESTATION_OVERLAP_US, EVIDENCE_KIND,
};

/// Migrations, applied in order; `PRAGMA user_version` is the number applied.
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
CREATE TABLE host_dispatch_state (
    hostname        TEXT PRIMARY KEY,
    rollout_id      TEXT NOT NULL,
    wave_index      INTEGER NOT NULL,
    closure_hash    TEXT NOT NULL,
    dispatched_at   TEXT NOT NULL,
    delivered_at    TEXT,
    confirmed_at    TEXT
);
CREATE TABLE dispatch_history (
    id              INTEGER PRIMARY KEY,
    hostname        TEXT NOT NULL,
    rollout_id      TEXT NOT NULL,
    closure_hash    TEXT NOT NULL,
    event           TEXT NOT NULL,
    at              TEXT NOT NULL
);
CREATE INDEX dispatch_history_host ON dispatch_history (hostname, id);
CREATE TABLE token_replay (
    nonce       TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    used_at     TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE TABLE host_reports (
    event_id    INTEGER PRIMARY KEY,
    hostname    TEXT NOT NULL,
    report_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    rollout_id  TEXT,
    body        TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (hostname, report_id)
);
CREATE TABLE rollout_events (
    id          INTEGER PRIMARY KEY,
    rollout_id  TEXT NOT NULL,
    hostname    TEXT,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          TEXT NOT NULL
);
CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
CREATE INDEX rollout_events_host ON rollout_events (hostname, id);
"#,
    r#"
CREATE TABLE host_attestations (
    hostname          TEXT PRIMARY KEY,
    body              TEXT NOT NULL,
    observed_us       INTEGER NOT NULL,
    last_seen_us      INTEGER NOT NULL,
    confirmed_us      INTEGER NOT NULL,
    delivered_rollout TEXT,
    delivered_us      INTEGER NOT NULL,
    updated_us        INTEGER NOT NULL
);
CREATE INDEX host_attestations_updated ON host_attestations (updated_us);
CREATE TABLE cp_leader (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    replica         TEXT NOT NULL,
    state_version   INTEGER NOT NULL,
    reasons_version INTEGER NOT NULL,
    reasons         TEXT,
    last_tick_at    TEXT
);
"#,
    r#"
CREATE TABLE signed_artifacts (
    name         TEXT PRIMARY KEY,
    body         BLOB NOT NULL,
    signature    BLOB NOT NULL,
    sha256       TEXT NOT NULL,
    signed_at_us INTEGER NOT NULL
);
CREATE TABLE signed_artifacts_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO signed_artifacts_version VALUES (1, 0);
"#,
    r#"
ALTER TABLE host_attestations ADD COLUMN compliance TEXT;
ALTER TABLE host_attestations ADD COLUMN compliance_us INTEGER NOT NULL DEFAULT 0;
CREATE INDEX host_reports_kind ON host_reports (hostname, kind, event_id);
"#,
];

use crate::clock::rfc3339 as ts;

fn parse_ts(s: &str) -> rusqlite::Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn open_error(path: &Path, e: impl std::fmt::Display) -> DbError {
    DbError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn connect(path: &Path) -> Result<Connection, DbError> {
    let open = |e: rusqlite::Error| open_error(path, e);
    let conn = Connection::open(path).map_err(open)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open)?;
    Ok(conn)
}

/// Creates the database if absent and applies missing migrations; refuses a database
/// whose schema is newer than this binary or that was not made by nixfleet.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), DbError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(DbError::TooNew {
            path: path.display().to_string(),
            found: version,
            known,
        });
    }
    if version == 0 {
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?;
        let tables: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !tables.is_empty() {
            return Err(DbError::Foreign {
                path: path.display().to_string(),
                tables: tables.join(", "),
            });
        }
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database migrated");
    }
    Ok(())
}

type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A job runs inside the batch transaction and says whether it succeeded.
type Job = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;

/// Handle to the database: one writer thread, one reader connection.
pub struct SqliteStore {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    reader: Mutex<Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(path, e))?;
        }
        let mut writer = connect(path)?;
        migrate(&mut writer, path)?;
        let reader = connect(path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("nixfleet-db-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| open_error(path, e))?;
        Ok(SqliteStore {
            jobs: Mutex::new(Some(tx)),
            reader: Mutex::new(reader),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Runs `f` in the writer's next batch; resolves after the batch commits.
    pub async fn write<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (done, wait) = oneshot::channel::<Result<T, String>>();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit: Result<(), String>| {
                let outcome = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e.to_string()),
                    (Ok(_), Err(e)) => Err(e),
                };
                let _ = done.send(outcome);
            });
            (ok, reply)
        });
        let sender = self
            .jobs
            .lock()
            .map_err(|_| DbError::WriterGone)?
            .clone()
            .ok_or(DbError::WriterGone)?;
        sender.send(job).map_err(|_| DbError::WriterGone)?;
        match wait.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(DbError::Write(e)),
            Err(_) => Err(DbError::WriterGone),
        }
    }

    /// Runs a read on the reader connection (WAL: never blocked by the writer).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, DbError>) -> Result<T, DbError> {
        let conn = self.reader.lock().map_err(|_| DbError::WriterGone)?;
        f(&conn)
    }

    /// Stops the writer after it has committed everything queued.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some(handle) = self.writer.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

impl SqliteStore {
    fn events(&self, of: EventsOf, key: &str, limit: usize) -> Result<Vec<Event>, DbError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT rollout_id, hostname, kind, reason, at FROM rollout_events WHERE {} = ?1 ORDER BY {} LIMIT ?2",
                of.column(),
                of.order()
            ))?;
            let rows = stmt.query_map(params![key, limit as i64], event_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

impl Store for SqliteStore {
    fn shared(&self) -> bool {
        false
    }

    fn close(&self) -> Fut<'_, ()> {
        Box::pin(async move {
            self.close();
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
        Box::pin(self.write(move |conn| {
            let stored: Option<String> = conn
                .query_row(
                    "SELECT signed_at FROM revocations_applied WHERE id = 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let newer_stored = stored
                .map(|s| parse_ts(&s))
                .transpose()?
                .is_some_and(|stored| stored > signed_at);
            if !newer_stored {
                conn.execute("DELETE FROM cert_revocations", [])?;
                let mut insert = conn.prepare(
                    "INSERT OR REPLACE INTO cert_revocations (hostname, not_before, reason, revoked_by) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for r in &list {
                    insert.execute(params![r.hostname, ts(r.not_before), r.reason, r.revoked_by])?;
                }
                conn.execute(
                    "INSERT OR REPLACE INTO revocations_applied (id, signed_at, sha256, applied_at) VALUES (1, ?1, ?2, ?3)",
                    params![ts(signed_at), sha256, ts(now)],
                )?;
            }
            conn.query_row("SELECT COUNT(*) FROM cert_revocations", [], |r| r.get::<_, i64>(0))
                .map(|n| n as usize)
        }))
    }

    fn revocations(&self) -> Fut<'_, (Vec<Revocation>, Option<OffsetDateTime>)> {
        Box::pin(async move {
            self.read(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT hostname, not_before, reason, revoked_by FROM cert_revocations ORDER BY hostname",
                )?;
                let list = stmt
                    .query_map([], |r| {
                        Ok(Revocation {
                            hostname: r.get(0)?,
                            not_before: parse_ts(&r.get::<_, String>(1)?)?,
                            reason: r.get(2)?,
                            revoked_by: r.get(3)?,
                        })
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let signed_at = conn
                    .query_row(
                        "SELECT signed_at FROM revocations_applied WHERE id = 1",
                        [],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()?
                    .map(|s| parse_ts(&s))
                    .transpose()?;
                Ok((list, signed_at))
            })
        })
    }

    fn claim_token_nonce(
        &self,
        nonce: String,
        hostname: String,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Fut<'_, bool> {
        Box::pin(self.write(move |conn| {
            // Expired nonces can never be replayed (the token check refuses them first).
            conn.execute(
                "DELETE FROM token_replay WHERE expires_at < ?1",
                params![ts(now - time::Duration::days(1))],
            )?;
            let inserted = conn.execute(
                "INSERT OR IGNORE INTO token_replay (nonce, hostname, used_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![nonce, hostname, ts(now), ts(expires_at)],
            )?;
            Ok(inserted == 1)
        }))
    }

    fn load_stored(&self) -> Fut<'_, StoredState> {
        Box::pin(async move {
            self.read(|conn| {
                let mut stored = StoredState::default();
                let mut stmt = conn.prepare("SELECT rollout_id, record FROM rollouts")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                for row in rows {
                    let (id, record) = row?;
                    let record: RolloutRecord = decode_json("rollout record", &record)?;
                    stored.rollouts.insert(id, record);
                }
                let mut stmt =
                    conn.prepare("SELECT rollout_id, hostname, record FROM host_rollout_state")?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                for row in rows {
                    let (id, host, record) = row?;
                    let record: HostRecord = decode_json("host record", &record)?;
                    if let Some(rollout) = stored.rollouts.get_mut(&id) {
                        rollout.hosts.insert(host, record);
                    }
                }
                Ok(stored)
            })
        })
    }

    fn host_record(&self, rollout_id: String, hostname: String) -> Fut<'_, Option<HostRecord>> {
        Box::pin(async move {
            self.read(|conn| {
                let record: Option<String> = conn
                    .query_row(
                        "SELECT record FROM host_rollout_state WHERE rollout_id = ?1 AND hostname = ?2",
                        params![rollout_id, hostname],
                        |r| r.get(0),
                    )
                    .optional()?;
                record.map(|r| decode_json("host record", &r)).transpose()
            })
        })
    }

    fn write_tick(&self, writes: TickWrites, now: OffsetDateTime) -> Fut<'_, ()> {
        Box::pin(self.write(move |conn| {
            let now = ts(now);
            let mut upsert_rollout = conn.prepare_cached(
                "INSERT INTO rollouts (rollout_id, channel, record, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rollout_id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
            )?;
            for (id, channel, record) in &writes.rollouts {
                upsert_rollout.execute(params![id, channel, record, now])?;
            }
            let mut upsert_host = conn.prepare_cached(
                "INSERT INTO host_rollout_state (rollout_id, hostname, record, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rollout_id, hostname) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
            )?;
            for (id, host, record) in &writes.hosts {
                upsert_host.execute(params![id, host, record, now])?;
            }
            let mut delete_host = conn.prepare_cached(
                "DELETE FROM host_rollout_state WHERE rollout_id = ?1 AND hostname = ?2",
            )?;
            for (id, host) in &writes.removed_hosts {
                delete_host.execute(params![id, host])?;
            }
            let mut event = conn.prepare_cached(
                "INSERT INTO rollout_events (rollout_id, hostname, kind, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in &writes.events {
                event.execute(params![e.rollout_id, e.hostname, e.kind, e.reason, ts(e.at)])?;
            }
            conn.execute(
                "INSERT INTO cp_leader (id, replica, state_version, reasons_version, reasons, last_tick_at)
                 VALUES (1, 'local', ?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET
                   state_version = state_version + ?1,
                   reasons_version = reasons_version + ?2,
                   reasons = coalesce(?3, reasons),
                   last_tick_at = ?4",
                params![
                    i64::from(writes.changes_state()),
                    i64::from(writes.reasons.is_some()),
                    writes.reasons,
                    now
                ],
            )?;
            Ok(())
        }))
    }

    fn leader_info(&self) -> Fut<'_, Option<LeaderInfo>> {
        Box::pin(async move {
            self.read(|conn| {
                let row = conn
                    .query_row(
                        "SELECT replica, state_version, reasons_version, last_tick_at FROM cp_leader WHERE id = 1",
                        [],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, i64>(2)?,
                                r.get::<_, Option<String>>(3)?,
                            ))
                        },
                    )
                    .optional()?;
                row.map(|(replica, state_version, reasons_version, tick)| {
                    Ok(LeaderInfo {
                        replica,
                        state_version,
                        reasons_version,
                        last_tick_at: tick.map(|t| parse_ts(&t)).transpose()?,
                    })
                })
                .transpose()
            })
        })
    }

    fn load_reasons(&self) -> Fut<'_, Option<String>> {
        Box::pin(async move {
            self.read(|conn| {
                Ok(conn
                    .query_row("SELECT reasons FROM cp_leader WHERE id = 1", [], |r| {
                        r.get::<_, Option<String>>(0)
                    })
                    .optional()?
                    .flatten())
            })
        })
    }

    fn lead(&self) -> Fut<'_, bool> {
        // Nobody else opens this file: the one control plane always leads.
        Box::pin(async { Ok(true) })
    }

    fn record_dispatch_event(
        &self,
        hostname: String,
        rollout_id: String,
        closure_hash: String,
        event: &'static str,
        now: OffsetDateTime,
    ) -> Fut<'_, bool> {
        Box::pin(self.write(move |conn| {
            let inserted = conn.execute(
                "INSERT INTO dispatch_history (hostname, rollout_id, closure_hash, event, at)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE NOT EXISTS (
                   SELECT 1 FROM dispatch_history WHERE hostname = ?1 AND rollout_id = ?2 AND event = ?4)",
                params![hostname, rollout_id, closure_hash, event, ts(now)],
            )?;
            Ok(inserted == 1)
        }))
    }

    fn rollout_events(&self, rollout_id: String, limit: usize) -> Fut<'_, Vec<Event>> {
        Box::pin(async move { self.events(EventsOf::Rollout, &rollout_id, limit) })
    }

    fn host_events(&self, hostname: String, limit: usize) -> Fut<'_, Vec<Event>> {
        Box::pin(async move { self.events(EventsOf::Host, &hostname, limit) })
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
        Box::pin(self.write(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO host_reports (hostname, report_id, kind, rollout_id, body, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![hostname, report_id, kind, rollout_id, body, ts(now)],
            )?;
            let id = conn.query_row(
                "SELECT event_id FROM host_reports WHERE hostname = ?1 AND report_id = ?2",
                params![hostname, report_id],
                |r| r.get(0),
            )?;
            conn.execute(
                "DELETE FROM host_reports WHERE hostname = ?1 AND event_id <= (
                     SELECT event_id FROM host_reports WHERE hostname = ?1
                     ORDER BY event_id DESC LIMIT 1 OFFSET ?2)
                   AND event_id IS NOT (
                     SELECT max(event_id) FROM host_reports WHERE hostname = ?1 AND kind = ?3)",
                params![
                    hostname,
                    i64::try_from(keep.max(1)).unwrap_or(i64::MAX),
                    EVIDENCE_KIND
                ],
            )?;
            Ok(id)
        }))
    }

    fn latest_reports(
        &self,
        kind: String,
        hostname: Option<String>,
    ) -> Fut<'_, Vec<(String, String, String)>> {
        Box::pin(async move {
            self.read(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT hostname, report_id, body FROM host_reports WHERE event_id IN (
                       SELECT max(event_id) FROM host_reports
                       WHERE kind = ?1 AND (?2 IS NULL OR hostname = ?2) GROUP BY hostname)
                     ORDER BY hostname",
                )?;
                let rows = stmt.query_map(params![kind, hostname], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
        })
    }

    fn save_attestations(&self, rows: Vec<(String, Attestation)>) -> Fut<'_, ()> {
        Box::pin(self.write(move |conn| {
            let now = micros(OffsetDateTime::now_utc());
            let mut upsert = conn.prepare_cached(
                "INSERT INTO host_attestations (hostname, body, observed_us, last_seen_us, confirmed_us, delivered_rollout, delivered_us, updated_us, compliance, compliance_us)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (hostname) DO UPDATE SET
                   body = CASE WHEN excluded.observed_us >= observed_us THEN excluded.body ELSE body END,
                   observed_us = max(observed_us, excluded.observed_us),
                   last_seen_us = max(last_seen_us, excluded.last_seen_us),
                   confirmed_us = max(confirmed_us, excluded.confirmed_us),
                   delivered_rollout = CASE WHEN excluded.delivered_us > delivered_us THEN excluded.delivered_rollout ELSE delivered_rollout END,
                   delivered_us = max(delivered_us, excluded.delivered_us),
                   compliance = CASE WHEN excluded.compliance_us > compliance_us THEN excluded.compliance ELSE compliance END,
                   compliance_us = max(compliance_us, excluded.compliance_us),
                   updated_us = excluded.updated_us",
            )?;
            for (host, a) in &rows {
                let row = AttestationRow::of(a);
                upsert.execute(params![
                    host,
                    row.body,
                    row.observed_us,
                    row.last_seen_us,
                    row.confirmed_us,
                    row.delivered_rollout,
                    row.delivered_us,
                    now,
                    row.compliance,
                    row.compliance_us
                ])?;
            }
            Ok(())
        }))
    }

    fn touch_attestations(&self, rows: Vec<(String, OffsetDateTime)>) -> Fut<'_, ()> {
        Box::pin(self.write(move |conn| {
            let now = micros(OffsetDateTime::now_utc());
            let mut touch = conn.prepare_cached(
                "UPDATE host_attestations SET last_seen_us = ?2, updated_us = ?3 WHERE hostname = ?1 AND last_seen_us < ?2",
            )?;
            for (host, seen) in &rows {
                touch.execute(params![host, micros(*seen), now])?;
            }
            Ok(())
        }))
    }

    fn attestations_since(&self, cursor: i64) -> Fut<'_, AttestationPage> {
        Box::pin(async move {
            let now = micros(OffsetDateTime::now_utc());
            self.read(|conn| {
                let mut stmt = conn.prepare(
                    "SELECT hostname, body, last_seen_us, confirmed_us, delivered_rollout, delivered_us, compliance FROM host_attestations WHERE updated_us > ?1",
                )?;
                let rows = stmt.query_map(params![cursor], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                })?;
                let mut page = AttestationPage {
                    rows: Vec::new(),
                    next: now - ATTESTATION_OVERLAP_US,
                };
                for row in rows {
                    let (host, body, seen, confirmed, d_rollout, d_us, compliance) = row?;
                    page.rows.push((
                        host,
                        AttestationRow::decode(
                            &body, seen, confirmed, d_rollout, d_us, compliance,
                        )?,
                    ));
                }
                Ok(page)
            })
        })
    }

    fn publish_artifacts(&self, set: Vec<SignedArtifact>) -> Fut<'_, bool> {
        Box::pin(self.write(move |conn| {
            let mut stored = Vec::new();
            let mut stmt = conn.prepare("SELECT name, sha256, signed_at_us FROM signed_artifacts")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            for row in rows {
                let (name, sha, us) = row?;
                stored.push((name, sha, artifact_time(us)?));
            }
            let (write, remove) = plan_artifacts(&stored, &set);
            if write.is_empty() && remove.is_empty() {
                return Ok(false);
            }
            for a in write {
                conn.execute(
                    "INSERT OR REPLACE INTO signed_artifacts (name, body, signature, sha256, signed_at_us) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![a.name, a.body, a.signature, a.sha256, micros(a.signed_at)],
                )?;
            }
            for name in &remove {
                conn.execute("DELETE FROM signed_artifacts WHERE name = ?1", params![name])?;
            }
            conn.execute(
                "UPDATE signed_artifacts_version SET version = version + 1 WHERE id = 1",
                [],
            )?;
            Ok(true)
        }))
    }

    fn artifacts_version(&self) -> Fut<'_, i64> {
        Box::pin(async move {
            self.read(|conn| {
                Ok(conn.query_row(
                    "SELECT version FROM signed_artifacts_version WHERE id = 1",
                    [],
                    |r| r.get(0),
                )?)
            })
        })
    }

    fn signed_artifacts(&self) -> Fut<'_, (i64, Vec<SignedArtifact>)> {
        Box::pin(async move {
            self.read(|conn| {
                let tx = conn.unchecked_transaction()?;
                let version: i64 = tx.query_row(
                    "SELECT version FROM signed_artifacts_version WHERE id = 1",
                    [],
                    |r| r.get(0),
                )?;
                let mut stmt = tx.prepare(
                    "SELECT name, body, signature, sha256, signed_at_us FROM signed_artifacts ORDER BY name",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (name, body, signature, sha256, us) = row?;
                    out.push(SignedArtifact {
                        name,
                        body,
                        signature,
                        sha256,
                        signed_at: artifact_time(us)?,
                    });
                }
                drop(stmt);
                tx.commit()?;
                Ok((version, out))
            })
        })
    }
}

fn artifact_time(us: i64) -> rusqlite::Result<OffsetDateTime> {
    crate::clock::from_micros(us).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            4,
            rusqlite::types::Type::Integer,
            format!("signed_artifacts: time {us} out of range").into(),
        )
    })
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        rollout_id: r.get(0)?,
        hostname: r.get(1)?,
        kind: r.get(2)?,
        reason: r.get(3)?,
        at: parse_ts(&r.get::<_, String>(4)?)?,
    })
}

fn writer_loop(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    const MAX_BATCH: usize = 512;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let commit = (|| -> rusqlite::Result<()> {
            let mut tx = conn.transaction()?;
            for job in batch.drain(..) {
                let mut sp = tx.savepoint()?;
                let (ok, reply) = job(&sp);
                replies.push(reply);
                // A failed job's writes are undone without touching the rest of the batch.
                sp.set_drop_behavior(if ok {
                    rusqlite::DropBehavior::Commit
                } else {
                    rusqlite::DropBehavior::Rollback
                });
                drop(sp);
            }
            tx.commit()
        })();
        let outcome = commit.map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "database batch failed to commit");
        }
        for reply in replies {
            reply(outcome.clone());
        }
    }
    // Checkpoint so the WAL does not outlive a clean shutdown.
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    let _ = conn.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrates_a_fresh_database_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let db = SqliteStore::open(&path).unwrap();
        let now = OffsetDateTime::now_utc();
        assert!(db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        assert!(!db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        SqliteStore::close(&db);
        let db = SqliteStore::open(&path).unwrap();
        assert!(!db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        SqliteStore::close(&db);
    }
}
