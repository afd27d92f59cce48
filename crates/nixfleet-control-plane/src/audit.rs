//! The issuance audit log: append-only JSON lines, never in the database and kept by the
//! runbook's wipe. What a fresh database must learn back from it comes from here.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::store::Db;

/// How long a nonce from an entry written before entries carried the token's expiry is
/// kept: longer than any bootstrap token is usually valid.
const LEGACY_TOKEN_LIFETIME: time::Duration = time::Duration::days(30);

/// A bootstrap token used at enrollment that has not expired yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedToken {
    pub nonce: String,
    pub hostname: String,
    pub used_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

fn time_of(entry: &serde_json::Value, key: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(entry[key].as_str()?, &Rfc3339).ok()
}

/// The enrollments in the audit log at `path` whose token could still be presented at
/// `now`. A missing log is an empty one; a line that is not an enrollment is skipped.
pub fn used_tokens(path: &Path, now: OffsetDateTime) -> Result<Vec<UsedToken>, String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read the audit log {}: {e}; the used bootstrap tokens it records must be known before enrolling anyone (fix its permissions)", path.display())),
    };
    let mut used = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line =
            line.map_err(|e| format!("cannot read the audit log {}: {e}", path.display()))?;
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let (Some(nonce), Some(hostname), Some(used_at)) = (
            entry["nonce"].as_str(),
            entry["cn"].as_str(),
            time_of(&entry, "time"),
        ) else {
            continue;
        };
        if entry["how"] != "enroll" {
            continue;
        }
        let expires_at =
            time_of(&entry, "tokenExpiresAt").unwrap_or(used_at + LEGACY_TOKEN_LIFETIME);
        if expires_at >= now {
            used.push(UsedToken {
                nonce: nonce.to_owned(),
                hostname: hostname.to_owned(),
                used_at,
                expires_at,
            });
        }
    }
    Ok(used)
}

/// Claims in the database every nonce the audit log says was used, so that a token used
/// before a wipe of the database is refused after it (409), as it was before.
pub async fn restore_used_tokens(
    db: &Db,
    path: &Path,
    now: OffsetDateTime,
) -> Result<usize, String> {
    let used = used_tokens(path, now)?;
    let mut restored = 0;
    for token in used {
        let newly = db
            .claim_token_nonce(token.nonce, token.hostname, token.expires_at, token.used_at)
            .await
            .map_err(|e| {
                format!("cannot restore the used bootstrap tokens into the database: {e}")
            })?;
        restored += usize::from(newly);
    }
    Ok(restored)
}

/// Kept next to the audit log, where the runbook's wipe does not reach: the signing time
/// of the newest revocation list ever applied. A list older than that is refused even on
/// an empty database, so a replayed old list cannot lift a revocation after a wipe.
pub fn revocations_floor_path(audit_log: &Path) -> PathBuf {
    audit_log.with_file_name("revocations-applied.json")
}

pub fn read_revocations_floor(path: &Path) -> Result<Option<OffsetDateTime>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}; it guards against replayed revocation lists (fix its permissions)", path.display())),
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| time_of(&v, "signedAt"))
        .map(Some)
        .ok_or_else(|| format!("{} is not a revocations record ({{\"signedAt\": …}}); it guards against replayed revocation lists: restore it from a backup, or delete it knowing that an older list would then be accepted once", path.display()))
}

/// Records `signed_at` durably (temporary file, fsync, rename).
pub fn write_revocations_floor(
    path: &Path,
    signed_at: OffsetDateTime,
    sha256: &str,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::json!({
        "signedAt": signed_at.format(&Rfc3339).unwrap_or_default(),
        "sha256": sha256,
    })
    .to_string();
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn unexpired_enrollments_are_read_back_and_other_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        assert_eq!(
            used_tokens(&path, datetime!(2026-12-01 0:00 UTC)).unwrap(),
            vec![]
        );
        std::fs::write(
            &path,
            concat!(
                r#"{"time":"2026-12-01T10:00:00Z","how":"enroll","cn":"web-01","nonce":"n1","tokenExpiresAt":"2026-12-02T10:00:00Z"}"#, "\n",
                r#"{"time":"2026-12-01T11:00:00Z","how":"renew","cn":"web-01","serial":"aa"}"#, "\n",
                "not json\n",
                r#"{"time":"2026-11-01T10:00:00Z","how":"enroll","cn":"web-02","nonce":"n2","tokenExpiresAt":"2026-11-02T10:00:00Z"}"#, "\n",
                r#"{"time":"2026-11-20T10:00:00Z","how":"enroll","cn":"web-03","nonce":"n3"}"#, "\n",
            ),
        )
        .unwrap();
        let used = used_tokens(&path, datetime!(2026-12-01 12:00 UTC)).unwrap();
        let nonces: Vec<&str> = used.iter().map(|u| u.nonce.as_str()).collect();
        // n2's token expired; n3 predates tokenExpiresAt and is kept for 30 days.
        assert_eq!(nonces, ["n1", "n3"]);
        assert_eq!(used[1].expires_at, datetime!(2026-12-20 10:00 UTC));
    }

    #[test]
    fn the_revocations_floor_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = revocations_floor_path(&dir.path().join("audit.log"));
        assert_eq!(read_revocations_floor(&path).unwrap(), None);
        let t = datetime!(2026-12-01 10:00 UTC);
        write_revocations_floor(&path, t, "ab").unwrap();
        assert_eq!(read_revocations_floor(&path).unwrap(), Some(t));
        std::fs::write(&path, b"{}").unwrap();
        let e = read_revocations_floor(&path).unwrap_err();
        assert!(e.contains("replayed revocation lists"), "{e}");
    }
}
