//! Bounded fuzzing of every parser here that takes attacker input: the canonicaliser,
//! the verification of fleets, manifests, revocation lists, bootstrap tokens and host
//! reports, rollout ids, and the trust file.
//!
//! Inputs are arbitrary bytes and structure-aware mutations of valid, correctly signed
//! artifacts (`nixfleet_fuzz::json`). For each: no panic; an artifact that still
//! verifies is canonically equal to the one that was signed, anything else is refused
//! with the error its bytes call for; a re-signed mutation is refused only for what it
//! says, never for its signature; deep nesting is an error, not a stack overflow; and
//! one parse allocates at most a bounded multiple of its input.
//!
//! `NIXFLEET_FUZZ_CASES` sets the cases per property; the seed is fixed
//! (`PROPTEST_RNG_SEED` to change it).

use nixfleet_fuzz::alloc::{Bound, CountingAlloc};
use nixfleet_fuzz::json::{self, nested_arrays, nested_objects};
use nixfleet_fuzz::{alone, ensure, run, Bytes};
use nixfleet_proto::*;
use nixfleet_trust::jcs::{self, JcsError, MAX_DEPTH};
use nixfleet_trust::keys::{self, PrivateKey};
use nixfleet_trust::verify::*;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// What one canonicalisation may allocate: linear in the input, because the whole tree
/// is parsed before it is written out (objects are sorted). The worst input is a chain
/// of one-element arrays, `[[[0]]]`: each level is two input bytes (`[` and `]`) and a
/// 32-byte `Value` in a vector that `Vec` gives a minimum capacity of 4, i.e. 128 bytes
/// per 2 input bytes, 64 per byte (measured: `[[[0]]],` repeated costs 54 per byte,
/// `[0],` 44, `{"":0},` 39, `0,` 27). The output, about the input's size for such
/// documents and never more than 5 times it for any (`1E20` is written
/// `100000000000000000000`), is allocated while the tree is still held: 72 per byte
/// covers both. The constant covers serde_json's scratch and a small document's fixed
/// costs.
///
/// So a document at the 64 MiB fleet limit can briefly take ~4.5 GiB before its
/// signature is checked: bounded, but worth knowing when setting `Limits`.
const JCS: Bound = Bound {
    per_input_byte: 72,
    constant: 64 << 10,
};

/// A verification canonicalises (above; that tree is freed before the next step), then
/// parses the canonical bytes into the typed artifact while holding them: strings,
/// vectors and maps of small structs, under the same per-byte cost as the tree. The
/// constant adds the typed parse's fixed costs (B-tree nodes, the key parses).
const VERIFY: Bound = Bound {
    per_input_byte: 72,
    constant: 256 << 10,
};

/// Tokens and reports: the signature covers one member, so the whole document is
/// canonicalised (above), read into a `serde_json::Value` to take that member out
/// (B-tree objects: ~96 bytes per input byte for `{"":0},` repeated), and the member
/// canonicalised again while that Value is held (up to the canonicaliser's 72).
/// Measured: `{"":0},` repeated inside the signed member costs 141 per byte. Inputs are
/// capped at 16 KiB (token) and 64 KiB (report) before any of it: at most ~12 MiB.
const MEMBER: Bound = Bound {
    per_input_byte: 192,
    constant: 256 << 10,
};

const SIGNED_AT: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

fn now() -> OffsetDateTime {
    SIGNED_AT + Duration::minutes(5)
}

/// Fixed keys, so that a seed reproduces the same bytes.
fn ed25519(seed: u8) -> PrivateKey {
    PrivateKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
}

fn p256(seed: u8) -> PrivateKey {
    let mut bytes = [seed; 32];
    bytes[0] = 1;
    PrivateKey::EcdsaP256(p256::ecdsa::SigningKey::from_bytes(&bytes.into()).unwrap())
}

struct World {
    ci: PrivateKey,
    ci_previous: PrivateKey,
    org: PrivateKey,
    host: PrivateKey,
    trust: TrustFile,
    limits: Limits,
}

fn world() -> World {
    let (ci, ci_previous, org, host) = (ed25519(1), p256(2), ed25519(3), ed25519(4));
    let trust = TrustFile {
        schema_version: 1,
        ci_release_key: KeySlot {
            current: ci.public_key().to_entry(),
            previous: Some(ci_previous.public_key().to_entry()),
            reject_before: Some(SIGNED_AT - Duration::days(30)),
        },
        org_root_key: KeySlot {
            current: org.public_key().to_entry(),
            previous: None,
            reject_before: None,
        },
        cache_keys: vec!["cache.example.org-1:zVmRhbXjkKFrgdKyz3eY1ycPvBQzXMpVDS7dD4b6vDs=".into()],
    };
    World {
        ci,
        ci_previous,
        org,
        host,
        trust,
        limits: Limits::default(),
    }
}

