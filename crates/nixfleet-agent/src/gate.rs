//! The target gate (SPEC.md §7 "On a target"): what the control plane says is only
//! believed when the CI-signed rollout manifest says it too. Pure: the manifest bytes, the
//! trust roots and the time are arguments.

use nixfleet_proto::wire::{closure_blocked, FailedTarget, ReportKind, Target};
use nixfleet_proto::{RolloutManifest, TrustFile};
use nixfleet_trust::verify::{self, Limits, ManifestContext, VerifyError};
use time::OffsetDateTime;

use std::collections::BTreeMap;

use time::format_description::well_known::Rfc3339;

use crate::machine::Activation;
use crate::store::Accepted;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A refused target: the report kind and the one-sentence reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ReportKind,
    pub reason: String,
}

fn manifest_rejected(reason: String) -> Refusal {
    Refusal {
        kind: ReportKind::ManifestRejected,
        reason,
    }
}

pub use nixfleet_proto::wire::{is_rollout_id, is_store_basename};

/// Why a closure that already failed here is not activated again.
pub fn already_failed(target: &Target, f: &FailedTarget) -> String {
    if f.rollout_id == target.rollout_id {
        format!(
            "closure {} already failed on this host in rollout {} ({}); it is never activated again in that rollout",
            target.closure_hash, target.rollout_id, f.reason
        )
    } else {
        format!(
            "closure {} already failed on this host in rollout {} ({}); a later rollout does not send it again by itself (to retry it on purpose, see docs/release.md)",
            target.closure_hash, f.rollout_id, f.reason
        )
    }
}

/// Checks done before anything is fetched: the shape of the ids, a rollout swapped under
/// an activation in flight, and a closure that already failed on this host
/// ([`closure_blocked`]).
pub fn precheck(
    target: &Target,
    in_flight: Option<&Activation>,
    failed_targets: &[FailedTarget],
) -> Result<(), Refusal> {
    if !is_rollout_id(&target.rollout_id) {
        return Err(manifest_rejected(format!(
            "the control plane sent rollout id {:?}, which is not a SHA-256 hex digest",
            target.rollout_id
        )));
    }
    if !is_store_basename(&target.closure_hash) {
        return Err(manifest_rejected(format!(
            "the control plane sent closure {:?}, which is not a Nix store basename",
            target.closure_hash
        )));
    }
    if let Some(activation) = in_flight {
        if activation.target.rollout_id != target.rollout_id {
            return Err(manifest_rejected(format!(
                "the control plane changed the rollout of the activation in flight from {} to {}; a rollout id never changes mid-rollout",
                activation.target.rollout_id, target.rollout_id
            )));
        }
    }
    if let Some(f) = closure_blocked(failed_targets, &target.rollout_id, &target.closure_hash) {
        return Err(manifest_rejected(already_failed(target, f)));
    }
    Ok(())
}

