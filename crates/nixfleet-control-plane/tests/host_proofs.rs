//! Schema-2 rollouts (no Nix, no `nixfleet release`: the tests sign what they need): the
//! control plane loads a manifest only with lists that match what it signs, and serves
//! each host an inclusion proof that the agent's verification accepts.

mod support;

use std::time::Duration;

use nixfleet_harness::*;
use nixfleet_trust::verify::{self, Limits, ManifestContext};
use serde_json::Value;
use support::HandRelease;

const NAMES: [&str; 4] = ["canary-01", "web-01", "web-02", "web-03"];

async fn wait_status(client: &Client, path: &str, want: u16) -> Reply {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reply = client.get(path).await;
        if reply.status == want {
            return reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "GET {path} answers {} ({}), not {want}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The proof in `reply`, checked as an agent checks it; returns the entry it shows.
fn verified_entry(r: &HandRelease, rollout: &str, reply: &Reply) -> nixfleet_proto::HostSetEntry {
    verify::verify_host_proof(
        &reply.body,
        &r.trust,
        time::OffsetDateTime::now_utc(),
        ManifestContext {
            rollout_id: Some(rollout),
            fleet: None,
        },
        &Limits::default(),
    )
    .unwrap_or_else(|e| panic!("the served proof does not verify: {e}"))
    .entry
}

fn error_of(reply: &Reply) -> String {
    reply.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_proof_verifies_and_shows_that_hosts_signed_target() {
    let mut r = HandRelease::new(&NAMES);
    let plan = r.plan(2);
    let rollout = r.publish_schema_2(&plan);
    let cp = r.start("cp", CpOptions::default());
    let op = Client::operator(&r.pki, cp.port);
    wait_status(&op, &format!("/v1/rollouts/{rollout}"), 200).await;

    // The host fetches its own proof with its certificate, as the agent does.
    let mut hosts = std::mem::take(&mut r.hosts);
    assert_eq!(enroll(&r.pki, cp.port, &mut hosts[2]).await.status, 200);
    let web02 = Client::host(&r.pki, cp.port, &hosts[2]);
    let reply = web02
        .get(&format!("/v1/rollouts/{rollout}/hosts/web-02"))
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let entry = verified_entry(&r, &rollout, &reply);
    assert_eq!(entry, plan.entry("web-02").unwrap().clone());
    assert_eq!(reply.json()["index"], 2);
    // Not a neighbour's: one host's key does not walk the host set.
    let reply = web02
        .get(&format!("/v1/rollouts/{rollout}/hosts/web-01"))
        .await;
    assert_eq!(reply.status, 403);
    assert!(
        error_of(&reply).contains("web-02 may fetch only its own proof"),
        "{}",
        error_of(&reply)
    );

    // Every host's proof leads to the same signed root; the manifest route still serves
    // the small signed header, which the proof carries as published.
    let header = op.get(&format!("/v1/rollouts/{rollout}")).await;
    let header_json: Value = serde_json::from_slice(&header.body).unwrap();
    assert_eq!(header_json["schemaVersion"], 2);
    assert_eq!(header_json["hostSetSize"], NAMES.len());
    assert!(header_json.get("hostSet").is_none());
    for name in NAMES {
        let reply = op
            .get(&format!("/v1/rollouts/{rollout}/hosts/{name}"))
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(verified_entry(&r, &rollout, &reply).hostname, name);
        assert_eq!(
            reply.json()["manifest"].as_str().unwrap().as_bytes(),
            &header.body[..]
        );
    }

    // A host outside the rollout, and a rollout that is not loaded: 404 with a reason.
    let reply = op.get(&format!("/v1/rollouts/{rollout}/hosts/db-01")).await;
    assert_eq!(reply.status, 404);
    assert!(
        error_of(&reply).contains("db-01 is not in the host set"),
        "{}",
        error_of(&reply)
    );
    let unknown = "0".repeat(64);
    let reply = op
        .get(&format!("/v1/rollouts/{unknown}/hosts/web-01"))
        .await;
    assert_eq!(reply.status, 404);
    assert!(error_of(&reply).contains(&unknown));
    // Without a certificate, nothing.
    let anonymous = Client::anonymous(&r.pki, cp.port);
    assert_ne!(
        anonymous
            .get(&format!("/v1/rollouts/{rollout}/hosts/web-01"))
            .await
            .status,
        200
    );

    let metrics = String::from_utf8(op.get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains(&format!(
            "nixfleet_host_proofs_served_total {}",
            NAMES.len() + 1
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_url_template_loads_a_schema_2_manifest_with_the_lists_next_to_it() {
    let r = HandRelease::new(&NAMES);
    let plan = r.plan(2);
    let rollout = r.publish_schema_2(&plan);
    let cp = r.start(
        "cp",
        CpOptions {
            rollouts_dir: false,
            extra: vec![
                "--rollouts-url-template".into(),
                r.forge.url("rollouts/channel/{channel}.json"),
            ],
            ..CpOptions::default()
        },
    );
    let op = Client::operator(&r.pki, cp.port);
    let reply = wait_status(&op, &format!("/v1/rollouts/{rollout}/hosts/web-03"), 200).await;
    assert_eq!(verified_entry(&r, &rollout, &reply).hostname, "web-03");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_1_rollout_has_no_host_proofs() {
    let r = HandRelease::new(&NAMES);
    let rollout = r.publish_schema_1(&r.plan(2));
    let cp = r.start("cp", CpOptions::default());
    let op = Client::operator(&r.pki, cp.port);
    wait_status(&op, &format!("/v1/rollouts/{rollout}"), 200).await;
    let reply = op
        .get(&format!("/v1/rollouts/{rollout}/hosts/web-01"))
        .await;
    assert_eq!(reply.status, 409);
    assert_eq!(
        error_of(&reply),
        format!("rollout {rollout} has a schema-1 manifest, which carries no host-set root; fetch /v1/rollouts/{rollout}")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn altered_or_missing_lists_keep_the_manifest_out_until_they_match() {
    let r = HandRelease::new(&NAMES);
    let plan = r.plan(2);
    let rollout = r.publish_schema_2(&plan);
    // One host's closure changed in the unsigned hosts file.
    let hosts_path = r.path(&format!("rollouts/{rollout}.hosts.json"));
    let genuine = std::fs::read(&hosts_path).unwrap();
    let mut altered: nixfleet_proto::RolloutHosts = serde_json::from_slice(&genuine).unwrap();
    altered.host_set[1].target_closure = closure("web-01", 666);
    std::fs::write(&hosts_path, serde_json::to_vec(&altered).unwrap()).unwrap();

    let cp = r.start("cp", CpOptions::default());
    wait_for(
        "the altered hosts file refused",
        Duration::from_secs(20),
        || {
            cp.log_text().lines().any(|l| {
                l.contains("rollout manifest refused")
                    && l.contains(&rollout)
                    && l.contains("the host set's root is")
            })
        },
    );
    let op = Client::operator(&r.pki, cp.port);
    let proof = format!("/v1/rollouts/{rollout}/hosts/web-01");
    assert_eq!(op.get(&proof).await.status, 404);
    assert_eq!(op.get(&format!("/v1/rollouts/{rollout}")).await.status, 404);

    // The genuine hosts file, but the budget list gone: still refused, naming the list.
    let sha256 = nixfleet_trust::hostset::budget_sha256(&plan.disruption_budgets[0].hosts);
    let budget_path = r.path(&format!("rollouts/budgets/{sha256}.json"));
    let budget = std::fs::read(&budget_path).unwrap();
    std::fs::remove_file(&budget_path).unwrap();
    std::fs::write(&hosts_path, &genuine).unwrap();
    wait_for(
        "the missing budget list named",
        Duration::from_secs(20),
        || {
            cp.log_text().lines().any(|l| {
                l.contains("rollout manifest refused")
                    && l.contains(&format!("budget list {sha256} is missing"))
            })
        },
    );
    assert_eq!(op.get(&proof).await.status, 404);

    // Both lists as released: the manifest loads and the proof is served.
    std::fs::write(&budget_path, budget).unwrap();
    let reply = wait_status(&op, &proof, 200).await;
    assert_eq!(
        verified_entry(&r, &rollout, &reply),
        plan.entry("web-01").unwrap().clone()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_kept_from_the_previous_release_keeps_serving_host_proofs() {
    let mut r = HandRelease::new(&NAMES);
    let first = r.plan(2);
    let first_id = r.publish_schema_2(&first);
    let cp = r.start("cp", CpOptions::default());
    let op = Client::operator(&r.pki, cp.port);
    let proof = format!("/v1/rollouts/{first_id}/hosts/web-03");
    wait_status(&op, &proof, 200).await;
    // Its rollout is on record (no host has checked in, so it cannot end).
    wait_for_async("the first rollout opened", Duration::from_secs(20), || {
        let op = op.clone();
        let first_id = first_id.clone();
        async move {
            op.get("/v1/rollouts")
                .await
                .json()
                .as_array()
                .is_some_and(|list| list.iter().any(|r| r["rollout_id"] == first_id.as_str()))
        }
    })
    .await;

    // The next release changes the channel's intent: the first rollout's manifest is no
    // longer released, and belongs to the fleet before.
    r.sign_fleet(3);
    let second = r.plan(3);
    let second_id = r.publish_schema_2(&second);
    assert_ne!(first_id, second_id);
    wait_status(&op, &format!("/v1/rollouts/{second_id}/hosts/web-03"), 200).await;
    assert!(cp.log_text().contains(
        "the new release does not carry this rollout's intent; keeping its verified manifest"
    ));
    let reply = op.get(&proof).await;
    assert_eq!(reply.status, 200, "{}", cp.log_text());
    assert_eq!(
        verified_entry(&r, &first_id, &reply),
        first.entry("web-03").unwrap().clone()
    );
}
