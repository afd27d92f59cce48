//! SQLite state (WAL). Everything here is rebuildable from signed artifacts plus agent
//! check-ins (SPEC.md §5), so a wiped database is an outage, never a breach.
//!
//! Writes go through one writer thread that batches queued jobs into one transaction, each
//! job in its own savepoint so one failing job does not undo the others. A job's caller
//! hears back only after the batch has committed.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use nixfleet_proto::Revocation;

/// Migrations, applied in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} has schema version {found}, newer than this binary understands ({known}); run a newer nixfleet-control-plane or restore the matching database (it is never rewritten silently)")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database {path} holds tables nixfleet did not create ({tables}); point --db-path at a nixfleet database or an empty location")]
    Foreign { path: PathBuf, tables: String },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database writer has stopped; the control plane is shutting down")]
    WriterGone,
}

use crate::clock::rfc3339 as ts;

fn parse_ts(s: &str) -> rusqlite::Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn connect(path: &Path) -> Result<Connection, DbError> {
    let open = |source| DbError::Open {
        path: path.to_path_buf(),
        source,
    };
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
            path: path.to_path_buf(),
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
                path: path.to_path_buf(),
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
pub struct Db {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    reader: Mutex<Connection>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DbError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let mut writer = connect(path)?;
        migrate(&mut writer, path)?;
        let reader = connect(path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("nixfleet-db-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| DbError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Db {
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
            Ok(Err(e)) => Err(DbError::Sql(rusqlite::Error::ToSqlConversionFailure(
                e.into(),
            ))),
            Err(_) => Err(DbError::WriterGone),
        }
    }

    /// Runs a read on the reader connection (WAL: never blocked by the writer).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let conn = self.reader.lock().map_err(|_| DbError::WriterGone)?;
        Ok(f(&conn)?)
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

    // --- revocations -----------------------------------------------------------------

    /// Makes the table exactly `list` (removals included) and records which list it was.
    pub async fn replace_revocations(
        &self,
        list: Vec<Revocation>,
        signed_at: OffsetDateTime,
        sha256: String,
        now: OffsetDateTime,
    ) -> Result<usize, DbError> {
        self.write(move |conn| {
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
            conn.query_row("SELECT COUNT(*) FROM cert_revocations", [], |r| r.get::<_, i64>(0))
                .map(|n| n as usize)
        })
        .await
    }

    /// The applied revocation list and its `signedAt`, if one was applied.
    pub fn revocations(&self) -> Result<(Vec<Revocation>, Option<OffsetDateTime>), DbError> {
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
    }

    // --- enrollment ------------------------------------------------------------------

    /// Records a token nonce; false when it was already used. Durable before returning,
    /// so a certificate is never issued twice for one token.
    pub async fn claim_token_nonce(
        &self,
        nonce: String,
        hostname: String,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool, DbError> {
        self.write(move |conn| {
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
        })
        .await
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
}

#[derive(Debug, Clone)]
pub struct Event {
    pub rollout_id: String,
    pub hostname: Option<String>,
    pub kind: String,
    pub reason: String,
    pub at: OffsetDateTime,
}

impl Db {
    /// The reconciler's stored state as last written (empty after a wipe).
    pub fn load_stored(&self) -> Result<nixfleet_reconciler::StoredState, DbError> {
        use nixfleet_reconciler::{HostRecord, RolloutRecord, StoredState};
        let bad = |e: serde_json::Error| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        };
        self.read(|conn| {
            let mut stored = StoredState::default();
            let mut stmt = conn.prepare("SELECT rollout_id, record FROM rollouts")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, record) = row?;
                let record: RolloutRecord = serde_json::from_str(&record).map_err(bad)?;
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
                let record: HostRecord = serde_json::from_str(&record).map_err(bad)?;
                if let Some(rollout) = stored.rollouts.get_mut(&id) {
                    rollout.hosts.insert(host, record);
                }
            }
            Ok(stored)
        })
    }

    /// Writes one tick's changes in one transaction.
    pub async fn write_tick(&self, writes: TickWrites, now: OffsetDateTime) -> Result<(), DbError> {
        self.write(move |conn| {
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
            Ok(())
        })
        .await
    }

    /// Records a dispatch-related event for a host (delivery, confirm, orphan confirm).
    pub async fn record_dispatch_event(
        &self,
        hostname: String,
        rollout_id: String,
        closure_hash: String,
        event: &'static str,
        now: OffsetDateTime,
    ) -> Result<(), DbError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO dispatch_history (hostname, rollout_id, closure_hash, event, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hostname, rollout_id, closure_hash, event, ts(now)],
            )?;
            Ok(())
        })
        .await
    }

    /// The rollout's event trail, oldest first.
    pub fn rollout_events(&self, rollout_id: &str, limit: usize) -> Result<Vec<Event>, DbError> {
        let rollout_id = rollout_id.to_owned();
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT rollout_id, hostname, kind, reason, at FROM rollout_events WHERE rollout_id = ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![rollout_id, limit as i64], event_row)?;
            rows.collect()
        })
    }

    /// A host's most recent events, newest first.
    pub fn host_events(&self, hostname: &str, limit: usize) -> Result<Vec<Event>, DbError> {
        let hostname = hostname.to_owned();
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT rollout_id, hostname, kind, reason, at FROM rollout_events WHERE hostname = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![hostname, limit as i64], event_row)?;
            rows.collect()
        })
    }

    /// Stores a verified host report once per (host, reportId); returns its event id.
    pub async fn record_report(
        &self,
        hostname: String,
        report_id: String,
        kind: String,
        rollout_id: Option<String>,
        body: String,
        now: OffsetDateTime,
    ) -> Result<i64, DbError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO host_reports (hostname, report_id, kind, rollout_id, body, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![hostname, report_id, kind, rollout_id, body, ts(now)],
            )?;
            conn.query_row(
                "SELECT event_id FROM host_reports WHERE hostname = ?1 AND report_id = ?2",
                params![hostname, report_id],
                |r| r.get(0),
            )
        })
        .await
    }
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
        let db = Db::open(&path).unwrap();
        let now = OffsetDateTime::now_utc();
        assert!(db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        assert!(!db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        db.close();
        let db = Db::open(&path).unwrap();
        assert!(!db
            .claim_token_nonce("n1".into(), "web-01".into(), now, now)
            .await
            .unwrap());
        db.close();
    }

    #[test]
    fn refuses_newer_and_foreign_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let newer = dir.path().join("newer.db");
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            Db::open(&newer),
            Err(DbError::TooNew { found: 99, .. })
        ));
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE stuff (x)")
            .unwrap();
        assert!(matches!(Db::open(&foreign), Err(DbError::Foreign { .. })));
    }

    #[tokio::test]
    async fn revocations_table_becomes_exactly_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.db")).unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let entry = |h: &str| Revocation {
            hostname: h.into(),
            not_before: now,
            reason: None,
            revoked_by: None,
        };
        let n = db
            .replace_revocations(vec![entry("a"), entry("b")], now, "x".into(), now)
            .await
            .unwrap();
        assert_eq!(n, 2);
        let n = db
            .replace_revocations(vec![entry("b")], now, "y".into(), now)
            .await
            .unwrap();
        assert_eq!(n, 1);
        let (list, signed_at) = db.revocations().unwrap();
        assert_eq!(list, vec![entry("b")]);
        assert_eq!(signed_at, Some(now));
        db.close();
    }
}
