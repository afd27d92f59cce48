//! End-to-end fleet scenarios: the real control plane, real `nixfleet-agent` processes (one
//! per host, each with its own host key, state dir, profile and current-system link), a
//! forge serving the signed artifacts, and a signed Nix binary cache over HTTP.

mod fleet;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet::*;
use nixfleet_harness::*;
use serde_json::{json, Value};

// ---- scenario 1 -----------------------------------------------------------------------------

#[test]
fn teardown_runbook_literally_with_ten_agents_and_a_revoked_host() {
    require_nix();
    let mut summary = Summary::begin("1 teardown");
    let good: Vec<String> = (1..=10).map(|i| format!("web-{i:02}")).collect();
    let revoked_name = "lost-01".to_owned();
    let mut names = good.clone();
    names.push(revoked_name.clone());
    let mut f = Fleet::new(
        &names,
        canary_policy("halt", 0),
        json!([{"hostname": revoked_name, "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]),
    );
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();

    // The fleet rolls out gen1 once: every good host activates and confirms it.
    f.wait_confirmed(&good.iter().map(String::as_str).collect::<Vec<_>>());
    let lost = f.node(&revoked_name);
    wait_for("the revoked host to be refused", LONG, || {
        lost.log().contains("it is revoked or expired")
    });
    assert!(lost.machine.activations().is_empty());
    let lost_cert = std::fs::read_to_string(lost.machine.dir.join("agent-state/cert.pem")).unwrap();

    // ---- Pre-flight ----
    // 1. Signed artifacts reachable from the configured URLs, and they verify.
    let pre = f.tmp.path().join("preflight");
    std::fs::create_dir_all(&pre).unwrap();
    for file in [
        "fleet.resolved.json",
        "fleet.resolved.json.sig",
        "revocations.json",
        "revocations.json.sig",
    ] {
        sh_ok(&format!(
            "curl -sf -o {} {}",
            pre.join(file).display(),
            f.forge.url(file)
        ));
    }
    let trust = f.pki.path("etc/trust.json");
    let nixfleet = bin("nixfleet");
    let verify = |kind: &str, dir: &std::path::Path, name: &str| {
        sh_ok(&format!(
            "{} verify {kind} --trust-file {} {}",
            nixfleet.display(),
            trust.display(),
            dir.join(name).display()
        ))
    };
    verify("fleet", &pre, "fleet.resolved.json");
    verify("revocations", &pre, "revocations.json");
    // 2. Build-time fallback intact.
    verify("fleet", &f.pki.path("build-time"), "fleet.resolved.json");
    // 3. Fleet CA available.
    for pem in ["etc/fleet-ca-cert.pem", "etc/fleet-ca-key.pem"] {
        sh_ok(&format!("grep -q 'BEGIN' {}", f.pki.path(pem).display()));
    }
    // 4. At least one agent currently online.
    let online = sh(&format!(
        "{} | jq '[.[] | select(.online)] | length'",
        f.curl_operator("/v1/hosts")
    ));
    assert_eq!(
        online.trim(),
        "10",
        "every good agent online before the wipe"
    );

    let audit_before = std::fs::read(f.state_dir().join("audit.log")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&audit_before).lines().count(),
        names.len(),
        "one issuance line per enrollment"
    );
    let logs_before = f.log_marks();

    // ---- Procedure ----
    let restarted = wipe_and_restart(&mut f);
    let new_log = f.cp().log.clone();

    // The revoked host is refused from the CP's very first answer: the signed list is
    // replayed before any agent request is served (never a 503 window, never a 200).
    let probe_host = Host {
        name: revoked_name.clone(),
        key: f.node(&revoked_name).host.key.clone(),
        cert_pem: Some(lost_cert),
    };
    let probe = Client::host(&f.pki, f.cp_port, &probe_host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lost_gen0 = f.node(&revoked_name).gen0.clone();
    let first = rt.block_on(async {
        let body = checkin_body(&revoked_name, &lost_gen0, None, json!([]));
        loop {
            if let Ok(r) = probe.try_post("/v1/agent/checkin", &body).await {
                return r.status;
            }
            assert!(restarted.elapsed() < LONG, "the CP never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert_eq!(
        first, 401,
        "the revoked host's first answer after the wipe must be 401"
    );

    // Full visibility: every good agent checked in with the new CP.
    let expected: BTreeSet<String> = good.iter().cloned().collect();
    wait_for("every good agent to check in again", LONG, || {
        checked_in(&new_log) == expected
    });
    let visible = restarted.elapsed();
    summary.timing(
        &format!(
            "restart to full visibility ({} agents, {POLL_SECS} s poll)",
            good.len()
        ),
        visible,
    );
    assert!(
        visible <= Duration::from_secs(2 * POLL_SECS),
        "restart to full visibility took {visible:?}, over 2 poll intervals"
    );
    f.cp.as_mut().unwrap().wait_ready(&f.pki);

    // ---- Verify, as written ----
    let healthz = sh(&format!(
        "curl -sk https://localhost:{}/healthz | jq '.last_tick_at != null'",
        f.cp_port
    ));
    assert_eq!(healthz.trim(), "true");
    let signed_at = sh(&format!(
        "{} | jq '.signed_at'",
        f.curl_operator("/v1/channels/stable")
    ));
    let released: Value =
        serde_json::from_slice(&std::fs::read(f.forge_dir.join("fleet.resolved.json")).unwrap())
            .unwrap();
    assert_eq!(
        signed_at.trim(),
        format!("\"{}\"", released["meta"]["signedAt"].as_str().unwrap())
    );
    let revocations = sh(&format!(
        "cat {} | grep -E 'revocations poll|cert_revocations'",
        new_log.display()
    ));
    assert!(
        revocations.contains("cert_revocations now has 1 rows"),
        "{revocations}"
    );
    assert_eq!(
        checked_in(&new_log),
        expected,
        "the revoked host never gets in"
    );

    // The operator view agrees: every good host seen since the restart, on gen1.
    let hosts = f.operator_get("/v1/hosts").json();
    for h in hosts.as_array().unwrap() {
        let name = h["name"].as_str().unwrap();
        if name == revoked_name {
            assert!(h["last_checkin"].is_null(), "revoked host seen: {h}");
        } else {
            assert!(!h["last_checkin"].is_null(), "{name} not seen: {h}");
            assert_eq!(h["current_closure"], f.node(name).gen1.as_str());
        }
    }

    // The revoked host stays refused: the agent keeps failing, the CP keeps saying 401.
    let lost = f.node(&revoked_name);
    let lost_before = logs_before[names.len() - 1];
    wait_for("the revoked agent to be refused again", LONG, || {
        lost.log()[lost_before..].contains("it is revoked or expired")
    });
    assert!(lost.machine.activations().is_empty());

    // No agent is told to roll back or re-activate: two more check-ins each, answered
    // with no target and no rollback; nothing switched again.
    let skip = [revoked_name.as_str()];
    f.wait_checkins_since(&logs_before, 2, &skip);
    f.assert_no_orders_since(&logs_before, &skip);
    for node in f.nodes.iter().filter(|n| n.name() != revoked_name) {
        assert_eq!(
            node.machine.activations(),
            vec![node.gen1.clone()],
            "{} activated again",
            node.name()
        );
        assert_eq!(node.machine.current().as_deref(), Some(node.gen1.as_str()));
        assert_eq!(node.state()["machine"]["phase"]["phase"], "idle");
    }

    // audit.log survives the wipe byte for byte.
    let audit_after = std::fs::read(f.state_dir().join("audit.log")).unwrap();
    assert_eq!(
        audit_after, audit_before,
        "audit.log changed across the wipe"
    );
}

// ---- scenario 2 -----------------------------------------------------------------------------

/// Three waves: canary (no soak), wave 1 soaking one minute, then everyone.
fn three_waves(wave1: &[&str]) -> Value {
    json!({
        "strategy": "canary",
        "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 0},
                  {"selector": {"hosts": wave1}, "soakMinutes": 1},
                  {"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
        "onHealthFailure": "halt"
    })
}

#[test]
fn teardown_mid_rollout_continues_the_soak_from_last_confirmed_at_and_converges() {
    require_nix();
    let mut summary = Summary::begin("2 teardown mid-rollout");
    let names: Vec<String> = ["canary-01", "web-01", "web-02", "web-03", "web-04"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (wave0, wave1, wave2) = (["canary-01"], ["web-01", "web-02"], ["web-03", "web-04"]);
    let mut f = Fleet::new(&names, three_waves(&wave1), json!([]));
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    f.wait_confirmed(&wave0);
    let wave1_confirmed = f.wait_confirmed(&wave1);
    // Wave 1 is soaking; wave 2 has not been told anything.
    for name in wave2 {
        assert!(f.node(name).machine.activations().is_empty());
    }
    // Let the soak run a while (five check-ins of each wave-1 agent, about 25 s), so
    // that a soak restarted at the wipe would end visibly later than one continued.
    let marks = f.log_marks();
    for name in wave1 {
        let (node, mark) = f
            .nodes
            .iter()
            .zip(&marks)
            .find(|(n, _)| n.name() == name)
            .unwrap();
        wait_for(&format!("{name} soaking through 5 check-ins"), LONG, || {
            node.log()[*mark..].matches("checked in").count() >= 5
        });
    }
    for name in wave2 {
        assert!(
            f.node(name).machine.activations().is_empty(),
            "{name} dispatched before wave 1 soaked"
        );
    }
    let soaking = json!({"executing": {"wave": 1, "phase": "soaking"}});
    assert_eq!(f.rollout_state(), soaking, "wave 1 soaking before the wipe");

    let marks = f.log_marks();
    let restarted = wipe_and_restart(&mut f);
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    let log = f.cp().log.clone();
    wait_for("every agent to check in again", LONG, || {
        checked_in(&log) == expected
    });
    // Rebuilt from the agents' attestations: still wave 1, still soaking.
    wait_for("the rollout to be rebuilt at wave 1", LONG, || {
        f.rollout_state() == soaking
    });

    // Wave 2 is dispatched once wave 1 has soaked one minute since its agents'
    // lastConfirmedAt: not earlier, and not a minute after the restart.
    let w2 = f.node(wave2[0]);
    wait_for("wave 2 to be dispatched", LONG, || {
        !w2.machine.activations().is_empty()
    });
    let promoted = Instant::now();
    let soaked = promoted - wave1_confirmed;
    let since_restart = promoted - restarted;
    summary.timing("wave 2 after wave 1 confirmed", soaked);
    summary.timing("wave 2 after the restart", since_restart);
    assert!(
        soaked >= Duration::from_secs(58),
        "wave 2 promoted early: {soaked:?} after wave 1 confirmed"
    );
    assert!(
        since_restart < Duration::from_secs(60),
        "the soak started over at the restart: wave 2 began {since_restart:?} after it"
    );
    f.wait_confirmed(&wave2);
    wait_for("the rollout to converge", LONG, || {
        f.rollout_state() == "converged"
    });
    // Waves 0 and 1 were not re-run: one activation each, no orders since the wipe.
    let done: Vec<&str> = wave0.iter().chain(&wave1).copied().collect();
    f.assert_no_orders_since(&marks, &wave2);
    for name in &done {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
    for name in wave2 {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
}

// ---- scenario 3 -----------------------------------------------------------------------------

#[test]
fn teardown_of_a_halted_rollout_stays_halted_and_nothing_re_activates() {
    require_nix();
    let _summary = Summary::begin("3 teardown halted");
    let names: Vec<String> = ["canary-01", "web-01", "web-02"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut f = Fleet::new(&names, canary_policy("halt", 0), json!([]));
    // The canary's switch fails: it rolls back to gen0 and the rollout halts.
    let canary = f.node("canary-01");
    canary.machine.set("fail", "nixos-system-canary-01-1", true);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    let canary = f.node("canary-01");
    wait_for("the canary to roll back", LONG, || {
        canary.log().contains("rolled back from")
    });
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()]
    );
    wait_for("the rollout to halt", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    let halted = f.rollout_state();
    // The failure no longer blocks the switch: only the halt keeps it from coming back.
    canary
        .machine
        .set("fail", "nixos-system-canary-01-1", false);

    let marks = f.log_marks();
    wipe_and_restart(&mut f);
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    let log = f.cp().log.clone();
    wait_for("every agent to check in again", LONG, || {
        checked_in(&log) == expected
    });
    // Several check-ins each after the wipe: the halt is rebuilt and holds.
    f.wait_checkins_since(&marks, 3, &[]);
    assert_eq!(f.rollout_state(), halted, "the halt is lost in the wipe");
    f.assert_no_orders_since(&marks, &[]);
    let canary = f.node("canary-01");
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()],
        "the failed closure was activated again"
    );
    assert_eq!(
        canary.machine.current().as_deref(),
        Some(canary.gen0.as_str())
    );
    for name in ["web-01", "web-02"] {
        assert!(
            f.node(name).machine.activations().is_empty(),
            "{name} dispatched after the wipe of a halted rollout"
        );
    }
}

// ---- control-plane-only scenarios (no Nix) ---------------------------------------------------

const SHORT: Duration = Duration::from_secs(30);

/// An RFC 3339 UTC time `offset` from now, as `date -d` reads it (e.g. `-10 min`).
fn utc(offset: &str) -> String {
    sh(&format!("date -u -d '{offset}' +%Y-%m-%dT%H:%M:%SZ"))
        .trim()
        .to_owned()
}

/// Copies `files` (relative paths, in order) from `from` to `to`, each replaced in one step.
fn publish(from: &std::path::Path, to: &std::path::Path, files: &[&str]) {
    for file in files {
        let dest = to.join(file);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let tmp = dest.with_extension("publishing");
        std::fs::copy(from.join(file), &tmp).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
    }
}

const FLEET_FILES: [&str; 2] = ["fleet.resolved.json.sig", "fleet.resolved.json"];
const REVOCATION_FILES: [&str; 2] = ["revocations.json.sig", "revocations.json"];

/// `nixfleet release` of `fleet` at `generation` signed with the key file `key` into `out`.
fn release_with_key(
    pki: &Pki,
    out: &std::path::Path,
    fleet: &Value,
    generation: u32,
    key: &str,
    extra: &[&str],
) {
    std::fs::write(pki.path("fleet.json"), fleet.to_string()).unwrap();
    std::fs::write(
        pki.path("closures.json"),
        generation_closures(fleet, generation).to_string(),
    )
    .unwrap();
    let mut args = vec![
        "release",
        "--fleet",
        "fleet.json",
        "--closures",
        "closures.json",
        "--ci-commit",
        COMMIT,
        "--key",
        key,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    nixfleet(&pki.dir, &args);
}

/// The `meta.signedAt` of the fleet.resolved.json in `dir`.
fn fleet_signed_at(dir: &std::path::Path) -> String {
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("fleet.resolved.json")).unwrap()).unwrap();
    v["meta"]["signedAt"].as_str().unwrap().to_owned()
}

/// Waits until the CP's log, after byte `mark`, has a line with `prefix` and `reason`;
/// returns that line.
async fn wait_log_line(cp: &Cp, mark: usize, prefix: &str, reason: &str) -> String {
    let mut found = String::new();
    wait_for_async(
        &format!("the CP to log `{prefix}` … `{reason}`"),
        SHORT,
        || {
            let text = cp.log_text();
            let hit = text
                .get(mark..)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains(prefix) && l.contains(reason))
                .map(str::to_owned);
            let done = hit.is_some();
            if let Some(line) = hit {
                found = line;
            }
            async move { done }
        },
    )
    .await;
    found
}

async fn checkin_status(client: &Client, host: &str) -> u16 {
    client
        .post(
            "/v1/agent/checkin",
            &checkin_body(host, &closure(host, 0), None, json!([])),
        )
        .await
        .status
}

async fn channel_signed_at(op: &Client) -> Value {
    let r = op.get("/v1/channels/stable").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["signed_at"].clone()
}

// ---- scenario 8 -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tampered_or_stale_intent_is_refused_and_the_last_good_state_kept() {
    let _summary = Summary::begin("8 tampered intent");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut web = Host::new("web-01");
    let mut lost = Host::new("lost-01");
    let fleet = fleet_json(&[&web, &lost], canary_policy("halt", 0));
    let forge_dir = tmp.path().join("forge");
    release_with_fallback(
        &pki,
        &forge_dir,
        &fleet,
        &generation_closures(&fleet, 1),
        COMMIT,
        &[],
    );
    let good_rollout = rollout_id(&forge_dir, "stable");
    let good = tmp.path().join("good");
    publish(&forge_dir, &good, &FLEET_FILES);

    // An older revocation list (nothing revoked), then the current one (lost-01 revoked).
    let old_revs = tmp.path().join("old-revocations");
    let list = |entries: Value| {
        json!({"schemaVersion": 1, "revocations": entries, "freshnessWindow": null,
               "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}})
    };
    std::fs::write(
        pki.path("revocations-old.json"),
        list(json!([])).to_string(),
    )
    .unwrap();
    let ten_min_ago = utc("-10 min");
    nixfleet(
        &pki.dir,
        &[
            "revocations",
            "sign",
            "--in",
            "revocations-old.json",
            "--key",
            "ci.pem",
            "--signed-at",
            &ten_min_ago,
            "--out",
            old_revs.to_str().unwrap(),
        ],
    );
    sign_revocations(
        &pki,
        &forge_dir,
        json!([{"hostname": "lost-01", "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]),
    );

    // Another release (other closures): its manifest is served under the channel URL.
    let other = tmp.path().join("other");
    release(&pki, &other, &fleet, 2, COMMIT);
    publish(
        &other,
        &forge_dir,
        &[
            "rollouts/channel/stable.json.sig",
            "rollouts/channel/stable.json",
        ],
    );
    let other_rollout = rollout_id(&other, "stable");
    assert_ne!(other_rollout, good_rollout);

    let forge = Forge::start(&forge_dir);
    let opts = CpOptions {
        rollouts_dir: false,
        extra: vec![
            "--rollouts-url-template".into(),
            forge.url("rollouts/channel/{channel}.json"),
        ],
        ..CpOptions::default()
    };
    let port = free_port();
    let mut cp = Cp::start_on(&pki, &forge, port, &pki.path("var"), &opts);
    cp.wait_ready(&pki);
    assert_eq!(enroll(&pki, port, &mut web).await.status, 200);
    assert_eq!(enroll(&pki, port, &mut lost).await.status, 200);
    let (web_c, lost_c) = (
        Client::host(&pki, port, &web),
        Client::host(&pki, port, &lost),
    );
    let op = Client::operator(&pki, port);
    let anon = Client::anonymous(&pki, port);
    wait_for_async("the revoked host to be refused", SHORT, || {
        let c = lost_c.clone();
        async move { checkin_status(&c, "lost-01").await == 401 }
    })
    .await;
    let good_signed_at = channel_signed_at(&op).await;
    assert_eq!(good_signed_at, fleet_signed_at(&good).as_str());

    let last_good_state_kept = |what: &'static str| {
        let (op, anon, web_c, lost_c) = (op.clone(), anon.clone(), web_c.clone(), lost_c.clone());
        let good_signed_at = good_signed_at.clone();
        async move {
            assert_eq!(
                channel_signed_at(&op).await,
                good_signed_at,
                "{what}: the verified fleet was replaced"
            );
            let health = anon.get("/healthz").await;
            assert_eq!(health.status, 200, "{what}: /healthz");
            assert!(!health.json()["last_tick_at"].is_null(), "{what}: /healthz");
            assert_eq!(
                checkin_status(&lost_c, "lost-01").await,
                401,
                "{what}: the revoked host got in"
            );
            assert_eq!(checkin_status(&web_c, "web-01").await, 200, "{what}");
        }
    };
    let rollouts = |op: Client| async move {
        let r = op.get("/v1/rollouts").await;
        assert_eq!(r.status, 200);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rollout_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    // (e) mix-and-match: the manifest under the channel URL belongs to another release.
    let line = wait_log_line(
        &cp,
        0,
        "rollout manifest of channel stable not loaded:",
        "mix-and-match",
    )
    .await;
    eprintln!("mix-and-match: {line}");
    last_good_state_kept("mix-and-match").await;
    assert!(
        !rollouts(op.clone()).await.contains(&other_rollout),
        "the other release's rollout was started"
    );
    let r = web_c
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-01", &closure("web-01", 0), None, json!([])),
        )
        .await;
    assert!(
        r.json()["target"].is_null(),
        "a target from a mismatched manifest"
    );
    // The right manifest is then loaded.
    std::fs::copy(
        forge_dir.join(format!("rollouts/{good_rollout}.json.sig")),
        forge_dir.join("rollouts/channel/stable.json.sig"),
    )
    .unwrap();
    std::fs::copy(
        forge_dir.join(format!("rollouts/{good_rollout}.json")),
        forge_dir.join("rollouts/channel/stable.json"),
    )
    .unwrap();
    wait_for_async("the release's own manifest to load", SHORT, || {
        let op = op.clone();
        let id = good_rollout.clone();
        async move { rollouts(op).await.contains(&id) }
    })
    .await;

    // (a) a bit flipped inside a string: still JSON, no longer what was signed.
    let flipped = tmp.path().join("flipped");
    publish(&good, &flipped, &FLEET_FILES);
    let text = std::fs::read_to_string(flipped.join("fleet.resolved.json")).unwrap();
    // A bit of the ciCommit string: still a well-formed commit id, but not the one signed.
    let pos = text.find(COMMIT).expect("a string to flip");
    let mut bytes = text.into_bytes();
    bytes[pos] ^= 0x01;
    std::fs::write(flipped.join("fleet.resolved.json"), &bytes).unwrap();
    serde_json::from_slice::<Value>(&bytes).expect("still valid JSON");
    // (b) dated two hours ahead; (c) signed beyond the freshness window (1440 min);
    // (d) signed by a key the trust file does not pin.
    let future = tmp.path().join("future");
    release_with_key(
        &pki,
        &future,
        &fleet,
        1,
        "ci.pem",
        &["--signed-at", &utc("+2 hours")],
    );
    let expired = tmp.path().join("expired");
    release_with_key(
        &pki,
        &expired,
        &fleet,
        1,
        "ci.pem",
        &["--signed-at", &utc("-3 days")],
    );
    nixfleet(&pki.dir, &["keygen", "--out", "foreign.pem"]);
    let foreign = tmp.path().join("foreign");
    release_with_key(&pki, &foreign, &fleet, 1, "foreign.pem", &[]);

    for (what, dir, reason) in [
        ("bit-flipped", &flipped, "signature does not verify"),
        ("future-dated", &future, "after now"),
        ("expired", &expired, "is stale"),
        ("foreign key", &foreign, "signature does not verify"),
    ] {
        let mark = cp.log_text().len();
        publish(dir, &forge_dir, &FLEET_FILES);
        let line = wait_log_line(&cp, mark, "channel-refs poll failed:", reason).await;
        eprintln!("{what}: {line}");
        assert!(line.contains("keeping the verified fleet"), "{line}");
        last_good_state_kept(what).await;
    }

    // (f) an older revocation list.
    let mark = cp.log_text().len();
    publish(&old_revs, &forge_dir, &REVOCATION_FILES);
    let line = wait_log_line(
        &cp,
        mark,
        "revocations poll failed:",
        "revocations never roll back",
    )
    .await;
    eprintln!("older revocations: {line}");
    last_good_state_kept("older revocation list").await;

    // Serving the good release again changes nothing either.
    publish(&good, &forge_dir, &FLEET_FILES);
    last_good_state_kept("good release again").await;
}

// ---- scenario 10 ----------------------------------------------------------------------------

/// A bootstrap token for `host`, correctly signed by the org root key, that expired an
/// hour ago.
fn expired_token(pki: &Pki, host: &Host) -> Value {
    use nixfleet_trust::keys::{ssh_fingerprint, PrivateKey};
    let org = PrivateKey::from_pem(&pki.read("org.pem")).unwrap();
    let claims = json!({
        "hostname": host.name,
        "expectedPubkeyFingerprint": ssh_fingerprint(&host.pubkey_line()).unwrap(),
        "issuedAt": utc("-2 hours"), "expiresAt": utc("-1 hour"),
        "nonce": "0000000000000000000000000000000e",
    });
    let sig = org.sign(&nixfleet_trust::jcs::to_canonical(&claims).unwrap());
    json!({"version": 1, "claims": claims, "signature": b64(&sig)})
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_concurrent_replayed_wrong_key_and_expired_tokens() {
    let _summary = Summary::begin("10 enrollment");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut hosts: Vec<Host> = (1..=5).map(|i| Host::new(&format!("web-{i:02}"))).collect();
    let late = Host::new("web-06");
    let mut all: Vec<&Host> = hosts.iter().collect();
    all.push(&late);
    let fleet = fleet_json(&all, canary_policy("halt", 0));
    let forge_dir = tmp.path().join("forge");
    release_with_fallback(
        &pki,
        &forge_dir,
        &fleet,
        &generation_closures(&fleet, 1),
        COMMIT,
        &[],
    );
    sign_revocations(&pki, &forge_dir, json!([]));
    let forge = Forge::start(&forge_dir);
    let state = pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&pki, &forge, port, &state, &CpOptions::default());
    cp.wait_ready(&pki);
    let anon = Client::anonymous(&pki, port);

    // Five hosts enroll at once, each with its own token: all get a certificate.
    let bodies: Vec<Value> = hosts
        .iter()
        .map(|h| json!({"token": h.token(&pki, &[]), "csrPem": h.csr()}))
        .collect();
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| {
            let anon = anon.clone();
            tokio::spawn(async move { anon.post("/v1/enroll", &body).await })
        })
        .collect();
    for (host, task) in hosts.iter_mut().zip(tasks) {
        let r = task.await.unwrap();
        assert_eq!(
            r.status,
            200,
            "{}: {}",
            host.name,
            String::from_utf8_lossy(&r.body)
        );
        host.cert_pem = Some(r.json()["certPem"].as_str().unwrap().to_owned());
    }
    for host in &hosts {
        let client = Client::host(&pki, port, host);
        assert_eq!(
            checkin_status(&client, &host.name).await,
            200,
            "{}",
            host.name
        );
    }
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert_eq!(audit.lines().count(), 5, "{audit}");

    // A replayed token: 409.
    let r = anon.post("/v1/enroll", &bodies[0]).await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));

    // A token minted for web-06 used with another host's key (a CSR for web-06 made
    // with web-01's key): 403.
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": late.token(&pki, &[]), "csrPem": hosts[0].csr_for("web-06")}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));

    // An expired token: 401.
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": expired_token(&pki, &late), "csrPem": late.csr()}),
        )
        .await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        String::from_utf8_lossy(&r.body).contains("expired"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    // None of the refused attempts issued a certificate.
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert_eq!(audit.lines().count(), 5, "{audit}");
    assert!(!audit.contains("web-06"), "{audit}");
}

// ---- scenario 11 ----------------------------------------------------------------------------

/// Replaces the trust file in one step (write aside, rename), as a deployment would.
fn install_trust(pki: &Pki, trust: &str) {
    let aside = pki.path("etc/trust.json.new");
    std::fs::write(&aside, trust).unwrap();
    std::fs::rename(&aside, pki.path("etc/trust.json")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_previous_key_grace_then_reject_before_refuses_old_artifacts() {
    let _summary = Summary::begin("11 key rotation");
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let mut hosts = [Host::new("web-01"), Host::new("web-02")];
    let fleet = fleet_json(&hosts.iter().collect::<Vec<_>>(), canary_policy("halt", 0));
    let forge_dir = tmp.path().join("forge");
    // The release in service, signed with the old key ten minutes ago.
    let old_release = tmp.path().join("old-release");
    let old_signed = utc("-10 min");
    release_with_key(
        &pki,
        &old_release,
        &fleet,
        1,
        "ci.pem",
        &["--signed-at", &old_signed],
    );
    publish(&old_release, &forge_dir, &FLEET_FILES);
    publish(&old_release, &pki.path("build-time"), &FLEET_FILES);
    sign_revocations(&pki, &forge_dir, json!([]));
    let forge = Forge::start(&forge_dir);
    let opts = CpOptions {
        rollouts_dir: false,
        ..CpOptions::default()
    };
    let port = free_port();
    let mut cp = Cp::start_on(&pki, &forge, port, &pki.path("var"), &opts);
    cp.wait_ready(&pki);
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&pki, port, h).await.status, 200);
    }
    let clients: Vec<(Client, String)> = hosts
        .iter()
        .map(|h| (Client::host(&pki, port, h), h.name.clone()))
        .collect();
    let agents_check_in = |what: &'static str| {
        let clients = clients.clone();
        async move {
            for (client, name) in &clients {
                assert_eq!(checkin_status(client, name).await, 200, "{what}: {name}");
            }
        }
    };
    let op = Client::operator(&pki, port);
    assert_eq!(channel_signed_at(&op).await, old_signed.as_str());
    agents_check_in("before the rotation").await;

    // CI rotates: the new key is current, the old one previous.
    let old_pub = nixfleet(&pki.dir, &["derive-pubkey", "ci.pem"]);
    let new_pub = nixfleet(&pki.dir, &["keygen", "--out", "ci-new.pem"]);
    let org_pub = nixfleet(&pki.dir, &["derive-pubkey", "org.pem"]);
    nixfleet(
        &pki.dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            new_pub.trim(),
            "--previous-ci-release-key",
            old_pub.trim(),
            "--org-root-key",
            org_pub.trim(),
            "--out",
            "etc/trust.json.rotated",
        ],
    );
    let rotated = pki.read("etc/trust.json.rotated");
    let mark = cp.log_text().len();
    install_trust(&pki, &rotated);
    wait_log_line(&cp, mark, "trust file changed", "new trust roots in use").await;
    // The old release is still accepted during the grace period.
    let verify_old = || {
        Command::new(bin("nixfleet"))
            .args(["verify", "fleet", "--trust-file"])
            .arg(pki.path("etc/trust.json"))
            .arg(old_release.join("fleet.resolved.json"))
            .output()
            .unwrap()
    };
    assert!(
        verify_old().status.success(),
        "old release during the grace"
    );
    agents_check_in("after the rotation").await;

    // The fleet re-signed with the new key is accepted.
    let new_release = tmp.path().join("new-release");
    release_with_key(&pki, &new_release, &fleet, 1, "ci-new.pem", &[]);
    let new_signed = fleet_signed_at(&new_release);
    assert!(new_signed > old_signed);
    publish(&new_release, &forge_dir, &FLEET_FILES);
    wait_for_async("the re-signed fleet to be in use", SHORT, || {
        let op = op.clone();
        let want = new_signed.clone();
        async move { channel_signed_at(&op).await == want.as_str() }
    })
    .await;
    agents_check_in("on the re-signed fleet").await;

    // rejectBefore after the old release's signedAt: old artifacts are refused.
    let mut trust: Value = serde_json::from_str(&rotated).unwrap();
    trust["ciReleaseKey"]["rejectBefore"] = json!(utc("-5 min"));
    let mark = cp.log_text().len();
    install_trust(&pki, &trust.to_string());
    wait_log_line(&cp, mark, "trust file changed", "new trust roots in use").await;
    let out = verify_old();
    assert!(
        !out.status.success(),
        "old release verified after rejectBefore"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rejectBefore"), "{err}");
    // The new release still verifies.
    sh_ok(&format!(
        "{} verify fleet --trust-file {} {}",
        bin("nixfleet").display(),
        pki.path("etc/trust.json").display(),
        new_release.join("fleet.resolved.json").display()
    ));

    // The forge serves the old-key release again: refused, the new one kept.
    let mark = cp.log_text().len();
    publish(&old_release, &forge_dir, &FLEET_FILES);
    let line = wait_log_line(&cp, mark, "channel-refs poll failed:", "rejectBefore").await;
    eprintln!("old release after rejectBefore: {line}");
    assert_eq!(channel_signed_at(&op).await, new_signed.as_str());
    let health = Client::anonymous(&pki, port).get("/healthz").await;
    assert_eq!(health.status, 200);
    agents_check_in("after rejectBefore").await;
}

// ---- fleet CA rotation ----------------------------------------------------------------------

/// Whether `openssl verify` accepts the certificate `pem` against the CA file `ca`.
fn issued_by(pem: &str, ca: &std::path::Path, dir: &std::path::Path) -> bool {
    let file = dir.join("probe-cert.pem");
    std::fs::write(&file, pem).unwrap();
    Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(&file)
        .output()
        .unwrap()
        .status
        .success()
}

/// The steps of docs/keys.md "The fleet CA": a bundle of both CAs while host certificates
/// move over at renewal, then the new CA alone.
#[tokio::test(flavor = "multi_thread")]
async fn fleet_ca_rotation_accepts_both_cas_during_the_overlap_then_only_the_new_one() {
    let _summary = Summary::begin("13 fleet CA rotation");
    let Setup {
        tmp,
        pki,
        forge,
        mut hosts,
        ..
    } = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let mut new_host = hosts.pop().unwrap();
    let mut old_host = hosts.pop().unwrap();
    let state = pki.path("var");
    let port = free_port();
    let restart = |cp: Option<Cp>| {
        if let Some(mut cp) = cp {
            assert_eq!(cp.terminate(), Some(0));
        }
        let mut cp = Cp::start_on(&pki, &forge, port, &state, &CpOptions::default());
        cp.wait_ready(&pki);
        cp
    };
    let cp = restart(None);
    assert_eq!(enroll(&pki, port, &mut old_host).await.status, 200);
    let old_ca = pki.path("etc/fleet-ca-cert.pem");
    let old_ca_copy = tmp.path().join("old-ca.pem");
    std::fs::copy(&old_ca, &old_ca_copy).unwrap();
    let old_cert = old_host.cert_pem.clone().unwrap();

    // 1. A new CA; both are trusted (agents' and the CP's CA file is the bundle); the
    //    server certificate and every new host certificate come from the new CA.
    nixfleet(&pki.dir, &["ca", "init", "--out", "ca-new"]);
    let bundle = format!(
        "{}{}",
        pki.read("etc/ca.pem"),
        pki.read("ca-new/fleet-ca-cert.pem")
    );
    std::fs::write(pki.path("etc/ca.pem"), bundle).unwrap();
    nixfleet(
        &pki.dir,
        &[
            "cert",
            "server",
            "--ca-dir",
            "ca-new",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--out",
            "server-new",
        ],
    );
    for (from, to) in [
        ("server-new/server-cert.pem", "etc/server-cert.pem"),
        ("server-new/server-key.pem", "etc/server-key.pem"),
        ("ca-new/fleet-ca-cert.pem", "etc/fleet-ca-cert.pem"),
        ("ca-new/fleet-ca-key.pem", "etc/fleet-ca-key.pem"),
    ] {
        std::fs::copy(pki.path(from), pki.path(to)).unwrap();
    }
    let cp = restart(Some(cp));
    let new_ca = pki.path("ca-new/fleet-ca-cert.pem");

    // The host still on the old CA's certificate keeps working.
    assert_eq!(
        checkin_status(&Client::host(&pki, port, &old_host), "web-01").await,
        200
    );
    // A host enrolling now gets a certificate from the new CA.
    assert_eq!(enroll(&pki, port, &mut new_host).await.status, 200);
    let issued = new_host.cert_pem.clone().unwrap();
    assert!(issued_by(&issued, &new_ca, tmp.path()));
    assert!(!issued_by(&issued, &old_ca_copy, tmp.path()));
    assert_eq!(
        checkin_status(&Client::host(&pki, port, &new_host), "web-02").await,
        200
    );
    // The old host moves over at its renewal.
    let renewed = renew(&pki, port, &mut old_host).await;
    assert_eq!(
        renewed.status,
        200,
        "{}",
        String::from_utf8_lossy(&renewed.body)
    );
    assert!(issued_by(
        old_host.cert_pem.as_deref().unwrap(),
        &new_ca,
        tmp.path()
    ));
    assert_eq!(
        checkin_status(&Client::host(&pki, port, &old_host), "web-01").await,
        200
    );

    // 2. Every certificate renewed: the old CA leaves the bundle.
    std::fs::copy(&new_ca, pki.path("etc/ca.pem")).unwrap();
    let _cp = restart(Some(cp));
    for host in [&old_host, &new_host] {
        assert_eq!(
            checkin_status(&Client::host(&pki, port, host), &host.name).await,
            200
        );
    }
    // A certificate from the old CA is refused now (at the handshake, or with 401).
    let stale = Host {
        name: "web-01".into(),
        key: old_host.key.clone(),
        cert_pem: Some(old_cert),
    };
    let refused = Client::host(&pki, port, &stale)
        .try_post(
            "/v1/agent/checkin",
            &checkin_body("web-01", &closure("web-01", 0), None, json!([])),
        )
        .await;
    assert!(
        refused.as_ref().map_or(true, |r| r.status == 401),
        "a certificate of the retired CA was accepted: {:?}",
        refused.map(|r| r.status)
    );
}
