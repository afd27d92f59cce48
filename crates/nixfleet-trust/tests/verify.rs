//! One test per attack of SPEC.md §3 against the verification pipeline, each asserting the
//! specific error variant, plus the positive cases (rotation, P-256, high-S).

use base64::Engine as _;
use nixfleet_proto::wire::{Report, ReportKind, ReportRequest};
use nixfleet_proto::*;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use nixfleet_trust::verify::*;
use proptest::prelude::*;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const SIGNED_AT: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

struct Keys {
    ci: PrivateKey,
    org: PrivateKey,
}

fn keys() -> Keys {
    Keys {
        ci: PrivateKey::generate(Algorithm::Ed25519),
        org: PrivateKey::generate(Algorithm::Ed25519),
    }
}

fn slot(key: &PrivateKey) -> KeySlot {
    KeySlot {
        current: key.public_key().to_entry(),
        previous: None,
        reject_before: None,
    }
}

fn trust(k: &Keys) -> TrustFile {
    TrustFile {
        schema_version: 1,
        ci_release_key: slot(&k.ci),
        org_root_key: slot(&k.org),
        cache_keys: vec![],
    }
}

fn meta(signed_at: Option<OffsetDateTime>) -> Meta {
    Meta {
        schema_version: 1,
        signed_at,
        ci_commit: Some("0123456789abcdef".into()),
        signature_algorithm: Some(Algorithm::Ed25519),
    }
}

