//! Fleet rollout scenarios against real Nix: staged waves under a budget and an edge,
//! rollback-and-halt, magic rollback with the CP frozen, corrupted and unsigned closures,
//! and a compromised control plane.

mod fleet;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet::*;
use nixfleet_harness::compromised::CompromisedCp;
use nixfleet_harness::nix::delete_from_store;
use nixfleet_harness::*;
use serde_json::{json, Value};
use time::OffsetDateTime;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// When the agent first heard of a target, and when its confirm was accepted.
fn agent_window(node: &Node) -> (OffsetDateTime, OffsetDateTime) {
    let log = node.log();
    let got = log
        .lines()
        .filter(|l| l.contains("checked in") && !l.contains("target=None"))
        .collect::<Vec<_>>()
        .join("\n");
    let got = log_times(&got, "checked in");
    let confirmed = log_times(&log, "confirm of");
    assert!(
        !got.is_empty() && !confirmed.is_empty(),
        "{}: no target or no confirm in\n{log}",
        node.name()
    );
    (got[0], confirmed[0])
}

/// The most intervals open at once; an interval ending when another starts does not
/// overlap it.
fn max_overlap(intervals: &[(OffsetDateTime, OffsetDateTime)]) -> usize {
    let mut points: Vec<(OffsetDateTime, i32)> = intervals
        .iter()
        .flat_map(|(a, b)| [(*a, 1), (*b, -1)])
        .collect();
    points.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, d) in points {
        open += d;
        most = most.max(open);
    }
    most as usize
}

