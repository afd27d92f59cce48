//! High availability against real Nix: three control-plane replicas on one PostgreSQL
//! database behind HAProxy (TCP, mTLS passed through), real agents, the leader killed
//! mid-rollout, then the database dropped and recreated under the running fleet.

mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use fleet::*;
use nixfleet_harness::haproxy::Haproxy;
use nixfleet_harness::pg::TestDb;
use nixfleet_harness::*;
use serde_json::json;

/// Seconds between ticks: a takeover must take at most two of them.
const TICK: u64 = 2;

/// The replicas, by name, with their logs shown when a scenario fails.
struct Replicas {
    cps: Vec<(String, Cp)>,
    db_url: String,
}

impl Replicas {
    fn start(f: &Fleet, name: &str, port: u16, db_url: &str) -> Cp {
        let mut cp = Cp::start_on(
            &f.pki,
            &f.forge,
            port,
            &f.tmp.path().join(name),
            &CpOptions {
                database_url: Some(db_url.to_owned()),
                extra: vec![
                    "--replica-name".into(),
                    name.into(),
                    "--tick-interval-secs".into(),
                    TICK.to_string(),
                ],
                ..CpOptions::default()
            },
        );
        cp.wait_ready(&f.pki);
        cp
    }

    fn healthz(&self, port: u16) -> serde_json::Value {
        serde_json::from_str(&sh(&format!(
            "curl -sk --max-time 2 https://localhost:{port}/healthz"
        )))
        .unwrap_or(serde_json::Value::Null)
    }

    fn leader(&self) -> Option<usize> {
        self.cps
            .iter()
            .position(|(_, cp)| cp.child.is_some() && self.healthz(cp.port)["role"] == "leader")
    }