fn fleet(signed_at: Option<OffsetDateTime>) -> FleetResolved {
    serde_json::from_value(serde_json::json!({
        "schemaVersion": 1,
        "hosts": {
            "web-01": {"system": "x86_64-linux", "tags": ["web"], "channel": "stable",
                       "closureHash": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web-01", "pubkey": null}
        },
        "channels": {
            "stable": {"rolloutPolicy": "all", "reconcileIntervalMinutes": 5,
                       "signingIntervalMinutes": 60, "freshnessWindow": 120}
        },
        "rolloutPolicies": {
            "all": {"strategy": "all-at-once", "waves": [{"selector": {"all": true}, "soakMinutes": 0}],
                    "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
                    "onHealthFailure": "halt"}
        },
        "waves": {"stable": [{"hosts": ["web-01"], "soakMinutes": 0}]},
        "edges": [], "channelEdges": [], "disruptionBudgets": [],
        "meta": meta(signed_at),
    }))
    .unwrap()
}

fn manifest(fleet_hash: &str, signed_at: OffsetDateTime) -> RolloutManifest {
    RolloutManifest {
        schema_version: 1,
        display_name: "stable@0123456".into(),
        channel: "stable".into(),
        channel_ref: "0123456789abcdef".into(),
        fleet_resolved_hash: fleet_hash.into(),
        host_set: vec![HostSetEntry {
            hostname: "web-01".into(),
            wave_index: 0,
            target_closure: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-web-01".into(),
        }],
        waves: vec![ManifestWave { soak_minutes: 0 }],
        health_gate: HealthGate::default(),
        on_health_failure: OnHealthFailure::Halt,
        compliance_frameworks: vec![],
        disruption_budgets: vec![],
        freshness_window: Some(120),
        introduced: None,
        meta: meta(Some(signed_at)),
        compliance: None,
    }
}

fn revocations(signed_at: OffsetDateTime) -> Revocations {
    Revocations {
        schema_version: 1,
        revocations: vec![Revocation {
            hostname: "web-02".into(),
            not_before: SIGNED_AT,
            reason: Some("decommissioned".into()),
            revoked_by: Some("ops".into()),
        }],
        freshness_window: None,
        meta: meta(Some(signed_at)),
    }
}

/// Serialises, canonicalises and signs: what `nixfleet release` does.
fn signed<T: serde::Serialize>(value: &T, key: &PrivateKey) -> (Vec<u8>, Vec<u8>) {
    let bytes = jcs::to_canonical(value).unwrap();
    let sig = key.sign(&bytes).to_vec();
    (bytes, sig)
}

fn now() -> OffsetDateTime {
    SIGNED_AT + Duration::minutes(5)
}

fn limits() -> Limits {
    Limits::default()
}

fn verified_fleet(k: &Keys) -> Verified<FleetResolved> {
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    verify_fleet(&bytes, &sig, &trust(k), now(), &limits()).unwrap()
}

#[test]
fn valid_fleet_verifies_with_current_key() {
    let k = keys();
    let v = verified_fleet(&k);
    assert_eq!(v.signed_by, SignedBy::Current);
    assert_eq!(v.signed_at, SIGNED_AT);
    assert_eq!(v.sha256, jcs::sha256_hex(&v.canonical));
    assert_eq!(v.value.hosts.len(), 1);
}

#[test]
fn received_bytes_are_canonicalised_not_reserialised() {
    // The signer signed canonical bytes; the transport pretty-printed them. Still valid.
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let pretty = serde_json::to_vec_pretty(&value).unwrap();
    let v = verify_fleet(&pretty, &sig, &trust(&k), now(), &limits()).unwrap();
    assert_eq!(v.canonical, bytes);
}

#[test]
fn bit_flip_in_payload_is_refused() {
    let k = keys();
    let (mut bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let at = bytes.windows(6).position(|w| w == b"web-01").unwrap();
    bytes[at] ^= 0x01; // "web-01" -> "vab-01": still valid JSON
    let err = verify_fleet(&bytes, &sig, &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(
        err,
        VerifyError::BadSignature {
            artifact: Artifact::Fleet,
            slot: Slot::CiReleaseKey
        }
    ));
}

#[test]
fn bit_flip_in_signature_is_refused() {
    let k = keys();
    let (bytes, mut sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    sig[10] ^= 0x80;
    let err = verify_fleet(&bytes, &sig, &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
}

#[test]
fn signature_by_a_foreign_key_is_refused() {
    let k = keys();
    let foreign = PrivateKey::generate(Algorithm::Ed25519);
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &foreign);
    let err = verify_fleet(&bytes, &sig, &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
}

#[test]
fn missing_or_truncated_signature_is_refused() {
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    for bad in [&[][..], &sig[..63]] {
        let err = verify_fleet(&bytes, bad, &trust(&k), now(), &limits()).unwrap_err();
        assert!(matches!(err, VerifyError::SignatureLength { .. }), "{err}");
    }
}

#[test]
fn unsigned_artifact_is_refused_even_with_a_valid_signature() {
    let k = keys();
    let (bytes, sig) = signed(&fleet(None), &k.ci);
    let err = verify_fleet(&bytes, &sig, &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(
        err,
        VerifyError::Unsigned {
            artifact: Artifact::Fleet
        }
    ));
}

#[test]
fn unsupported_schema_version_is_refused() {
    let k = keys();
    let mut f = fleet(Some(SIGNED_AT));
    f.schema_version = 2;
    let (bytes, sig) = signed(&f, &k.ci);
    let err = verify_fleet(&bytes, &sig, &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(
        err,
        VerifyError::UnsupportedSchema {
            found: 2,
            supported: 1,
            ..
        }
    ));
}

#[test]
fn artifact_signed_before_reject_before_is_refused_for_either_key() {
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let mut t = trust(&k);
    t.ci_release_key.reject_before = Some(SIGNED_AT + Duration::seconds(1));
    let err = verify_fleet(&bytes, &sig, &t, now(), &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::RejectedBefore { .. }), "{err}");
    // Same cut-off when the signature comes from the previous key.
    let new = PrivateKey::generate(Algorithm::Ed25519);
    t.ci_release_key.previous = Some(t.ci_release_key.current.clone());
    t.ci_release_key.current = new.public_key().to_entry();
    let err = verify_fleet(&bytes, &sig, &t, now(), &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::RejectedBefore { .. }), "{err}");
    t.ci_release_key.reject_before = Some(SIGNED_AT);
    assert!(verify_fleet(&bytes, &sig, &t, now(), &limits()).is_ok());
}

#[test]
fn stale_artifact_is_refused_after_window_plus_slack() {
    // freshnessWindow 120 minutes + 60 s slack.
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let edge = SIGNED_AT + Duration::minutes(120) + Duration::seconds(60);
    assert!(verify_fleet(&bytes, &sig, &trust(&k), edge, &limits()).is_ok());
    let err = verify_fleet(
        &bytes,
        &sig,
        &trust(&k),
        edge + Duration::seconds(1),
        &limits(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Stale {
                window_minutes: 120,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn future_dated_by_61s_is_refused_and_59s_accepted() {
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let t = trust(&k);
    let ok = verify_fleet(
        &bytes,
        &sig,
        &t,
        SIGNED_AT - Duration::seconds(59),
        &limits(),
    );
    assert!(ok.is_ok());
    let err = verify_fleet(
        &bytes,
        &sig,
        &t,
        SIGNED_AT - Duration::seconds(61),
        &limits(),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::FutureDated { .. }), "{err}");
}

#[test]
fn oversize_input_is_refused_before_parsing() {
    let k = keys();
    let limits = Limits {
        fleet_bytes: 1024,
        ..Limits::default()
    };
    // Not even JSON: the size check comes first.
    let endless = vec![b'['; 1025];
    let err = verify_fleet(&endless, &[0; 64], &trust(&k), now(), &limits).unwrap_err();
    assert!(matches!(
        err,
        VerifyError::TooLarge {
            size: 1025,
            limit: 1024,
            ..
        }
    ));
}

#[test]
fn malformed_json_is_a_parse_error() {
    let k = keys();
    let err = verify_fleet(b"{\"a\":", &[0; 64], &trust(&k), now(), &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::Parse { .. }), "{err}");
}

#[test]
fn previous_key_verifies_during_rotation() {
    let k = keys();
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    let mut t = trust(&k);
    t.ci_release_key.previous = Some(t.ci_release_key.current.clone());
    t.ci_release_key.current = PrivateKey::generate(Algorithm::EcdsaP256)
        .public_key()
        .to_entry();
    let v = verify_fleet(&bytes, &sig, &t, now(), &limits()).unwrap();
    assert_eq!(v.signed_by, SignedBy::Previous);
}

#[test]
fn ecdsa_p256_release_key_verifies() {
    let ci = PrivateKey::generate(Algorithm::EcdsaP256);
    let k = Keys {
        ci,
        org: PrivateKey::generate(Algorithm::Ed25519),
    };
    let v = verified_fleet(&k);
    assert_eq!(v.signed_by, SignedBy::Current);
}

#[test]
fn high_s_p256_signature_is_accepted() {
    use p256::elliptic_curve::ops::Reduce;
    use p256::elliptic_curve::scalar::IsHigh;
    use p256::elliptic_curve::PrimeField;
    let k = Keys {
        ci: PrivateKey::generate(Algorithm::EcdsaP256),
        org: PrivateKey::generate(Algorithm::Ed25519),
    };
    let (bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
    // s' = n - s is the other valid signature of the same message.
    let mut s_bytes = p256::FieldBytes::default();
    s_bytes.copy_from_slice(&sig[32..]);
    let s = p256::Scalar::reduce_bytes(&s_bytes);
    let high = if bool::from(s.is_high()) { s } else { -s };
    assert!(bool::from(high.is_high()), "constructed s must be high");
    let mut high_sig = sig.clone();
    high_sig[32..].copy_from_slice(&high.to_repr());
    let v = verify_fleet(&bytes, &high_sig, &trust(&k), now(), &limits()).unwrap();
    assert_eq!(v.signed_by, SignedBy::Current);
}

#[test]
fn manifest_verifies_with_its_id_and_fleet() {
    let k = keys();
    let f = verified_fleet(&k);
    let (bytes, sig) = signed(&manifest(&f.sha256, SIGNED_AT), &k.ci);
    let id = rollout_id(&bytes).unwrap();
    let ctx = ManifestContext {
        rollout_id: Some(&id),
        fleet: Some(&f),
    };
    let v = verify_manifest(&bytes, &sig, &trust(&k), now(), ctx, None, &limits()).unwrap();
    assert_eq!(v.id, id);
    assert_eq!(
        v.sha256,
        jcs::sha256_hex(&bytes),
        "sha256 still names the bytes"
    );
    assert_ne!(v.sha256, v.id);
}

#[test]
fn rollout_id_is_the_intent_and_a_re_sign_keeps_it() {
    let first = manifest(&"1".repeat(64), SIGNED_AT);
    let id = |m: &RolloutManifest| rollout_id(&jcs::to_canonical(m).unwrap()).unwrap();
    // A re-sign: new time, commit, display name, fleet binding, freshness, provenance.
    let mut resigned = manifest(&"2".repeat(64), SIGNED_AT + Duration::hours(1));
    resigned.channel_ref = "fedcba9876543210".into();
    resigned.display_name = "stable@fedcba9".into();
    resigned.freshness_window = Some(240);
    resigned.introduced = Some(Introduced {
        ci_commit: Some("0123456789abcdef".into()),
        signed_at: SIGNED_AT,
    });
    assert_eq!(id(&first), id(&resigned));
    // Whitespace and member order of the received bytes do not matter either.
    let pretty = serde_json::to_vec_pretty(&first).unwrap();
    assert_eq!(rollout_id(&pretty).unwrap(), id(&first));
    // Any change to what hosts get, or how, is a new intent.
    type Change = fn(&mut RolloutManifest);
    let changes: [(&str, Change); 6] = [
        ("closure", |m| m.host_set[0].target_closure.push('2')),
        ("wave", |m| m.host_set[0].wave_index = 1),
        ("soak", |m| m.waves[0].soak_minutes = 5),
        ("gate", |m| m.health_gate.max_failures = 1),
        ("policy", |m| {
            m.on_health_failure = OnHealthFailure::RollbackAndHalt
        }),
        ("channel", |m| m.channel = "edge".into()),
    ];
    for (what, change) in changes {
        let mut changed = first.clone();
        change(&mut changed);
        assert_ne!(id(&changed), id(&first), "{what}");
    }
}

#[test]
fn manifest_whose_intent_was_altered_is_refused_under_its_id() {
    let k = keys();
    let f = verified_fleet(&k);
    let original = manifest(&f.sha256, SIGNED_AT);
    let id = rollout_id(&jcs::to_canonical(&original).unwrap()).unwrap();
    let mut altered = original.clone();
    altered.host_set[0].target_closure =
        "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-nixos-system-web-01".into();
    // Even signed by the CI key, other intent served under this id is refused.
    let (bytes, sig) = signed(&altered, &k.ci);
    let ctx = ManifestContext {
        rollout_id: Some(&id),
        fleet: Some(&f),
    };
    let err = verify_manifest(&bytes, &sig, &trust(&k), now(), ctx, None, &limits()).unwrap_err();
    assert!(
        matches!(err, VerifyError::ManifestIdMismatch { .. }),
        "{err}"
    );
}

#[test]
fn manifest_served_under_another_id_is_refused() {
    let k = keys();
    let f = verified_fleet(&k);
    let (bytes, sig) = signed(&manifest(&f.sha256, SIGNED_AT), &k.ci);
    let wrong = "0".repeat(64);
    let ctx = ManifestContext {
        rollout_id: Some(&wrong),
        fleet: Some(&f),
    };
    let err = verify_manifest(&bytes, &sig, &trust(&k), now(), ctx, None, &limits()).unwrap_err();
    assert!(
        matches!(err, VerifyError::ManifestIdMismatch { .. }),
        "{err}"
    );
}

#[test]
fn manifest_from_another_release_is_refused_mix_and_match() {
    let k = keys();
    let current = verified_fleet(&k);
    // A manifest validly signed for an older release of the fleet.
    let mut older = fleet(Some(SIGNED_AT - Duration::minutes(30)));
    older.meta.ci_commit = Some("older".into());
    let older_hash = jcs::sha256_hex(&jcs::to_canonical(&older).unwrap());
    let (bytes, sig) = signed(&manifest(&older_hash, SIGNED_AT), &k.ci);
    let ctx = ManifestContext {
        rollout_id: None,
        fleet: Some(&current),
    };
    let err = verify_manifest(&bytes, &sig, &trust(&k), now(), ctx, None, &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::FleetMismatch { .. }), "{err}");
}

#[test]
fn replayed_expired_manifest_is_refused_indefinite_freeze() {
    let k = keys();
    let (bytes, sig) = signed(&manifest("x", SIGNED_AT), &k.ci);
    let later = SIGNED_AT + Duration::days(30);
    let err = verify_manifest(
        &bytes,
        &sig,
        &trust(&k),
        later,
        ManifestContext::default(),
        None,
        &limits(),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::Stale { .. }), "{err}");
}

#[test]
fn manifest_without_any_freshness_window_is_refused() {
    let k = keys();
    let mut m = manifest("x", SIGNED_AT);
    m.freshness_window = None;
    let (bytes, sig) = signed(&m, &k.ci);
    let err = verify_manifest(
        &bytes,
        &sig,
        &trust(&k),
        now(),
        ManifestContext::default(),
        None,
        &limits(),
    )
    .unwrap_err();
    assert!(
        matches!(err, VerifyError::NoFreshnessWindow { .. }),
        "{err}"
    );
}

#[test]
fn revocations_verify_and_older_list_is_refused_rollback() {
    let k = keys();
    let t = trust(&k);
    let (bytes, sig) = signed(&revocations(SIGNED_AT), &k.ci);
    let v = verify_revocations(&bytes, &sig, &t, now(), None, &limits()).unwrap();
    assert_eq!(v.value.revocations[0].hostname, "web-02");
    // The same list again is fine (a re-poll).
    assert!(verify_revocations(&bytes, &sig, &t, now(), Some(SIGNED_AT), &limits()).is_ok());
    let newer = SIGNED_AT + Duration::minutes(1);
    let err = verify_revocations(&bytes, &sig, &t, now(), Some(newer), &limits()).unwrap_err();
    assert!(
        matches!(err, VerifyError::RevocationsRollback { .. }),
        "{err}"
    );
}

#[test]
fn revocations_with_a_freshness_window_go_stale() {
    let k = keys();
    let mut r = revocations(SIGNED_AT);
    r.freshness_window = Some(60);
    let (bytes, sig) = signed(&r, &k.ci);
    let later = SIGNED_AT + Duration::minutes(62);
    let err = verify_revocations(&bytes, &sig, &trust(&k), later, None, &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::Stale { .. }), "{err}");
}

#[test]
fn revocations_without_a_freshness_window_go_stale_after_seven_days() {
    let k = keys();
    let r = revocations(SIGNED_AT);
    assert_eq!(r.freshness_window, None);
    let (bytes, sig) = signed(&r, &k.ci);
    let week = Duration::minutes(i64::from(DEFAULT_REVOCATIONS_FRESHNESS_MINUTES));
    verify_revocations(&bytes, &sig, &trust(&k), SIGNED_AT + week, None, &limits()).unwrap();
    let replayed = SIGNED_AT + Duration::days(14);
    let err = verify_revocations(&bytes, &sig, &trust(&k), replayed, None, &limits()).unwrap_err();
    assert!(matches!(err, VerifyError::Stale { .. }), "{err}");
}

fn token(k: &Keys, issued_at: OffsetDateTime, hours: i64) -> Vec<u8> {
    let claims = TokenClaims {
        hostname: "web-01".into(),
        expected_pubkey_fingerprint: "SHA256:abc".into(),
        issued_at,
        expires_at: issued_at + Duration::hours(hours),
        nonce: "00112233445566778899aabbccddeeff".into(),
    };
    let sig = k.org.sign(&jcs::to_canonical(&claims).unwrap());
    let token = BootstrapToken {
        version: 1,
        claims,
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    };
    serde_json::to_vec_pretty(&token).unwrap()
}

#[test]
fn token_verifies_against_org_root_key() {
    let k = keys();
    let bytes = token(&k, SIGNED_AT, 24);
    let v = verify_token(&bytes, &trust(&k), now(), &limits()).unwrap();
    assert_eq!(v.value.hostname, "web-01");
}

#[test]
fn token_attacks_are_refused() {
    let k = keys();
    let t = trust(&k);
    let bytes = token(&k, SIGNED_AT, 24);
    let expired = SIGNED_AT + Duration::hours(25);
    assert!(matches!(
        verify_token(&bytes, &t, expired, &limits()).unwrap_err(),
        VerifyError::TokenExpired { .. }
    ));
    let tampered = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("web-01", "db-01");
    assert!(matches!(
        verify_token(tampered.as_bytes(), &t, now(), &limits()).unwrap_err(),
        VerifyError::BadSignature {
            slot: Slot::OrgRootKey,
            ..
        }
    ));
    // Signed by the CI key instead of the org root key.
    let wrong = Keys {
        ci: k.org.clone(),
        org: k.ci.clone(),
    };
    assert!(matches!(
        verify_token(&token(&wrong, SIGNED_AT, 24), &t, now(), &limits()).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
    let mut cut = t.clone();
    cut.org_root_key.reject_before = Some(SIGNED_AT + Duration::hours(1));
    assert!(matches!(
        verify_token(&bytes, &cut, now(), &limits()).unwrap_err(),
        VerifyError::RejectedBefore { .. }
    ));
}

#[test]
fn host_report_verifies_against_the_host_key_and_tampering_is_refused() {
    let host = PrivateKey::generate(Algorithm::Ed25519);
    let line = keys::to_ssh_public_line(&host.public_key(), "root@web-01").unwrap();
    let report = Report {
        hostname: "web-01".into(),
        report_id: "r1".into(),
        kind: ReportKind::RolledBack,
        rollout_id: Some("abc".into()),
        closure_hash: None,
        boot_id: "boot".into(),
        reason: "confirm window expired".into(),
        at: SIGNED_AT,
    };
    let sig = host.sign(&jcs::to_canonical(&report).unwrap());
    let req = ReportRequest {
        report,
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    };
    let bytes = serde_json::to_vec(&req).unwrap();
    let v = verify_report(&bytes, "web-01", &line, &limits()).unwrap();
    assert_eq!(v.value.report.kind, ReportKind::RolledBack);
    let tampered = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("confirm window expired", "all good");
    assert!(matches!(
        verify_report(tampered.as_bytes(), "web-01", &line, &limits()).unwrap_err(),
        VerifyError::BadSignature {
            slot: Slot::HostKey,
            ..
        }
    ));
    assert!(matches!(
        verify_report(&bytes, "db-01", &line, &limits()).unwrap_err(),
        VerifyError::ReportHostMismatch { .. }
    ));
}

#[test]
fn trust_file_checks() {
    let k = keys();
    let bytes = serde_json::to_vec(&trust(&k)).unwrap();
    assert!(check_trust_file("t.json", &bytes, 0o100644, &limits()).is_ok());
    assert!(matches!(
        check_trust_file("t.json", &bytes, 0o100664, &limits()).unwrap_err(),
        TrustFileError::Writable { .. }
    ));
    assert!(matches!(
        check_trust_file("t.json", &bytes, 0o100646, &limits()).unwrap_err(),
        TrustFileError::Writable { .. }
    ));
    let v2 = String::from_utf8(bytes.clone())
        .unwrap()
        .replace("\"schemaVersion\":1", "\"schemaVersion\":2");
    let err = check_trust_file("t.json", v2.as_bytes(), 0o100600, &limits()).unwrap_err();
    assert!(matches!(
        err,
        TrustFileError::UnsupportedSchema { found: 2, .. }
    ));
    assert!(err.to_string().contains("t.json"));
    let mut p256_org = trust(&k);
    p256_org.org_root_key.current = PrivateKey::generate(Algorithm::EcdsaP256)
        .public_key()
        .to_entry();
    let bytes = serde_json::to_vec(&p256_org).unwrap();
    assert!(matches!(
        check_trust_file("t.json", &bytes, 0o100600, &limits()).unwrap_err(),
        TrustFileError::OrgRootNotEd25519 { .. }
    ));
    let mut bad_cache = trust(&k);
    bad_cache.cache_keys = vec!["no-colon".into()];
    let bytes = serde_json::to_vec(&bad_cache).unwrap();
    assert!(matches!(
        check_trust_file("t.json", &bytes, 0o100600, &limits()).unwrap_err(),
        TrustFileError::CacheKey { .. }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_artifact_parser_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048), sig in proptest::collection::vec(any::<u8>(), 0..80)) {
        let k = keys();
        let t = trust(&k);
        let l = limits();
        prop_assert!(verify_fleet(&bytes, &sig, &t, now(), &l).is_err());
        prop_assert!(verify_manifest(&bytes, &sig, &t, now(), ManifestContext::default(), None, &l).is_err());
        prop_assert!(verify_revocations(&bytes, &sig, &t, now(), None, &l).is_err());
        prop_assert!(verify_token(&bytes, &t, now(), &l).is_err());
        prop_assert!(verify_report(&bytes, "h", "ssh-ed25519 AAAA", &l).is_err());
        prop_assert!(nixfleet_trust::verify::verify_evidence(&bytes, "h", "ssh-ed25519 AAAA", &l).is_err());
        let _ = check_trust_file("t", &bytes, 0o600, &l);
    }

    #[test]
    fn no_artifact_parser_panics_on_mutated_valid_artifacts(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let k = keys();
        let t = trust(&k);
        let (mut bytes, sig) = signed(&fleet(Some(SIGNED_AT)), &k.ci);
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        let original = signed(&fleet(Some(SIGNED_AT)), &k.ci).0;
        let result = verify_fleet(&bytes, &sig, &t, now(), &limits());
        // Any change to the canonical content must be refused.
        if jcs::canonicalize(&bytes).ok().as_deref() != Some(&original[..]) {
            prop_assert!(result.is_err());
        }
    }
}

// ---- schema 2: the host set and budget lists committed by hash -------------------------

use nixfleet_trust::hostset::{self, HostLists, HostSetError};

/// A schema-2 plan of `n` hosts in two waves with a fleet-wide budget.
fn plan(fleet_hash: &str, n: usize) -> RolloutManifest {
    let mut m = manifest(fleet_hash, SIGNED_AT);
    m.schema_version = MANIFEST_SCHEMA_VERSION;
    m.host_set = (0..n)
        .map(|i| HostSetEntry {
            hostname: format!("host-{i:06}"),
            wave_index: (i % 2) as u32,
            target_closure: format!("{:032}-nixos-system-host-{i:06}", i).replace('0', "a"),
        })
        .collect();
    m.waves = vec![ManifestWave { soak_minutes: 0 }; 2];
    m.disruption_budgets = vec![ManifestBudget {
        selector: Selector {
            all: Some(true),
            ..Selector::default()
        },
        hosts: m.host_set.iter().map(|e| e.hostname.clone()).collect(),
        max_in_flight: Some(10),
        max_in_flight_pct: None,
    }];
    m
}

struct V2 {
    plan: RolloutManifest,
    bytes: Vec<u8>,
    sig: Vec<u8>,
    id: String,
}

fn signed_v2(plan: RolloutManifest, key: &PrivateKey) -> V2 {
    let (bytes, sig) = signed(&hostset::header_of(&plan), key);
    V2 {
        id: rollout_id(&bytes).unwrap(),
        plan,
        bytes,
        sig,
    }
}

impl V2 {
    fn lists(&self) -> HostLists {
        HostLists {
            hosts: Some(RolloutHosts {
                rollout_id: self.id.clone(),
                host_set: self.plan.host_set.clone(),
            }),
            budgets: self
                .plan
                .disruption_budgets
                .iter()
                .map(|b| (hostset::budget_sha256(&b.hosts), b.hosts.clone()))
                .collect(),
        }
    }

    fn verify(
        &self,
        k: &Keys,
        lists: Option<&HostLists>,
    ) -> Result<Verified<RolloutManifest>, VerifyError> {
        let ctx = ManifestContext {
            rollout_id: Some(&self.id),
            fleet: None,
        };
        verify_manifest(
            &self.bytes,
            &self.sig,
            &trust(k),
            now(),
            ctx,
            lists,
            &limits(),
        )
    }

    fn proof(&self, host: &str) -> HostProof {
        let tree = hostset::tree(&self.plan.host_set);
        let text = String::from_utf8(self.bytes.clone()).unwrap();
        hostset::host_proof(&self.id, &text, &self.sig, &self.plan.host_set, &tree, host).unwrap()
    }
}

fn check_proof(k: &Keys, proof: &HostProof) -> Result<VerifiedEntry, VerifyError> {
    let bytes = serde_json::to_vec(proof).unwrap();
    verify_host_proof(
        &bytes,
        &trust(k),
        now(),
        ManifestContext::default(),
        &limits(),
    )
}

#[test]
fn schema_2_manifest_reads_back_the_whole_plan_from_its_lists() {
    let k = keys();
    let v2 = signed_v2(plan("x", 7), &k.ci);
    let header: ManifestHeader = serde_json::from_slice(&v2.bytes).unwrap();
    assert_eq!(header.host_set_size, 7);
    assert!(
        !String::from_utf8_lossy(&v2.bytes).contains("host-000003"),
        "no hostname in the header"
    );
    let whole = v2.verify(&k, Some(&v2.lists())).unwrap();
    assert_eq!(whole.value, v2.plan);
    assert_eq!(whole.id, v2.id);
    assert_eq!(
        whole.canonical, v2.bytes,
        "the signed bytes are the header's"
    );
}

#[test]
fn schema_2_rollout_id_commits_to_every_hosts_target() {
    let id = |p: &RolloutManifest| {
        rollout_id(&jcs::to_canonical(&hostset::header_of(p)).unwrap()).unwrap()
    };
    let first = plan("x", 5);
    type Change = fn(&mut RolloutManifest);
    let changes: [(&str, Change); 5] = [
        ("closure", |m| m.host_set[3].target_closure.push('2')),
        ("wave", |m| m.host_set[3].wave_index = 0),
        ("host dropped", |m| {
            m.host_set.pop();
        }),
        ("hostname", |m| m.host_set[4].hostname.push('x')),
        ("budget list", |m| {
            m.disruption_budgets[0].hosts.pop();
        }),
    ];
    for (what, change) in changes {
        let mut changed = first.clone();
        change(&mut changed);
        assert_ne!(id(&changed), id(&first), "{what}");
    }
    // A re-sign keeps it.
    let mut resigned = plan("y", 5);
    resigned.meta = meta(Some(SIGNED_AT + Duration::hours(1)));
    assert_eq!(id(&resigned), id(&first));
}

#[test]
fn schema_2_lists_that_do_not_match_what_is_signed_are_refused() {
    let k = keys();
    let v2 = signed_v2(plan("x", 6), &k.ci);
    let err = v2.verify(&k, None).unwrap_err();
    assert!(matches!(err, VerifyError::HostListsMissing { .. }), "{err}");
    type Alter = fn(&mut HostLists);
    let alterations: [(&str, Alter); 7] = [
        ("closure", |l| {
            l.hosts.as_mut().unwrap().host_set[2]
                .target_closure
                .push('x')
        }),
        ("wave", |l| {
            l.hosts.as_mut().unwrap().host_set[2].wave_index = 1
        }),
        ("dropped", |l| {
            l.hosts.as_mut().unwrap().host_set.pop();
        }),
        ("swapped", |l| l.hosts.as_mut().unwrap().host_set.swap(0, 1)),
        ("other rollout", |l| {
            l.hosts.as_mut().unwrap().rollout_id = "0".repeat(64)
        }),
        ("budget missing", |l| l.budgets.clear()),
        ("budget altered", |l| {
            for list in l.budgets.values_mut() {
                list.pop();
            }
        }),
    ];
    for (what, alter) in alterations {
        let mut lists = v2.lists();
        alter(&mut lists);
        let err = v2.verify(&k, Some(&lists)).unwrap_err();
        let VerifyError::HostLists { source, .. } = &err else {
            panic!("{what}: {err}");
        };
        let expected = match what {
            "closure" | "wave" => matches!(source, HostSetError::Root { .. }),
            "dropped" => matches!(source, HostSetError::Size { .. }),
            "swapped" => matches!(source, HostSetError::Unsorted { .. }),
            "other rollout" => matches!(source, HostSetError::WrongRollout { .. }),
            "budget missing" => matches!(source, HostSetError::BudgetMissing { .. }),
            _ => matches!(source, HostSetError::Budget { .. }),
        };
        assert!(expected, "{what}: {err}");
    }
}

#[test]
fn every_hosts_proof_verifies_and_any_alteration_fails() {
    let k = keys();
    let v2 = signed_v2(plan("x", 11), &k.ci);
    for e in &v2.plan.host_set {
        let ok = check_proof(&k, &v2.proof(&e.hostname)).unwrap();
        assert_eq!(&ok.entry, e);
        assert_eq!(ok.manifest.id, v2.id);
    }
    let good = v2.proof("host-000004");
    type Alter = fn(&mut HostProof);
    let alterations: [(&str, Alter); 6] = [
        ("closure", |p| p.entry.target_closure.push('x')),
        ("wave", |p| p.entry.wave_index ^= 1),
        ("hostname", |p| p.entry.hostname = "host-000005".into()),
        ("index", |p| p.index += 1),
        ("sibling", |p| p.proof[1] = "0".repeat(64)),
        ("extra hash", |p| p.proof.push("0".repeat(64))),
    ];
    for (what, alter) in alterations {
        let mut p = good.clone();
        alter(&mut p);
        let err = check_proof(&k, &p).unwrap_err();
        assert!(
            matches!(err, VerifyError::ProofMismatch { .. }),
            "{what}: {err}"
        );
    }
    // Another rollout's proof under this header, and this proof under another id.
    let other = signed_v2(plan("x", 12), &k.ci);
    let mut spliced = good.clone();
    spliced.proof = other.proof("host-000004").proof;
    assert!(matches!(
        check_proof(&k, &spliced).unwrap_err(),
        VerifyError::ProofMismatch { .. }
    ));
    let mut renamed = good.clone();
    renamed.rollout_id = other.id.clone();
    assert!(matches!(
        check_proof(&k, &renamed).unwrap_err(),
        VerifyError::ManifestIdMismatch { .. }
    ));
    // A foreign key, and a stale one.
    let foreign = keys();
    assert!(matches!(
        check_proof(&foreign, &good).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
    let bytes = serde_json::to_vec(&good).unwrap();
    let later = SIGNED_AT + Duration::days(2);
    let err = verify_host_proof(
        &bytes,
        &trust(&k),
        later,
        ManifestContext::default(),
        &limits(),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::Stale { .. }), "{err}");
    // A schema-1 manifest has no root to prove against.
    let (v1, v1_sig) = signed(&manifest("x", SIGNED_AT), &k.ci);
    let mut p = good.clone();
    p.manifest = String::from_utf8(v1).unwrap();
    p.signature = base64::engine::general_purpose::STANDARD.encode(v1_sig);
    p.rollout_id = rollout_id(p.manifest.as_bytes()).unwrap();
    assert!(matches!(
        check_proof(&k, &p).unwrap_err(),
        VerifyError::ProofShape { .. }
    ));
}

#[test]
fn at_100000_hosts_what_a_host_fetches_stays_under_4_kib() {
    let k = keys();
    let v2 = signed_v2(plan("x", 100_000), &k.ci);
    assert!(v2.bytes.len() < 2048, "header: {} bytes", v2.bytes.len());
    let proof = serde_json::to_vec(&v2.proof("host-054321")).unwrap();
    assert!(proof.len() <= 4096, "proof document: {} bytes", proof.len());
    assert!(check_proof(&k, &v2.proof("host-099999")).is_ok());
}

#[test]
fn schema_1_is_still_accepted_and_a_newer_schema_names_the_supported_one() {
    let k = keys();
    let (bytes, sig) = signed(&manifest("x", SIGNED_AT), &k.ci);
    let v1 = verify_manifest(
        &bytes,
        &sig,
        &trust(&k),
        now(),
        ManifestContext::default(),
        None,
        &limits(),
    )
    .unwrap();
    assert_eq!(v1.value.schema_version, 1);
    let mut header = hostset::header_of(&plan("x", 3));
    header.schema_version = 3;
    let (bytes, sig) = signed(&header, &k.ci);
    let err = verify_manifest_header(
        &bytes,
        &sig,
        &trust(&k),
        now(),
        ManifestContext::default(),
        &limits(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::UnsupportedSchema {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("understands only 2"), "{err}");
}