fn at(event: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(
        event["at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// In-flight intervals from the CP's own trail (SPEC.md §6: Dispatched through Healthy),
/// per host: from `dispatch` to the event that ends it.
fn trace_in_flight(trace: &[Value]) -> BTreeMap<String, Vec<(OffsetDateTime, OffsetDateTime)>> {
    let mut open: BTreeMap<String, OffsetDateTime> = BTreeMap::new();
    let mut done: BTreeMap<String, Vec<(OffsetDateTime, OffsetDateTime)>> = BTreeMap::new();
    for e in trace {
        let Some(host) = e["hostname"].as_str() else {
            continue;
        };
        match e["kind"].as_str().unwrap() {
            "dispatch" => {
                open.insert(host.to_owned(), at(e));
            }
            "soak" | "requeue" | "fail" => {
                if let Some(start) = open.remove(host) {
                    done.entry(host.to_owned())
                        .or_default()
                        .push((start, at(e)));
                }
            }
            _ => {}
        }
    }
    assert!(
        open.is_empty(),
        "still in flight after convergence: {open:?}"
    );
    done
}

// ---- scenario 4 -----------------------------------------------------------------------------

#[test]
fn staged_rollout_obeys_waves_soak_budget_and_host_edge() {
    require_nix();
    let mut summary = Summary::begin("4 staged rollout");
    let wave1 = ["web-01", "web-02", "web-03"];
    let wave2 = ["web-04", "web-05", "web-06"];
    let all = names(&[
        "canary-01",
        "web-01",
        "web-02",
        "web-03",
        "web-04",
        "web-05",
        "web-06",
    ]);
    let policy = json!({
        "strategy": "canary",
        "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": 1},
                  {"selector": {"hosts": wave1}, "soakMinutes": 0},
                  {"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
        "onHealthFailure": "halt"
    });
    // web-02 waits for web-03, against the name order the waves would otherwise use.
    let mut f = Fleet::new_with(&all, policy, json!([]), |fleet| {
        fleet["edges"] = json!([{"before": "web-03", "after": "web-02", "reason": "web-03 first"}]);
        fleet["disruptionBudgets"] = json!([{"selector": {"all": true}, "maxInFlight": 2}]);
    });
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let started = Instant::now();
    f.start_agents();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    f.wait_confirmed(&all_refs);
    wait_for("the rollout to converge", LONG, || {
        f.rollout_state() == "converged"
    });
    summary.timing("converged after", started.elapsed());

    // What the agents saw, on their own clocks: order, soak and edge.
    let window: BTreeMap<&str, _> = all_refs
        .iter()
        .map(|n| (*n, agent_window(f.node(n))))
        .collect();
    let canary_confirmed = window["canary-01"].1;
    for host in wave1 {
        let soaked = window[host].0 - canary_confirmed;
        assert!(
            soaked >= time::Duration::seconds(59),
            "{host} got its target {soaked} after the canary confirmed, inside its 1 min soak"
        );
    }
    let wave1_done = wave1.iter().map(|h| window[h].1).max().unwrap();
    for host in wave2 {
        assert!(
            window[host].0 >= wave1_done,
            "{host} got its target before wave 1 was confirmed"
        );
    }
    assert!(
        window["web-02"].0 >= window["web-03"].1,
        "web-02 got its target before web-03 (its edge) confirmed"
    );
    summary.timing(
        "canary soak",
        Duration::try_from(wave1.iter().map(|h| window[h].0).min().unwrap() - canary_confirmed)
            .unwrap(),
    );
    // Target to confirm is inside each host's in-flight time, so it can never exceed 2.
    let seen: Vec<_> = window.values().copied().collect();
    assert!(
        max_overlap(&seen) <= 2,
        "3 agents in flight at once: {window:?}"
    );

    // The CP's own trail: never more than 2 in flight, and the budget was used.
    let trace = f
        .operator_get(&format!("/v1/rollouts/{}/trace", f.rollout))
        .json();
    let trace = trace.as_array().unwrap();
    let in_flight = trace_in_flight(trace);
    for host in &all_refs {
        assert_eq!(
            in_flight.get(*host).map(Vec::len),
            Some(1),
            "{host} dispatched other than once: {trace:?}"
        );
    }
    let intervals: Vec<_> = in_flight.values().flatten().copied().collect();
    assert_eq!(
        max_overlap(&intervals),
        2,
        "the budget of 2 was exceeded or never used: {trace:#?}"
    );
    // Waves were dispatched in order.
    let dispatch_order: Vec<&str> = trace
        .iter()
        .filter(|e| e["kind"] == "dispatch")
        .map(|e| e["hostname"].as_str().unwrap())
        .collect();
    let position = |h: &str| dispatch_order.iter().position(|d| *d == h).unwrap();
    assert_eq!(position("canary-01"), 0);
    for a in wave1 {
        for b in wave2 {
            assert!(position(a) < position(b), "{dispatch_order:?}");
        }
    }
    assert!(
        position("web-03") < position("web-02"),
        "{dispatch_order:?}"
    );
    for node in &f.nodes {
        assert_eq!(node.machine.activations(), vec![node.gen1.clone()]);
    }
}

// ---- scenario 5 -----------------------------------------------------------------------------

#[test]
fn rollback_and_halt_reverts_every_activated_host_and_dispatches_nothing_more() {
    require_nix();
    let mut summary = Summary::begin("5 rollback-and-halt");
    let all = names(&["canary-01", "canary-02", "web-01", "web-02"]);
    let mut f = Fleet::new_with(
        &all,
        canary_policy("rollback-and-halt", 0),
        json!([]),
        |fleet| fleet["hosts"]["canary-02"]["tags"] = json!(["canary"]),
    );
    // canary-01's switch waits until canary-02 has confirmed, then reports a failed unit.
    let bad = "nixos-system-canary-01-1";
    f.node("canary-01").machine.set("hang", bad, true);
    f.node("canary-01").machine.set("unhealthy", bad, true);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let started = Instant::now();
    f.start_agents();
    f.wait_confirmed(&["canary-02"]);
    f.node("canary-01").machine.set("hang", bad, false);
    for name in ["canary-01", "canary-02"] {
        let node = f.node(name);
        wait_for(&format!("{name} to roll back"), LONG, || {
            node.log().contains("rolled back from")
        });
        assert!(
            node.log().contains("rollback signal for rollout"),
            "{name} rolled back without the CP's signal"
        );
        assert_eq!(
            node.machine.activations(),
            vec![node.gen1.clone(), node.gen0.clone()]
        );
        assert_eq!(node.machine.current().as_deref(), Some(node.gen0.as_str()));
        assert_eq!(
            node.machine.profile_target().as_deref(),
            Some(node.gen0.as_str())
        );
    }
    summary.timing("both canaries back on gen0 after", started.elapsed());
    // canary-01's own units failed: its closure is unhealthy there and is not sent to it
    // again by a later rollout; canary-02 only followed the halt.
    for (name, cause) in [("canary-01", "health"), ("canary-02", "rollback-signal")] {
        let node = f.node(name);
        wait_for(&format!("{name} to record why"), LONG, || {
            node.state()["failedTargets"][0]["cause"] == cause
        });
    }
    wait_for("the rollout to be reverted", LONG, || {
        f.rollout_state().get("reverted").is_some()
    });
    // Nothing goes further: wave 1 never hears of the target over several check-ins.
    let marks = f.log_marks();
    f.wait_checkins_since(&marks, 3, &[]);
    f.assert_no_orders_since(&marks, &[]);
    for name in ["web-01", "web-02"] {
        let node = f.node(name);
        assert!(
            node.machine.activations().is_empty(),
            "{name} was dispatched"
        );
        assert!(!node.log().contains("switching to"), "{name} switched");
    }
    assert!(f.rollout_state().get("reverted").is_some());
}

// ---- scenario 6 -----------------------------------------------------------------------------

#[test]
fn magic_rollback_when_the_cp_is_frozen_through_the_confirm_window() {
    require_nix();
    let mut summary = Summary::begin("6 magic rollback");
    const WINDOW_SECS: u64 = 15;
    let all = names(&["canary-01", "web-01"]);
    let mut f = Fleet::new(&all, canary_policy("halt", 0), json!([]));
    f.cp_extra = vec!["--confirm-window-secs".into(), WINDOW_SECS.to_string()];
    let gen1 = "nixos-system-canary-01-1";
    f.node("canary-01").machine.set("hang", gen1, true);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();
    let canary = f.node("canary-01");
    wait_for("the canary's switch to start", LONG, || {
        !canary.machine.activations().is_empty()
    });
    // The CP freezes (SIGSTOP): connections are accepted by the kernel, never answered.
    f.signal_cp("STOP");
    let frozen = Instant::now();
    canary.machine.set("hang", gen1, false);
    let canary = f.node("canary-01");
    let mut deadline = None;
    wait_for("the canary to await its confirm", LONG, || {
        let phase = canary.state()["machine"]["phase"].clone();
        deadline = phase["deadline"].as_str().map(str::to_owned);
        deadline.is_some() || canary.log().contains("rolled back from")
    });
    let deadline = OffsetDateTime::parse(
        &deadline.expect("the awaiting-confirm phase was seen"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    wait_for("the canary to roll back by itself", LONG, || {
        canary.log().contains("rolled back from")
    });
    summary.timing("reverted after the freeze", frozen.elapsed());
    // The switch back starts at the deadline, not a request timeout later.
    let rolling_back = log_times(&canary.log(), "without a 204; rolling back");
    assert_eq!(rolling_back.len(), 1, "{}", canary.log());
    let late = rolling_back[0] - deadline;
    assert!(
        late < time::Duration::seconds(2),
        "the rollback began {late} after the confirm window closed at {deadline}"
    );
    assert!(canary.log().contains("confirm not sent"));
    assert!(
        !canary.log().contains("confirm of"),
        "no success after a rollback"
    );
    assert_eq!(
        canary.machine.activations(),
        vec![canary.gen1.clone(), canary.gen0.clone()]
    );
    assert_eq!(
        canary.machine.current().as_deref(),
        Some(canary.gen0.as_str())
    );
    assert_eq!(
        canary.state()["failedTargets"][0]["closureHash"],
        canary.gen1.as_str()
    );

    f.signal_cp("CONT");
    wait_for("the CP to show the canary Failed", LONG, || {
        let rollouts = f.operator_get("/v1/rollouts").json();
        rollouts.as_array().unwrap().iter().any(|r| {
            r["rollout_id"] == f.rollout.as_str()
                && r["hosts"]["canary-01"].to_string().contains("failed")
        })
    });
    wait_for("the rollout to halt", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    let marks = f.log_marks();
    f.wait_checkins_since(&marks, 3, &[]);
    f.assert_no_orders_since(&marks, &[]);
    let canary = f.node("canary-01");
    assert_eq!(canary.machine.activations().len(), 2, "re-dispatched");
    assert!(f.node("web-01").machine.activations().is_empty());
}

// ---- scenario 16 ----------------------------------------------------------------------------

/// A host's `waiting` in the operator API.
fn waiting_of(f: &Fleet, host: &str) -> String {
    f.operator_get(&format!("/v1/hosts/{host}")).json()["waiting"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_slow_switch_converges_and_one_that_never_ends_fails_after_the_activation_timeout() {
    require_nix();
    let mut summary = Summary::begin("16 slow switch");
    const WINDOW_SECS: u64 = 10;
    const ACTIVATION_SECS: u64 = 45;
    let all = names(&["canary-01", "web-01"]);
    let mut f = Fleet::new(&all, canary_policy("halt", 0), json!([]));
    f.cp_extra = vec![
        "--confirm-window-secs".into(),
        WINDOW_SECS.to_string(),
        "--activation-timeout-secs".into(),
        ACTIVATION_SECS.to_string(),
    ];
    let (canary_gen1, web_gen1) = ("nixos-system-canary-01-1", "nixos-system-web-01-1");
    f.node("canary-01").machine.set("hang", canary_gen1, true);
    f.node("web-01").machine.set("hang", web_gen1, true);
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    f.start_agents();

    // The canary's switch takes three confirm windows: the control plane hears it is
    // switching, and neither fails it nor refuses its confirm afterwards.
    let canary = f.node("canary-01");
    wait_for("the canary's switch to start", LONG, || {
        !canary.machine.activations().is_empty()
    });
    let switching = Instant::now();
    wait_for(
        "the control plane to know the canary is switching",
        LONG,
        || waiting_of(&f, "canary-01").starts_with("activating: switching since"),
    );
    while switching.elapsed() < Duration::from_secs(3 * WINDOW_SECS) {
        assert!(
            !waiting_of(&f, "canary-01").starts_with("failed"),
            "failed while switching: {}",
            waiting_of(&f, "canary-01")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    canary.machine.set("hang", canary_gen1, false);
    f.wait_confirmed(&["canary-01"]);
    summary.timing("slow switch confirmed", switching.elapsed());
    let log = canary.log();
    assert!(!log.contains("(410)"), "{log}");
    assert!(!log.contains("rolling back"), "{log}");
    assert_eq!(
        canary.machine.current().as_deref(),
        Some(canary.gen1.as_str())
    );

    // web-01's switch never ends: failed after the activation timeout, saying so.
    let web = f.node("web-01");
    wait_for("web-01's switch to start", LONG, || {
        !web.machine.activations().is_empty()
    });
    let started = Instant::now();
    wait_for(
        "the control plane to fail web-01",
        Duration::from_secs(ACTIVATION_SECS) + LONG,
        || waiting_of(&f, "web-01").starts_with("failed"),
    );
    let took = started.elapsed();
    summary.timing("never-ending switch failed", took);
    let why = waiting_of(&f, "web-01");
    assert!(
        why.starts_with("failed: activation timeout: still switching (since "),
        "{why}"
    );
    assert!(
        took < Duration::from_secs(ACTIVATION_SECS + WINDOW_SECS),
        "failed {took:?} after the switch started: the activation timeout, not the confirm deadline, should end it"
    );
    wait_for("the rollout to halt", LONG, || {
        f.rollout_state().get("halted").is_some()
    });
    web.machine.set("hang", web_gen1, false);
}

// ---- scenario 7 -----------------------------------------------------------------------------

/// The NAR file the cache's narinfo for `closure` points at.
fn nar_file(cache_dir: &std::path::Path, closure: &str) -> std::path::PathBuf {
    let narinfo =
        std::fs::read_to_string(cache_dir.join(format!("{}.narinfo", &closure[..32]))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    cache_dir.join(url)
}

#[test]
fn corrupted_and_unsigned_closures_are_refused_by_every_agent() {
    require_nix();
    let mut summary = Summary::begin("7 corrupted closure");
    let all = names(&["web-01", "web-02", "web-03"]);
    let every = json!({
        "strategy": "all-at-once",
        "waves": [{"selector": {"all": true}, "soakMinutes": 0}],
        "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 10},
        "onHealthFailure": "halt"
    });
    let mut f = Fleet::new(&all, every, json!([]));
    let cache_dir = f.cache.dir.clone();
    // gen2 of every host goes in unsigned; gen1's signed narinfo then points at gen2's
    // bytes, as if the NAR were modified after signing.
    let mut gen2 = serde_json::Map::new();
    for node in &f.nodes {
        let g2 = node
            .machine
            .build(&format!("nixos-system-{}-2", node.name()));
        f.cache.push_unsigned(&g2);
        delete_from_store(&g2);
        std::fs::copy(nar_file(&cache_dir, &g2), nar_file(&cache_dir, &node.gen1)).unwrap();
        gen2.insert(node.name().to_owned(), Value::String(g2));
    }
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let started = Instant::now();
    f.start_agents();
    for node in &f.nodes {
        wait_for(&format!("{} to refuse gen1", node.name()), LONG, || {
            node.log().contains("refused, nothing activated")
        });
    }
    summary.timing("corrupted refused by all after", started.elapsed());

    // CI's next release: closures that nobody signed.
    let commit2 = "2222222222222222222222222222222222222222";
    let rollout2 = f.release_next(&Value::Object(gen2.clone()), commit2);
    let released = Instant::now();
    for node in &f.nodes {
        let g2 = gen2[node.name()].as_str().unwrap();
        wait_for(&format!("{} to refuse gen2", node.name()), LONG, || {
            node.log()
                .lines()
                .any(|l| l.contains("refused, nothing activated") && l.contains(g2))
        });
    }
    summary.timing("unsigned refused by all after", released.elapsed());
    for node in &f.nodes {
        let g2 = gen2[node.name()].as_str().unwrap();
        assert!(
            node.machine.activations().is_empty(),
            "{} activated something",
            node.name()
        );
        assert_eq!(node.machine.current().as_deref(), Some(node.gen0.as_str()));
        assert_eq!(
            node.machine.profile_target().as_deref(),
            Some(node.gen0.as_str())
        );
        for closure in [node.gen1.as_str(), g2] {
            assert!(
                !nixfleet_harness::nix::is_valid(closure),
                "{closure} made it into the store"
            );
        }
        let failed: Vec<(String, String)> = node.state()["failedTargets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["rolloutId"].as_str().unwrap().to_owned(),
                    t["closureHash"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            failed.contains(&(f.rollout.clone(), node.gen1.clone())),
            "{failed:?}"
        );
        assert!(
            failed.contains(&(rollout2.clone(), g2.to_owned())),
            "{failed:?}"
        );
    }
    let log = f.cp().log_text();
    assert!(
        log.matches("kind=closure-rejected").count() >= 2 * f.nodes.len(),
        "the CP did not record every refusal:\n{log}"
    );
}

// ---- scenario 9 -----------------------------------------------------------------------------

#[test]
fn compromised_cp_hand_edited_fleet_refused_at_start_and_lies_refused_by_every_agent() {
    require_nix();
    let mut summary = Summary::begin("9 compromised CP");
    let all = names(&["web-01", "web-02", "web-03"]);
    let mut f = Fleet::new(&all, canary_policy("halt", 3), json!([]));

    // The build-time fleet on the CP's disk, hand-edited: web-01 gets web-02's closure.
    // trust.json still pins CI's key, and the forge is unreachable.
    let build_time = f.pki.path("build-time/fleet.resolved.json");
    let real = std::fs::read(&build_time).unwrap();
    let mut edited: Value = serde_json::from_slice(&real).unwrap();
    let (gen1_01, gen1_02) = (f.node("web-01").gen1.clone(), f.node("web-02").gen1.clone());
    assert_eq!(edited["hosts"]["web-01"]["closureHash"], gen1_01.as_str());
    edited["hosts"]["web-01"]["closureHash"] = json!(gen1_02);
    std::fs::write(&build_time, edited.to_string()).unwrap();
    f.forge.set_down(true);
    let started = Instant::now();
    let (code, log) = Cp::run_to_exit(&f.pki, &f.forge, &f.state_dir(), &CpOptions::default());
    summary.timing("refused to start in", started.elapsed());
    assert_ne!(code, 0, "the CP started on a hand-edited fleet:\n{log}");
    assert!(log.contains("build-time artifact"), "{log}");
    assert!(log.to_lowercase().contains("signature"), "{log}");
    std::fs::write(&build_time, &real).unwrap();
    f.forge.set_down(false);

    // A CP that lies: each agent talks to it through a relay that advertises the
    // neighbour's closure (real, and signed by the cache) as its target.
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let url = f.forge.url("cache");
    let mut relays: Vec<CompromisedCp> = Vec::new();
    let count = f.nodes.len();
    for i in 0..count {
        let lie = f.nodes[(i + 1) % count].gen1.clone();
        let node = &f.nodes[i];
        let cert = node.machine.dir.join("agent-state/cert.pem");
        let evil = CompromisedCp::start(&f.pki, f.cp_port, cert, &node.host.key);
        evil.rewrite_checkin(move |v| {
            if v["target"].is_object() {
                v["target"]["closureHash"] = Value::String(lie.clone());
            }
        });
        let mut config = nixfleet_harness::agent::AgentConfig::new(
            &f.pki,
            evil.port,
            &node.host,
            &node.key_dir,
            &node.machine,
            &url,
        );
        config.poll_interval_secs = POLL_SECS;
        relays.push(evil);
        f.nodes[i].agent = Some(nixfleet_harness::agent::AgentProc::start(&config));
    }
    let lying = Instant::now();
    for node in &f.nodes {
        wait_for(&format!("{} to refuse the lie", node.name()), LONG, || {
            node.log().contains("but the signed manifest disagrees")
        });
    }
    summary.timing("lie refused by all after", lying.elapsed());
    let marks = f.log_marks();
    f.wait_checkins_since(&marks, 2, &[]);
    for node in &f.nodes {
        assert!(
            node.machine.activations().is_empty(),
            "{} switched",
            node.name()
        );
        assert_eq!(node.machine.current().as_deref(), Some(node.gen0.as_str()));
    }
    let log = f.cp().log_text();
    assert!(
        log.matches("kind=manifest-rejected").count() >= count,
        "the CP did not record every refusal:\n{log}"
    );
    drop(relays);
}
