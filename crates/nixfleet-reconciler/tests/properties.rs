//! Invariants over random fleets (1–500 hosts, 1–5 channels, random waves, tags, budgets
//! of every selector form, host and channel edges, agents that confirm, fail or stay
//! offline): every tick is deterministic, a fixpoint once applied, never dispatches a
//! host twice, past a budget, ahead of its wave or edge, or out of a halted rollout; and a
//! wipe rebuilds the same wave and halt from attestations alone.

mod support;

use nixfleet_proto::wire::FailedTarget;
use nixfleet_reconciler::{apply, Action, Delivery, HostEvent, RolloutState, StoredState};
use proptest::prelude::*;
use support::{check_tick, dispatches, Options, Rng, World};
use time::Duration;

fn options(
    hosts: usize,
    channels: usize,
    failure_rate: f64,
    offline_rate: f64,
    bad_units_rate: f64,
) -> Options {
    Options {
        hosts,
        channels,
        failure_rate,
        offline_rate,
        bad_units_rate,
    }
}

/// Scrambles some attestations into states no well-behaved agent produces: other
/// closures, confirms in the future, failures for any rollout, stale deliveries.
fn scramble(world: &mut World, seed: u64, share: f64) {
    let mut rng = Rng::new(seed);
    let rollouts: Vec<String> = world.manifests.keys().cloned().collect();
    let now = world.now;
    let names: Vec<String> = world.fleet.hosts.keys().cloned().collect();
    for name in names {
        if !rng.chance(share) {
            continue;
        }
        let rollout = rng.pick(&rollouts).clone();
        let target = world.target(&rollout, &name).map(str::to_owned);
        let offset = |rng: &mut Rng| Duration::seconds(rng.below(7200) as i64 - 3600);
        let att = world.observed.hosts.entry(name.clone()).or_insert_with(|| {
            std::sync::Arc::new(nixfleet_reconciler::Attestation {
                last_seen: now,
                current_closure: None,
                last_confirmed_at: None,
                failed_targets: vec![],
                failed_units: 0,
                health_at: None,
                delivered: None,
                activation: None,
                compliance: None,
                compliance_claimed_at: None,
            })
        });
        let att = std::sync::Arc::make_mut(att);
        att.last_seen = now - Duration::seconds(rng.below(900) as i64);
        att.health_at = rng.chance(0.9).then_some(att.last_seen);
        att.current_closure = match rng.below(3) {
            0 => target.clone(),
            1 => Some(format!("old-{name}")),
            _ => Some("something-else".into()),
        };
        att.last_confirmed_at = rng.chance(0.6).then(|| now + offset(&mut rng));
        att.failed_units = rng.below(3) as u32;
        if rng.chance(0.2) {
            att.failed_targets.push(FailedTarget {
                rollout_id: rollout.clone(),
                closure_hash: target.unwrap_or_default(),
                reason: "scrambled".into(),
                at: now + offset(&mut rng),
                cause: None,
            });
        }
        if rng.chance(0.3) {
            att.delivered = Some(Delivery {
                rollout_id: rollout,
                at: now + offset(&mut rng),
            });
        }
    }
}

/// 40 cases by default; `PROPTEST_CASES=2000` for a longer hunt.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(40);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_tick_keeps_the_invariants(
        seed in any::<u64>(),
        hosts in 1usize..=500,
        channels in 1usize..=5,
        ticks in 1usize..60,
        failure_rate in 0.0f64..0.3,
        offline_rate in 0.0f64..0.2,
        bad_units_rate in 0.0f64..0.2,
    ) {
        let mut world = World::random(seed, &options(hosts, channels, failure_rate, offline_rate, bad_units_rate));
        for _ in 0..ticks {
            let plan = world.plan();
            check_tick(&world, &plan).map_err(TestCaseError::fail)?;
            world.commit(&plan);
        }
    }

    #[test]
    fn invariants_hold_for_arbitrary_attestations(
        seed in any::<u64>(),
        hosts in 1usize..=500,
        channels in 1usize..=5,
        ticks in 0usize..30,
        share in 0.0f64..1.0,
    ) {
        let mut world = World::random(seed, &options(hosts, channels, 0.1, 0.1, 0.1));
        for _ in 0..ticks {
            world.step();
        }
        scramble(&mut world, seed ^ 0x5eed, share);
        let plan = world.plan();
        check_tick(&world, &plan).map_err(TestCaseError::fail)?;
        // And from nothing stored at all.
        world.observed.stored = StoredState::default();
        let plan = world.plan();
        check_tick(&world, &plan).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn wipe_rebuilds_the_same_wave_and_halt(
        seed in any::<u64>(),
        hosts in 1usize..=500,
        channels in 1usize..=5,
        ticks in 0usize..80,
        failure_rate in 0.0f64..0.3,
        offline_rate in 0.0f64..0.2,
    ) {
        // Failures reach the control plane as failed targets (no failed-unit health gate,
        // see the crate docs on what a wipe cannot recover).
        let mut world = World::random(seed, &options(hosts, channels, failure_rate, offline_rate, 0.0));
        for _ in 0..ticks {
            world.step();
        }
        let live_plan = world.plan();
        let mut live = world.observed.stored.clone();
        apply(&live_plan, &mut live, world.now);

        let wiped = world.wiped();
        let rebuild_plan = world.plan_for(&wiped);
        let mut rebuilt = StoredState::default();
        apply(&rebuild_plan, &mut rebuilt, world.now);

        for (id, record) in &live.rollouts {
            let again = rebuilt.rollouts.get(id).map(|r| &r.state);
            let same = match (&record.state, again) {
                (RolloutState::Superseded { .. }, _) => true,
                (a, Some(b)) => a == b,
                (_, None) => false,
            };
            prop_assert!(same, "{}: live {:?}, rebuilt {:?}", id, record.state, again);
        }
        for (rollout, host, _) in dispatches(&rebuild_plan) {
            let target = world.target(rollout, host);
            let current = wiped.hosts.get(host).and_then(|a| a.current_closure.as_deref());
            prop_assert!(current != target, "{} re-dispatched although on its target", host);
        }
        for action in &rebuild_plan.actions {
            if let Action::Host { event: HostEvent::Rollback, rollout, host } = action {
                let live_state = &live.rollouts[rollout].state;
                prop_assert!(
                    matches!(live_state, RolloutState::Reverting { .. } | RolloutState::Reverted { .. }),
                    "{} told to roll back after the wipe, but {} is {:?}", host, rollout, live_state
                );
            }
        }
    }
}
