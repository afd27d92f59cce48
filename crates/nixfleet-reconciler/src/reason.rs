//! The sentences that answer "why hasn't host X upgraded?".

use nixfleet_proto::compliance::FailingControl;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// RFC 3339 in UTC (`2026-11-27T10:00:00Z`).
pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("@{}", at.unix_timestamp()))
}

pub(crate) fn wave_not_reached(wave: u32) -> String {
    format!("waiting: wave {wave} not reached")
}

pub(crate) fn offline(since: OffsetDateTime) -> String {
    format!("waiting: offline since {}", rfc3339(since))
}

/// No check-in since the control plane started (the control plane itself tells a host it
/// never saw from one seen before the start, see its `/v1/hosts`).
pub(crate) fn not_seen(since: OffsetDateTime) -> String {
    format!(
        "waiting: no check-in since the control plane started at {}",
        rfc3339(since)
    )
}

pub(crate) fn edge(before: &str) -> String {
    format!("waiting: edge {before} not soaked")
}

pub(crate) fn budget(label: &str, in_flight: u32, limit: u32) -> String {
    format!("waiting: budget \"{label}\" {in_flight}/{limit} in flight")
}

/// Why a rollout is pending (its `pending: …` in `nixfleet rollout list`).
pub(crate) fn deferred(predecessor: &str, display: &str, word: &str) -> String {
    format!("after channel {predecessor}, whose rollout {display} is {word}")
}

pub(crate) fn channel_edge(predecessor: &str) -> String {
    format!("waiting: channel {predecessor} must finish its rollout first")
}

/// The longest failure reason quoted in another host's reason.
const QUOTED_REASON_CHARS: usize = 120;

/// `held: rollout halted after 2 failures in wave 0 (first: web-01, health gate: 1 failed
/// unit, max 0)`.
pub(crate) fn held(word: &str, failures: u32, wave: u32, first: Option<(&str, &str)>) -> String {
    let plural = if failures == 1 { "" } else { "s" };
    let first = match first {
        Some((host, why)) => {
            let mut quoted: String = why.chars().take(QUOTED_REASON_CHARS).collect();
            if why.chars().count() > QUOTED_REASON_CHARS {
                quoted.push('…');
            }
            format!(" (first: {host}, {quoted})")
        }
        None => String::new(),
    };
    format!("held: rollout {word} after {failures} failure{plural} in wave {wave}{first}")
}

pub(crate) fn soaking(elapsed_minutes: i64, soak_minutes: u32) -> String {
    format!("soaking: {elapsed_minutes}m of {soak_minutes}m")
}

/// A host whose target closure already failed on it in another rollout.
pub(crate) fn already_failed(rollout: &str, reason: &str) -> String {
    let short: String = rollout.chars().take(12).collect();
    format!("closure already failed on this host in rollout {short} ({reason}); not sent again by itself")
}

/// A live rollout whose signed manifest is not in the release the control plane serves.
pub(crate) fn manifest_missing(id: &str) -> String {
    format!("waiting: manifest of rollout {id} is not available (a rollout recorded under an id the current release does not carry, e.g. from before an upgrade; see docs/release.md \"Upgrading\")")
}

/// `activation timeout: still switching (since …) 1800 s after delivery (--activation-timeout-secs)`.
pub(crate) fn activation_timeout(
    doing: &str,
    since: OffsetDateTime,
    timeout: time::Duration,
) -> String {
    format!(
        "activation timeout: still {doing} (since {}) {} s after delivery (--activation-timeout-secs)",
        rfc3339(since),
        timeout.whole_seconds()
    )
}

/// `compliance: control ssh-root-login-key-only fail, auditd-enabled error`: a soaking
/// host's evidence for its target closure, in an `enforce` rollout.
pub(crate) fn compliance_failed(failing: &[FailingControl]) -> String {
    let list: Vec<String> = failing
        .iter()
        .map(|c| format!("{} {}", c.id, c.status.as_str()))
        .collect();
    let plural = if failing.len() == 1 { "" } else { "s" };
    format!("compliance: control{plural} {}", list.join(", "))
}

pub(crate) fn compliance_awaited(host: &str) -> String {
    format!("soaking: waiting for compliance evidence from {host} for its new closure")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn reasons_read_as_specified() {
        assert_eq!(wave_not_reached(1), "waiting: wave 1 not reached");
        assert_eq!(budget("db", 1, 1), "waiting: budget \"db\" 1/1 in flight");
        assert_eq!(edge("db-01"), "waiting: edge db-01 not soaked");
        assert_eq!(
            offline(datetime!(2026-11-27 10:00:00 UTC)),
            "waiting: offline since 2026-11-27T10:00:00Z"
        );
        assert_eq!(
            offline(datetime!(2026-11-27 11:00:00 +1)),
            "waiting: offline since 2026-11-27T10:00:00Z"
        );
        assert_eq!(
            channel_edge("edge"),
            "waiting: channel edge must finish its rollout first"
        );
        assert_eq!(
            not_seen(datetime!(2026-11-27 10:00:00 UTC)),
            "waiting: no check-in since the control plane started at 2026-11-27T10:00:00Z"
        );
        assert_eq!(
            deferred("edge", "edge@0123456", "executing"),
            "after channel edge, whose rollout edge@0123456 is executing"
        );
        assert_eq!(
            activation_timeout("switching", datetime!(2026-11-27 10:00:00 UTC), time::Duration::seconds(1800)),
            "activation timeout: still switching (since 2026-11-27T10:00:00Z) 1800 s after delivery (--activation-timeout-secs)"
        );
        assert_eq!(
            held("halted", 2, 0, None),
            "held: rollout halted after 2 failures in wave 0"
        );
        assert_eq!(
            held("reverted", 1, 3, None),
            "held: rollout reverted after 1 failure in wave 3"
        );
        assert_eq!(
            held("halted", 1, 0, Some(("web-01", "compliance: control auditd-enabled fail"))),
            "held: rollout halted after 1 failure in wave 0 (first: web-01, compliance: control auditd-enabled fail)"
        );
        let long = "x".repeat(300);
        assert!(held("halted", 1, 0, Some(("web-01", &long))).ends_with("x…)"));
        assert_eq!(soaking(12, 30), "soaking: 12m of 30m");
        assert_eq!(
            already_failed(&"a".repeat(64), "activation failed: exit 1"),
            "closure already failed on this host in rollout aaaaaaaaaaaa (activation failed: exit 1); not sent again by itself"
        );
        assert!(manifest_missing("abc").starts_with(
            "waiting: manifest of rollout abc is not available (a rollout recorded under an id"
        ));
    }
}