fn host_line(w: &World) -> String {
    keys::to_ssh_public_line(&w.host.public_key(), "root@web-01").unwrap()
}

fn closure(host: &str) -> String {
    format!("{}-nixos-system-{host}", "a".repeat(32))
}

/// A fleet with some of everything: hosts with keys, two channels, nested selectors,
/// edges and budgets.
fn fleet_value(w: &World) -> Value {
    json!({
        "schemaVersion": 1,
        "hosts": {
            "web-01": {"system": "x86_64-linux", "tags": ["web", "canary"], "channel": "stable",
                       "closureHash": closure("web-01"), "pubkey": host_line(w)},
            "web-02": {"system": "x86_64-linux", "tags": ["web"], "channel": "stable",
                       "closureHash": closure("web-02"), "pubkey": null},
            "db-01": {"system": "aarch64-linux", "tags": ["db"], "channel": "edge",
                      "closureHash": null, "pubkey": null}
        },
        "channels": {
            "stable": {"rolloutPolicy": "canary", "reconcileIntervalMinutes": 5,
                       "signingIntervalMinutes": 60, "freshnessWindow": 180,
                       "compliance": {"frameworks": ["nis2"], "mode": "enforce"}},
            "edge": {"rolloutPolicy": "all", "reconcileIntervalMinutes": 1,
                     "signingIntervalMinutes": 30, "freshnessWindow": 120}
        },
        "rolloutPolicies": {
            "canary": {"strategy": "canary",
                       "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 10},
                                 {"selector": {"and": [{"all": true}, {"not": {"tags": ["db"]}}]}, "soakMinutes": 0}],
                       "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 1},
                       "onHealthFailure": "rollback-and-halt"},
            "all": {"strategy": "all-at-once", "waves": [{"selector": {"all": true}, "soakMinutes": 0}],
                    "healthGate": {}, "onHealthFailure": "halt"}
        },
        "waves": {"stable": [{"hosts": ["web-01"], "soakMinutes": 10}, {"hosts": ["web-02"], "soakMinutes": 0}]},
        "edges": [{"before": "db-01", "after": "web-01", "reason": "schema first"}],
        "channelEdges": [{"before": "edge", "after": "stable", "reason": null}],
        "disruptionBudgets": [{"selector": {"tagsAny": ["web", "db"]}, "maxInFlight": 1, "maxInFlightPct": null}],
        "meta": {"schemaVersion": 1, "signedAt": "2026-11-27T10:00:00Z", "ciCommit": "0123456789abcdef", "signatureAlgorithm": "ed25519"}
    })
}

