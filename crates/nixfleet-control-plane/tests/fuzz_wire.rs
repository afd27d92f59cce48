//! Bounded fuzzing over the wire: the real control-plane binary, an enrolled host's mTLS
//! client and an anonymous one post mutated and random bodies to every route that parses
//! agent input: /v1/agent/checkin, /v1/agent/report, /v1/agent/confirm, /v1/enroll and
//! /v1/agent/renew.
//!
//! Bodies are structure-aware mutations of valid ones (`nixfleet_fuzz::json`), random
//! bytes, 100,000-deep nesting and oversize bodies; and, because the test holds the host
//! key and the org root key, mutations signed again, which reach the checks behind the
//! signatures: reports with odd text, tokens with odd nonces (each sent twice, so the
//! replay is refused and logged), check-ins reporting failures and activations. Every
//! answer must be a 4xx with a JSON reason (a 413 also closing the connection, and
//! saying so), or a 2xx for a body that is still valid; never a 5xx or a dropped
//! connection. A layout change of a valid check-in, report or renewal is still served.
//! Afterwards the control plane still answers /healthz, still ticks, still serves the
//! host, and its log has only well-formed lines: no text the fuzzer sent put a raw
//! control character or line separator into it. The parsing happens in another process,
//! so instead of a counting allocator this test bounds how much the control plane's
//! peak resident memory (VmHWM) grew.
//!
//! `NIXFLEET_FUZZ_CASES` sets the cases; the seed is fixed (`PROPTEST_RNG_SEED` to
//! change it). Needs the workspace's binaries (`cargo build --workspace --bins`).

mod support;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::Method;
use nixfleet_fuzz::json::{self, forged_markers, injection, injections, MARKER};
use nixfleet_fuzz::{run, Bytes};
use nixfleet_harness::*;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{ssh_fingerprint, PrivateKey};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};
use support::{now_rfc3339, start_enrolled};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The control plane's request body limit (`api.rs`).
const BODY_LIMIT: usize = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Checkin,
    Report,
    Confirm,
    Enroll,
    Renew,
}

const ROUTES: [Route; 5] = [
    Route::Checkin,
    Route::Report,
    Route::Confirm,
    Route::Enroll,
    Route::Renew,
];

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Checkin => "/v1/agent/checkin",
            Route::Report => "/v1/agent/report",
            Route::Confirm => "/v1/agent/confirm",
            Route::Enroll => "/v1/enroll",
            Route::Renew => "/v1/agent/renew",
        }
    }
}

#[derive(Debug, Clone)]
enum Input {
    Mutated(Route, json::Plan),
    Random(Route, Bytes),
    Deep {
        route: Route,
        depth: usize,
        objects: bool,
    },
    /// Just over the 256 KiB body limit.
    Oversize(Route),
    /// A check-in whose failed target for the live rollout gives this reason.
    FailedTarget(String),
    /// The report changed, then signed again with the host key.
    ResignedReport(json::Plan),
    /// A report with this text in one of its free-text members, signed by the host.
    ReportText(&'static str, String),
    /// The token's claims changed, then signed again with the org root key.
    ResignedToken(json::Plan),
    /// A valid token with this nonce, sent twice.
    TokenNonce(String),
    /// A check-in reporting an activation in flight: a phase (valid or not) since a time
    /// (now, or at the edges of what RFC 3339 allows).
    Activation {
        phase: &'static str,
        since: &'static str,
    },
}

fn routes() -> impl Strategy<Value = Route> {
    select(&ROUTES[..])
}

fn inputs() -> impl Strategy<Value = Input> {
    prop_oneof![
        12 => (routes(), json::plan()).prop_map(|(r, p)| Input::Mutated(r, p)),
        2 => (routes(), nixfleet_fuzz::bytes(0..512)).prop_map(|(r, b)| Input::Random(r, b)),
        1 => (routes(), select(&[129usize, 100_000][..]), any::<bool>())
            .prop_map(|(route, depth, objects)| Input::Deep { route, depth, objects }),
        1 => routes().prop_map(Input::Oversize),
        2 => injection().prop_map(Input::FailedTarget),
        3 => json::plan().prop_map(Input::ResignedReport),
        2 => (select(&["reason", "reportId", "bootId", "closureHash", "rolloutId"][..]), injection())
            .prop_map(|(field, text)| Input::ReportText(field, text)),
        2 => json::plan().prop_map(Input::ResignedToken),
        1 => injection().prop_map(Input::TokenNonce),
        2 => (
            select(&["fetching", "switching", "awaitingConfirm", "rollingBack", "Switching", ""][..]),
            select(&[
                "now",
                "9999-12-31T23:59:59-23:59",
                "0000-01-01T00:00:00+23:59",
                "1970-01-01T00:00:00Z",
                "2026-02-30T00:00:00Z",
                "2026-06-30T23:59:60Z",
            ][..])
        )
            .prop_map(|(phase, since)| Input::Activation { phase, since }),
    ]
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0).unwrap().format(&Rfc3339).unwrap()
}

