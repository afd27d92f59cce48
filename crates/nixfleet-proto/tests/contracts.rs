//! The serialisation rules of SPEC.md §4 hold for every contract.

use nixfleet_proto::wire::{CheckinRequest, CheckinResponse};
use nixfleet_proto::*;

const SPEC_FLEET: &str = r#"{
  "schemaVersion": 1,
  "hosts": {
    "web-01": { "system": "x86_64-linux", "tags": ["web", "canary"], "channel": "stable",
                "closureHash": "abc-nixos-system", "pubkey": "ssh-ed25519 AAAA root@web-01" }
  },
  "channels": {
    "stable": { "rolloutPolicy": "canary", "reconcileIntervalMinutes": 30,
                "signingIntervalMinutes": 60, "freshnessWindow": 1440,
                "compliance": { "frameworks": [], "mode": "disabled" } }
  },
  "rolloutPolicies": {
    "canary": {
      "strategy": "canary",
      "waves": [ { "selector": { "tags": ["canary"] }, "soakMinutes": 30 },
                 { "selector": { "all": true }, "soakMinutes": 0 } ],
      "healthGate": { "systemdFailedUnits": { "max": 0 }, "maxFailures": 0 },
      "onHealthFailure": "rollback-and-halt"
    }
  },
  "waves": { "stable": [ { "hosts": ["web-01"], "soakMinutes": 30 } ] },
  "edges": [ { "before": "db-01", "after": "web-01", "reason": "schema migration first" } ],
  "channelEdges": [ { "before": "edge", "after": "stable", "reason": "lab first" } ],
  "disruptionBudgets": [ { "selector": { "tags": ["db"] }, "maxInFlight": 1, "maxInFlightPct": null } ],
  "meta": { "schemaVersion": 1, "signedAt": "2026-11-27T10:00:00Z", "ciCommit": "abc123", "signatureAlgorithm": "ed25519" },
  "someFutureField": { "ignored": true }
}"#;

#[test]
fn spec_fleet_example_parses_and_unknown_fields_are_ignored() {
    let fleet: FleetResolved = serde_json::from_str(SPEC_FLEET).unwrap();
    assert_eq!(fleet.hosts["web-01"].tags, ["web", "canary"]);
    assert_eq!(
        fleet.rollout_policies["canary"].on_health_failure,
        OnHealthFailure::RollbackAndHalt
    );
    assert_eq!(fleet.freshness_window_minutes(), Some(1440));
    assert_eq!(
        fleet.meta.signed_at.unwrap(),
        time::macros::datetime!(2026-11-27 10:00:00 UTC)
    );
    assert_eq!(fleet.select(&Selector::tags(["canary"])), ["web-01"]);
}

#[test]
fn optional_values_are_written_as_explicit_null_in_camel_case() {
    let meta = Meta::unsigned(1);
    let json = serde_json::to_string(&meta).unwrap();
    assert_eq!(
        json,
        r#"{"schemaVersion":1,"signedAt":null,"ciCommit":null,"signatureAlgorithm":null}"#
    );
    let slot = KeySlot {
        current: PublicKeyEntry {
            algorithm: Algorithm::EcdsaP256,
            public: "AA==".into(),
        },
        previous: None,
        reject_before: None,
    };
    assert_eq!(
        serde_json::to_string(&slot).unwrap(),
        r#"{"current":{"algorithm":"ecdsa-p256","public":"AA=="},"previous":null,"rejectBefore":null}"#
    );
}

#[test]
fn checkin_round_trip_and_missing_optionals() {
    let req: CheckinRequest = serde_json::from_str(
        r#"{"hostname":"web-01","agentVersion":"0.1.0","bootId":"b","currentGeneration":{"closureHash":"x"},"health":{"failedUnits":0,"uptimeSecs":5}}"#,
    )
    .unwrap();
    assert!(req.last_confirmed_at.is_none());
    assert!(req.failed_targets.is_empty());
    let resp = CheckinResponse {
        target: None,
        rollback: None,
        next_checkin_secs: 60,
        compliance_evidence_at: None,
    };
    assert_eq!(
        serde_json::to_string(&resp).unwrap(),
        r#"{"target":null,"rollback":null,"nextCheckinSecs":60,"complianceEvidenceAt":null}"#
    );
}

