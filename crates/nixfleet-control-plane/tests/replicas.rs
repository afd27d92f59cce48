//! Control-plane replicas on one PostgreSQL database (no Nix): any replica serves any
//! request, one leader at a time, a takeover within two tick intervals, and a replica
//! cut off from the database answers 503 until it is back.

mod support;

use std::time::{Duration, Instant};

use nixfleet_harness::haproxy::Haproxy;
use nixfleet_harness::pg::{self, TestDb};
use nixfleet_harness::relay::TcpRelay;
use nixfleet_harness::*;
use serde_json::{json, Value};

/// A released fleet (no Nix) and a throw-away database for the replicas.
struct Replicated {
    s: Setup,
    db: TestDb,
}

fn setup(names: &[&str]) -> Replicated {
    Replicated {
        s: Setup::new(names, canary_policy("halt", 0), json!([])),
        db: TestDb::create("nixfleet_replicas"),
    }
}

impl std::ops::Deref for Replicated {
    type Target = Setup;
    fn deref(&self) -> &Setup {
        &self.s
    }
}

impl std::ops::DerefMut for Replicated {
    fn deref_mut(&mut self) -> &mut Setup {
        &mut self.s
    }
}

impl Replicated {
    /// Starts replica `name` against `url`, with `tick` seconds between ticks.
    fn replica(&self, name: &str, url: &str, tick: u64) -> Cp {
        self.replica_with(name, url, tick, &[])
    }

    /// Like `replica`, with more flags.
    fn replica_with(&self, name: &str, url: &str, tick: u64, flags: &[&str]) -> Cp {
        let mut extra = vec!["--tick-interval-secs".to_owned(), tick.to_string()];
        extra.extend(flags.iter().map(|f| f.to_string()));
        self.start(
            name,
            CpOptions {
                database_url: Some(url.to_owned()),
                extra,
                ..CpOptions::default()
            },
        )
    }

    /// Starts replica `name` with `opts` (its name added) and waits until it is ready.
    fn start(&self, name: &str, mut opts: CpOptions) -> Cp {
        opts.extra
            .splice(0..0, ["--replica-name".to_owned(), name.to_owned()]);
        let mut cp = Cp::start(&self.pki, &self.forge, &self.tmp.path().join(name), &opts);
        cp.wait_ready(&self.pki);
        cp
    }
}

/// Waits until the leader has stored an artifact whose name is LIKE `pattern`.
async fn wait_published(db: &TestDb, pattern: &str) {
    wait_for_async(
        &format!("the leader to publish {pattern}"),
        Duration::from_secs(20),
        || async move {
            !db.query(&format!(
                "SELECT name FROM signed_artifacts WHERE name LIKE '{pattern}'"
            ))
            .is_empty()
        },
    )
    .await;
}

async fn healthz(pki: &Pki, port: u16) -> Option<Value> {
    let reply = Client::anonymous(pki, port)
        .try_request(hyper::Method::GET, "/healthz", None, &[])
        .await
        .ok()?;
    Some(reply.json())
}

