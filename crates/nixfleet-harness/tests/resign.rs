//! Scenario 15: CI re-signs the current release every few seconds (a short freshness
//! window makes that necessary) while a rollout runs, halts, survives a control-plane
//! wipe and is fixed. A re-sign keeps the rollout: the halted rollout stays halted, the
//! closure that failed on the canary is never sent to it again, and nothing goes stale.

mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleet::*;
use nixfleet_harness::nix::delete_from_store;
use nixfleet_harness::*;
use serde_json::{json, Value};
use time::OffsetDateTime;

const COMMIT2: &str = "2222222222222222222222222222222222222222";
const COMMIT3: &str = "3333333333333333333333333333333333333333";
/// CI signs again this often: many re-signs within the channel's 1-minute interval.
const RESIGN_EVERY: Duration = Duration::from_millis(2500);

/// What CI signs: a closure for every host, as `commit`.
struct Release {
    closures: Value,
    commit: String,
}

struct CiState {
    current: Release,
    /// The rollout ids of `stable` that each commit was published under.
    ids: BTreeMap<String, BTreeSet<String>>,
}

struct Ci {
    publisher: Publisher,
    state: Mutex<CiState>,
    resigns: AtomicUsize,
    stop: AtomicBool,
}

impl Ci {
    fn lock(&self) -> MutexGuard<'_, CiState> {
        // A panic while the lock was held must not hide the failure that caused it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Signs and publishes the current release; the lock serialises every release.
    fn sign(&self, state: &mut CiState) -> String {
        let Release { closures, commit } = &state.current;
        let id = self.publisher.publish(closures, commit);
        state
            .ids
            .entry(commit.clone())
            .or_default()
            .insert(id.clone());
        id
    }
}

/// The CI thread re-signing the current release; stopped and joined when dropped, also
/// when the test panics.
struct Resigner {
    ci: Arc<Ci>,
    thread: Option<JoinHandle<()>>,
}

