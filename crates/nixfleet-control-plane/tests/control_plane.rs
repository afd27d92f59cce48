//! The real control-plane binary on loopback, driven over mTLS by test agents and
//! operators, with certificates and releases made by the `nixfleet` CLI.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nixfleet_harness::*;
use serde_json::{json, Value};
use support::{now_rfc3339, start_enrolled};

fn in_an_hour() -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    t.replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn rollout_state(op: &Client, rollout: &str) -> Value {
    let list = op.get("/v1/rollouts").await.json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["rollout_id"] == rollout)
        .map(|r| r["state"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn runbook_wipe_restart_recovers_everything_and_keeps_revoked_host_out() {
    let s = Setup::new(
        &["web-01", "web-02", "web-03"],
        canary_policy("halt", 0),
        json!([{"hostname": "web-03", "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]),
    );
    let state = s.pki.path("var");
    let port = free_port();
    let started = std::time::Instant::now();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "last_tick_at set within 5 s of start"
    );
    let mut hosts = s.hosts;
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, port, h).await.status, 200);
    }
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let web02 = Client::host(&s.pki, port, &hosts[1]);
    let web03 = Client::host(&s.pki, port, &hosts[2]);
    let op = Client::operator(&s.pki, port);
    let rollout = rollout_id(&s.forge_dir, "stable");

    // The revoked host is refused; the others roll out wave by wave.
    let r = web03
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-03", &closure("web-03", 0), None, json!([])),
        )
        .await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    let r = web02
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
        )
        .await;
    assert!(r.json()["target"].is_null(), "wave 1 must wait for wave 0");
    let t1 = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    assert_eq!(t1["closureHash"], closure("web-01", 1));
    assert_eq!(t1["rolloutId"], rollout.as_str());
    assert_eq!(t1["waveIndex"], 0);
    assert_eq!(activate(&web01, "web-01", &t1).await, 204);
    let t2 = until_target(&web02, "web-02", &closure("web-02", 0)).await;
    assert_eq!(t2["waveIndex"], 1);
    assert_eq!(activate(&web02, "web-02", &t2).await, 204);
    let confirmed_at = now_rfc3339();
    wait_for_async("rollout converged", Duration::from_secs(20), || {
        let op = op.clone();
        let rollout = rollout.clone();
        async move { rollout_state(&op, &rollout).await == json!("converged") }
    })
    .await;
    let audit_before = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert_eq!(
        audit_before.lines().count(),
        3,
        "one issuance line per enrollment"
    );

    // Runbook step 1-3: stop, wipe, start.
    assert_eq!(
        cp.terminate(),
        Some(0),
        "SIGTERM exits 0:\n{}",
        cp.log_text()
    );
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let restarted = std::time::Instant::now();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());

    // The revoked host is refused on its very first request after the restart.
    let web03 = Client::host(&s.pki, port, &hosts[2]);
    wait_for_async("CP answers", Duration::from_secs(20), || {
        let web03 = web03.clone();
        async move {
            match web03
                .try_post(
                    "/v1/agent/checkin",
                    &checkin_body("web-03", &closure("web-03", 0), None, json!([])),
                )
                .await
            {
                Err(_) => false, // not listening yet
                Ok(r) => {
                    assert_ne!(r.status, 200, "a revoked host must never be served");
                    r.status == 401
                }
            }
        }
    })
    .await;
    cp.wait_ready(&s.pki);

    // Hosts on their target: no target, no rollback, immediately visible.
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let web02 = Client::host(&s.pki, port, &hosts[1]);
    for (client, name) in [(&web01, "web-01"), (&web02, "web-02")] {
        for _ in 0..3 {
            let r = client
                .post(
                    "/v1/agent/checkin",
                    &checkin_body(name, &closure(name, 1), Some(&confirmed_at), json!([])),
                )
                .await
                .json();
            assert!(
                r["target"].is_null(),
                "{name} re-dispatched after the wipe: {r}"
            );
            assert!(
                r["rollback"].is_null(),
                "{name} told to roll back after the wipe: {r}"
            );
        }
    }
    let visible = restarted.elapsed();
    eprintln!("restart to full visibility: {visible:?}");

    // The runbook's Verify commands, literally (curl + jq; the log file stands in for journalctl).
    let ca = s.pki.path("etc/ca.pem");
    let healthz = sh(&format!(
        "curl -sk https://localhost:{port}/healthz | jq '.last_tick_at != null'"
    ));
    assert_eq!(healthz.trim(), "true");
    let signed_at = sh(&format!(
        "curl -sk --cacert {} --cert {} --key {} https://localhost:{port}/v1/channels/stable | jq -r '.signed_at'",
        ca.display(),
        s.pki.path("operator/operator-cert.pem").display(),
        s.pki.path("operator/operator-key.pem").display()
    ));
    let fleet: Value =
        serde_json::from_slice(&std::fs::read(s.forge_dir.join("fleet.resolved.json")).unwrap())
            .unwrap();
    assert_eq!(
        signed_at.trim(),
        fleet["meta"]["signedAt"].as_str().unwrap()
    );
    let log = cp.log.display().to_string();
    let revocations = sh(&format!(
        "cat {log} | grep -E 'revocations poll|cert_revocations'"
    ));
    assert!(
        revocations.contains("cert_revocations now has 1 rows"),
        "{revocations}"
    );
    let seen = sh(&format!(
        "cat {log} | grep 'checkin received' | awk '{{print $NF}}' | sort -u"
    ));
    assert_eq!(
        seen.split_whitespace().collect::<Vec<_>>(),
        ["web-01", "web-02"]
    );

    // The rollout is converged again, rebuilt from attestations alone.
    let op = Client::operator(&s.pki, port);
    wait_for_async(
        "rollout converged after the wipe",
        Duration::from_secs(20),
        || {
            let op = op.clone();
            let rollout = rollout.clone();
            async move { rollout_state(&op, &rollout).await == json!("converged") }
        },
    )
    .await;
    let channel = op.get("/v1/channels/stable").await.json();
    assert_eq!(channel["hosts_converged"], 2);
    // audit.log survives the wipe untouched.
    let audit_after = std::fs::read_to_string(state.join("audit.log")).unwrap();
    assert_eq!(audit_after, audit_before);
    let _ = &s.fleet;
}