#[test]
fn manifest_membership_uses_the_sorted_host_set() {
    let m = RolloutManifest {
        schema_version: 1,
        display_name: "stable@abc123".into(),
        channel: "stable".into(),
        channel_ref: "abc123".into(),
        fleet_resolved_hash: "00".into(),
        host_set: vec![
            HostSetEntry {
                hostname: "a".into(),
                wave_index: 0,
                target_closure: "c1".into(),
            },
            HostSetEntry {
                hostname: "b".into(),
                wave_index: 1,
                target_closure: "c2".into(),
            },
        ],
        waves: vec![
            ManifestWave { soak_minutes: 0 },
            ManifestWave { soak_minutes: 0 },
        ],
        health_gate: HealthGate::default(),
        on_health_failure: OnHealthFailure::Halt,
        compliance_frameworks: vec![],
        disruption_budgets: vec![],
        freshness_window: Some(60),
        introduced: None,
        meta: Meta::unsigned(1),
        compliance: None,
    };
    assert!(m.contains("b", 1, "c2"));
    assert!(!m.contains("b", 0, "c2"), "wrong wave");
    assert!(!m.contains("b", 1, "c1"), "wrong closure");
    assert!(!m.contains("c", 0, "c1"), "not in the rollout");
}

#[test]
fn operator_host_detail_is_the_host_plus_its_events_in_snake_case() {
    use nixfleet_proto::api::{state_name, HostDetail};
    let text = r#"{"name": "web-03", "channel": "stable",
        "declared_closure": "a-x", "current_closure": null, "last_checkin": null,
        "online": false, "converged": false, "rollout": null, "rollout_state": null,
        "waiting": "waiting: never seen",
        "events": [{"rollout_id": "r", "hostname": "web-03", "kind": "dispatch",
                    "detail": {"action": "dispatch", "wave": 1}, "at": "2026-11-27T10:00:01Z"}],
        "added_later": 1}"#;
    let detail: HostDetail = serde_json::from_str(text).unwrap();
    assert_eq!(detail.host.name, "web-03");
    assert_eq!(detail.events[0].kind, "dispatch");
    let back = serde_json::to_value(&detail).unwrap();
    assert!(back.get("host").is_none(), "flattened: {back}");
    assert_eq!(
        back["waiting"],
        detail.host.waiting.clone().unwrap().as_str()
    );
    assert_eq!(back["last_checkin"], serde_json::Value::Null);
    assert_eq!(
        state_name(&serde_json::json!({"halted": {"wave": 0}})),
        "halted"
    );
    assert_eq!(state_name(&serde_json::json!("converged")), "converged");
}

#[test]
fn a_closure_that_failed_on_a_host_is_blocked_by_cause() {
    use nixfleet_proto::wire::{closure_blocked, FailedTarget, FailureCause};
    let f = |rollout: &str, closure: &str, cause: Option<FailureCause>, minute: u8| FailedTarget {
        rollout_id: rollout.into(),
        closure_hash: closure.into(),
        reason: format!("{cause:?} in {rollout}"),
        at: time::macros::datetime!(2026-11-27 10:00 UTC) + time::Duration::minutes(minute.into()),
        cause,
    };
    use FailureCause::*;
    // Any failure blocks its own rollout.
    for cause in [Activation, ConfirmTimeout, RollbackSignal, Refused] {
        let list = [f("A", "c", Some(cause), 0)];
        assert!(closure_blocked(&list, "A", "c").is_some(), "{cause:?}");
        assert!(closure_blocked(&list, "A", "other").is_none(), "{cause:?}");
    }
    // Across rollouts: an activation failure, or an unknown cause, blocks at once.
    for cause in [Some(Activation), Some(Health), None, Some(Other)] {
        let list = [f("A", "c", cause, 0)];
        let hit = closure_blocked(&list, "B", "c").unwrap();
        assert_eq!(hit.rollout_id, "A", "{cause:?}");
    }
    // What says nothing about the closure on this host does not.
    for cause in [RollbackSignal, Refused] {
        assert!(closure_blocked(&[f("A", "c", Some(cause), 0)], "B", "c").is_none());
    }
    // A confirm timeout may be retried once by one later rollout, not twice.
    let once = [f("A", "c", Some(ConfirmTimeout), 0)];
    assert!(closure_blocked(&once, "B", "c").is_none());
    let twice = [
        f("A", "c", Some(ConfirmTimeout), 0),
        f("B", "c", Some(ConfirmTimeout), 5),
    ];
    assert_eq!(closure_blocked(&twice, "C", "c").unwrap().rollout_id, "B");
    // Older agents send no cause; a newer one may send a cause this build does not know.
    let parsed: FailedTarget = serde_json::from_str(
        r#"{"rolloutId":"A","closureHash":"c","reason":"x","at":"2026-11-27T10:00:00Z","cause":"quantum-flux"}"#,
    )
    .unwrap();
    assert_eq!(parsed.cause, Some(Other));
    let old: FailedTarget = serde_json::from_str(
        r#"{"rolloutId":"A","closureHash":"c","reason":"x","at":"2026-11-27T10:00:00Z"}"#,
    )
    .unwrap();
    assert_eq!(old.cause, None);
}