    /// Every host any replica has logged a check-in from.
    fn checked_in(&self) -> BTreeSet<String> {
        self.cps
            .iter()
            .flat_map(|(_, cp)| checked_in(&cp.log))
            .collect()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (name, cp) in &self.cps {
            let text = cp.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains(" poll: ") && !l.contains("checkin received"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("---- replica {name} ----\n{}", tail.join("\n"));
        }
        let _ = &self.db_url;
    }
}

/// Per host, the rollout's `dispatch` events; and the most hosts in flight at once, from
/// the trail in commit order (dispatch opens, soak/requeue/fail closes).
fn history(db: &TestDb, rollout: &str) -> (BTreeMap<String, usize>, usize) {
    let rows = db.query(&format!(
        "SELECT hostname, kind FROM rollout_events WHERE rollout_id = '{rollout}' AND hostname IS NOT NULL ORDER BY id"
    ));
    let mut dispatches: BTreeMap<String, usize> = BTreeMap::new();
    let mut open = BTreeSet::new();
    let mut most = 0;
    for row in &rows {
        let (host, kind) = (row[0].clone(), row[1].as_str());
        match kind {
            "dispatch" => {
                *dispatches.entry(host.clone()).or_default() += 1;
                open.insert(host);
            }
            "soak" | "requeue" | "fail" => {
                open.remove(&host);
            }
            _ => {}
        }
        most = most.max(open.len());
    }
    (dispatches, most)
}

#[test]
fn three_replicas_behind_haproxy_survive_a_killed_leader_and_a_dropped_database() {
    require_nix();
    let mut summary = Summary::begin("14 HA: replicas");
    let good: Vec<String> = std::iter::once("canary-01".to_owned())
        .chain((1..=9).map(|i| format!("web-{i:02}")))
        .collect();
    let revoked = "lost-01".to_owned();
    let mut names = good.clone();
    names.push(revoked.clone());
    let wave1 = ["web-01", "web-02", "web-03", "web-04"];
    let policy = json!({
        "strategy": "canary",
        "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 0},
                  {"selector": {"hosts": wave1}, "soakMinutes": 0},
                  {"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
        "onHealthFailure": "halt"
    });
    let mut f = Fleet::new_with(
        &names,
        policy,
        json!([{"hostname": revoked, "notBefore": in_an_hour(), "reason": "stolen", "revokedBy": "ops"}]),
        |fleet| {
            fleet["disruptionBudgets"] = json!([{"selector": {"all": true}, "maxInFlight": 2}]);
        },
    );
    let db = TestDb::create("nixfleet_ha");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas = Replicas {
        cps: Vec::new(),
        db_url: db.url.clone(),
    };
    for (i, port) in ports.iter().enumerate() {
        let name = format!("cp-{}", i + 1);
        let cp = Replicas::start(&f, &name, *port, &db.url);
        replicas.cps.push((name, cp));
        if i == 0 {
            wait_for("cp-1 to lead", LONG, || replicas.leader() == Some(0));
        }
    }
    let haproxy = Haproxy::start(&f.tmp.path().join("haproxy"), &ports);
    f.cp_port = haproxy.port;
    let started = Instant::now();
    f.start_agents();

    // ---- The leader dies mid-rollout (SIGKILL) ----
    f.wait_confirmed(&["canary-01"]);
    wait_for("wave 1 under way", LONG, || {
        wave1.iter().any(|h| f.node(h).log().contains("confirm of"))
    });
    let confirmed_before = good
        .iter()
        .filter(|h| f.node(h).log().contains("confirm of"))
        .count();
    let leader = replicas.leader().expect("a leader");
    let old_leader = replicas.cps[leader].0.clone();
    let mut child = replicas.cps[leader].1.child.take().unwrap();
    child.kill().unwrap();
    let killed = Instant::now();
    let _ = child.wait();
    let mut new_leader = None;
    wait_for("a new leader", LONG, || {
        new_leader = replicas.leader();
        new_leader.is_some()
    });
    let takeover = killed.elapsed();
    summary.timing("takeover after kill -9 of the leader", takeover);
    assert!(
        takeover <= Duration::from_secs(2 * TICK),
        "takeover took {takeover:?}, over two tick intervals"
    );
    let new_leader = new_leader.unwrap();
    assert!(replicas.cps[new_leader]
        .1
        .log_text()
        .contains("became the leader"));
    assert!(
        confirmed_before < good.len(),
        "the leader was killed after the rollout finished"
    );

    let all: Vec<&str> = good.iter().map(String::as_str).collect();
    f.wait_confirmed(&all);
    wait_for("the rollout to converge", LONG, || {
        f.rollout_state() == "converged"
    });
    summary.timing("converged after", started.elapsed());

    // No host activated twice, and the revoked host never got in.
    for name in &all {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
    let lost = f.node(&revoked);
    wait_for("the revoked host to be refused", LONG, || {
        lost.log().contains("it is revoked or expired")
    });
    assert!(lost.machine.activations().is_empty());

    // The database's history: one dispatch per host, never more than 2 in flight, and one
    // delivery and one confirm per host whichever replica handled them.
    let (dispatches, most) = history(&db, &f.rollout);
    for name in &all {
        assert_eq!(
            dispatches.get(*name),
            Some(&1),
            "{name} dispatched other than once: {dispatches:?}"
        );
    }
    assert_eq!(most, 2, "the budget of 2 was exceeded or never used");
    for event in ["delivered", "confirmed"] {
        let rows = db.query(&format!(
            "SELECT count(*), count(DISTINCT hostname) FROM dispatch_history WHERE event = '{event}'"
        ));
        assert_eq!(rows, [["10", "10"]], "{event} rows");
    }
    eprintln!("leader {old_leader} killed with {confirmed_before} hosts confirmed");

    // ---- Drop and recreate the database under the running fleet, restart replicas ----
    let lost_cert = std::fs::read_to_string(lost.machine.dir.join("agent-state/cert.pem")).unwrap();
    let marks = f.log_marks();
    db.recreate();
    for (_, cp) in replicas.cps.iter_mut() {
        if cp.child.is_some() {
            assert_eq!(
                cp.terminate(),
                Some(0),
                "SIGTERM exits 0:\n{}",
                cp.log_text()
            );
        }
    }
    let restarted = Instant::now();
    for (i, port) in ports.iter().enumerate() {
        let name = format!("cp-{}", i + 1);
        let cp = Replicas::start(&f, &name, *port, &db.url);
        replicas.cps[i] = (name, cp);
    }
    // The revoked certificate is refused: never a 200 through the load balancer.
    let probe_host = Host {
        name: revoked.clone(),
        key: lost.host.key.clone(),
        cert_pem: Some(lost_cert),
    };
    let probe = Client::host(&f.pki, haproxy.port, &probe_host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = checkin_body(&revoked, &lost.gen0, None, json!([]));
    let mut refused = 0;
    while refused < 6 {
        // A replica HAProxy still marks down is a connection error, not an answer.
        if let Ok(reply) = rt.block_on(probe.try_post("/v1/agent/checkin", &body)) {
            assert_eq!(
                reply.status, 401,
                "the revoked host after the database was recreated"
            );
            refused += 1;
        }
        assert!(restarted.elapsed() < LONG, "no answer through HAProxy");
    }
    let expected: BTreeSet<String> = good.iter().cloned().collect();
    wait_for("every good agent to check in again", LONG, || {
        replicas.checked_in() == expected
    });
    summary.timing(
        &format!(
            "database recreated to full visibility ({} agents, {POLL_SECS} s poll)",
            good.len()
        ),
        restarted.elapsed(),
    );
    wait_for("the rollout rebuilt as converged", LONG, || {
        f.rollout_state() == "converged"
    });
    assert_eq!(
        db.query("SELECT count(*) FROM cert_revocations"),
        [["1"]],
        "the signed revocation list is applied again"
    );
    // No wave re-runs: two more check-ins each, no orders, nothing activated again.
    let skip = [revoked.as_str()];
    f.wait_checkins_since(&marks, 2, &skip);
    f.assert_no_orders_since(&marks, &skip);
    for name in &all {
        let node = f.node(name);
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
    assert!(lost.machine.activations().is_empty());
    drop(haproxy);
}
