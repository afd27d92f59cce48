//! A 1,000-host fleet driven through a 3-wave rollout, tick by tick: agents confirm after
//! random delays and 2% of them fail. The rollout converges, or halts exactly as its
//! policy says, and no budget is ever exceeded.

mod support;

use std::collections::BTreeSet;

use nixfleet_proto::{HealthGate, OnHealthFailure};
use nixfleet_reconciler::{HostState, RolloutState};
use support::{budget_usage, dispatches, Fate, World};

const HOSTS: usize = 1000;
const SEED: u64 = 0x6e69_7866_6c65_6574;
const ROLLOUT: &str = "c0-r1";

fn world(max_failures: u32, on_health_failure: OnHealthFailure) -> World {
    World::staged(
        SEED,
        HOSTS,
        &[5, 30, 65],
        &[10, 10, 0],
        HealthGate {
            systemd_failed_units: None,
            max_failures,
        },
        on_health_failure,
        0.02,
    )
}

fn wave_of(world: &World, host: &str) -> u32 {
    world.manifests[ROLLOUT]
        .entry(host)
        .expect("member")
        .wave_index
}

/// Hosts whose agent will fail, per wave.
fn doomed_per_wave(world: &World) -> Vec<usize> {
    let mut per_wave = vec![0; 3];
    for (name, agent) in &world.agents {
        let doomed = match agent.fate {
            Fate::FailsActivation { .. } => true,
            Fate::Confirms { after } => after.whole_seconds() >= 600,
        };
        if doomed {
            per_wave[wave_of(world, name) as usize] += 1;
        }
    }
    per_wave
}

/// Runs until the rollout is terminal (or a generous tick limit), checking budgets and
/// that no dispatch happens out of order. Returns the ticks taken.
fn drive(world: &mut World) -> usize {
    let mut halted_at = None;
    for tick in 0..2000 {
        let state = world
            .observed
            .stored
            .rollouts
            .get(ROLLOUT)
            .map(|r| r.state.clone());
        if matches!(
            state,
            Some(
                RolloutState::Converged
                    | RolloutState::Halted { .. }
                    | RolloutState::Reverted { .. }
            )
        ) {
            // Let hosts that were mid-activation finish and be dealt with; a finished
            // rollout only dispatches if it converged (hosts that were offline).
            for _ in 0..40 {
                let plan = world.step();
                let converged = state == Some(RolloutState::Converged);
                assert!(converged || dispatches(&plan).is_empty());
            }
            return tick;
        }
        let plan = world.step();
        for (_, host, wave) in dispatches(&plan) {
            assert!(halted_at.is_none(), "{host} dispatched after the halt");
            let current = match &world.observed.stored.rollouts[ROLLOUT].state {
                RolloutState::Executing { wave, .. } => *wave,
                RolloutState::Converged => 2,
                other => panic!("{host} dispatched while {other:?}"),
            };
            assert!(
                wave <= current,
                "{host} of wave {wave} dispatched in wave {current}"
            );
        }
        if matches!(
            world.observed.stored.rollouts[ROLLOUT].state,
            RolloutState::Halted { .. } | RolloutState::Reverting { .. }
        ) {
            halted_at.get_or_insert(tick);
        }
        for (selector, in_flight, limit) in budget_usage(&world.observed.stored, &world.manifests) {
            assert!(
                in_flight <= limit,
                "tick {tick}: budget {selector:?} has {in_flight} in flight, limit {limit}"
            );
        }
    }
    panic!("the rollout did not finish in 2000 ticks");
}

#[test]
fn rollout_converges_when_failures_stay_within_the_gate() {
    let mut world = world(30, OnHealthFailure::Halt);
    let doomed = doomed_per_wave(&world);
    assert!(
        doomed.iter().sum::<usize>() > 0,
        "the seed should make some hosts fail"
    );
    assert!(doomed.iter().all(|d| *d <= 30));
    let ticks = drive(&mut world);
    let record = &world.observed.stored.rollouts[ROLLOUT];
    assert_eq!(record.state, RolloutState::Converged, "after {ticks} ticks");
    let mut failed = 0;
    for name in world.agents.keys() {
        match record.hosts.get(name).map(|h| &h.state) {
            Some(HostState::Converged) => {}
            Some(HostState::Failed { .. }) => failed += 1,
            other => panic!("{name} ended {other:?}"),
        }
    }
    assert_eq!(failed, doomed.iter().sum::<usize>());
}

#[test]
fn rollout_halts_in_the_first_wave_over_the_gate() {
    let max_failures = 1;
    let mut world = world(max_failures, OnHealthFailure::Halt);
    let doomed = doomed_per_wave(&world);
    let expected_wave = doomed
        .iter()
        .position(|d| *d > max_failures as usize)
        .expect("the seed should trip the gate") as u32;
    drive(&mut world);
    let record = &world.observed.stored.rollouts[ROLLOUT];
    match record.state {
        RolloutState::Halted { wave, failures } => {
            assert_eq!(wave, expected_wave);
            assert!(failures > max_failures);
        }
        ref other => panic!("expected a halt, got {other:?}"),
    }
    // Nothing of a later wave was ever dispatched.
    for (name, hr) in &record.hosts {
        if wave_of(&world, name) > expected_wave {
            assert!(
                hr.dispatched_at.is_none(),
                "{name} dispatched past the halt"
            );
        }
    }
}

#[test]
fn rollback_and_halt_reverts_every_host_that_activated() {
    let max_failures = 1;
    let mut world = world(max_failures, OnHealthFailure::RollbackAndHalt);
    let doomed = doomed_per_wave(&world);
    let expected_wave = doomed
        .iter()
        .position(|d| *d > max_failures as usize)
        .expect("the seed should trip the gate") as u32;
    drive(&mut world);
    let record = &world.observed.stored.rollouts[ROLLOUT];
    match record.state {
        RolloutState::Reverted { wave, failures } => {
            assert_eq!(wave, expected_wave);
            assert!(failures > max_failures);
        }
        ref other => panic!("expected a completed revert, got {other:?}"),
    }
    let mut reverted = BTreeSet::new();
    for (name, agent) in &world.agents {
        assert!(
            !agent.closure.starts_with("new-"),
            "{name} still runs the rolled-back closure"
        );
        if record.hosts.get(name).map(|h| &h.state) == Some(&HostState::Reverted) {
            reverted.insert(name);
        }
    }
    assert!(
        !reverted.is_empty(),
        "hosts of earlier waves were rolled back"
    );
}
