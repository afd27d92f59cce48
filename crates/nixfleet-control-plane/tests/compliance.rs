//! Compliance evidence at the control plane (docs/compliance.md): host-signed evidence is
//! verified against the key the signed fleet pins, replays and forgeries are refused, the
//! newest is stored, shown to operators and auditors, survives a restart, and comes back
//! from the agent after a wipe.

mod support;

use std::time::Duration;

use nixfleet_harness::*;
use serde_json::{json, Value};
use support::start_enrolled;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn at(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0).unwrap().format(&Rfc3339).unwrap()
}

fn hash(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

/// Evidence of `host` on its generation-1 closure: activated `activated_ago` seconds
/// ago, collected `collected_ago` seconds ago, control `ssh-hardening` with `status`.
fn evidence(host: &str, activated_ago: i64, collected_ago: i64, status: &str) -> Value {
    let now = OffsetDateTime::now_utc();
    let activated = at(now - time::Duration::seconds(activated_ago));
    let collected = at(now - time::Duration::seconds(collected_ago));
    json!({
        "hostname": host, "rolloutId": null, "closureHash": closure(host, 1),
        "bootId": "boot-1", "activatedAt": activated, "collectedAt": collected,
        "trigger": "activation", "mode": "enforce", "frameworks": ["nis2"],
        "controls": [
            {"id": "audit-logging", "status": "pass", "articles": {"nis2": ["21.2.g"]},
             "outputHash": hash(1), "collectedAt": collected},
            {"id": "ssh-hardening", "status": status, "articles": {"nis2": ["21.2.h"]},
             "outputHash": hash(2), "collectedAt": collected},
        ],
    })
}

/// The `EvidenceRequest` for `evidence`, signed by `key` as the agent signs it.
fn signed(key: &nixfleet_trust::keys::PrivateKey, evidence: &Value) -> Value {
    let sig = key.sign(&nixfleet_trust::jcs::to_canonical(evidence).unwrap());
    json!({"evidence": evidence, "signature": b64(&sig)})
}

fn evidence_id(evidence: &Value) -> String {
    nixfleet_trust::jcs::sha256_hex(&nixfleet_trust::jcs::to_canonical(evidence).unwrap())
}

fn text(r: &Reply) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

async fn post(client: &Client, body: &Value) -> Reply {
    client.post("/v1/agent/evidence", body).await
}

/// A check-in of `host` on its generation-1 closure, claiming evidence collected at
/// `claimed`; returns the answer.
async fn checkin(client: &Client, host: &str, claimed: Option<&str>) -> Value {
    let mut body = checkin_body(host, &closure(host, 1), None, json!([]));
    body["complianceEvidenceAt"] = json!(claimed);
    let r = client.post("/v1/agent/checkin", &body).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()
}

async fn host_compliance(op: &Client, host: &str) -> Value {
    let r = op.get("/v1/compliance").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    r.json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hostname"] == host)
        .cloned()
        .unwrap_or_else(|| panic!("{host} missing from GET /v1/compliance"))
}

#[tokio::test(flavor = "multi_thread")]
async fn good_evidence_is_stored_shown_and_kept_by_check_ins() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 2).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let op = Client::operator(&s.pki, port);

    // Nothing stored yet: the check-in answer says so, and so does the operator view.
    assert!(checkin(&web01, "web-01", None).await["complianceEvidenceAt"].is_null());
    let r = op.get("/v1/hosts/web-01/evidence").await;
    assert_eq!(r.status, 404, "{}", text(&r));
    assert!(text(&r).contains("no compliance evidence stored for web-01"));

    let ev = evidence("web-01", 120, 60, "fail");
    let body = signed(&hosts[0].key, &ev);
    let r = post(&web01, &body).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let id = evidence_id(&ev);
    assert_eq!(r.json()["evidenceId"], id.as_str());

    // A resend of the same evidence is the same answer, stored once.
    let again = post(&web01, &body).await;
    assert_eq!(again.status, 200, "{}", text(&again));
    assert_eq!(again.json()["evidenceId"], id.as_str());

    // The check-in answer carries what is stored; a later check-in does not erase it.
    let answer = checkin(&web01, "web-01", ev["collectedAt"].as_str()).await;
    assert_eq!(answer["complianceEvidenceAt"], ev["collectedAt"]);
    let answer = checkin(&web01, "web-01", ev["collectedAt"].as_str()).await;
    assert_eq!(answer["complianceEvidenceAt"], ev["collectedAt"]);

    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(shown["channel"], "stable");
    // The channel's compliance in the signed fleet (this one declares none).
    assert_eq!(shown["mode"], "disabled");
    assert_eq!(shown["frameworks"], json!([]));
    assert_eq!(shown["pending"], false);
    assert_eq!(shown["summary"]["evidenceId"], id.as_str());
    assert_eq!(shown["summary"]["passed"], 1);
    assert_eq!(
        shown["summary"]["failing"],
        json!([{"id": "ssh-hardening", "status": "fail"}])
    );
    assert_eq!(
        shown["evidence"], body,
        "the evidence as the host signed it"
    );
    let other = host_compliance(&op, "web-02").await;
    assert!(other["summary"].is_null() && other["evidence"].is_null());
    let r = op.get("/v1/compliance?channel=stable").await;
    assert_eq!(r.json()["hosts"].as_array().unwrap().len(), 2);
    let r = op.get("/v1/compliance?channel=nope").await;
    assert_eq!(r.status, 404, "{}", text(&r));
    // Operators only.
    assert_eq!(web01.get("/v1/compliance").await.status, 403);
    assert_eq!(web01.get("/v1/hosts/web-01/evidence").await.status, 403);

    // The auditor's copy is byte for byte what the host signed.
    let r = op.get("/v1/hosts/web-01/evidence").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json(), body);

    // One audit line, with the signed document in it.
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l["event"] == "compliance-evidence")
        .collect();
    assert_eq!(lines.len(), 1, "{audit}");
    assert_eq!(lines[0]["host"], "web-01");
    assert_eq!(lines[0]["evidenceId"], id.as_str());
    assert_eq!(lines[0]["failing"], json!(["ssh-hardening"]));
    assert_eq!(lines[0]["evidence"], body);

    // Newer evidence replaces it.
    let newer = evidence("web-01", 120, 10, "pass");
    let r = post(&web01, &signed(&hosts[0].key, &newer)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(shown["summary"]["evidenceId"], evidence_id(&newer).as_str());
    assert_eq!(shown["summary"]["failing"], json!([]));

    let metrics = op.get("/metrics").await;
    let metrics = text(&metrics);
    assert!(
        metrics.contains("nixfleet_compliance_evidence_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nixfleet_compliance_hosts{result=\"pass\"} 1"),
        "{metrics}"
    );
    let log = cp.log_text();
    assert!(log.contains("compliance evidence received"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_misdirected_replayed_and_misdated_evidence_is_refused() {
    let mut s = Setup::new(&["web-01", "web-02"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (_cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 2).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let op = Client::operator(&s.pki, port);
    let good = evidence("web-01", 300, 100, "pass");

    // Signed by another key (web-02's), or changed after signing: 401.
    let r = post(&web01, &signed(&hosts[1].key, &good)).await;
    assert_eq!(r.status, 401, "{}", text(&r));
    let mut altered = signed(&hosts[0].key, &evidence("web-01", 300, 100, "fail"));
    altered["evidence"]["controls"][1]["status"] = json!("pass");
    let r = post(&web01, &altered).await;
    assert_eq!(r.status, 401, "{}", text(&r));

    // web-02's own, genuine evidence relayed with web-01's certificate, and web-01
    // signing evidence that names web-02: both are another host's, 403.
    let r = post(
        &web01,
        &signed(&hosts[1].key, &evidence("web-02", 300, 100, "pass")),
    )
    .await;
    assert_eq!(r.status, 403, "{}", text(&r));
    let r = post(
        &web01,
        &signed(&hosts[0].key, &evidence("web-02", 300, 100, "pass")),
    )
    .await;
    assert_eq!(r.status, 403, "{}", text(&r));

    // Collected before the activation it follows: 422.
    let mut early = evidence("web-01", 300, 100, "pass");
    early["controls"][0]["collectedAt"] =
        json!(at(OffsetDateTime::now_utc() - time::Duration::seconds(400)));
    let r = post(&web01, &signed(&hosts[0].key, &early)).await;
    assert_eq!(r.status, 422, "{}", text(&r));
    assert!(text(&r).contains("before the closure was activated"));

    // Dated ahead of the control plane's clock by more than the slack: 422.
    let future = evidence("web-01", 300, -600, "pass");
    let r = post(&web01, &signed(&hosts[0].key, &future)).await;
    assert_eq!(r.status, 422, "{}", text(&r));
    assert!(text(&r).contains("ahead of this control plane's clock"));

    // Over the size limit: refused unread.
    let mut big = evidence("web-01", 300, 100, "pass");
    big["bootId"] = json!("x".repeat(nixfleet_proto::compliance::MAX_EVIDENCE_BYTES));
    let r = post(&web01, &signed(&hosts[0].key, &big)).await;
    assert_eq!(r.status, 413, "{}", text(&r));

    // Nothing refused was stored.
    assert!(host_compliance(&op, "web-01").await["summary"].is_null());

    // The good one is taken; older evidence is then a replay (409), even a passing one
    // sent to hide a later failure.
    let latest = evidence("web-01", 300, 50, "fail");
    let r = post(&web01, &signed(&hosts[0].key, &latest)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let r = post(&web01, &signed(&hosts[0].key, &good)).await;
    assert_eq!(r.status, 409, "{}", text(&r));
    assert!(
        text(&r).contains("evidence replayed: collected at"),
        "{}",
        text(&r)
    );
    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(
        shown["summary"]["evidenceId"],
        evidence_id(&latest).as_str()
    );

    let metrics = op.get("/metrics").await;
    let metrics = text(&metrics);
    for (reason, n) in [
        ("signature", 2),
        ("host", 2),
        ("before-activation", 1),
        ("future", 1),
        ("replay", 1),
    ] {
        assert!(
            metrics.contains(&format!(
                "nixfleet_compliance_evidence_refused_total{{reason=\"{reason}\"}} {n}"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(
        metrics
            .contains("nixfleet_compliance_controls{control=\"ssh-hardening\",status=\"fail\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_survives_a_restart_and_comes_back_after_a_wipe() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let (mut cp, port, hosts) = start_enrolled(&mut s, &state, &CpOptions::default(), 1).await;
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let ev = evidence("web-01", 300, 60, "fail");
    let body = signed(&hosts[0].key, &ev);
    let collected = ev["collectedAt"].as_str().unwrap().to_owned();
    checkin(&web01, "web-01", None).await;
    let r = post(&web01, &body).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    checkin(&web01, "web-01", Some(&collected)).await;

    // Restart on the same database: the evidence is still the host's latest.
    assert_eq!(cp.terminate(), Some(0), "{}", cp.log_text());
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let op = Client::operator(&s.pki, port);
    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(
        shown["summary"]["evidenceId"],
        evidence_id(&ev).as_str(),
        "{shown}"
    );
    assert_eq!(shown["evidence"], body);
    let answer = checkin(&web01, "web-01", Some(&collected)).await;
    assert_eq!(answer["complianceEvidenceAt"], collected.as_str());
    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(shown["pending"], false, "{shown}");
    assert_eq!(shown["summary"]["evidenceId"], evidence_id(&ev).as_str());
    // Replays are still refused against what the database holds.
    let older = evidence("web-01", 300, 120, "pass");
    let r = post(&web01, &signed(&hosts[0].key, &older)).await;
    assert_eq!(r.status, 409, "{}", text(&r));

    // Wipe: the control plane has nothing, the agent still holds its evidence.
    assert_eq!(cp.terminate(), Some(0), "{}", cp.log_text());
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let web01 = Client::host(&s.pki, port, &hosts[0]);
    let op = Client::operator(&s.pki, port);
    let answer = checkin(&web01, "web-01", Some(&collected)).await;
    assert!(
        answer["complianceEvidenceAt"].is_null(),
        "the agent is told to send it again: {answer}"
    );
    let shown = host_compliance(&op, "web-01").await;
    assert_eq!(shown["pending"], true, "{shown}");
    assert!(shown["summary"].is_null() && shown["evidence"].is_null());

    // The agent sends it again: restored, no longer pending.
    let r = post(&web01, &body).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["evidenceId"], evidence_id(&ev).as_str());
    let answer = checkin(&web01, "web-01", Some(&collected)).await;
    assert_eq!(answer["complianceEvidenceAt"], collected.as_str());
    wait_for_async("evidence restored", Duration::from_secs(5), || {
        let op = op.clone();
        async move {
            let shown = host_compliance(&op, "web-01").await;
            shown["pending"] == false && !shown["summary"].is_null()
        }
    })
    .await;
    drop(cp);
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_taken_by_one_replica_is_seen_by_another_and_not_erased() {
    let mut s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let db = nixfleet_harness::pg::TestDb::create("nixfleet_compliance");
    let replica = |name: &str| {
        let opts = CpOptions {
            database_url: Some(db.url.clone()),
            extra: vec![
                "--replica-name".to_owned(),
                name.to_owned(),
                "--tick-interval-secs".to_owned(),
                "1".to_owned(),
            ],
            ..CpOptions::default()
        };
        let mut cp = Cp::start(&s.pki, &s.forge, &s.tmp.path().join(name), &opts);
        cp.wait_ready(&s.pki);
        cp
    };
    let a = replica("cp-a");
    let b = replica("cp-b");
    let mut hosts = std::mem::take(&mut s.hosts);
    assert_eq!(enroll(&s.pki, a.port, &mut hosts[0]).await.status, 200);
    let on_a = Client::host(&s.pki, a.port, &hosts[0]);
    let on_b = Client::host(&s.pki, b.port, &hosts[0]);
    checkin(&on_b, "web-01", None).await;

    // A takes the evidence; B answers the next check-ins, which claim it.
    let ev = evidence("web-01", 300, 60, "error");
    let collected = ev["collectedAt"].as_str().unwrap().to_owned();
    let r = post(&on_a, &signed(&hosts[0].key, &ev)).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    checkin(&on_b, "web-01", Some(&collected)).await;
    let op_b = Client::operator(&s.pki, b.port);
    wait_for_async("B sees A's evidence", Duration::from_secs(20), || {
        let on_b = on_b.clone();
        let op_b = op_b.clone();
        let collected = collected.clone();
        async move {
            let answer = checkin(&on_b, "web-01", Some(&collected)).await;
            let shown = host_compliance(&op_b, "web-01").await;
            answer["complianceEvidenceAt"] == collected.as_str()
                && shown["pending"] == false
                && shown["summary"]["failing"]
                    == json!([{"id": "ssh-hardening", "status": "error"}])
        }
    })
    .await;
    // B's check-ins did not erase it from the shared database, and B refuses a replay.
    assert_eq!(
        db.query("SELECT compliance IS NOT NULL FROM host_attestations WHERE hostname = 'web-01'"),
        vec![vec!["t".to_owned()]]
    );
    let older = evidence("web-01", 300, 120, "pass");
    let r = post(&on_b, &signed(&hosts[0].key, &older)).await;
    assert_eq!(r.status, 409, "{}", text(&r));
    drop((a, b));
}