fn manifest_value(fleet_hash: &str) -> Value {
    json!({
        "schemaVersion": 1,
        "displayName": "stable@0123456",
        "channel": "stable",
        "channelRef": "0123456789abcdef",
        "fleetResolvedHash": fleet_hash,
        "hostSet": [
            {"hostname": "web-01", "waveIndex": 0, "targetClosure": closure("web-01")},
            {"hostname": "web-02", "waveIndex": 1, "targetClosure": closure("web-02")}
        ],
        "waves": [{"soakMinutes": 10}, {"soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 1},
        "onHealthFailure": "rollback-and-halt",
        "complianceFrameworks": ["nis2"],
        "disruptionBudgets": [{"selector": {"not": {"hosts": ["db-01"]}}, "hosts": ["web-01", "web-02"],
                               "maxInFlight": 1, "maxInFlightPct": 50}],
        "freshnessWindow": null,
        "introduced": {"ciCommit": "0000000000000000", "signedAt": "2026-11-20T10:00:00Z"},
        "meta": {"schemaVersion": 1, "signedAt": "2026-11-27T10:00:00Z", "ciCommit": "0123456789abcdef", "signatureAlgorithm": "ecdsa-p256"}
    })
}

fn revocations_value() -> Value {
    json!({
        "schemaVersion": 1,
        "revocations": [
            {"hostname": "web-02", "notBefore": "2026-11-26T00:00:00Z", "reason": "stolen", "revokedBy": "ops"},
            {"hostname": "db-01", "notBefore": "2026-11-27T09:00:00+01:00", "reason": null, "revokedBy": null}
        ],
        "freshnessWindow": 1440,
        "meta": {"schemaVersion": 1, "signedAt": "2026-11-27T10:00:00Z", "ciCommit": null, "signatureAlgorithm": "ed25519"}
    })
}

fn token_value(w: &World) -> Value {
    let claims = json!({
        "hostname": "web-01",
        "expectedPubkeyFingerprint": keys::ssh_fingerprint(&host_line(w)).unwrap(),
        "issuedAt": "2026-11-27T09:00:00Z",
        "expiresAt": "2026-11-27T11:00:00Z",
        "nonce": "00112233445566778899aabbccddeeff",
    });
    let sig = w.org.sign(&jcs::to_canonical(&claims).unwrap());
    json!({"version": 1, "claims": claims, "signature": b64(&sig)})
}

fn report_value(w: &World) -> Value {
    let report = json!({
        "hostname": "web-01", "reportId": "r-1", "kind": "activation-failed",
        "rolloutId": "0".repeat(64), "closureHash": closure("web-01"), "bootId": "b-1",
        "reason": "switch-to-configuration exited 4", "at": "2026-11-27T10:01:00Z",
    });
    let sig = w.host.sign(&jcs::to_canonical(&report).unwrap());
    json!({"report": report, "signature": b64(&sig)})
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn bytes_of(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// The three signed CI artifacts, verified as the control plane and agents do.
struct Signed {
    fleet: Vec<u8>,
    fleet_sig: Vec<u8>,
    fleet_ok: Verified<FleetResolved>,
    manifest: Vec<u8>,
    manifest_sig: Vec<u8>,
    manifest_ok: Verified<RolloutManifest>,
    revocations: Vec<u8>,
    revocations_sig: Vec<u8>,
    revocations_ok: Verified<Revocations>,
}

fn signed(w: &World) -> Signed {
    let fleet = bytes_of(&fleet_value(w));
    let fleet_sig = w.ci.sign(&jcs::canonicalize(&fleet).unwrap()).to_vec();
    let fleet_ok = verify_fleet(&fleet, &fleet_sig, &w.trust, now(), &w.limits).unwrap();
    let manifest = bytes_of(&manifest_value(&fleet_ok.sha256));
    let manifest_sig = w
        .ci_previous
        .sign(&jcs::canonicalize(&manifest).unwrap())
        .to_vec();
    let manifest_ok = verify_manifest(
        &manifest,
        &manifest_sig,
        &w.trust,
        now(),
        ManifestContext {
            rollout_id: None,
            fleet: Some(&fleet_ok),
        },
        None,
        &w.limits,
    )
    .unwrap();
    assert_eq!(manifest_ok.signed_by, SignedBy::Previous);
    let revocations = bytes_of(&revocations_value());
    let revocations_sig =
        w.ci.sign(&jcs::canonicalize(&revocations).unwrap())
            .to_vec();
    let revocations_ok = verify_revocations(
        &revocations,
        &revocations_sig,
        &w.trust,
        now(),
        Some(SIGNED_AT - Duration::hours(1)),
        &w.limits,
    )
    .unwrap();
    Signed {
        fleet,
        fleet_sig,
        fleet_ok,
        manifest,
        manifest_sig,
        manifest_ok,
        revocations,
        revocations_sig,
        revocations_ok,
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Fleet,
    Manifest,
    Revocations,
}

const KINDS: [Kind; 3] = [Kind::Fleet, Kind::Manifest, Kind::Revocations];

/// What an artifact's verification returned, reduced to what the checks compare.
struct Outcome {
    result: Result<(Vec<u8>, String, String), VerifyError>,
    /// The typed value equals the original's.
    same_value: bool,
}

fn verify_kind(
    w: &World,
    s: &Signed,
    kind: Kind,
    bytes: &[u8],
    sig: &[u8],
) -> Result<Outcome, TestCaseError> {
    fn reduce<T: PartialEq>(r: Result<Verified<T>, VerifyError>, orig: &Verified<T>) -> Outcome {
        let same_value = r.as_ref().is_ok_and(|v| v.value == orig.value);
        Outcome {
            result: r.map(|v| (v.canonical, v.sha256, v.id)),
            same_value,
        }
    }
    VERIFY.check("verify", bytes.len(), || match kind {
        Kind::Fleet => reduce(
            verify_fleet(bytes, sig, &w.trust, now(), &w.limits),
            &s.fleet_ok,
        ),
        Kind::Manifest => reduce(
            verify_manifest(
                bytes,
                sig,
                &w.trust,
                now(),
                ManifestContext {
                    rollout_id: Some(&s.manifest_ok.id),
                    fleet: Some(&s.fleet_ok),
                },
                None,
                &w.limits,
            ),
            &s.manifest_ok,
        ),
        Kind::Revocations => reduce(
            verify_revocations(
                bytes,
                sig,
                &w.trust,
                now(),
                Some(SIGNED_AT - Duration::hours(1)),
                &w.limits,
            ),
            &s.revocations_ok,
        ),
    })
}

fn original(s: &Signed, kind: Kind) -> (&[u8], &[u8], &[u8]) {
    match kind {
        Kind::Fleet => (&s.fleet, &s.fleet_sig, &s.fleet_ok.canonical),
        Kind::Manifest => (&s.manifest, &s.manifest_sig, &s.manifest_ok.canonical),
        Kind::Revocations => (
            &s.revocations,
            &s.revocations_sig,
            &s.revocations_ok.canonical,
        ),
    }
}

/// The oracle for received bytes checked against the original signature: the result is
/// decided by the canonical form of the bytes alone.
fn check_against_original(
    kind: Kind,
    limit: usize,
    orig_canonical: &[u8],
    bytes: &[u8],
    o: &Outcome,
) -> Result<(), TestCaseError> {
    let shown = || format!("{kind:?}: {:?}", o.result.as_ref().map(|_| "verified"));
    if bytes.len() > limit {
        return ensure(matches!(o.result, Err(VerifyError::TooLarge { .. })), shown);
    }
    match jcs::canonicalize(bytes) {
        Err(expected) => ensure(
            matches!(&o.result, Err(VerifyError::Parse { source, .. }) if *source == expected),
            || format!("{}, expected a parse error {expected:?}", shown()),
        ),
        Ok(c) if c == orig_canonical => match &o.result {
            Ok((canonical, sha, _)) => ensure(
                canonical == orig_canonical
                    && *sha == jcs::sha256_hex(orig_canonical)
                    && o.same_value,
                || format!("{kind:?}: verified, but not as the original"),
            ),
            Err(e) => Err(TestCaseError::fail(format!(
                "{kind:?}: canonically equal to the signed artifact, yet refused: {e}"
            ))),
        },
        Ok(_) => ensure(
            matches!(o.result, Err(VerifyError::BadSignature { .. })),
            || {
                format!(
                    "{kind:?}: canonically different from what was signed, so only BadSignature is right: {:?}",
                    o.result.as_ref().err()
                )
            },
        ),
    }
}

fn kinds() -> impl Strategy<Value = Kind> {
    select(&KINDS[..])
}

#[test]
fn mutated_signed_artifacts_verify_only_when_canonically_equal() {
    let w = world();
    let s = signed(&w);
    let seeds = [
        serde_json::from_slice::<Value>(&s.fleet).unwrap(),
        serde_json::from_slice::<Value>(&s.manifest).unwrap(),
        serde_json::from_slice::<Value>(&s.revocations).unwrap(),
    ];
    let limits = w.limits;
    run(
        "mutated signed artifacts",
        4,
        (kinds(), json::plan()),
        |(kind, plan)| {
            let (_, sig, canonical) = original(&s, kind);
            let bytes = json::apply(&seeds[kind as usize], &plan);
            let o = verify_kind(&w, &s, kind, &bytes, sig)?;
            let limit = match kind {
                Kind::Fleet => limits.fleet_bytes,
                Kind::Manifest => limits.manifest_bytes,
                Kind::Revocations => limits.revocations_bytes,
            };
            check_against_original(kind, limit, canonical, &bytes, &o)?;
            if json::layout_only(&plan) {
                prop_assert!(o.result.is_ok(), "a layout change was refused");
            }
            Ok(())
        },
    );
}

#[test]
fn mutated_signatures_are_refused() {
    let w = world();
    let s = signed(&w);
    run(
        "mutated signatures",
        1,
        (kinds(), prop::collection::vec(json::byte_edit(), 1..4)),
        |(kind, edits)| {
            let (bytes, sig, _) = original(&s, kind);
            let bad = json::apply_bytes(sig, &edits);
            let o = verify_kind(&w, &s, kind, bytes, &bad)?;
            if bad == sig {
                prop_assert!(o.result.is_ok());
            } else if bad.len() != 64 {
                prop_assert!(
                    matches!(o.result, Err(VerifyError::SignatureLength { len, .. }) if len == bad.len()),
                    "a {}-byte signature: {:?}",
                    bad.len(),
                    o.result.err()
                );
            } else {
                prop_assert!(
                    matches!(o.result, Err(VerifyError::BadSignature { .. })),
                    "a changed signature: {:?}",
                    o.result.err()
                );
            }
            Ok(())
        },
    );
}

/// The fuzzer holds the CI key here: mutations re-signed reach every check behind the
/// signature (huge numbers, odd dates, missing members, wrong types).
#[test]
fn resigned_mutations_are_refused_only_for_what_they_say() {
    let w = world();
    let s = signed(&w);
    let seeds = [
        serde_json::from_slice::<Value>(&s.fleet).unwrap(),
        serde_json::from_slice::<Value>(&s.manifest).unwrap(),
        serde_json::from_slice::<Value>(&s.revocations).unwrap(),
    ];
    run(
        "re-signed mutations",
        4,
        (kinds(), json::plan()),
        |(kind, plan)| {
            let bytes = json::apply(&seeds[kind as usize], &plan);
            let Ok(canonical) = jcs::canonicalize(&bytes) else {
                // Refused before any signature check: the property above covers it.
                return Ok(());
            };
            let key = if matches!(kind, Kind::Manifest) {
                &w.ci_previous
            } else {
                &w.ci
            };
            let o = verify_kind(&w, &s, kind, &bytes, &key.sign(&canonical))?;
            match &o.result {
                Ok((c, sha, id)) => {
                    prop_assert_eq!(c, &canonical);
                    prop_assert_eq!(sha, &jcs::sha256_hex(&canonical));
                    if matches!(kind, Kind::Manifest) {
                        prop_assert_eq!(id, &rollout_id(&canonical).unwrap());
                        prop_assert!(wire::is_rollout_id(id));
                    }
                }
                Err(e) => prop_assert!(
                    matches!(
                        e,
                        VerifyError::Shape { .. }
                            | VerifyError::UnsupportedSchema { .. }
                            | VerifyError::Unsigned { .. }
                            | VerifyError::RejectedBefore { .. }
                            | VerifyError::Stale { .. }
                            | VerifyError::FutureDated { .. }
                            | VerifyError::NoFreshnessWindow { .. }
                            | VerifyError::ManifestIdMismatch { .. }
                            | VerifyError::FleetMismatch { .. }
                            | VerifyError::RevocationsRollback { .. }
                    ),
                    "a correctly signed artifact refused for its signature or size: {}",
                    e
                ),
            }
            if json::layout_only(&plan) {
                prop_assert!(o.result.is_ok());
            }
            Ok(())
        },
    );
}

/// verify_token / verify_report: the signature covers the canonical `claims` / `report`
/// member, so the oracle looks at that member.
#[derive(Debug, Clone, Copy)]
enum Member {
    Token,
    Report,
}

fn verify_member(w: &World, which: Member, bytes: &[u8]) -> Result<Verified<Value>, VerifyError> {
    match which {
        Member::Token => verify_token(bytes, &w.trust, now(), &w.limits).map(|v| Verified {
            value: serde_json::to_value(&v.value).unwrap(),
            canonical: v.canonical,
            sha256: v.sha256,
            id: v.id,
            signed_at: v.signed_at,
            signed_by: v.signed_by,
        }),
        Member::Report => {
            verify_report(bytes, "web-01", &host_line(w), &w.limits).map(|v| Verified {
                value: serde_json::to_value(&v.value.report).unwrap(),
                canonical: v.canonical,
                sha256: v.sha256,
                id: v.id,
                signed_at: v.signed_at,
                signed_by: v.signed_by,
            })
        }
    }
}

#[test]
fn mutated_tokens_and_reports_verify_only_when_the_signed_member_is_unchanged() {
    let w = world();
    let token = token_value(&w);
    let report = report_value(&w);
    let originals = [
        (Member::Token, "claims", "version", token),
        (Member::Report, "report", "", report),
    ];
    let canon = |v: &Value| jcs::to_canonical(v).unwrap();
    let member_canonical: Vec<Vec<u8>> =
        originals.iter().map(|(_, m, _, v)| canon(&v[m])).collect();
    for (i, (which, ..)) in originals.iter().enumerate() {
        let v = verify_member(&w, *which, &bytes_of(&originals[i].3)).unwrap();
        assert_eq!(v.canonical, member_canonical[i]);
    }
    run(
        "mutated tokens and reports",
        4,
        (0..originals.len(), json::plan()),
        |(i, plan)| {
            let (which, member, version_field, seed) = &originals[i];
            let bytes = json::apply(seed, &plan);
            let limit = match which {
                Member::Token => w.limits.token_bytes,
                Member::Report => w.limits.report_bytes,
            };
            let result = MEMBER.check("verify member", bytes.len(), || {
                verify_member(&w, *which, &bytes)
            })?;
            if bytes.len() > limit {
                prop_assert!(
                    matches!(result, Err(VerifyError::TooLarge { .. })),
                    "over the limit: {:?}",
                    result.err()
                );
                return Ok(());
            }
            let canonical = match jcs::canonicalize(&bytes) {
                Err(expected) => {
                    prop_assert!(
                        matches!(&result, Err(VerifyError::Parse { source, .. }) if *source == expected),
                        "{:?}",
                        result.err()
                    );
                    return Ok(());
                }
                Ok(c) => c,
            };
            let whole: Option<Value> = serde_json::from_slice(&canonical).ok();
            let part = whole
                .as_ref()
                .and_then(|v| v.get(member))
                .and_then(|p| jcs::to_canonical(p).ok());
            let unchanged = part.as_deref() == Some(&member_canonical[i][..]);
            match &result {
                Ok(v) => {
                    prop_assert!(unchanged, "{which:?} verified with a changed {member}");
                    prop_assert_eq!(&v.canonical, &member_canonical[i]);
                    prop_assert_eq!(&v.value, &seed[member]);
                }
                Err(e) => {
                    let allowed = matches!(
                        e,
                        VerifyError::Shape { .. }
                            | VerifyError::SignatureEncoding { .. }
                            | VerifyError::SignatureLength { .. }
                            | VerifyError::BadSignature { .. }
                    ) || (matches!(which, Member::Token)
                        && matches!(e, VerifyError::UnsupportedSchema { .. }))
                        || (matches!(which, Member::Report)
                            && matches!(e, VerifyError::ReportHostMismatch { .. }));
                    prop_assert!(allowed, "{which:?} refused with an unexpected error: {e}");
                    // Everything the signature or the version depends on is intact: it
                    // must verify.
                    let same = |field: &str| {
                        field.is_empty()
                            || whole.as_ref().and_then(|v| v.get(field)) == Some(&seed[field])
                    };
                    prop_assert!(
                        !(unchanged && same("signature") && same(version_field)),
                        "{which:?}: signed member, signature and version intact, yet: {e}"
                    );
                }
            }
            if json::layout_only(&plan) {
                prop_assert!(result.is_ok());
            }
            Ok(())
        },
    );
}

fn scan_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn check_canonicalize(bytes: &[u8]) -> Result<(), TestCaseError> {
    let result = JCS.check("jcs::canonicalize", bytes.len(), || {
        jcs::canonicalize(bytes)
    })?;
    let serde: Result<Value, _> = serde_json::from_slice(bytes);
    match &result {
        Ok(c) => {
            prop_assert_eq!(&jcs::canonicalize(c), &Ok(c.clone()), "not a fixed point");
            prop_assert!(
                !c.iter().any(|&b| b < 0x20),
                "canonical JSON has a raw control character"
            );
            let depth = scan_depth(bytes);
            prop_assert!(depth <= MAX_DEPTH, "accepted {depth} levels of nesting");
            if depth < MAX_DEPTH {
                // jcs is the stricter parser: what it takes, serde_json takes.
                prop_assert!(serde.is_ok(), "jcs accepted what serde_json refuses");
            }
        }
        Err(JcsError::NotUtf8) => prop_assert!(std::str::from_utf8(bytes).is_err()),
        Err(JcsError::TooDeep) => prop_assert!(scan_depth(bytes) > MAX_DEPTH),
        Err(e) => {
            prop_assert!(std::str::from_utf8(bytes).is_ok());
            if serde.is_ok() {
                // serde_json keeps the last of duplicate keys; jcs refuses them.
                prop_assert!(
                    matches!(e, JcsError::DuplicateKey(_)),
                    "serde_json parses it, jcs says {:?}",
                    e
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Input {
    Bytes(Bytes),
    /// A seed (by index) and what was done to it.
    Mutated(usize, json::Plan),
}

#[test]
fn canonicalize_arbitrary_and_mutated_input() {
    let w = world();
    let s = signed(&w);
    let seeds = [
        serde_json::from_slice::<Value>(&s.fleet).unwrap(),
        token_value(&w),
        json!([1, -0.0, 1e21, "\u{1f600}", {"b": [], "a": {}}, null, true]),
    ];
    let inputs = prop_oneof![
        2 => nixfleet_fuzz::bytes(0..1024).prop_map(Input::Bytes),
        1 => "[\\[\\]{}:,\"\\\\0-9eE.+\\-tfnrulasu \\n]{0,256}"
            .prop_map(|s| Input::Bytes(Bytes(s.into_bytes()))),
        5 => (0..seeds.len(), json::plan()).prop_map(|(i, plan)| Input::Mutated(i, plan)),
    ];
    run("jcs::canonicalize", 4, inputs, |input| match input {
        Input::Bytes(bytes) => check_canonicalize(&bytes),
        Input::Mutated(i, plan) => check_canonicalize(&json::apply(&seeds[i], &plan)),
    });
}

#[test]
fn arbitrary_bytes_are_refused_by_every_verifier() {
    let w = world();
    let s = signed(&w);
    run(
        "arbitrary bytes",
        4,
        (nixfleet_fuzz::bytes(0..2048), nixfleet_fuzz::bytes(0..80)),
        |(bytes, sig)| {
            for kind in KINDS {
                let o = verify_kind(&w, &s, kind, &bytes, &sig)?;
                prop_assert!(o.result.is_err());
            }
            for which in [Member::Token, Member::Report] {
                let r = MEMBER.check("member", bytes.len(), || verify_member(&w, which, &bytes))?;
                prop_assert!(r.is_err());
            }
            let id = JCS.check("rollout_id", bytes.len(), || rollout_id(&bytes))?;
            if let Ok(id) = id {
                prop_assert!(wire::is_rollout_id(&id));
            }
            Ok(())
        },
    );
}

#[test]
fn rollout_ids_follow_the_canonical_intent() {
    let w = world();
    let s = signed(&w);
    let seed: Value = serde_json::from_slice(&s.manifest).unwrap();
    let intent = |v: &Value| -> Option<Vec<u8>> {
        let obj = v.as_object()?;
        let kept: serde_json::Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| ROLLOUT_INTENT_MEMBERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        jcs::to_canonical(&Value::Object(kept)).ok()
    };
    let orig_intent = intent(&seed).unwrap();
    run("rollout ids", 2, json::plan(), |plan| {
        let bytes = json::apply(&seed, &plan);
        let id = JCS.check("rollout_id", bytes.len(), || rollout_id(&bytes))?;
        match (&id, jcs::canonicalize(&bytes)) {
            (Ok(id), Ok(c)) => {
                prop_assert!(wire::is_rollout_id(id));
                prop_assert_eq!(
                    id,
                    &rollout_id(&c).unwrap(),
                    "received and canonical bytes disagree"
                );
                let value: Option<Value> = serde_json::from_slice(&c).ok();
                if let Some(mutated_intent) = value.as_ref().and_then(intent) {
                    prop_assert_eq!(
                        id == &s.manifest_ok.id,
                        mutated_intent == orig_intent,
                        "the id must change exactly when the intent does"
                    );
                }
            }
            (Err(e), Ok(c)) => {
                prop_assert!(!c.starts_with(b"{"), "an object without an id: {e}");
            }
            (Ok(_), Err(e)) => {
                return Err(TestCaseError::fail(format!(
                    "an id for bytes jcs refuses: {e}"
                )))
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, &b),
        }
        Ok(())
    });
}

#[test]
fn trust_files_are_checked_without_panics_or_unbounded_allocation() {
    let w = world();
    let seed = serde_json::to_value(&w.trust).unwrap();
    let inputs = prop_oneof![
        1 => nixfleet_fuzz::bytes(0..512).prop_map(Input::Bytes),
        4 => json::plan().prop_map(|plan| Input::Mutated(0, plan)),
    ];
    run("trust files", 2, inputs, |input| {
        let bytes = match input {
            Input::Bytes(b) => b.0,
            Input::Mutated(_, plan) => json::apply(&seed, &plan),
        };
        let r = VERIFY.check("check_trust_file", bytes.len(), || {
            check_trust_file("trust.json", &bytes, 0o100600, &w.limits)
        })?;
        if let Ok(t) = r {
            for slot in [&t.ci_release_key, &t.org_root_key] {
                for entry in std::iter::once(&slot.current).chain(&slot.previous) {
                    prop_assert!(keys::PublicKey::from_entry(entry).is_ok());
                }
            }
            prop_assert_eq!(t.org_root_key.current.algorithm, Algorithm::Ed25519);
            for key in &t.cache_keys {
                prop_assert!(parse_cache_key(key).is_some());
            }
        }
        Ok(())
    });
}

/// 100,000 nested arrays or objects, closed or not, alone or inside every artifact: a
/// typed error, never a stack overflow (the canonicaliser stops at MAX_DEPTH before it
/// recurses further; serde_json stops at 128 on its own).
#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let _alone = alone();
    let w = world();
    let s = signed(&w);
    for depth in [MAX_DEPTH + 1, 1_000, 100_000] {
        for closed in [true, false] {
            for deep in [nested_arrays(depth, closed), nested_objects(depth, closed)] {
                let r = JCS
                    .check("deep", deep.len(), || jcs::canonicalize(&deep))
                    .unwrap();
                assert_eq!(r, Err(JcsError::TooDeep), "depth {depth}");
                // Inside an artifact, in place of a member.
                let mut fleet: Value = serde_json::from_slice(&s.fleet).unwrap();
                fleet["edges"] = Value::String("\u{1}DEEP\u{1}".into());
                let text = serde_json::to_vec(&fleet).unwrap();
                let marker = b"\"\\u0001DEEP\\u0001\"";
                let at = text
                    .windows(marker.len())
                    .position(|w| w == marker)
                    .unwrap();
                let mut bytes = text[..at].to_vec();
                bytes.extend_from_slice(&deep);
                bytes.extend_from_slice(&text[at + marker.len()..]);
                for kind in KINDS {
                    let o = verify_kind(&w, &s, kind, &bytes, &s.fleet_sig).unwrap();
                    assert!(
                        matches!(
                            o.result,
                            Err(VerifyError::Parse {
                                source: JcsError::TooDeep,
                                ..
                            })
                        ),
                        "{kind:?} at depth {depth}: {:?}",
                        o.result.err()
                    );
                }
                for (which, limit) in [
                    (Member::Token, w.limits.token_bytes),
                    (Member::Report, w.limits.report_bytes),
                ] {
                    let r = verify_member(&w, which, &deep);
                    if deep.len() > limit {
                        assert!(matches!(r, Err(VerifyError::TooLarge { .. })));
                    } else {
                        assert!(
                            matches!(
                                r,
                                Err(VerifyError::Parse {
                                    source: JcsError::TooDeep,
                                    ..
                                })
                            ),
                            "{which:?} at depth {depth}: {:?}",
                            r.err()
                        );
                    }
                }
                assert_eq!(rollout_id(&deep), Err(JcsError::TooDeep));
                assert!(check_trust_file("t", &deep, 0o600, &w.limits).is_err());
            }
        }
    }
    // The limit itself: MAX_DEPTH levels canonicalise, one more does not.
    assert!(jcs::canonicalize(&nested_arrays(MAX_DEPTH, true)).is_ok());
    assert_eq!(
        jcs::canonicalize(&nested_arrays(MAX_DEPTH + 1, true)),
        Err(JcsError::TooDeep)
    );
    // A report whose `report` member is nested to the limit: jcs takes it, the typed
    // parse refuses it, with a typed error.
    let mut deep_report = b"{\"signature\":\"\",\"report\":".to_vec();
    deep_report.extend_from_slice(&nested_arrays(MAX_DEPTH - 1, true));
    deep_report.push(b'}');
    assert!(jcs::canonicalize(&deep_report).is_ok());
    assert!(matches!(
        verify_member(&w, Member::Report, &deep_report),
        Err(VerifyError::Shape { .. })
    ));
}

/// The inputs the bounds above were worked out from, at a size where the constant no
/// longer hides the per-byte cost.
#[test]
fn the_costliest_known_documents_stay_within_the_bounds() {
    let _alone = alone();
    let w = world();
    let s = signed(&w);
    let chain = format!(
        "{}0{}",
        "[".repeat(MAX_DEPTH - 1),
        "]".repeat(MAX_DEPTH - 1)
    );
    for item in [
        chain.as_str(),
        "[[[0]]]",
        "[0]",
        "{\"\":0}",
        "{\"\":[0]}",
        "0",
        "1E20",
    ] {
        let items = vec![item; 200_000 / item.len()];
        let many = format!("[{}]", items.join(",")).into_bytes();
        let r = JCS
            .check("jcs", many.len(), || jcs::canonicalize(&many))
            .unwrap();
        assert!(r.is_ok(), "{item}");
        for kind in KINDS {
            let o = verify_kind(&w, &s, kind, &many, &s.fleet_sig).unwrap();
            assert!(matches!(o.result, Err(VerifyError::BadSignature { .. })));
        }
        // The signed member made of them, at each member's size limit, and beside it.
        for (which, member, limit) in [
            (Member::Token, "claims", w.limits.token_bytes),
            (Member::Report, "report", w.limits.report_bytes),
        ] {
            let n = (limit - 64) / (item.len() + 1);
            let items = vec![item; n].join(",");
            for doc in [
                format!(r#"{{"{member}":[{items}],"signature":""}}"#),
                format!(r#"{{"{member}":{{}},"x":[{items}],"signature":""}}"#),
            ] {
                if doc.len() <= limit {
                    let r = MEMBER
                        .check("member", doc.len(), || {
                            verify_member(&w, which, doc.as_bytes())
                        })
                        .unwrap();
                    assert!(r.is_err());
                }
            }
        }
    }
}
