//! Before the agent starts: at boot (launchd starts daemons early, with no ordering on the
//! network, the clock or other daemons) the host key, the CA certificate or the trust file
//! may not exist yet, and the clock may not be set. Rather than exit and be restarted in
//! a loop, or sleep a fixed time, the agent waits with backoff, logging what it waits
//! for, until each file exists and the clock is sane: not before its certificate's
//! notBefore when it has one, else not before [`CLOCK_FLOOR`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::config::Config;
use crate::identity;

/// No clock that runs this agent can honestly be earlier than this (before it was written).
pub const CLOCK_FLOOR: OffsetDateTime = time::macros::datetime!(2025-01-01 00:00 UTC);

/// The longest wait between two looks.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// What the agent still waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// A file the agent cannot start without does not exist yet.
    Missing { what: &'static str, path: PathBuf },
    /// The clock is before `not_before`.
    Clock {
        now: OffsetDateTime,
        not_before: OffsetDateTime,
        reason: &'static str,
    },
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocker::Missing { what, path } => write!(
                f,
                "waiting for {what} {} (it does not exist yet)",
                path.display()
            ),
            Blocker::Clock {
                now,
                not_before,
                reason,
            } => write!(
                f,
                "waiting for a sane clock: it says {now}, before {reason} {not_before} (is time sync running?)"
            ),
        }
    }
}

/// The first thing the agent waits for, or None when it can start. `cert` is the agent's
/// certificate (`<state dir>/cert.pem`), which may well not exist (not enrolled yet).
pub fn blocker(
    host_key: &Path,
    ca_cert: &Path,
    trust_file: &Path,
    cert: &Path,
    now: OffsetDateTime,
) -> Option<Blocker> {
    for (what, path) in [
        ("the host key", host_key),
        ("the CA certificate", ca_cert),
        ("the trust file", trust_file),
    ] {
        if !path.exists() {
            return Some(Blocker::Missing {
                what,
                path: path.to_path_buf(),
            });
        }
    }
    let cert_not_before = std::fs::read_to_string(cert)
        .ok()
        .as_deref()
        .and_then(identity::validity)
        .map(|(not_before, _)| not_before);
    let (not_before, reason) = match cert_not_before {
        Some(t) => (t, "the notBefore of its certificate"),
        None => (CLOCK_FLOOR, "the earliest date this agent can run at,"),
    };
    (now < not_before).then_some(Blocker::Clock {
        now,
        not_before,
        reason,
    })
}

/// Waits until [`blocker`] finds nothing; false when `shutdown` came first.
pub async fn wait_until_ready(config: &Config, shutdown: &mut watch::Receiver<bool>) -> bool {
    let cert = config.state_dir.join("cert.pem");
    let mut wait = Duration::from_secs(1);
    let mut waited = false;
    loop {
        let Some(blocked) = blocker(
            &config.host_key,
            &config.ca_cert,
            &config.trust_file,
            &cert,
            OffsetDateTime::now_utc(),
        ) else {
            if waited {
                tracing::info!("everything the agent needs is there; starting");
            }
            return true;
        };
        tracing::warn!("{blocked}; looking again in {} s", wait.as_secs());
        waited = true;
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return false,
        }
        wait = (wait * 2).min(MAX_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_each_file_then_for_the_clock() {
        let dir = std::env::temp_dir().join(format!("nixfleet-startup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, ca, trust, cert) = (
            dir.join("key"),
            dir.join("ca.pem"),
            dir.join("trust.json"),
            dir.join("cert.pem"),
        );
        let now = OffsetDateTime::now_utc();
        let missing = blocker(&key, &ca, &trust, &cert, now).unwrap();
        assert!(missing.to_string().contains("the host key"), "{missing}");
        std::fs::write(&key, "k").unwrap();
        let missing = blocker(&key, &ca, &trust, &cert, now).unwrap();
        assert!(
            missing.to_string().contains("the CA certificate"),
            "{missing}"
        );
        std::fs::write(&ca, "c").unwrap();
        std::fs::write(&trust, "t").unwrap();
        assert_eq!(blocker(&key, &ca, &trust, &cert, now), None);
        // A clock at the epoch (no RTC, no time sync yet) is not sane.
        let epoch = OffsetDateTime::UNIX_EPOCH;
        let clock = blocker(&key, &ca, &trust, &cert, epoch).unwrap();
        assert!(matches!(clock, Blocker::Clock { not_before, .. } if not_before == CLOCK_FLOOR));
        assert!(clock.to_string().contains("sane clock"), "{clock}");
        // With a certificate, its notBefore is the floor: a clock behind it (an RTC
        // reset on a host enrolled since) waits, one past it starts.
        let issued = time::macros::datetime!(2030-06-01 12:00 UTC);
        let (pem, _) = nixfleet_pki::generate_ca("host", issued, time::Duration::days(30)).unwrap();
        std::fs::write(&cert, pem).unwrap();
        let early = blocker(&key, &ca, &trust, &cert, issued - time::Duration::hours(1)).unwrap();
        assert!(
            matches!(early, Blocker::Clock { not_before, .. } if not_before == issued),
            "{early}"
        );
        assert!(
            early.to_string().contains("notBefore of its certificate"),
            "{early}"
        );
        assert_eq!(blocker(&key, &ca, &trust, &cert, issued), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