impl Resigner {
    fn start(publisher: Publisher, first: Release, first_id: &str) -> Resigner {
        let ids = BTreeMap::from([(first.commit.clone(), BTreeSet::from([first_id.to_owned()]))]);
        let ci = Arc::new(Ci {
            publisher,
            state: Mutex::new(CiState {
                current: first,
                ids,
            }),
            resigns: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let shared = ci.clone();
        let thread = std::thread::spawn(move || loop {
            let next = Instant::now() + RESIGN_EVERY;
            while Instant::now() < next {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut state = shared.lock();
            shared.sign(&mut state);
            shared.resigns.fetch_add(1, Ordering::SeqCst);
        });
        Resigner {
            ci,
            thread: Some(thread),
        }
    }

    /// Publishes `release` now and re-signs it from then on; returns its rollout id.
    fn release(&self, release: Release) -> String {
        let mut state = self.ci.lock();
        state.current = release;
        self.ci.sign(&mut state)
    }

    /// Re-signs so far; fails the test if the thread died (a release failed).
    fn resigns(&self) -> usize {
        assert!(
            !self.thread.as_ref().is_some_and(|t| t.is_finished()),
            "the re-signing thread stopped (see its panic above)"
        );
        self.ci.resigns.load(Ordering::SeqCst)
    }

    fn wait_resigns(&self, n: usize, what: &str) {
        wait_for(&format!("{n} re-signs {what}"), LONG, || {
            self.resigns() >= n
        });
    }

    fn ids(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.ci.lock().ids.clone()
    }
}

impl Drop for Resigner {
    fn drop(&mut self) {
        self.ci.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let died = thread.join().is_err();
            if died && !std::thread::panicking() {
                panic!("the re-signing thread panicked");
            }
        }
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Builds generation `generation` of every host, signs it into the cache and removes it
/// from the store (agents must fetch it); returns {host: closure}.
fn build_generation(f: &Fleet, generation: u32) -> BTreeMap<String, String> {
    f.nodes
        .iter()
        .map(|node| {
            let closure = node
                .machine
                .build(&format!("nixos-system-{}-{generation}", node.name()));
            f.cache.push(&closure);
            delete_from_store(&closure);
            (node.name().to_owned(), closure)
        })
        .collect()
}

fn release(closures: &BTreeMap<String, String>, commit: &str) -> Release {
    Release {
        closures: json!(closures),
        commit: commit.to_owned(),
    }
}

/// The rollouts of channel `stable` in a rollout list (the API's or the CLI's).
fn of_stable(list: &Value) -> Vec<Value> {
    list.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["channel"] == "stable")
        .cloned()
        .collect()
}

/// The rollouts of `stable` as `GET /v1/rollouts` lists them.
fn stable_rollouts(f: &Fleet) -> Vec<Value> {
    of_stable(&f.operator_get("/v1/rollouts").json())
}

/// Rollout `id`'s entry in a rollout list, or null.
fn entry_of(list: &[Value], id: &str) -> Value {
    list.iter()
        .find(|r| r["rollout_id"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

fn state_of(list: &[Value], id: &str) -> Value {
    entry_of(list, id)["state"].clone()
}

/// One rollout per intent: every listed rollout is one of `intents`' ids, each once.
fn assert_one_rollout_per_intent(list: &[Value], intents: &[&str], when: &str) {
    let ids: Vec<&str> = list
        .iter()
        .map(|r| r["rollout_id"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "{when}: a rollout listed twice: {list:#?}"
    );
    assert!(
        unique.iter().all(|id| intents.contains(id)),
        "{when}: rollouts other than one per intent {intents:?}: {list:#?}"
    );
}

/// Waits until rollout `intents.last()` is in a state `done` accepts, or a rollout that
/// is none of `intents` appears (a re-sign opened one); then asserts neither happened
/// wrongly.
fn wait_rollout(f: &Fleet, intents: &[&str], what: &str, done: impl Fn(&Value) -> bool) {
    let id = *intents.last().unwrap();
    let foreign = |list: &[Value]| {
        list.iter()
            .any(|r| !intents.contains(&r["rollout_id"].as_str().unwrap_or("")))
    };
    wait_for(what, LONG, || {
        let list = stable_rollouts(f);
        done(&state_of(&list, id)) || foreign(&list)
    });
    let list = stable_rollouts(f);
    assert_one_rollout_per_intent(&list, intents, what);
    assert!(done(&state_of(&list, id)), "{what}: {list:#?}");
}

/// `meta.signedAt` of the manifest the CP serves for rollout `id`.
fn served_signed_at(f: &Fleet, id: &str) -> OffsetDateTime {
    let reply = f.operator_get(&format!("/v1/rollouts/{id}"));
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    OffsetDateTime::parse(
        reply.json()["meta"]["signedAt"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
}

/// `nixfleet rollout list --json` as an operator, for channel `stable`.
fn cli_rollout_list(f: &Fleet) -> Vec<Value> {
    let out = Command::new(bin("nixfleet"))
        .args(["rollout", "list", "--json"])
        .env("NIXFLEET_URL", format!("https://localhost:{}", f.cp_port))
        .env("NIXFLEET_CA_CERT", f.pki.path("etc/ca.pem"))
        .env("NIXFLEET_CERT", f.pki.path("operator/operator-cert.pem"))
        .env("NIXFLEET_KEY", f.pki.path("operator/operator-key.pem"))
        .env("XDG_CONFIG_HOME", f.pki.path("no-config"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nixfleet rollout list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    of_stable(&serde_json::from_slice(&out.stdout).unwrap())
}

/// `fleet_signed_at` as the CP's /healthz reports it: the fleet it installed.
fn cp_fleet_signed_at(f: &Fleet) -> Option<OffsetDateTime> {
    let health = f.operator_get("/healthz").json();
    OffsetDateTime::parse(
        health["fleet_signed_at"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
}

/// Waits until the CP has installed a fleet CI signed after `after`: it took a re-sign.
fn wait_fleet_signed_after(f: &Fleet, after: OffsetDateTime) {
    wait_for("the CP to install a re-signed fleet", LONG, || {
        cp_fleet_signed_at(f).is_some_and(|t| t > after)
    });
}

/// The halted gen2 rollout, and what must hold while CI re-signs it.
struct Halt<'a> {
    /// canary-01's gen2 closure, whose switch fails.
    bad: &'a str,
    id: &'a str,
    state: &'a Value,
    /// The rollout ids of the intents released so far.
    intents: &'a [&'a str],
}

impl Halt<'_> {
    /// Since `marks`: the failed closure was not sent to the canary again, no web host got
    /// gen2, no agent was told to act, the rollout is as halted as before, and the
    /// operator sees one rollout per intent (API and CLI).
    fn assert_held(&self, f: &Fleet, marks: &[usize], when: &str) {
        let canary = f.node("canary-01");
        assert_eq!(
            count(&canary.machine.activations(), self.bad),
            1,
            "{when}: the failed closure was sent to the canary again: {:?}",
            canary.machine.activations()
        );
        for node in f.nodes.iter().filter(|n| n.name() != "canary-01") {
            assert_eq!(
                node.machine.activations(),
                vec![node.gen1.clone()],
                "{when}: {} activated more than gen1",
                node.name()
            );
        }
        for (node, mark) in f.nodes.iter().zip(marks) {
            let after = &node.log()[*mark..];
            for line in after.lines().filter(|l| l.contains("checked in")) {
                assert!(
                    line.contains("target=None") && line.contains("rollback=None"),
                    "{when}: {} told to act: {line}",
                    node.name()
                );
            }
            assert!(
                !after.contains("switching to"),
                "{when}: {} switched:\n{after}",
                node.name()
            );
        }
        let list = stable_rollouts(f);
        assert_eq!(&state_of(&list, self.id), self.state, "{when}: {list:#?}");
        assert_one_rollout_per_intent(&list, self.intents, when);
        assert_one_rollout_per_intent(
            &cli_rollout_list(f),
            self.intents,
            &format!("nixfleet rollout list {when}"),
        );
    }
}

fn count(list: &[String], closure: &str) -> usize {
    list.iter().filter(|c| *c == closure).count()
}

/// Nothing was offered that an agent had to refuse, and nothing went stale.
fn assert_nothing_stale_or_refused(f: &Fleet, cp_logs: &[String]) {
    for node in &f.nodes {
        let log = node.log();
        for line in log.lines() {
            let lower = line.to_lowercase();
            assert!(!lower.contains("stale"), "{}: {line}", node.name());
            for bad in [
                "refused target",
                "refused, nothing activated",
                "already failed here",
            ] {
                assert!(!line.contains(bad), "{}: {line}", node.name());
            }
        }
    }
    for log in cp_logs {
        for bad in [
            "is stale",
            "kind=stale-target",
            "kind=manifest-rejected",
            "kind=closure-rejected",
        ] {
            let hit = log.lines().find(|l| l.contains(bad));
            assert!(hit.is_none(), "control plane: {}", hit.unwrap_or_default());
        }
    }
}

#[test]
fn re_signs_keep_the_rollout_halted_across_a_wipe_and_never_resend_a_failed_closure() {
    require_nix();
    let mut summary = Summary::begin("15 re-sign");
    let all = names(&["canary-01", "web-01", "web-02", "web-03"]);
    // A 2-minute freshness window: without CI signing again, the release goes stale
    // during the scenario.
    let mut f = Fleet::new_with(&all, canary_policy("halt", 0), json!([]), |fleet| {
        fleet["channels"]["stable"]["signingIntervalMinutes"] = json!(1);
        fleet["channels"]["stable"]["freshnessWindow"] = json!(2);
    });
    let gen1_id = f.rollout.clone();
    let gen1: BTreeMap<String, String> = f
        .nodes
        .iter()
        .map(|n| (n.name().to_owned(), n.gen1.clone()))
        .collect();
    // Declared after the fleet, so it stops before the fleet's forge and directory go.
    let ci = Resigner::start(f.publisher(), release(&gen1, COMMIT), &gen1_id);

    let gen2 = build_generation(&f, 2);
    let gen3 = build_generation(&f, 3);
    // canary-01's gen2 fails to switch: the agent rolls back to gen1 by itself.
    let bad = gen2["canary-01"].clone();
    f.node("canary-01")
        .machine
        .set("fail", "nixos-system-canary-01-2", true);

    // gen1 rolls out through the canary wave and converges, re-signed all along.
    f.spawn_cp();
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let started = Instant::now();
    f.start_agents();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    f.wait_confirmed(&all_refs);
    wait_rollout(&f, &[gen1_id.as_str()], "gen1 to converge", |s| {
        s == "converged"
    });
    summary.timing("gen1 converged after", started.elapsed());

    // gen2: the canary fails and the rollout halts before any web host is told.
    let gen2_id = ci.release(release(&gen2, COMMIT2));
    assert_ne!(gen2_id, gen1_id, "a new intent keeps the old rollout id");
    let published = Instant::now();
    let canary = f.node("canary-01");
    wait_for("the canary to roll back from gen2", LONG, || {
        canary.log().contains(&format!("rolled back from {bad}"))
    });
    let intents = [gen1_id.as_str(), gen2_id.as_str()];
    wait_rollout(&f, &intents, "gen2 to halt", |s| s.get("halted").is_some());
    summary.timing("gen2 halted after", published.elapsed());
    let halted = state_of(&stable_rollouts(&f), &gen2_id);

    // CI keeps re-signing gen2: the CP takes the new signatures, and nothing moves.
    let marks = f.log_marks();
    let held = Instant::now();
    let served = served_signed_at(&f, &gen2_id);
    let from = ci.resigns();
    ci.wait_resigns(from + 5, "of gen2 while halted");
    wait_fleet_signed_after(&f, served);
    f.wait_checkins_since(&marks, 2, &[]);
    summary.timing(
        &format!("halt held over {} re-signs", ci.resigns() - from),
        held.elapsed(),
    );
    let halt = Halt {
        bad: &bad,
        id: &gen2_id,
        state: &halted,
        intents: &intents,
    };
    halt.assert_held(&f, &marks, "while re-signed");
    // Both intents, and nothing else: the re-signs opened no rollout.
    let (api, cli) = (stable_rollouts(&f), cli_rollout_list(&f));
    assert_eq!(api.len(), 2, "{api:#?}");
    assert_eq!(cli.len(), 2, "nixfleet rollout list: {cli:#?}");
    wait_for("the CP to serve the newest signature of gen2", LONG, || {
        served_signed_at(&f, &gen2_id) > served
    });
    // Provenance: the operator sees when the intent was first released and the latest
    // re-sign, from the signed manifest.
    let entry = entry_of(&stable_rollouts(&f), &gen2_id);
    let signed = |k: &str| {
        OffsetDateTime::parse(
            entry[k]["signed_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(signed("introduced") < signed("latest"), "{entry:#}");
    assert_eq!(entry["introduced"]["ci_commit"], COMMIT2, "{entry:#}");

    // The runbook's wipe, with CI still re-signing: the halt is rebuilt from the agents'
    // attestations and holds.
    let old_log = f.cp().log.clone();
    let marks = f.log_marks();
    let restarted = wipe_and_restart(&mut f);
    let wiped_at = OffsetDateTime::now_utc();
    let from = ci.resigns();
    let mut cp_logs = vec![std::fs::read_to_string(old_log).unwrap()];
    f.cp.as_mut().unwrap().wait_ready(&f.pki);
    let expected: BTreeSet<String> = all.iter().cloned().collect();
    let log = f.cp().log.clone();
    wait_for("every agent to check in again", LONG, || {
        checked_in(&log) == expected
    });
    wait_rollout(
        &f,
        &intents,
        "gen2 to be halted again after the wipe",
        |s| *s == halted,
    );
    summary.timing("halt rebuilt after the wipe", restarted.elapsed());
    ci.wait_resigns(from + 5, "of gen2 after the wipe");
    wait_fleet_signed_after(&f, wiped_at);
    f.wait_checkins_since(&marks, 3, &[]);
    halt.assert_held(&f, &marks, "after the wipe");

    // The fix: gen3 everywhere, re-signed from now on, converges.
    let gen3_id = ci.release(release(&gen3, COMMIT3));
    let fixed = Instant::now();
    for node in &f.nodes {
        let closure = &gen3[node.name()];
        wait_for(&format!("{} to confirm gen3", node.name()), LONG, || {
            node.log().contains(&format!("confirm of {closure}"))
        });
    }
    let intents = [gen1_id.as_str(), gen2_id.as_str(), gen3_id.as_str()];
    wait_rollout(&f, &intents, "gen3 to converge", |s| s == "converged");
    summary.timing("gen3 converged after the fix", fixed.elapsed());
    for node in &f.nodes {
        let activations = node.machine.activations();
        let closure = gen3[node.name()].as_str();
        assert_eq!(activations.last().map(String::as_str), Some(closure));
        assert_eq!(node.machine.current().as_deref(), Some(closure));
        if node.name() == "canary-01" {
            assert_eq!(count(&activations, &bad), 1, "{activations:?}");
        } else {
            assert_eq!(activations, vec![node.gen1.clone(), closure.to_owned()]);
        }
    }

    // Every re-sign of a release kept its rollout id.
    let ids = ci.ids();
    let expected_ids = BTreeMap::from([
        (COMMIT.to_owned(), BTreeSet::from([gen1_id.clone()])),
        (COMMIT2.to_owned(), BTreeSet::from([gen2_id.clone()])),
        (COMMIT3.to_owned(), BTreeSet::from([gen3_id.clone()])),
    ]);
    assert_eq!(ids, expected_ids, "a re-sign changed a rollout id");
    cp_logs.push(f.cp().log_text());
    assert_nothing_stale_or_refused(&f, &cp_logs);
    summary.timing(
        &format!("{} re-signs in all, over", ci.resigns()),
        started.elapsed(),
    );
}