/// Everything a case needs to build its bodies.
struct Fixture {
    host: PrivateKey,
    host_line: String,
    org: PrivateKey,
    /// web-02's CSR: web-02 is not enrolled yet, the enroll body is its.
    newcomer_csr: String,
    rollout: String,
    seeds: BTreeMap<Route, Value>,
    report: Value,
    claims: Value,
}

impl Fixture {
    fn token(&self, claims_text: &[u8]) -> Vec<u8> {
        let signature = match jcs::canonicalize(claims_text) {
            Ok(c) => b64(&self.org.sign(&c)),
            Err(_) => b64(&[0; 64]),
        };
        let mut out = br#"{"version":1,"claims":"#.to_vec();
        out.extend_from_slice(claims_text);
        out.extend_from_slice(format!(r#","signature":"{signature}"}}"#).as_bytes());
        out
    }

    fn enroll_body(&self, token: &[u8]) -> Vec<u8> {
        let mut out = br#"{"token":"#.to_vec();
        out.extend_from_slice(token);
        out.extend_from_slice(format!(r#","csrPem":{}}}"#, json!(self.newcomer_csr)).as_bytes());
        out
    }

    fn claims_with_nonce(&self, nonce: &str) -> Value {
        let mut claims = self.claims.clone();
        claims["nonce"] = json!(nonce);
        claims
    }

    fn report_body(&self, report_text: &[u8]) -> Vec<u8> {
        let signature = match jcs::canonicalize(report_text) {
            Ok(c) => b64(&self.host.sign(&c)),
            Err(_) => b64(&[0; 64]),
        };
        let mut out = br#"{"report":"#.to_vec();
        out.extend_from_slice(report_text);
        out.extend_from_slice(format!(r#","signature":"{signature}"}}"#).as_bytes());
        out
    }

    /// The bodies of a case, in the order they are sent, with their route.
    fn bodies(&self, input: &Input) -> Vec<(Route, Vec<u8>)> {
        let json_bytes = |v: &Value| serde_json::to_vec(v).unwrap();
        match input {
            Input::Mutated(route, plan) => vec![(*route, json::apply(&self.seeds[route], plan))],
            Input::Random(route, bytes) => vec![(*route, bytes.0.clone())],
            Input::Deep {
                route,
                depth,
                objects,
            } => {
                let deep = if *objects {
                    json::nested_objects(*depth, true)
                } else {
                    json::nested_arrays(*depth, true)
                };
                vec![(*route, deep)]
            }
            Input::Oversize(route) => {
                let mut v = self.seeds[route].clone();
                v["padding"] = json!("x".repeat(260 << 10));
                vec![(*route, json_bytes(&v))]
            }
            Input::FailedTarget(reason) => {
                let failed = json!([{"rolloutId": self.rollout, "closureHash": closure("web-01", 1),
                                     "reason": reason, "at": now_rfc3339(), "cause": "activation"}]);
                vec![(
                    Route::Checkin,
                    json_bytes(&checkin_body("web-01", &closure("web-01", 0), None, failed)),
                )]
            }
            Input::ResignedReport(plan) => {
                vec![(
                    Route::Report,
                    self.report_body(&json::apply(&self.report, plan)),
                )]
            }
            Input::ReportText(field, text) => {
                let mut report = self.report.clone();
                report[*field] = json!(text);
                vec![(Route::Report, self.report_body(&json_bytes(&report)))]
            }
            Input::ResignedToken(plan) => {
                // A fresh nonce, so that a token that still verifies gets as far as it can.
                let claims = self.claims_with_nonce(&format!("{:032x}", nonce_counter()));
                let token = self.token(&json::apply(&claims, plan));
                vec![(Route::Enroll, self.enroll_body(&token))]
            }
            Input::Activation { phase, since } => {
                let since = if *since == "now" {
                    now_rfc3339()
                } else {
                    (*since).to_owned()
                };
                let mut body = checkin_body("web-01", &closure("web-01", 0), None, json!([]));
                body["activation"] = json!({"rolloutId": self.rollout, "closureHash": closure("web-01", 1),
                                            "phase": phase, "since": since});
                vec![(Route::Checkin, json_bytes(&body))]
            }
            Input::TokenNonce(nonce) => {
                let token = self.token(&json_bytes(&self.claims_with_nonce(nonce)));
                let body = self.enroll_body(&token);
                vec![(Route::Enroll, body.clone()), (Route::Enroll, body)]
            }
        }
    }
}

fn nonce_counter() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn fixture(s: &Setup, hosts: &[Host], rollout: String) -> Fixture {
    let org = PrivateKey::from_pem(&s.pki.read("org.pem")).unwrap();
    let newcomer = &hosts[1];
    let newcomer_line = newcomer.pubkey_line();
    let now = OffsetDateTime::now_utc();
    let claims = json!({
        "hostname": newcomer.name,
        "expectedPubkeyFingerprint": ssh_fingerprint(&newcomer_line).unwrap(),
        "issuedAt": rfc3339(now - time::Duration::minutes(1)),
        "expiresAt": rfc3339(now + time::Duration::hours(1)),
        "nonce": format!("{:032x}", nonce_counter()),
    });
    let report = json!({"hostname": "web-01", "reportId": "r-1", "kind": "rolled-back",
                        "rolloutId": rollout, "closureHash": closure("web-01", 1), "bootId": "b",
                        "reason": "confirm window expired", "at": now_rfc3339()});
    let host = hosts[0].key.clone();
    let mut f = Fixture {
        host_line: hosts[0].pubkey_line(),
        host,
        org,
        newcomer_csr: newcomer.csr(),
        rollout: rollout.clone(),
        seeds: BTreeMap::new(),
        report: report.clone(),
        claims,
    };
    let signed_report: Value =
        serde_json::from_slice(&f.report_body(&serde_json::to_vec(&report).unwrap())).unwrap();
    let token: Value =
        serde_json::from_slice(&f.token(&serde_json::to_vec(&f.claims).unwrap())).unwrap();
    f.seeds = BTreeMap::from([
        (
            Route::Checkin,
            checkin_body("web-01", &closure("web-01", 0), None, json!([])),
        ),
        (Route::Report, signed_report),
        (
            Route::Confirm,
            confirm_body("web-01", &rollout, 0, &closure("web-01", 1)),
        ),
        (
            Route::Enroll,
            json!({"token": token, "csrPem": f.newcomer_csr}),
        ),
        (Route::Renew, json!({"csrPem": hosts[0].csr()})),
    ]);
    f
}

/// Whether a body the control plane served is one an agent could have sent: it reads as
/// the route's request type and, for a report, its signature verifies.
fn still_valid(f: &Fixture, route: Route, body: &[u8]) -> bool {
    use nixfleet_proto::wire::*;
    match route {
        Route::Checkin => serde_json::from_slice::<CheckinRequest>(body).is_ok(),
        Route::Confirm => serde_json::from_slice::<ConfirmRequest>(body).is_ok(),
        Route::Enroll => serde_json::from_slice::<EnrollRequest>(body).is_ok(),
        Route::Renew => serde_json::from_slice::<RenewRequest>(body).is_ok(),
        Route::Report => nixfleet_trust::verify::verify_report(
            body,
            "web-01",
            &f.host_line,
            &nixfleet_trust::verify::Limits::default(),
        )
        .is_ok(),
    }
}

/// Peak resident memory of a process, from /proc (kB).
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A line of the control plane's log without its colours: `ESC [ … letter` removed.
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `2026-12-04T08:13:00.123456Z  INFO target: message`: a line tracing wrote.
fn well_formed(line: &str) -> bool {
    let b = line.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() > 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && line
            .split_whitespace()
            .nth(1)
            .is_some_and(|level| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level))
}

fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn check_log(log: &str) -> Result<(), String> {
    let forged = forged_markers(log);
    if let Some(&at) = forged.first() {
        let line_start = log[..at].rfind('\n').unwrap_or(0);
        let from = log[..line_start].rfind('\n').map_or(0, |i| i + 1);
        return Err(format!(
            "{} forged line(s) in the control plane's log; the first: {:?}",
            forged.len(),
            &log[from..at + MARKER.len()]
        ));
    }
    for line in log.lines() {
        let plain = without_colours(line);
        if !well_formed(&plain) {
            return Err(format!("not a line the control plane wrote: {line:?}"));
        }
        if let Some(c) = plain
            .chars()
            .find(|c| (c.is_control() && *c != '\t') || matches!(c, '\u{2028}' | '\u{2029}'))
        {
            return Err(format!("raw {c:?} in the log: {line:?}"));
        }
    }
    Ok(())
}

#[test]
fn every_mutated_body_gets_a_4xx_or_2xx_and_the_control_plane_stays_healthy() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let opts = CpOptions {
        extra: vec!["--reports-per-minute".into(), "1000000".into()],
        ..CpOptions::default()
    };
    let (mut cp, port, hosts) = rt.block_on(start_enrolled(&mut s, &state, &opts, 1));
    let pid = cp.child.as_ref().map(|c| c.id()).unwrap();
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let anonymous = Client::anonymous(&s.pki, port);
    let f = fixture(&s, &hosts, rollout_id(&s.forge_dir, "stable"));

    let mut newcomer = Host {
        name: hosts[1].name.clone(),
        key: hosts[1].key.clone(),
        cert_pem: None,
    };
    // Every seed is valid: the mutations start from bodies the control plane serves.
    for route in ROUTES {
        let client = if route == Route::Enroll {
            &anonymous
        } else {
            &web01
        };
        let r = rt.block_on(client.post(route.path(), &f.seeds[&route]));
        assert!(
            (200..300).contains(&r.status),
            "{route:?} seed: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if route == Route::Enroll {
            newcomer.cert_pem = r.json()["certPem"].as_str().map(str::to_owned);
        }
    }
    let web02 = Client::host(&s.pki, port, &newcomer);

    let rss_before = peak_rss_kb(pid);
    let seen: Mutex<BTreeMap<(Route, u16), u32>> = Mutex::new(BTreeMap::new());
    let started = Instant::now();
    run("control plane over the wire", 4, inputs(), |input| {
        for (route, body) in f.bodies(&input) {
            let len = body.len();
            let client = if route == Route::Enroll {
                &anonymous
            } else {
                &web01
            };
            let body_copy = body.clone();
            let reply = match rt.block_on(client.try_request(
                Method::POST,
                route.path(),
                Some(body),
                &[("x-nixfleet-protocol", "1")],
            )) {
                Ok(reply) => reply,
                // Over the limit, the control plane answers 413 and closes the connection
                // without reading the rest, so a client still sending sees a broken pipe.
                Err(e) if len > BODY_LIMIT && e.contains("BrokenPipe") => {
                    *seen.lock().unwrap().entry((route, 413)).or_default() += 1;
                    continue;
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "{route:?}: no answer to a {len}-byte body: {e}\nthe control plane's log ends:\n{}",
                        log_tail(&cp.log_text(), 15)
                    )))
                }
            };
            *seen
                .lock()
                .unwrap()
                .entry((route, reply.status))
                .or_default() += 1;
            let text = || String::from_utf8_lossy(&reply.body).into_owned();
            prop_assert!(
                (200..300).contains(&reply.status) || (400..500).contains(&reply.status),
                "{:?} answered {}: {}\nthe control plane's log ends:\n{}",
                route,
                reply.status,
                text(),
                log_tail(&cp.log_text(), 15)
            );
            if (200..300).contains(&reply.status) {
                prop_assert!(
                    still_valid(&f, route, &body_copy),
                    "{:?} served a body that is not a valid request: {}",
                    route,
                    String::from_utf8_lossy(&body_copy)
                );
            }
            if reply.status == 413 {
                // Over the limit the control plane stops reading and closes the
                // connection: it must say so, or the next request would go into it.
                prop_assert_eq!(reply.header("connection"), Some("close"));
            }
            // Every refusal says why, as JSON (`ErrorBody`).
            if reply.status >= 400 {
                let error: Value = serde_json::from_slice(&reply.body).map_err(|_| {
                    TestCaseError::fail(format!("{route:?} {}: not JSON: {}", reply.status, text()))
                })?;
                prop_assert!(error["error"].is_string(), "{}", text());
            }
            if let Input::Mutated(r @ (Route::Checkin | Route::Report | Route::Renew), plan) =
                &input
            {
                if json::layout_only(plan) && !plan.layout.float_integers {
                    prop_assert!(
                        (200..300).contains(&reply.status),
                        "{:?}: the same body laid out differently was refused: {} {}",
                        r,
                        reply.status,
                        text()
                    );
                }
            }
        }
        Ok(())
    });
    let fuzzed = started.elapsed();
    let after = OffsetDateTime::now_utc();

    // Still healthy: /healthz, a tick after the fuzzing, the host still served.
    let health = rt.block_on(anonymous.get("/healthz"));
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["ok"], true, "{}", health.json());
    rt.block_on(wait_for_async(
        "a tick after the fuzzing",
        Duration::from_secs(20),
        || {
            let anonymous = anonymous.clone();
            async move {
                let h = anonymous.get("/healthz").await.json();
                h["last_tick_at"]
                    .as_str()
                    .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                    .is_some_and(|t| t > after)
            }
        },
    ));
    let r = rt.block_on(web01.post("/v1/agent/checkin", &f.seeds[&Route::Checkin]));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    if let Some(child) = cp.child.as_mut() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the control plane exited"
        );
    }

    // No unbounded allocation: bodies are capped at 256 KiB, so one request at a time
    // cannot grow the peak by much (the costliest parse, a B-tree per tiny JSON object,
    // is ~100 bytes per body byte: ~25 MiB).
    let rss_after = peak_rss_kb(pid);
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib <= 128,
        "the control plane's peak memory grew by {grown_mib} MiB ({rss_before} kB to {rss_after} kB)"
    );

    // Agent text that is logged after the checks, each carrying every injection at once:
    // a failure reason the reconciler acts on (then quoted back by a refused confirm),
    // and a replayed token's nonce. web-02 reports the failure: the fuzzing may have
    // failed web-01 already, and only a host's first failure is recorded.
    let all = injections().join(" ");
    let failed = json!([{"rolloutId": f.rollout, "closureHash": closure("web-02", 1),
                         "reason": all, "at": now_rfc3339(), "cause": "activation"}]);
    let body = checkin_body("web-02", &closure("web-02", 0), None, failed);
    let operator = Client::operator(&s.pki, port);
    rt.block_on(wait_for_async(
        "the reported failure",
        Duration::from_secs(20),
        || {
            let (web02, operator, body) = (web02.clone(), operator.clone(), body.clone());
            async move {
                assert_eq!(web02.post("/v1/agent/checkin", &body).await.status, 200);
                let host = operator.get("/v1/hosts/web-02").await.json();
                host["rollout_state"]
                    .as_str()
                    .is_some_and(|s| s.contains("failed"))
            }
        },
    ));
    let confirm = confirm_body("web-02", &f.rollout, 1, &closure("web-02", 1));
    let r = rt.block_on(web02.post("/v1/agent/confirm", &confirm));
    assert_eq!(r.status, 410, "{}", String::from_utf8_lossy(&r.body));
    let token = f.token(&serde_json::to_vec(&f.claims_with_nonce(&all)).unwrap());
    let enroll = f.enroll_body(&token);
    for want in [200, 409] {
        let r =
            rt.block_on(anonymous.request(Method::POST, "/v1/enroll", Some(enroll.clone()), &[]));
        assert_eq!(r.status, want, "{}", String::from_utf8_lossy(&r.body));
    }

    let log = cp.log_text();
    if let Err(e) = check_log(&log) {
        panic!("{e}");
    }
    let seen = seen.into_inner().unwrap();
    eprintln!(
        "{} requests in {fuzzed:.1?}; peak memory {} -> {} kB; answers: {seen:?}",
        seen.values().sum::<u32>(),
        rss_before,
        rss_after
    );
    for route in ROUTES {
        assert!(
            seen.keys()
                .any(|(r, status)| *r == route && (400..500).contains(status)),
            "{route:?} was never refused: the fuzzing did not reach it"
        );
    }
}

#[test]
fn the_log_check_catches_forged_lines() {
    let line = "2026-12-04T08:13:00.123456Z  INFO nixfleet_control_plane::api: report received: x";
    assert!(check_log(&format!("{line}\n{line}\n")).is_ok());
    assert!(check_log(&format!("{line}\\n{MARKER}\n")).is_ok());
    assert!(check_log(&format!("{line}\n{MARKER}\n")).is_err());
    assert!(check_log(&format!("{line}\u{2028}{MARKER}\n")).is_err());
    assert!(check_log(&format!("{line}\r{MARKER}\n")).is_err());
    assert!(check_log(&format!("{line} x\u{7}\n")).is_err());
    assert!(check_log("thread 'main' panicked at src/api.rs:1:1\n").is_err());
    let coloured = "\u{1b}[2m2026-12-04T08:13:00.123456Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x: y";
    assert!(
        check_log(coloured).is_ok(),
        "{:?}",
        without_colours(coloured)
    );
}