#[tokio::test(flavor = "multi_thread")]
async fn confirm_deadline_expiry_fails_the_host_and_halts_and_the_halt_survives_a_wipe() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let opts = CpOptions {
        extra: vec![
            "--confirm-window-secs".into(),
            "2".into(),
            "--activation-timeout-secs".into(),
            "1".into(),
        ],
        ..CpOptions::default()
    };
    let (mut cp, port, hosts) = start_enrolled(&mut s, &state, &opts, usize::MAX).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let web02 = Client::host(&s.pki, port, &hosts[1]);
    let op = Client::operator(&s.pki, port);
    let rollout = rollout_id(&s.forge_dir, "stable");
    web02
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
        )
        .await;
    let t1 = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    // web-01 never confirms: the deadline passes, it fails, the rollout halts.
    wait_for_async("halt", Duration::from_secs(20), || {
        let op = op.clone();
        let rollout = rollout.clone();
        async move { rollout_state(&op, &rollout).await["halted"].is_object() }
    })
    .await;
    let host = op.get("/v1/hosts/web-01").await.json();
    assert!(
        host["rollout_state"]
            .as_str()
            .unwrap_or("")
            .contains("failed"),
        "{host}"
    );
    let r = web02
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
        )
        .await
        .json();
    assert!(
        r["target"].is_null(),
        "a halted rollout dispatches nothing: {r}"
    );
    // A late confirm for the failed dispatch is refused with 410.
    assert_eq!(activate(&web01, "web-01", &t1).await, 410);

    // Wipe: the agent's failedTargets restore the failure, and the halt with it.
    assert_eq!(cp.terminate(), Some(0));
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &opts);
    cp.wait_ready(&s.pki);
    let failed = json!([{"rolloutId": rollout, "closureHash": closure("web-01", 1), "reason": "confirm window expired", "at": now_rfc3339()}]);
    for _ in 0..5 {
        let r = web01
            .post(
                "/v1/agent/checkin",
                &checkin_body("web-01", &closure("web-01", 0), None, failed.clone()),
            )
            .await
            .json();
        assert!(
            r["target"].is_null(),
            "a failed target is never re-sent: {r}"
        );
        let r = web02
            .post(
                "/v1/agent/checkin",
                &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
            )
            .await
            .json();
        assert!(r["target"].is_null(), "the halt must survive the wipe: {r}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let op = Client::operator(&s.pki, port);
    wait_for_async("halt rebuilt", Duration::from_secs(20), || {
        let op = op.clone();
        let rollout = rollout.clone();
        async move { rollout_state(&op, &rollout).await["halted"].is_object() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_mid_confirm_during_a_wipe_gets_an_orphan_confirm() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (mut cp, port, hosts) =
        start_enrolled(&mut s, &state, &CpOptions::default(), usize::MAX).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let t1 = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    assert_eq!(cp.terminate(), Some(0));
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    // The agent switched while the CP was down and now confirms: accepted, not 410.
    assert_eq!(activate(&web01, "web-01", &t1).await, 204);
    assert!(cp.log_text().contains("orphan-confirm"));
    let r = web01
        .post(
            "/v1/agent/checkin",
            &checkin_body(
                "web-01",
                &closure("web-01", 1),
                Some(&now_rfc3339()),
                json!([]),
            ),
        )
        .await
        .json();
    assert!(r["target"].is_null() && r["rollback"].is_null(), "{r}");
    // A confirm for a closure the signed manifest does not give this host is refused.
    let bogus =
        json!({"closureHash": closure("web-01", 9), "rolloutId": t1["rolloutId"], "waveIndex": 0});
    assert_eq!(activate(&web01, "web-01", &bogus).await, 410);
}

fn expired_token(pki: &Pki, host: &Host) -> Value {
    use nixfleet_trust::keys::PrivateKey;
    let org = PrivateKey::from_pem(&pki.read("org.pem")).unwrap();
    let issued = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        - time::Duration::hours(3);
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let claims = json!({
        "hostname": host.name,
        "expectedPubkeyFingerprint": nixfleet_trust::keys::ssh_fingerprint(&host.pubkey_line()).unwrap(),
        "issuedAt": fmt(issued), "expiresAt": fmt(issued + time::Duration::hours(1)),
        "nonce": "00000000000000000000000000000001",
    });
    let sig = org.sign(&nixfleet_trust::jcs::to_canonical(&claims).unwrap());
    json!({"version": 1, "claims": claims, "signature": b64(&sig)})
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_rules() {
    let s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let anon = Client::anonymous(&s.pki, port);
    let mut hosts = s.hosts;

    // Happy path, then a replay of the same token: 409.
    let token = hosts[0].token(&s.pki, &[]);
    let body = json!({"token": token, "csrPem": hosts[0].csr()});
    let r = anon.post("/v1/enroll", &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["certPem"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(v["caPem"].as_str().unwrap(), s.pki.read("etc/ca.pem"));
    hosts[0].cert_pem = Some(v["certPem"].as_str().unwrap().to_owned());
    assert_eq!(anon.post("/v1/enroll", &body).await.status, 409);

    // Two concurrent enrollments with one token: exactly one certificate.
    let token = hosts[1].token(&s.pki, &[]);
    let body = json!({"token": token, "csrPem": hosts[1].csr()});
    let (a, b) = tokio::join!(
        anon.post("/v1/enroll", &body),
        anon.post("/v1/enroll", &body)
    );
    let mut statuses = [a.status, b.status];
    statuses.sort();
    assert_eq!(statuses, [200, 409]);

    // Expired token: 401.
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": expired_token(&s.pki, &hosts[1]), "csrPem": hosts[1].csr()}),
        )
        .await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    // A CSR made with another key than the token names: 403.
    let other = Host::new("web-02");
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": hosts[1].token(&s.pki, &[]), "csrPem": other.csr()}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // A CSR for another host name than the token's: 403.
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": hosts[1].token(&s.pki, &[]), "csrPem": hosts[1].csr_for("web-01")}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // A tampered token: 401.
    let mut token = hosts[1].token(&s.pki, &[]);
    token["claims"]["hostname"] = json!("web-99");
    assert_eq!(
        anon.post(
            "/v1/enroll",
            &json!({"token": token, "csrPem": hosts[1].csr()})
        )
        .await
        .status,
        401
    );

    // Renewal: the caller's CN only.
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let r = web01
        .post("/v1/agent/renew", &json!({"csrPem": hosts[0].csr()}))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = web01
        .post(
            "/v1/agent/renew",
            &json!({"csrPem": hosts[0].csr_for("web-02")}),
        )
        .await;
    assert_eq!(r.status, 403);
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{audit}");
    assert_eq!(lines[2]["how"], "renew");
    for l in &lines {
        assert!(l["serial"].is_string() && l["notAfter"].is_string() && l["cn"].is_string());
    }

    // org root rejectBefore: tokens issued before the cut-off are refused after a reload.
    let mut trust: Value = serde_json::from_str(&s.pki.read("etc/trust.json")).unwrap();
    trust["orgRootKey"]["rejectBefore"] = json!(in_an_hour());
    let token = hosts[1].token(&s.pki, &[]);
    std::fs::write(s.pki.path("etc/trust.json"), trust.to_string()).unwrap();
    wait_for("trust file reloaded", Duration::from_secs(20), || {
        cp.log_text().contains("trust file changed")
    });
    let r = anon
        .post(
            "/v1/enroll",
            &json!({"token": token, "csrPem": hosts[1].csr()}),
        )
        .await;
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("rejectBefore"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_ca_key_enrollment_is_503_and_checkins_keep_working() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (mut cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    assert_eq!(cp.terminate(), Some(0));
    let opts = CpOptions {
        with_ca_key: false,
        ..CpOptions::default()
    };
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &opts);
    cp.wait_ready(&s.pki);
    let mut fresh = Host::new("web-01");
    assert_eq!(enroll(&s.pki, port, &mut fresh).await.status, 503);
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let r = web01
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-01", &closure("web-01", 0), None, json!([])),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        web01
            .post("/v1/agent/renew", &json!({"csrPem": hosts[0].csr()}))
            .await
            .status,
        503
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_authorised_and_bounded() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let body = checkin_body("web-01", &closure("web-01", 0), None, json!([]));
    // Certificate for web-01, body for web-02: 403.
    let r = web01
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-02", "x", None, json!([])),
        )
        .await;
    assert_eq!(r.status, 403);
    // Another protocol major version: 426; none at all is served.
    let r = web01
        .request(
            hyper::Method::POST,
            "/v1/agent/checkin",
            Some(body.to_string().into_bytes()),
            &[("x-nixfleet-protocol", "2")],
        )
        .await;
    assert_eq!(r.status, 426);
    assert!(String::from_utf8_lossy(&r.body).contains("speaks nixfleet protocol 1"));
    let r = web01
        .request(
            hyper::Method::POST,
            "/v1/agent/checkin",
            Some(body.to_string().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    // Oversize body: 413. Malformed JSON: 400 with a reason.
    // Small enough to be fully sent before the 413 comes back.
    let big = vec![b' '; 300 << 10];
    let r = web01
        .request(hyper::Method::POST, "/v1/agent/checkin", Some(big), &[])
        .await;
    assert_eq!(r.status, 413);
    let r = web01
        .request(
            hyper::Method::POST,
            "/v1/agent/checkin",
            Some(b"{\"hostname\":".to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    // A host certificate on an operator route: 403; no certificate: 401.
    assert_eq!(web01.get("/v1/channels/stable").await.status, 403);
    assert_eq!(web01.get("/v1/hosts").await.status, 403);
    let anon = Client::anonymous(&s.pki, port);
    assert_eq!(anon.get("/v1/channels/stable").await.status, 401);
    assert_eq!(anon.post("/v1/agent/checkin", &body).await.status, 401);
    // The operator sees channels, hosts, rollouts, metrics.
    let op = Client::operator(&s.pki, port);
    assert_eq!(op.get("/v1/channels/stable").await.status, 200);
    assert_eq!(op.get("/v1/channels/nope").await.status, 404);
    let hosts_view = op.get("/v1/hosts").await.json();
    assert_eq!(hosts_view.as_array().unwrap().len(), 2);
    let metrics = String::from_utf8(op.get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("nixfleet_checkins_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("nixfleet_request_duration_seconds_bucket"));
    // Manifests are served to agents byte for byte, with their raw signature.
    let rollout = rollout_id(&s.forge_dir, "stable");
    let m = web01.get(&format!("/v1/rollouts/{rollout}")).await;
    assert_eq!(
        m.body,
        std::fs::read(s.forge_dir.join(format!("rollouts/{rollout}.json"))).unwrap()
    );
    let sig = web01.get(&format!("/v1/rollouts/{rollout}/sig")).await;
    assert_eq!(sig.body.len(), 64);
    assert_eq!(
        web01
            .get(&format!("/v1/rollouts/{}", "0".repeat(64)))
            .await
            .status,
        404
    );
}

#[test]
fn priming_url_then_build_time_fallback_then_refusal() {
    let s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    // From the URL.
    let mut cp = Cp::start(&s.pki, &s.forge, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    assert!(
        cp.log_text()
            .contains("primed verified fleet from channel-refs"),
        "{}",
        cp.log_text()
    );
    drop(cp);
    // Forge down: from the build-time artifact, and the failure names the URL and status.
    s.forge.set_down(true);
    let opts = CpOptions {
        with_revocations: false,
        ..CpOptions::default()
    };
    let mut cp = Cp::start(&s.pki, &s.forge, &state, &opts);
    cp.wait_ready(&s.pki);
    let log = cp.log_text();
    assert!(
        log.contains("primed verified fleet from build-time artifact"),
        "{log}"
    );
    assert!(
        log.contains("channel-refs")
            && log.contains("HTTP status 503")
            && log.contains(&s.forge.url("fleet.resolved.json")),
        "{log}"
    );
    drop(cp);
    // Both unusable: refuse to start, printing both errors.
    std::fs::write(s.pki.path("build-time/fleet.resolved.json.sig"), [0u8; 64]).unwrap();
    let (code, stderr) = Cp::run_to_exit(&s.pki, &s.forge, &state, &opts);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("channel-refs") && stderr.contains("build-time artifact"),
        "{stderr}"
    );
    assert!(stderr.contains("does not verify"), "{stderr}");
    s.forge.set_down(false);
    // A trust file others can write: refuse, naming it.
    use std::os::unix::fs::PermissionsExt;
    let trust = s.pki.path("etc/trust.json");
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, stderr) = Cp::run_to_exit(&s.pki, &s.forge, &state, &CpOptions::default());
    assert_ne!(code, 0);
    assert!(
        stderr.contains(trust.to_str().unwrap()) && stderr.contains("writable"),
        "{stderr}"
    );
    std::fs::set_permissions(&trust, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A database from a newer nixfleet: refuse, never rewrite.
    let db = state.join("state.db");
    let _ = std::fs::remove_file(&db);
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let (code, stderr) = Cp::run_to_exit(&s.pki, &s.forge, &state, &CpOptions::default());
    assert_ne!(code, 0);
    assert!(stderr.contains("newer than this binary"), "{stderr}");
    assert_eq!(
        rusqlite::Connection::open(&db)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .unwrap(),
        99,
        "never rewritten"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (mut cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    let body = checkin_body("web-01", &closure("web-01", 0), None, json!([]));
    // A request half-sent when SIGTERM arrives still gets its answer.
    let status = request_in_flight(&s.pki, port, &hosts[0], "/v1/agent/checkin", &body, async {
        cp.send_sigterm();
        // Let the signal land and the listener close before finishing the request.
        wait_for_async("listener closed", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        })
        .await;
    })
    .await;
    assert_eq!(status, 200);
    let code = tokio::task::spawn_blocking(move || cp.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let _ = Path::new("");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_and_halt_signals_every_host_that_activated() {
    let mut s = Setup::new(
        &["web-01", "web-02"],
        canary_policy("rollback-and-halt", 0),
        json!([]),
    );
    let state = s.pki.path("var");
    let opts = CpOptions {
        extra: vec![
            "--confirm-window-secs".into(),
            "2".into(),
            "--activation-timeout-secs".into(),
            "1".into(),
        ],
        ..CpOptions::default()
    };
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &opts, usize::MAX).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let web02 = Client::host(&s.pki, port, &hosts[1]);
    let rollout = rollout_id(&s.forge_dir, "stable");
    web02
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
        )
        .await;
    let t1 = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    assert_eq!(activate(&web01, "web-01", &t1).await, 204);
    // web-02 gets wave 1 and never confirms: the health gate trips.
    let _t2 = until_target(&web02, "web-02", &closure("web-02", 0)).await;
    let signal = {
        let start = std::time::Instant::now();
        loop {
            let r = web01
                .post(
                    "/v1/agent/checkin",
                    &checkin_body(
                        "web-01",
                        &closure("web-01", 1),
                        Some(&now_rfc3339()),
                        json!([]),
                    ),
                )
                .await
                .json();
            if !r["rollback"].is_null() {
                break r["rollback"].clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no rollback signal for web-01"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(signal["rolloutId"], rollout.as_str());
    // Once web-01 is back on its previous closure, the rollout is reverted.
    let op = Client::operator(&s.pki, port);
    wait_for_async("reverted", Duration::from_secs(30), || {
        let (web01, web02, op, rollout) =
            (web01.clone(), web02.clone(), op.clone(), rollout.clone());
        async move {
            web01
                .post(
                    "/v1/agent/checkin",
                    &checkin_body("web-01", &closure("web-01", 0), None, json!([])),
                )
                .await;
            web02
                .post(
                    "/v1/agent/checkin",
                    &checkin_body("web-02", &closure("web-02", 0), None, json!([])),
                )
                .await;
            rollout_state(&op, &rollout).await["reverted"].is_object()
        }
    })
    .await;
    let trace = op
        .get(&format!("/v1/rollouts/{rollout}/trace"))
        .await
        .json();
    let kinds: Vec<&str> = trace
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    for kind in ["open", "dispatch", "fail", "halt"] {
        assert!(
            kinds.iter().any(|k| k.contains(kind)),
            "{kind} missing from the trail {kinds:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_signed_reports_are_stored_once_and_forgeries_refused() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let report = json!({"hostname": "web-01", "reportId": "r-1", "kind": "rolled-back", "rolloutId": null,
                        "closureHash": null, "bootId": "b", "reason": "confirm window expired", "at": now_rfc3339()});
    let sig = hosts[0]
        .key
        .sign(&nixfleet_trust::jcs::to_canonical(&report).unwrap());
    let body = json!({"report": report, "signature": b64(&sig)});
    let first = web01.post("/v1/agent/report", &body).await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    let again = web01.post("/v1/agent/report", &body).await;
    assert_eq!(
        again.json()["eventId"],
        first.json()["eventId"],
        "a re-sent report is stored once"
    );
    let mut forged = body.clone();
    forged["report"]["reason"] = json!("all good");
    assert_eq!(web01.post("/v1/agent/report", &forged).await.status, 401);

    // An auditor checks the same report offline, against the key the signed fleet pins.
    let verify = |report: &Value| {
        let file = s.pki.path("report.json");
        std::fs::write(&file, report.to_string()).unwrap();
        let out = Command::new(bin("nixfleet"))
            .args(["verify", "report"])
            .arg(&file)
            .arg("--fleet")
            .arg(s.forge.root.join("fleet.resolved.json"))
            .arg("--trust-file")
            .arg(s.pki.path("etc/trust.json"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = verify(&body);
    assert!(ok, "{text}");
    assert!(
        text.starts_with("ok: rolled-back report r-1 from web-01 at "),
        "{text}"
    );
    let (ok, text) = verify(&forged);
    assert!(!ok && text.contains("signature"), "{text}");
    let mut elsewhere = body.clone();
    elsewhere["report"]["hostname"] = json!("db-01");
    let (ok, text) = verify(&elsewhere);
    assert!(
        !ok && text.contains("\"db-01\" is not in the given fleet"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_by_url_template_and_metrics_on_loopback() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let metrics_port = free_port();
    let opts = CpOptions {
        rollouts_dir: false,
        extra: vec![
            "--rollouts-url-template".into(),
            s.forge.url("rollouts/channel/{channel}.json"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        ..CpOptions::default()
    };
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &opts, 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let target = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    assert_eq!(
        target["rolloutId"],
        rollout_id(&s.forge_dir, "stable").as_str()
    );
    let metrics = sh(&format!("curl -s http://127.0.0.1:{metrics_port}/metrics"));
    assert!(
        metrics.contains("nixfleet_targets_sent_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nixfleet_fleet_signed_at_timestamp_seconds"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed_after_ten_seconds() {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (_cp, port, _hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 0).await;
    let config = nixfleet_pki::client_tls_config(&s.pki.read("etc/ca.pem"), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Read the whole answer, then nothing more is sent: the connection sits idle.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&buf).contains("\r\n\r\n{") || !buf.ends_with(b"}") {
        let n = tls.read(&mut chunk).await.unwrap();
        assert_ne!(n, 0, "closed before answering");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let idle = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut chunk))
        .await
        .expect("an idle connection was kept for 30 s");
    // An orderly TLS close reads as end of stream; a reset is a close too.
    if let Ok(n) = read {
        assert_eq!(n, 0, "unexpected bytes: {:?}", &chunk[..n]);
    }
    let after = idle.elapsed();
    // Agents drop idle connections after 5 s, so the server must not close them sooner.
    assert!(
        after >= Duration::from_secs(9),
        "closed after {after:?}, before the 10 s idle limit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_supplied_text_cannot_forge_log_lines() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let forged =
        "x\n2026-12-04T00:00:00Z  INFO nixfleet_control_plane::api: checkin received forged-host";
    // Identifiers are checked where they arrive.
    let confirm = json!({"hostname": "web-01", "rolloutId": forged, "waveIndex": 0,
                         "generation": {"closureHash": closure("web-01", 1), "bootId": "b"}});
    assert_eq!(web01.post("/v1/agent/confirm", &confirm).await.status, 400);
    let sign = |report: &Value| {
        let sig = hosts[0]
            .key
            .sign(&nixfleet_trust::jcs::to_canonical(report).unwrap());
        json!({"report": report, "signature": b64(&sig)})
    };
    let mut report = json!({"hostname": "web-01", "reportId": "r-1", "kind": "rolled-back",
                            "rolloutId": "../../etc", "closureHash": null, "bootId": "b",
                            "reason": "x", "at": now_rfc3339()});
    assert_eq!(
        web01.post("/v1/agent/report", &sign(&report)).await.status,
        400
    );
    // Free text is escaped: the forged line stays inside the real one.
    report["rolloutId"] = Value::Null;
    report["reason"] = json!(forged);
    assert_eq!(
        web01.post("/v1/agent/report", &sign(&report)).await.status,
        200
    );
    let checkin = checkin_body(
        "web-01",
        &closure("web-01", 0),
        None,
        json!([{"rolloutId": forged, "closureHash": closure("web-01", 1), "reason": forged,
                "at": now_rfc3339()}]),
    );
    assert_eq!(web01.post("/v1/agent/checkin", &checkin).await.status, 200);
    let log = cp.log_text();
    assert!(log.contains("report received: x\\n2026"), "{log}");
    // The runbook's count of hosts that checked in is not fooled.
    let hosts_seen: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("checkin received"))
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert!(!hosts_seen.contains(&"forged-host"), "{log}");
    assert!(hosts_seen.contains(&"web-01"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_token_is_refused_after_the_runbooks_wipe() {
    let s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let anon = Client::anonymous(&s.pki, port);
    let host = &s.hosts[0];
    let body = json!({"token": host.token(&s.pki, &[]), "csrPem": host.csr()});
    assert_eq!(anon.post("/v1/enroll", &body).await.status, 200);
    assert_eq!(anon.post("/v1/enroll", &body).await.status, 409);

    // The runbook: stop, delete the database, start. The audit log stays.
    assert_eq!(cp.terminate(), Some(0));
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    assert!(
        cp.log_text()
            .contains("used bootstrap tokens restored from the audit log"),
        "{}",
        cp.log_text()
    );
    // A thief holding the used token (and the key it names) does not get back in.
    assert_eq!(anon.post("/v1/enroll", &body).await.status, 409);
    // A new token for the same host still enrolls it.
    let fresh = json!({"token": host.token(&s.pki, &[]), "csrPem": host.csr()});
    assert_eq!(anon.post("/v1/enroll", &fresh).await.status, 200);
    assert_eq!(cp.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_revocation_list_is_refused_after_the_runbooks_wipe() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let forge = s.forge_dir.clone();
    let rfc = |t: time::OffsetDateTime| {
        t.replace_nanosecond(0)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let now = time::OffsetDateTime::now_utc();
    // The list in service revokes nobody; an attacker keeps a copy of it.
    let earlier = rfc(now - time::Duration::minutes(1));
    sign_revocations_with(&s.pki, &forge, json!([]), &["--signed-at", &earlier]);
    let replay = s.pki.path("replay");
    std::fs::create_dir_all(&replay).unwrap();
    for f in ["revocations.json", "revocations.json.sig"] {
        std::fs::copy(forge.join(f), replay.join(f)).unwrap();
    }
    let state = s.pki.path("var");
    let (mut cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 2).await;
    let web02 = Client::host(&s.pki, port, &hosts[1]);
    let checkin = checkin_body("web-02", &closure("web-02", 0), None, json!([]));
    assert_eq!(web02.post("/v1/agent/checkin", &checkin).await.status, 200);

    // web-02's key is stolen: CI signs a list revoking it, and the control plane applies it.
    let revoked = json!([{"hostname": "web-02", "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]);
    sign_revocations_with(&s.pki, &forge, revoked, &["--signed-at", &rfc(now)]);
    wait_for_async("web-02 to be refused", Duration::from_secs(20), || {
        let (web02, checkin) = (web02.clone(), checkin.clone());
        async move { web02.post("/v1/agent/checkin", &checkin).await.status == 401 }
    })
    .await;

    // The runbook's wipe, while whoever serves the list replays the old one.
    assert_eq!(cp.terminate(), Some(0));
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    for f in ["revocations.json", "revocations.json.sig"] {
        std::fs::copy(replay.join(f), forge.join(f)).unwrap();
    }
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    wait_for(
        "the old list to be refused",
        Duration::from_secs(20),
        || {
            cp.log_text()
                .contains("is older than the list already applied")
        },
    );
    // No list it can trust: agent routes answer 503, and web-02 is never served.
    let status = web02.post("/v1/agent/checkin", &checkin).await.status;
    assert_eq!(status, 503, "{}", cp.log_text());
    assert_eq!(cp.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_does_not_outrun_a_revocation() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let forge = s.forge_dir.clone();
    let state = s.pki.path("var");
    let (_cp, port, mut hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    // The revocation's cut-off: after the enrollment, before the thief's renewal.
    let cutoff = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        + time::Duration::seconds(1);
    wait_for("the cut-off to pass", Duration::from_secs(5), || {
        time::OffsetDateTime::now_utc() > cutoff
    });
    // A thief holding the key and certificate renews between the signing of the list
    // and its application.
    let renewed = renew(&s.pki, port, &mut hosts[0]).await;
    assert_eq!(
        renewed.status,
        200,
        "{}",
        String::from_utf8_lossy(&renewed.body)
    );
    let thief = Client::host(&s.pki, port, &hosts[0]);
    let checkin = checkin_body("web-01", &closure("web-01", 0), None, json!([]));
    assert_eq!(thief.post("/v1/agent/checkin", &checkin).await.status, 200);

    let cut = cutoff
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    sign_revocations(
        &s.pki,
        &forge,
        json!([{"hostname": "web-01", "notBefore": cut, "reason": "key stolen", "revokedBy": "ops"}]),
    );
    // The renewed certificate carries the enrollment time, so the cut-off covers it.
    wait_for_async(
        "the renewed certificate to be refused",
        Duration::from_secs(20),
        || {
            let (thief, checkin) = (thief.clone(), checkin.clone());
            async move { thief.post("/v1/agent/checkin", &checkin).await.status == 401 }
        },
    )
    .await;
    let again = renew(&s.pki, port, &mut hosts[0]).await;
    assert_eq!(again.status, 401, "a revoked host cannot renew");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_flood_is_capped_and_counted() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let opts = CpOptions {
        extra: vec!["--reports-per-minute".into(), "20".into()],
        ..CpOptions::default()
    };
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &opts, 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let report = |id: usize, reason: String| {
        let report = json!({"hostname": "web-01", "reportId": format!("r-{id}"), "kind": "rolled-back",
                            "rolloutId": null, "closureHash": null, "bootId": "b",
                            "reason": reason, "at": now_rfc3339()});
        let sig = hosts[0]
            .key
            .sign(&nixfleet_trust::jcs::to_canonical(&report).unwrap());
        json!({"report": report, "signature": b64(&sig)})
    };
    // A report far larger than any agent writes is refused for good (422).
    let big = web01
        .post("/v1/agent/report", &report(0, "x".repeat(60_000)))
        .await;
    assert_eq!(big.status, 422, "{}", String::from_utf8_lossy(&big.body));
    let long = web01
        .post("/v1/agent/report", &report(1, "x".repeat(5_000)))
        .await;
    assert_eq!(long.status, 422);
    // A flood: the first 20 in the minute are stored, the rest get 429.
    let mut statuses = Vec::new();
    for i in 0..40 {
        statuses.push(
            web01
                .post("/v1/agent/report", &report(10 + i, "x".into()))
                .await
                .status,
        );
    }
    // The over-long reason was only found after the rate check, so it used a slot.
    let stored = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(stored, 19, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let metrics = Client::operator(&s.pki, port).get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("nixfleet_reports_dropped_total{reason=\"size\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("nixfleet_reports_dropped_total{reason=\"rate\"} 21"),
        "{text}"
    );
    assert!(text.contains("nixfleet_reports_total 19"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_host_shows_as_revoked_and_each_refusal_is_logged_once_a_minute_and_counted() {
    let s = Setup::new(
        &["web-01", "web-03"],
        canary_policy("halt", 0),
        json!([{"hostname": "web-03", "notBefore": in_an_hour(), "reason": "laptop stolen", "revokedBy": "ops"}]),
    );
    let state = s.pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let mut hosts = s.hosts;
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, port, h).await.status, 200);
    }
    let web03 = Client::host(&s.pki, port, &hosts[1]);
    for _ in 0..3 {
        let r = web03
            .post(
                "/v1/agent/checkin",
                // It claims to run its declared closure: it still must not look converged.
                &checkin_body("web-03", &closure("web-03", 0), None, json!([])),
            )
            .await;
        assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    }
    let op = Client::operator(&s.pki, port);
    let hosts_json = op.get("/v1/hosts").await.json();
    let row = hosts_json
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "web-03")
        .unwrap()
        .clone();
    assert_eq!(row["converged"], false, "{row}");
    assert_eq!(row["revoked"]["reason"], "laptop stolen", "{row}");
    assert_eq!(row["revoked"]["revoked_by"], "ops", "{row}");
    assert!(
        row["waiting"]
            .as_str()
            .unwrap()
            .starts_with("revoked: laptop stolen; certificates enrolled before "),
        "{row}"
    );
    let web01 = hosts_json
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "web-01")
        .unwrap();
    assert_eq!(web01["revoked"], Value::Null, "{web01}");
    let metrics = String::from_utf8(op.get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("nixfleet_revoked_certificate_refusals_total 3"),
        "{metrics}"
    );
    let log = cp.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused the revoked certificate of web-03"))
        .collect();
    assert_eq!(refusals.len(), 1, "one line per host per minute:\n{log}");
    assert!(
        refusals[0].contains("laptop stolen") && refusals[0].contains("by ops"),
        "{}",
        refusals[0]
    );
    // The operator CLI says the same.
    let text = nixfleet_status_text(&s.pki, port);
    let line = text.lines().find(|l| l.starts_with("web-03")).unwrap();
    assert!(line.contains("revoked"), "{text}");
    assert!(text.contains(", 1 revoked"), "{text}");
}

fn nixfleet_status_text(pki: &Pki, port: u16) -> String {
    let out = Command::new(bin("nixfleet"))
        .arg("status")
        .env("NO_COLOR", "1")
        .env("NIXFLEET_URL", format!("https://localhost:{port}"))
        .env("NIXFLEET_CA_CERT", pki.path("etc/ca.pem"))
        .env("NIXFLEET_CERT", pki.path("operator/operator-cert.pem"))
        .env("NIXFLEET_KEY", pki.path("operator/operator-key.pem"))
        .env("XDG_CONFIG_HOME", pki.path("no-config"))
        .env_remove("NIXFLEET_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_never_seen_and_one_seen_before_a_restart_are_told_apart() {
    let s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let op = Client::operator(&s.pki, port);
    let mut hosts = s.hosts;
    assert_eq!(enroll(&s.pki, port, &mut hosts[0]).await.status, 200);
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let before = op.get("/v1/hosts").await.json();
    assert_eq!(waiting(&before, "web-01").0, "waiting: never seen");
    assert_eq!(waiting(&before, "web-01").1, Value::Null);
    let r = web01
        .post(
            "/v1/agent/checkin",
            &checkin_body("web-01", &closure("web-01", 0), None, json!([])),
        )
        .await;
    assert_eq!(r.status, 200);

    // Restarted: web-01 has not checked in since, but it was seen before (it was
    // dispatched meanwhile, which is what its reason says now), and its last check-in
    // is still known.
    cp.terminate();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let after = op.get("/v1/hosts").await.json();
    let (why, last) = waiting(&after, "web-01");
    assert_ne!(why, "waiting: never seen", "{after}");
    assert!(last.is_string(), "{after}");
    assert!(
        cp.log_text()
            .contains("last check-ins before this start read"),
        "{}",
        cp.log_text()
    );
}

/// A host's `waiting` and `last_checkin` in a `/v1/hosts` answer.
fn waiting(hosts: &Value, name: &str) -> (String, Value) {
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap();
    (
        h["waiting"].as_str().unwrap_or("").to_owned(),
        h["last_checkin"].clone(),
    )
}