async fn role(pki: &Pki, port: u16) -> String {
    healthz(pki, port)
        .await
        .map(|h| h["role"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

async fn wait_role(pki: &Pki, port: u16, want: &str, within: Duration) {
    let start = Instant::now();
    loop {
        if role(pki, port).await == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "replica on {port} is not {want} after {within:?}: {:?}",
            healthz(pki, port).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn checkin_status(client: &Client, host: &str, closure: &str) -> u16 {
    match client
        .try_post(
            "/v1/agent/checkin",
            &checkin_body(host, closure, None, json!([])),
        )
        .await
    {
        Ok(r) => {
            if r.status != 200 {
                eprintln!(
                    "check-in {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                );
            }
            r.status
        }
        Err(_) => 0,
    }
}

async fn host_state(op: &Client, rollout: &str, host: &str) -> Value {
    let list = op.get("/v1/rollouts").await.json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r["rollout_id"] == rollout)
        .map(|r| r["hosts"][host].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_from_one_replica_is_confirmed_on_another() {
    let mut s = setup(&["web-01", "web-02"]);
    let a = s.replica("cp-a", &s.db.url, 1);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    let b = s.replica("cp-b", &s.db.url, 1);
    assert_eq!(role(&s.pki, b.port).await, "follower");
    let health = healthz(&s.pki, b.port).await.unwrap();
    assert_eq!(health["replica"], "cp-b");
    assert_eq!(health["leader"], "cp-a");
    assert_eq!(health["database_ok"], true);

    // Enrolled on B, dispatched by A (the leader), handed out by B, confirmed on A.
    let mut hosts = std::mem::take(&mut s.hosts);
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, b.port, h).await.status, 200);
    }
    let rollout = rollout_id(&s.forge_dir, "stable");
    let on_a = Client::host(&s.pki, a.port, &hosts[0]);
    let on_b = Client::host(&s.pki, b.port, &hosts[0]);
    let target = until_target(&on_b, "web-01", &closure("web-01", 0)).await;
    assert_eq!(target["rolloutId"], rollout.as_str());
    assert_eq!(activate(&on_a, "web-01", &target).await, 204);

    // The leader acts on a confirm it did not receive: the canary is promoted, and B's
    // operator view shows it.
    let op_b = Client::operator(&s.pki, b.port);
    wait_for_async("web-01 soaked, seen on B", Duration::from_secs(20), || {
        let op = op_b.clone();
        let rollout = rollout.clone();
        async move {
            let state = host_state(&op, &rollout, "web-01").await;
            state == "soaked" || state == "converged"
        }
    })
    .await;
    // The next wave's target comes from either replica.
    let web02_a = Client::host(&s.pki, a.port, &hosts[1]);
    let t2 = until_target(&web02_a, "web-02", &closure("web-02", 0)).await;
    let web02_b = Client::host(&s.pki, b.port, &hosts[1]);
    assert_eq!(activate(&web02_b, "web-02", &t2).await, 204);
    let op_a = Client::operator(&s.pki, a.port);
    wait_for_async("the rollout converged", Duration::from_secs(20), || {
        let op = op_a.clone();
        let rollout = rollout.clone();
        async move {
            let list = op.get("/v1/rollouts").await.json();
            list.as_array()
                .unwrap()
                .iter()
                .any(|r| r["rollout_id"] == rollout.as_str() && r["state"] == "converged")
        }
    })
    .await;
    // Each delivery and confirm is recorded once, whichever replica took it.
    let history = s.db.query(
        "SELECT hostname, event, count(*) FROM dispatch_history GROUP BY 1, 2 ORDER BY 1, 2",
    );
    assert_eq!(
        history,
        [
            ["web-01", "confirmed", "1"],
            ["web-01", "delivered", "1"],
            ["web-02", "confirmed", "1"],
            ["web-02", "delivered", "1"],
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_verifies_what_the_leader_published_and_refuses_a_forged_fleet() {
    let mut s = setup(&["web-01", "web-02"]);
    let a = s.replica("cp-a", &s.db.url, 1);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    // B cannot reach the forge and has neither a build-time artifact nor a rollouts
    // directory: everything it serves was published in the database by A and verified
    // by B, from its start-up on.
    wait_published(&s.db, "fleet").await;
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let b = s.start(
        "cp-b",
        CpOptions {
            database_url: Some(s.db.url.clone()),
            url: false,
            build_time_artifact: false,
            rollouts_dir: false,
            with_revocations: false,
            extra: vec![
                "--channel-refs-artifact-url".into(),
                format!("{nowhere}/fleet.resolved.json"),
                "--revocations-artifact-url".into(),
                format!("{nowhere}/revocations.json"),
            ],
            ..CpOptions::default()
        },
    );
    assert_eq!(role(&s.pki, b.port).await, "follower");
    // Its revocation list too: until it has verified one, agents get 503 there.
    let pki = &s.pki;
    wait_for_async(
        "B verified a revocation list",
        Duration::from_secs(20),
        || async move { healthz(pki, b.port).await.is_some_and(|h| h["ok"] == true) },
    )
    .await;
    let mut hosts = std::mem::take(&mut s.hosts);
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, a.port, h).await.status, 200);
    }
    // The manifest reached B only through the database.
    let web01 = Client::host(&s.pki, b.port, &hosts[0]);
    let target = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    assert_eq!(
        target["rolloutId"],
        rollout_id(&s.forge_dir, "stable").as_str()
    );
    assert!(b
        .log_text()
        .contains("primed verified fleet from the database"));

    // A revocation signed after B started reaches it the same way.
    let in_an_hour = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let in_an_hour = in_an_hour
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    sign_revocations(
        &s.pki,
        &s.forge_dir,
        json!([{"hostname": "web-02", "notBefore": in_an_hour, "reason": "stolen", "revokedBy": "ops"}]),
    );
    let web02 = Client::host(&s.pki, b.port, &hosts[1]);
    wait_for_async(
        "B refuses the revoked web-02",
        Duration::from_secs(20),
        || {
            let web02 = web02.clone();
            async move { checkin_status(&web02, "web-02", &closure("web-02", 0)).await == 401 }
        },
    )
    .await;

    // Someone with write access to the database stores a fleet "signed" later: B refuses
    // it, keeps serving what it verified, and the leader does not write over it.
    s.db.query(
        "UPDATE signed_artifacts SET body = overlay(body placing '9' from 40 for 1), sha256 = 'forged', signed_at_us = signed_at_us + 86400000000 WHERE name = 'fleet'; \
         UPDATE signed_artifacts_version SET version = version + 1",
    );
    wait_for(
        "B refuses the forged fleet",
        Duration::from_secs(20),
        || {
            b.log_text()
                .contains("the fleet published in the database is refused")
        },
    );
    assert_eq!(
        checkin_status(&web01, "web-01", &closure("web-01", 0)).await,
        200
    );
    let health = healthz(&s.pki, b.port).await.unwrap();
    assert_eq!(health["ok"], true, "{health}");
}

/// The host's record in `rollout` as the leader last wrote it.
fn stored_record(db: &TestDb, rollout: &str, host: &str) -> Option<Value> {
    let rows = db.query(&format!(
        "SELECT record FROM host_rollout_state WHERE rollout_id = '{rollout}' AND hostname = '{host}'"
    ));
    rows.first().map(|r| serde_json::from_str(&r[0]).unwrap())
}

fn rfc3339(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(
        v.as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// Waits until the leader has written `host`'s confirm deadline, and returns it.
async fn stored_deadline(db: &TestDb, rollout: &str, host: &str) -> time::OffsetDateTime {
    let start = Instant::now();
    loop {
        let record = stored_record(db, rollout, host);
        if let Some(deadline) = record
            .as_ref()
            .map(|r| &r["state"]["confirmWindow"]["deadline"])
            .filter(|d| d.is_string())
        {
            return rfc3339(deadline);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{host} has no confirm deadline: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sleep_until(t: time::OffsetDateTime) {
    let wait = t - time::OffsetDateTime::now_utc();
    if wait.is_positive() {
        tokio::time::sleep(wait.try_into().unwrap()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn confirms_are_taken_until_the_deadline_and_the_leader_fails_a_host_only_after_a_grace() {
    const GRACE: time::Duration = time::Duration::seconds(10);
    let mut s = setup(&["web-01", "web-02"]);
    let flags = [
        "--confirm-window-secs",
        "6",
        "--activation-timeout-secs",
        "0",
    ];
    let a = s.replica_with("cp-a", &s.db.url, 1, &flags);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    let b = s.replica_with("cp-b", &s.db.url, 1, &flags);
    assert_eq!(role(&s.pki, b.port).await, "follower");
    let mut hosts = std::mem::take(&mut s.hosts);
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, b.port, h).await.status, 200);
    }
    let rollout = rollout_id(&s.forge_dir, "stable");

    // The canary confirms on the follower just before its deadline: the leader, which
    // learns of it through the database, must not fail it.
    let web01 = Client::host(&s.pki, b.port, &hosts[0]);
    let target = until_target(&web01, "web-01", &closure("web-01", 0)).await;
    let deadline = stored_deadline(&s.db, &rollout, "web-01").await;
    sleep_until(deadline - time::Duration::milliseconds(300)).await;
    assert_eq!(activate(&web01, "web-01", &target).await, 204);
    let op = Client::operator(&s.pki, a.port);
    wait_for_async("web-01 soaked", Duration::from_secs(30), || {
        let op = op.clone();
        let rollout = rollout.clone();
        async move {
            let state = host_state(&op, &rollout, "web-01").await;
            assert_ne!(
                state, "failed",
                "the leader failed a host confirmed in time"
            );
            state == "soaked" || state == "converged"
        }
    })
    .await;

    // The next host confirms after its deadline: the follower refuses, while the leader
    // still holds the failure back for the grace period.
    let web02 = Client::host(&s.pki, b.port, &hosts[1]);
    let target = until_target(&web02, "web-02", &closure("web-02", 0)).await;
    let deadline = stored_deadline(&s.db, &rollout, "web-02").await;
    sleep_until(deadline + time::Duration::milliseconds(300)).await;
    let late = web02
        .post(
            "/v1/agent/confirm",
            &confirm_body(
                "web-02",
                &rollout,
                target["waveIndex"].as_u64().unwrap() as u32,
                target["closureHash"].as_str().unwrap(),
            ),
        )
        .await;
    assert_eq!(late.status, 410, "{}", String::from_utf8_lossy(&late.body));
    assert!(
        late.json()["error"]
            .as_str()
            .unwrap()
            .contains("confirm window"),
        "{}",
        String::from_utf8_lossy(&late.body)
    );
    let record = stored_record(&s.db, &rollout, "web-02").unwrap();
    assert!(
        record["state"]["confirmWindow"].is_object(),
        "the refusal came before the leader's failure: {record}"
    );
    // The leader fails it once the grace is over, dated at the deadline.
    let (db, id) = (&s.db, rollout.as_str());
    wait_for_async("web-02 failed", Duration::from_secs(30), || async move {
        stored_record(db, id, "web-02").is_some_and(|r| r["state"]["failed"].is_object())
    })
    .await;
    let record = stored_record(&s.db, &rollout, "web-02").unwrap();
    assert_eq!(rfc3339(&record["state"]["failed"]["at"]), deadline);
    assert!(
        rfc3339(&record["since"]) >= deadline + GRACE,
        "failed before the grace was over: {record}"
    );
    let history = s
        .db
        .query("SELECT hostname, event FROM dispatch_history WHERE event = 'confirmed' ORDER BY 1");
    assert_eq!(history, [["web-01", "confirmed"]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_is_replaced_within_two_tick_intervals() {
    const TICK: u64 = 2;
    let s = setup(&["web-01"]);
    let mut a = s.replica("cp-a", &s.db.url, TICK);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    let b = s.replica("cp-b", &s.db.url, TICK);
    let c = s.replica("cp-c", &s.db.url, TICK);
    assert_eq!(role(&s.pki, b.port).await, "follower");
    assert_eq!(role(&s.pki, c.port).await, "follower");

    let mut child = a.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL: no goodbye to the database
    let killed = Instant::now();
    let _ = child.wait();
    // A new leader is elected and has published a tick of its own.
    let mut leader = None;
    while leader.is_none() {
        for cp in [&b, &c] {
            if let Some(h) = healthz(&s.pki, cp.port).await {
                let ticked_after_kill = h["last_tick_at"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| {
                        t >= time::OffsetDateTime::now_utc()
                            - time::Duration::try_from(killed.elapsed()).unwrap()
                    });
                if h["role"] == "leader" && ticked_after_kill {
                    leader = Some(cp.port);
                }
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no new leader 30 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = killed.elapsed();
    eprintln!(
        "takeover after the leader's SIGKILL: {:.2} s",
        took.as_secs_f64()
    );
    assert!(
        took <= Duration::from_secs(2 * TICK),
        "takeover took {took:?}, over two tick intervals ({TICK} s each)"
    );
    let other = if leader == Some(b.port) { &c } else { &b };
    assert_eq!(
        role(&s.pki, other.port).await,
        "follower",
        "one leader at a time"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_from_postgres_answers_503_and_recovers_by_itself() {
    let mut s = setup(&["web-01"]);
    let a = s.replica("cp-a", &s.db.url, 1);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    let relay = TcpRelay::start(pg::server_addr(&s.db.url));
    let b = s.replica("cp-b", &pg::url_with_port(&s.db.url, relay.port), 1);
    let mut hosts = std::mem::take(&mut s.hosts);
    assert_eq!(enroll(&s.pki, a.port, &mut hosts[0]).await.status, 200);
    let on_a = Client::host(&s.pki, a.port, &hosts[0]);
    let on_b = Client::host(&s.pki, b.port, &hosts[0]);
    let gen0 = closure("web-01", 0);
    assert_eq!(checkin_status(&on_b, "web-01", &gen0).await, 200);
    // An agent-like client behind HAProxy whose kept-alive connection landed on B.
    let haproxy = Haproxy::start(&s.tmp.path().join("haproxy"), &[a.port, b.port]);
    let answered_by_b = || b.log_text().matches("checkin received web-01").count();
    let mut pinned = None;
    for _ in 0..6 {
        let client = Client::host(&s.pki, haproxy.port, &hosts[0]);
        let before = answered_by_b();
        assert_eq!(checkin_status(&client, "web-01", &gen0).await, 200);
        wait_for("the check-in to be logged", Duration::from_secs(5), || {
            a.log_text().contains("checkin received web-01") || answered_by_b() > before
        });
        if answered_by_b() > before {
            pinned = Some(client);
            break;
        }
    }
    let via_b = pinned.expect("no connection through HAProxy reached B");

    relay.sever();
    let cut = Instant::now();
    // Every answer is either from a current replica (200) or a refusal (503), and B
    // turns to refusals within the staleness bound.
    loop {
        let status = checkin_status(&on_b, "web-01", &gen0).await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "B still answers 200 {:?} after losing its database",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "503 from the cut-off replica after {:.1} s",
        cut.elapsed().as_secs_f64()
    );
    // The refusal closes the connection, so a kept-alive agent reconnects (through the
    // load balancer, to another replica) instead of asking this one again.
    let refused = on_b
        .try_post(
            "/v1/agent/checkin",
            &checkin_body("web-01", &gen0, None, json!([])),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("connection"), Some("close"));
    let health = healthz(&s.pki, b.port).await.unwrap();
    assert_eq!(health["database_ok"], false);
    assert_eq!(health["ok"], false);
    // Confirms and reports are refused the same way; the other replica serves on.
    let confirm = on_b
        .try_post(
            "/v1/agent/confirm",
            &confirm_body("web-01", "any", 0, &closure("web-01", 1)),
        )
        .await
        .unwrap();
    assert_eq!(confirm.status, 503);
    assert_eq!(checkin_status(&on_a, "web-01", &gen0).await, 200);
    // The client pinned to B is refused once, then carries on through A.
    let mut statuses = Vec::new();
    while !statuses.contains(&503) {
        statuses.push(checkin_status(&via_b, "web-01", &gen0).await);
        assert!(cut.elapsed() < Duration::from_secs(20), "{statuses:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // HAProxy's /healthz check takes B out: no new connection is sent to it.
    wait_for("HAProxy to mark B down", Duration::from_secs(10), || {
        haproxy.log_text().contains("cp2 is DOWN")
    });
    for _ in 0..3 {
        assert_eq!(
            checkin_status(&via_b, "web-01", &gen0).await,
            200,
            "the agent stayed on the cut-off replica"
        );
    }

    relay.restore();
    let restored = Instant::now();
    wait_for_async("B to serve again", Duration::from_secs(20), || {
        let on_b = on_b.clone();
        let gen0 = gen0.clone();
        async move { checkin_status(&on_b, "web-01", &gen0).await == 200 }
    })
    .await;
    eprintln!(
        "B serves again {:.1} s after the database came back",
        restored.elapsed().as_secs_f64()
    );
    assert_eq!(healthz(&s.pki, b.port).await.unwrap()["database_ok"], true);
    wait_for(
        "B to log that it serves again",
        Duration::from_secs(5),
        || b.log_text().contains("the database answers again"),
    );
    wait_for("HAProxy to take B back", Duration::from_secs(10), || {
        haproxy.log_text().contains("cp2 is UP")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_has_not_verified_a_rollout_never_tells_an_agent_to_roll_back() {
    let mut s = setup(&["web-01"]);
    let a = s.replica("cp-a", &s.db.url, 1);
    wait_role(&s.pki, a.port, "leader", Duration::from_secs(10)).await;
    // B has no rollouts directory, and the manifest A stored in the database is damaged
    // (its recorded hash left as it was, so A does not store it again): B can never
    // verify the leader's rollout.
    wait_published(&s.db, "manifest/%").await;
    s.db.query(
        "UPDATE signed_artifacts SET body = overlay(body placing '9' from 40 for 1) WHERE name LIKE 'manifest/%'; \
         UPDATE signed_artifacts_version SET version = version + 1",
    );
    let b = s.start(
        "cp-b",
        CpOptions {
            database_url: Some(s.db.url.clone()),
            rollouts_dir: false,
            ..CpOptions::default()
        },
    );
    wait_for(
        "B to refuse the damaged manifest",
        Duration::from_secs(20),
        || b.log_text().contains("rollout manifest refused"),
    );
    let mut hosts = std::mem::take(&mut s.hosts);
    assert_eq!(enroll(&s.pki, a.port, &mut hosts[0]).await.status, 200);
    let on_a = Client::host(&s.pki, a.port, &hosts[0]);
    let on_b = Client::host(&s.pki, b.port, &hosts[0]);
    let target = until_target(&on_a, "web-01", &closure("web-01", 0)).await;
    wait_for(
        "B to load the leader's rollout",
        Duration::from_secs(10),
        || b.log_text().contains("has not verified yet"),
    );
    let body = confirm_body(
        "web-01",
        target["rolloutId"].as_str().unwrap(),
        0,
        target["closureHash"].as_str().unwrap(),
    );
    let on_b_reply = on_b.try_post("/v1/agent/confirm", &body).await.unwrap();
    assert_eq!(
        on_b_reply.status,
        503,
        "a valid activation must be retried, not rolled back: {}",
        String::from_utf8_lossy(&on_b_reply.body)
    );
    assert_eq!(activate(&on_a, "web-01", &target).await, 204);
}

/// A schema-2 rollout reaches a follower through the database with its lists: the
/// follower checks them against the signed root and serves the host proofs the leader does.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_serves_the_host_proofs_the_leader_serves() {
    let r = support::HandRelease::new(&["canary-01", "web-01", "web-02"]);
    let rollout = r.publish_schema_2(&r.plan(2));
    let db = TestDb::create("nixfleet_host_proofs");
    let replica = |name: &str, opts: CpOptions| {
        let mut opts = CpOptions {
            database_url: Some(db.url.clone()),
            ..opts
        };
        opts.extra
            .splice(0..0, ["--replica-name".to_owned(), name.to_owned()]);
        r.start(name, opts)
    };
    let a = replica("cp-a", CpOptions::default());
    wait_role(&r.pki, a.port, "leader", Duration::from_secs(10)).await;
    wait_published(&db, &format!("manifest-lists/{rollout}")).await;
    // B reads nothing from the forge: the manifest and its lists come from the database.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let b = replica(
        "cp-b",
        CpOptions {
            url: false,
            build_time_artifact: false,
            rollouts_dir: false,
            with_revocations: false,
            extra: vec![
                "--channel-refs-artifact-url".into(),
                format!("{nowhere}/fleet.resolved.json"),
                "--revocations-artifact-url".into(),
                format!("{nowhere}/revocations.json"),
            ],
            ..CpOptions::default()
        },
    );
    assert_eq!(role(&r.pki, b.port).await, "follower");
    let path = format!("/v1/rollouts/{rollout}/hosts/web-02");
    let from_a = Client::operator(&r.pki, a.port).get(&path).await;
    assert_eq!(from_a.status, 200);
    let op_b = Client::operator(&r.pki, b.port);
    let from_b = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply = op_b.get(&path).await;
            if reply.status == 200 || Instant::now() > deadline {
                break reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(from_b.status, 200, "{}", b.log_text());
    assert_eq!(from_b.json(), from_a.json());
    let entry = nixfleet_trust::verify::verify_host_proof(
        &from_b.body,
        &r.trust,
        time::OffsetDateTime::now_utc(),
        nixfleet_trust::verify::ManifestContext::default(),
        &nixfleet_trust::verify::Limits::default(),
    )
    .unwrap()
    .entry;
    assert_eq!(entry.hostname, "web-02");
    assert_eq!(entry.target_closure, closure("web-02", 2));
}