/// Verifies the manifest (signature against ciReleaseKey, id = hash of its intent,
/// freshness from its own signed window), that it gives this host this closure in this
/// wave, and that it is not older than a manifest of its channel this host already
/// accepted (`newest`, per channel). `manifest_source` names where the bytes came from.
#[allow(clippy::too_many_arguments)]
pub fn check(
    target: &Target,
    hostname: &str,
    manifest: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    manifest_source: &str,
    newest: &BTreeMap<String, Accepted>,
) -> Result<RolloutManifest, Refusal> {
    let verified = verify::verify_manifest(
        manifest,
        signature,
        trust,
        now,
        ManifestContext {
            rollout_id: Some(&target.rollout_id),
            fleet: None,
        },
        &Limits::default(),
    )
    .map_err(|e| Refusal {
        kind: match e {
            VerifyError::Stale { .. } => ReportKind::StaleTarget,
            _ => ReportKind::ManifestRejected,
        },
        reason: format!("rollout manifest {manifest_source}: {e}"),
    })?;
    let manifest = &verified.value;
    if !manifest.contains(hostname, target.wave_index, &target.closure_hash) {
        let actual = match manifest.entry(hostname) {
            Some(e) => format!(
                "it gives {hostname} closure {} in wave {}",
                e.target_closure, e.wave_index
            ),
            None => format!("its hostSet does not list {hostname}"),
        };
        return Err(manifest_rejected(format!(
            "the control plane sent closure {} in wave {} of rollout {}, but the signed manifest disagrees: {actual}",
            target.closure_hash, target.wave_index, target.rollout_id
        )));
    }
    if let Some(mark) = newest.get(&manifest.channel) {
        if verified.signed_at < mark.signed_at {
            return Err(manifest_rejected(format!(
                "rollout {} of channel {} was signed at {}, before the newest release this host already accepted for that channel (signed at {}); an older release is never activated (it is being replayed); to go back, CI signs a new release naming the older closure",
                target.rollout_id,
                manifest.channel,
                rfc3339(verified.signed_at),
                rfc3339(mark.signed_at)
            )));
        }
    }
    Ok(verified.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::wire::FailureCause;
    use time::macros::datetime;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const CLOSURE: &str = "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-nixos-system-a-1";

    fn target(rollout: &str, closure: &str) -> Target {
        Target {
            closure_hash: closure.to_owned(),
            rollout_id: rollout.to_owned(),
            wave_index: 0,
            signed_at: datetime!(2026-11-27 10:00 UTC),
            freshness_window_secs: 3600,
            confirm_window_secs: 60,
        }
    }

    #[test]
    fn store_basenames_are_checked() {
        assert!(is_store_basename(CLOSURE));
        for bad in [
            "",
            "nohash",
            "../../etc/passwd",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-a/b",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci1-short",
            "Pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-upper",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-",
        ] {
            assert!(!is_store_basename(bad), "{bad}");
        }
    }

    #[test]
    fn a_swapped_rollout_id_is_refused() {
        let in_flight = Activation {
            target: target(ID, CLOSURE),
            previous: "x".into(),
        };
        let other = ID.replace('0', "f");
        let r = precheck(&target(&other, CLOSURE), Some(&in_flight), &[]).unwrap_err();
        assert_eq!(r.kind, ReportKind::ManifestRejected);
        assert!(r.reason.contains("changed the rollout"), "{}", r.reason);
        assert!(precheck(&target(ID, CLOSURE), Some(&in_flight), &[]).is_ok());
    }

    fn failure(rollout: &str, cause: FailureCause) -> FailedTarget {
        FailedTarget {
            rollout_id: rollout.into(),
            closure_hash: CLOSURE.into(),
            reason: "switch-to-configuration exited with status 1".into(),
            at: datetime!(2026-11-27 10:00 UTC),
            cause: Some(cause),
        }
    }

    #[test]
    fn a_closure_that_failed_in_the_rollout_is_refused() {
        let failed = failure(ID, FailureCause::ConfirmTimeout);
        assert!(precheck(&target(ID, CLOSURE), None, &[failed]).is_err());
    }

    #[test]
    fn a_closure_whose_activation_failed_here_is_refused_in_a_later_rollout() {
        let later = ID.replace('0', "f");
        let r = precheck(
            &target(&later, CLOSURE),
            None,
            &[failure(ID, FailureCause::Activation)],
        )
        .unwrap_err();
        assert_eq!(r.kind, ReportKind::ManifestRejected);
        assert!(r.reason.contains("does not send it again"), "{}", r.reason);
        assert!(
            r.reason.contains("status 1"),
            "the original reason: {}",
            r.reason
        );
        // A rollback on the control plane's signal says nothing about the closure here.
        let signalled = failure(ID, FailureCause::RollbackSignal);
        assert!(precheck(&target(&later, CLOSURE), None, &[signalled]).is_ok());
    }

    #[test]
    fn malformed_ids_are_refused() {
        assert!(precheck(&target("abc", CLOSURE), None, &[]).is_err());
        assert!(precheck(&target(ID, "/nix/store/x"), None, &[]).is_err());
    }
}
