//! Bounded fuzzing of the agent request bodies as the control plane reads them: check-in,
//! report, confirm, enroll and renew. Its handlers (`api.rs`, a binary crate) parse each
//! body with `serde_json::from_slice` into these types, and the enroll route once more
//! into a `serde_json::Value` to take the token out as received; this test does the same
//! on arbitrary bytes and structure-aware mutations of valid bodies
//! (`nixfleet_fuzz::json`). The same bodies go over the wire to the real binary in
//! `crates/nixfleet-control-plane/tests/fuzz_wire.rs`.
//!
//! For each: no panic; deep nesting is an error; a body that parses writes back to
//! itself; a layout change or an unknown member does not change what is read; the
//! identifier checks that keep agent text out of logs and paths hold; and one parse
//! allocates at most a bounded multiple of its input.
//!
//! `NIXFLEET_FUZZ_CASES` sets the cases per property; the seed is fixed
//! (`PROPTEST_RNG_SEED` to change it).

use nixfleet_fuzz::alloc::{Bound, CountingAlloc};
use nixfleet_fuzz::json::{self, nested_arrays, nested_objects};
use nixfleet_fuzz::{alone, run, Bytes};
use nixfleet_proto::wire::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Typed bodies: strings (at most their input length), vectors of small structs (a
/// failed target is ~130 bytes and takes ~60 input bytes at least) doubled by vector
/// growth, and serde_json's scratch for escaped strings: well under 16 per byte.
const TYPED: Bound = Bound {
    per_input_byte: 16,
    constant: 32 << 10,
};

/// The enroll route's second parse, into a `serde_json::Value`: every object is a
/// B-tree whose first node holds room for 11 members (~630 bytes), so `{"":0},` (7
/// bytes) costs ~660 bytes: about 96 per input byte at worst. Bounded, but the worst
/// amplification here: 256 KiB (the route's body limit) can take ~25 MiB for a moment.
const VALUE: Bound = Bound {
    per_input_byte: 104,
    constant: 32 << 10,
};

const ROLLOUT: &str = "7d5a3c1e9b0f2d4c6a8e1b3d5f7a9c0e2d4f6a8b0c1e3d5f7a9b1c3e5d7f9a0b";

fn closure(n: u32) -> String {
    format!("{:032}-nixos-system-web-01-{n}", n)
}

fn seeds() -> Vec<(Route, Value)> {
    vec![
        (
            Route::Checkin,
            json!({
                "hostname": "web-01", "agentVersion": "0.1.0", "bootId": "b-1",
                "currentGeneration": {"closureHash": closure(0)},
                "lastConfirmedAt": "2026-11-27T10:00:00Z",
                "failedTargets": [
                    {"rolloutId": ROLLOUT, "closureHash": closure(1), "reason": "switch failed",
                     "at": "2026-11-27T09:00:00Z", "cause": "activation"},
                    {"rolloutId": ROLLOUT, "closureHash": closure(2), "reason": "",
                     "at": "2026-11-27T09:30:00+02:00", "cause": null}
                ],
                "health": {"failedUnits": 0, "uptimeSecs": 100},
                "activation": {"rolloutId": ROLLOUT, "closureHash": closure(1), "phase": "switching",
                               "since": "2026-11-27T10:00:00Z"}
            }),
        ),
        (
            Route::Confirm,
            json!({"hostname": "web-01", "rolloutId": ROLLOUT, "waveIndex": 0,
                   "generation": {"closureHash": closure(1), "bootId": "b-1"}}),
        ),
        (
            Route::Report,
            json!({"report": {"hostname": "web-01", "reportId": "r-1", "kind": "rolled-back",
                              "rolloutId": ROLLOUT, "closureHash": null, "bootId": "b-1",
                              "reason": "health gate", "at": "2026-11-27T10:00:00Z"},
                   "signature": "A".repeat(86) + "=="}),
        ),
        (
            Route::Enroll,
            json!({"token": {"version": 1,
                             "claims": {"hostname": "web-01", "expectedPubkeyFingerprint": "SHA256:abc",
                                        "issuedAt": "2026-11-27T09:00:00Z", "expiresAt": "2026-11-27T11:00:00Z",
                                        "nonce": "00112233445566778899aabbccddeeff"},
                             "signature": "A".repeat(86) + "=="},
                   "csrPem": "-----BEGIN CERTIFICATE REQUEST-----\nMIGaME4CAQAwETEPMA0GA1UEAwwGd2ViLTAxMCowBQYDK2VwAyEA\n-----END CERTIFICATE REQUEST-----\n"}),
        ),
        (
            Route::Renew,
            json!({"csrPem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Checkin,
    Confirm,
    Report,
    Enroll,
    Renew,
}

const ROUTES: [Route; 5] = [
    Route::Checkin,
    Route::Confirm,
    Route::Report,
    Route::Enroll,
    Route::Renew,
];

/// Parses as the route's handler does; `Ok(re-serialised value)` or the error text.
fn parse_as<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    body: &[u8],
) -> Result<Result<T, String>, TestCaseError> {
    let parsed: Result<T, _> = TYPED.check("typed body", body.len(), || {
        serde_json::from_slice::<T>(body)
    })?;
    let parsed = match parsed {
        Ok(v) => v,
        Err(e) => {
            prop_assert!(!e.is_io(), "an I/O error from a slice: {e}");
            return Ok(Err(e.to_string()));
        }
    };
    // What was read writes back, and reads back the same.
    let again = serde_json::to_vec(&parsed).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let back: T = serde_json::from_slice(&again)
        .map_err(|e| TestCaseError::fail(format!("does not read back: {e}")))?;
    prop_assert_eq!(&back, &parsed);
    Ok(Ok(parsed))
}

fn check_checkin(req: &CheckinRequest) -> Result<(), TestCaseError> {
    for f in &req.failed_targets {
        if is_rollout_id(&f.rollout_id) {
            prop_assert!(f.rollout_id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        if is_store_basename(&f.closure_hash) {
            // What the handler lets into its logs and decisions: no control characters,
            // no path separators, nothing that starts a hidden file.
            prop_assert!(f.closure_hash.bytes().all(|b| b.is_ascii_graphic()));
            prop_assert!(!f.closure_hash.contains('/') && !f.closure_hash.starts_with('.'));
        }
        let blocked = closure_blocked(&req.failed_targets, &f.rollout_id, &f.closure_hash);
        prop_assert!(blocked.is_some_and(|b| b.closure_hash == f.closure_hash));
    }
    // A closure that failed nowhere is blocked nowhere.
    let fresh = closure(99);
    if !req.failed_targets.iter().any(|f| f.closure_hash == fresh) {
        prop_assert!(closure_blocked(&req.failed_targets, ROLLOUT, &fresh).is_none());
    }
    Ok(())
}

/// One body through its route's parse; `Ok(true)` if it was accepted.
fn parse_route(route: Route, body: &[u8]) -> Result<bool, TestCaseError> {
    Ok(match route {
        Route::Checkin => match parse_as::<CheckinRequest>(body)? {
            Ok(req) => {
                check_checkin(&req)?;
                true
            }
            Err(_) => false,
        },
        Route::Confirm => parse_as::<ConfirmRequest>(body)?.is_ok(),
        Route::Report => parse_as::<ReportRequest>(body)?.is_ok(),
        Route::Renew => parse_as::<RenewRequest>(body)?.is_ok(),
        Route::Enroll => {
            let typed = parse_as::<EnrollRequest>(body)?;
            let value = VALUE.check("enroll body as a Value", body.len(), || {
                serde_json::from_slice::<Value>(body)
            })?;
            // The handler refuses the body (400) if either parse fails: serde_json skips an
            // unknown member without checking its escapes, so a lone surrogate there gets
            // past the typed parse and is caught by this one.
            if let (Ok(req), Ok(v)) = (&typed, &value) {
                // The token as received, taken out for verification, reads as the one
                // the typed parse saw.
                let token_bytes = serde_json::to_vec(&v["token"]).unwrap_or_default();
                let token: nixfleet_proto::BootstrapToken = serde_json::from_slice(&token_bytes)
                    .map_err(|e| {
                        TestCaseError::fail(format!("the token taken out does not read: {e}"))
                    })?;
                prop_assert_eq!(&token, &req.token);
            }
            typed.is_ok() && value.is_ok()
        }
    })
}

/// What a body says, as the typed parse reads it, written back as JSON.
fn typed_reading(route: Route, body: &[u8]) -> Option<Value> {
    match route {
        Route::Checkin => serde_json::from_slice::<CheckinRequest>(body)
            .ok()
            .map(|v| serde_json::to_value(v).ok()),
        Route::Confirm => serde_json::from_slice::<ConfirmRequest>(body)
            .ok()
            .map(|v| serde_json::to_value(v).ok()),
        Route::Report => serde_json::from_slice::<ReportRequest>(body)
            .ok()
            .map(|v| serde_json::to_value(v).ok()),
        Route::Enroll => serde_json::from_slice::<EnrollRequest>(body)
            .ok()
            .map(|v| serde_json::to_value(v).ok()),
        Route::Renew => serde_json::from_slice::<RenewRequest>(body)
            .ok()
            .map(|v| serde_json::to_value(v).ok()),
    }
    .flatten()
}

#[derive(Debug, Clone)]
enum Input {
    Mutated(usize, json::Plan),
    /// An unknown member added at the top level.
    Unknown(usize, String, Value),
    Arbitrary(usize, Bytes),
}

#[test]
fn agent_bodies_parse_as_the_control_plane_reads_them() {
    let seeds = seeds();
    for (route, v) in &seeds {
        assert!(
            parse_route(*route, &serde_json::to_vec(v).unwrap()).unwrap(),
            "{route:?}"
        );
    }
    let readings: Vec<Value> = seeds
        .iter()
        .map(|(r, v)| typed_reading(*r, &serde_json::to_vec(v).unwrap()).unwrap())
        .collect();
    let n = seeds.len();
    let inputs = prop_oneof![
        8 => (0..n, json::plan()).prop_map(|(i, p)| Input::Mutated(i, p)),
        1 => (0..n, "[a-zA-Z_]{1,12}", json::value()).prop_map(|(i, k, v)| Input::Unknown(i, k, v)),
        2 => (0..n, nixfleet_fuzz::bytes(0..512)).prop_map(|(i, b)| Input::Arbitrary(i, b)),
    ];
    run("agent bodies", 8, inputs, |input| {
        let (i, body) = match &input {
            Input::Mutated(i, plan) => (*i, json::apply(&seeds[*i].1, plan)),
            Input::Unknown(i, key, value) => {
                let mut v = seeds[*i].1.clone();
                if v.get(key).is_some() {
                    return Ok(());
                }
                v[key] = value.clone();
                (*i, serde_json::to_vec(&v).unwrap())
            }
            Input::Arbitrary(i, b) => (*i, b.0.clone()),
        };
        let route = seeds[i].0;
        let accepted = parse_route(route, &body)?;
        let same_reading = || typed_reading(route, &body).as_ref() == Some(&readings[i]);
        match &input {
            Input::Mutated(_, plan) if json::layout_only(plan) && !plan.layout.float_integers => {
                prop_assert!(
                    accepted && same_reading(),
                    "a layout change changed the body"
                );
            }
            Input::Unknown(..) => {
                prop_assert!(
                    accepted && same_reading(),
                    "an unknown member changed the body"
                );
            }
            _ => {}
        }
        Ok(())
    });
}

#[test]
fn deep_bodies_are_an_error_not_a_stack_overflow() {
    let _alone = alone();
    for depth in [127, 128, 129, 1_000, 100_000] {
        for closed in [true, false] {
            for deep in [nested_arrays(depth, closed), nested_objects(depth, closed)] {
                for route in ROUTES {
                    assert!(!parse_route(route, &deep).unwrap(), "{route:?} at {depth}");
                }
                // Inside a body, where the handler expects a string.
                let mut body = br#"{"csrPem":"#.to_vec();
                body.extend_from_slice(&deep);
                body.push(b'}');
                assert!(!parse_route(Route::Renew, &body).unwrap());
                assert!(!parse_route(Route::Enroll, &body).unwrap());
            }
        }
    }
}

#[test]
fn identifier_checks_admit_only_safe_text() {
    let texts = prop_oneof![
        "[0-9a-f]{64}",
        "[0-9a-zA-Z]{60,68}",
        "[0-9a-df-np-sv-z]{32}-[a-zA-Z0-9+._?=-]{1,12}",
        "[0-9a-z]{30,34}-[ -~]{0,12}",
        any::<String>(),
    ];
    run("identifiers", 8, texts, |s| {
        if is_rollout_id(&s) {
            prop_assert!(
                s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            );
        }
        if is_store_basename(&s) {
            prop_assert!(s.len() <= 32 + 1 + 211);
            prop_assert!(s
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\'));
            let name = &s[33..];
            prop_assert!(!name.starts_with('.') && !name.is_empty());
        }
        Ok(())
    });
}

/// The inputs the bounds above were worked out from, at a size where the constant no
/// longer hides the per-byte cost.
#[test]
fn the_costliest_known_bodies_stay_within_the_bounds() {
    let _alone = alone();
    for item in [
        "{\"\":0}",
        "[0]",
        "[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]",
        "0",
        "\"\"",
    ] {
        let many = json::Raw::ManyItems { item, len: 30_000 }.bytes();
        let mut body = br#"{"csrPem":"x","token":"#.to_vec();
        body.extend_from_slice(&many);
        body.push(b'}');
        for route in ROUTES {
            // Renew ignores the unknown member; every other route refuses the body.
            let accepted = parse_route(route, &body).unwrap();
            assert_eq!(accepted, route == Route::Renew, "{route:?} {item}");
        }
    }
}
