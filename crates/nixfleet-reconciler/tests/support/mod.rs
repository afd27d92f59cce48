//! A simulated fleet around the reconciler: agents that check in, confirm, fail and roll
//! back the way SPEC.md §7 says, and a control plane that applies plans and answers
//! check-ins. Used by the property and simulation tests; seeded, so runs reproduce.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use nixfleet_proto::wire::{FailedTarget, FailureCause};
use nixfleet_proto::{
    Channel, ChannelEdge, Compliance, DisruptionBudget, Edge, FailedUnitsGate, FleetResolved,
    HealthGate, Host, HostSetEntry, ManifestBudget, ManifestWave, Meta, OnHealthFailure,
    RolloutManifest, Selector,
};
use nixfleet_reconciler::{
    apply, reconcile, Action, Attestation, Config, Delivery, HostEvent, HostState, Observed, Plan,
    RolloutState, StoredState,
};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

pub const START: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);
pub const FLEET_HASH: &str = "fleet-1";

/// SplitMix64: small, seedable, good enough to pick fleets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a host's agent will do with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Activates and confirms this long after delivery.
    Confirms { after: Duration },
    /// Activation fails this long after delivery (magic rollback, failed target).
    FailsActivation { after: Duration },
}

#[derive(Debug, Clone)]
pub struct Job {
    pub rollout_id: String,
    pub closure: String,
    pub received_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct Agent {
    /// Constant for the run: a host is either up throughout or never checks in.
    pub online: bool,
    pub closure: String,
    pub confirmed_at: Option<OffsetDateTime>,
    pub previous: Option<(String, Option<OffsetDateTime>)>,
    pub failed_targets: Vec<FailedTarget>,
    /// Failed units it shows while running a new closure.
    pub bad_units: u32,
    pub fate: Fate,
    pub job: Option<Job>,
    pub delivered: Option<Delivery>,
}

pub struct Options {
    pub hosts: usize,
    pub channels: usize,
    /// Probability that a host's activation fails or never confirms.
    pub failure_rate: f64,
    /// Probability that a host is offline for the whole run.
    pub offline_rate: f64,
    /// Hosts show failed units (the health gate) with this probability.
    pub bad_units_rate: f64,
}

pub struct World {
    pub fleet: FleetResolved,
    pub manifests: BTreeMap<String, RolloutManifest>,
    pub config: Config,
    pub now: OffsetDateTime,
    pub tick: Duration,
    pub observed: Observed,
    pub agents: BTreeMap<String, Agent>,
}

fn channel_def() -> Channel {
    Channel {
        rollout_policy: "default".into(),
        reconcile_interval_minutes: 30,
        signing_interval_minutes: 60,
        freshness_window: 1440,
        compliance: Compliance::default(),
    }
}

pub fn meta(signed_at: OffsetDateTime) -> Meta {
    Meta {
        schema_version: 1,
        signed_at: Some(signed_at),
        ci_commit: Some("r1".into()),
        signature_algorithm: None,
    }
}

fn random_selector(
    rng: &mut Rng,
    tags: &[&str],
    hosts: &[String],
    channels: &[String],
) -> Selector {
    let tag = |rng: &mut Rng| (*rng.pick(tags)).to_owned();
    match rng.below(7) {
        0 => Selector::tags([tag(rng)]),
        1 => Selector {
            tags_any: Some(vec![tag(rng), tag(rng)]),
            ..Selector::default()
        },
        2 => {
            let n = 1 + rng.below(hosts.len().min(8) as u64) as usize;
            Selector::hosts((0..n).map(|_| rng.pick(hosts).clone()).collect::<Vec<_>>())
        }
        3 => Selector {
            channel: Some(rng.pick(channels).clone()),
            ..Selector::default()
        },
        4 => Selector::all(),
        5 => Selector {
            not: Some(Box::new(Selector::tags([tag(rng)]))),
            ..Selector::default()
        },
        _ => Selector {
            and: Some(vec![
                Selector::tags([tag(rng)]),
                Selector {
                    channel: Some(rng.pick(channels).clone()),
                    ..Selector::default()
                },
            ]),
            ..Selector::default()
        },
    }
}

impl World {
    /// A random fleet: hosts with random tags spread over channels, each channel with
    /// random waves, soak times and health gate, shared budgets of every selector form,
    /// host edges and channel edges (a DAG), one release of manifests.
    pub fn random(seed: u64, options: &Options) -> World {
        let mut rng = Rng::new(seed);
        let tags = ["a", "b", "c", "d"];
        let channels: Vec<String> = (0..options.channels.max(1))
            .map(|i| format!("c{i}"))
            .collect();
        let names: Vec<String> = (0..options.hosts.max(1))
            .map(|i| format!("h{i:03}"))
            .collect();
        let mut hosts = BTreeMap::new();
        for name in &names {
            let host_tags = tags
                .iter()
                .filter(|_| rng.chance(0.3))
                .map(|t| (*t).to_owned())
                .collect();
            hosts.insert(
                name.clone(),
                Host {
                    system: "x86_64-linux".into(),
                    tags: host_tags,
                    channel: rng.pick(&channels).clone(),
                    closure_hash: Some(format!("new-{name}")),
                    pubkey: None,
                },
            );
        }
        let mut edges = Vec::new();
        for _ in 0..rng.below(names.len() as u64 / 8 + 2) {
            let before = rng.pick(&names).clone();
            let after = rng.pick(&names).clone();
            if before != after {
                edges.push(Edge {
                    before,
                    after,
                    reason: None,
                });
            }
        }
        let mut channel_edges = Vec::new();
        for i in 0..channels.len() {
            for j in i + 1..channels.len() {
                if rng.chance(0.3) {
                    channel_edges.push(ChannelEdge {
                        before: channels[i].clone(),
                        after: channels[j].clone(),
                        reason: None,
                    });
                }
            }
        }
        let mut budgets = Vec::new();
        for _ in 0..rng.below(4) {
            let selector = random_selector(&mut rng, &tags, &names, &channels);
            let (max_in_flight, max_in_flight_pct) = match rng.below(3) {
                0 => (Some(rng.below(6) as u32), None),
                1 => (None, Some(1 + rng.below(60) as u32)),
                _ => (
                    Some(1 + rng.below(5) as u32),
                    Some(1 + rng.below(60) as u32),
                ),
            };
            budgets.push(DisruptionBudget {
                selector,
                max_in_flight,
                max_in_flight_pct,
            });
        }
        let fleet = FleetResolved {
            schema_version: 1,
            hosts,
            channels: channels
                .iter()
                .map(|c| (c.clone(), channel_def()))
                .collect(),
            rollout_policies: BTreeMap::new(),
            waves: BTreeMap::new(),
            edges,
            channel_edges,
            disruption_budgets: budgets,
            meta: meta(START - Duration::minutes(10)),
        };
        let channel_local_budgets = rng.chance(0.5);
        let mut manifests = BTreeMap::new();
        for channel in &channels {
            let waves = 1 + rng.below(4) as usize;
            let soaks = [0, 5, 10, 30];
            let host_set: Vec<HostSetEntry> = fleet
                .channel_hosts(channel)
                .map(|(name, _)| HostSetEntry {
                    hostname: name.to_owned(),
                    wave_index: rng.below(waves as u64) as u32,
                    // A tenth of the hosts already run their target (unchanged closure).
                    target_closure: if rng.chance(0.1) {
                        format!("old-{name}")
                    } else {
                        format!("new-{name}")
                    },
                })
                .collect();
            let disruption_budgets = fleet
                .disruption_budgets
                .iter()
                .map(|b| ManifestBudget {
                    selector: b.selector.clone(),
                    hosts: fleet
                        .select(&b.selector)
                        .into_iter()
                        .filter(|h| !channel_local_budgets || fleet.hosts[h].channel == *channel)
                        .collect(),
                    max_in_flight: b.max_in_flight,
                    max_in_flight_pct: b.max_in_flight_pct,
                })
                .collect();
            let manifest = RolloutManifest {
                schema_version: 1,
                display_name: format!("{channel}@r1"),
                channel: channel.clone(),
                channel_ref: "r1".into(),
                fleet_resolved_hash: FLEET_HASH.into(),
                host_set,
                waves: (0..waves)
                    .map(|_| ManifestWave {
                        soak_minutes: *rng.pick(&soaks),
                    })
                    .collect(),
                health_gate: HealthGate {
                    systemd_failed_units: rng.chance(0.5).then(|| FailedUnitsGate {
                        max: rng.below(2) as u32,
                    }),
                    max_failures: rng.below(4) as u32,
                },
                on_health_failure: if rng.chance(0.5) {
                    OnHealthFailure::Halt
                } else {
                    OnHealthFailure::RollbackAndHalt
                },
                compliance_frameworks: vec![],
                disruption_budgets,
                freshness_window: Some(1440),
                introduced: None,
                meta: meta(START - Duration::minutes(10)),
                compliance: None,
            };
            manifests.insert(format!("{channel}-r1"), manifest);
        }
        let mut agents = BTreeMap::new();
        for name in &names {
            let fate = if rng.chance(options.failure_rate) {
                if rng.chance(0.5) {
                    Fate::FailsActivation {
                        after: Duration::seconds(30 + rng.below(300) as i64),
                    }
                } else {
                    // Longer than the confirm window: a confirm timeout.
                    Fate::Confirms {
                        after: Duration::minutes(30),
                    }
                }
            } else {
                Fate::Confirms {
                    after: Duration::seconds(20 + rng.below(400) as i64),
                }
            };
            agents.insert(
                name.clone(),
                Agent {
                    online: !rng.chance(options.offline_rate),
                    closure: format!("old-{name}"),
                    confirmed_at: Some(START - Duration::days(1)),
                    previous: None,
                    failed_targets: Vec::new(),
                    bad_units: if rng.chance(options.bad_units_rate) {
                        2
                    } else {
                        0
                    },
                    fate,
                    job: None,
                    delivered: None,
                },
            );
        }
        let mut world = World {
            fleet,
            manifests,
            config: Config {
                confirm_window_secs: 600,
                activation_timeout_secs: 0,
                offline_after_secs: 300,
                late_confirm_grace_secs: 0,
            },
            now: START,
            tick: Duration::seconds(60),
            observed: Observed {
                attestations_since: START - Duration::hours(1),
                hosts: BTreeMap::new(),
                stored: StoredState::default(),
            },
            agents,
        };
        // Offline hosts: half were seen long ago, half never since the start.
        for (name, agent) in &world.agents {
            if agent.online || rng.chance(0.5) {
                let seen = if agent.online {
                    START
                } else {
                    START - Duration::hours(2)
                };
                world
                    .observed
                    .hosts
                    .insert(name.clone(), attestation(agent, seen).into());
            }
        }
        world
    }

    pub fn plan(&self) -> Plan {
        self.plan_for(&self.observed)
    }

    pub fn plan_for(&self, observed: &Observed) -> Plan {
        reconcile(
            &self.fleet,
            FLEET_HASH,
            &self.manifests,
            observed,
            &self.config,
            self.now,
        )
    }

    /// One control-plane tick, then one round of agent check-ins a tick later.
    pub fn step(&mut self) -> Plan {
        let plan = self.plan();
        self.commit(&plan);
        plan
    }

    /// Applies `plan` (made at `now`), advances a tick and lets agents check in.
    pub fn commit(&mut self, plan: &Plan) {
        apply(plan, &mut self.observed.stored, self.now);
        self.now += self.tick;
        self.check_in();
    }

    /// A 1,000-host style fleet on one channel: `waves` sized by `shares` (percent), a
    /// `db` budget and a fleet-wide percentage budget, agents failing at `failure_rate`.
    pub fn staged(
        seed: u64,
        hosts: usize,
        shares: &[usize],
        soak_minutes: &[u32],
        gate: HealthGate,
        on_health_failure: OnHealthFailure,
        failure_rate: f64,
    ) -> World {
        let mut world = World::random(
            seed,
            &Options {
                hosts,
                channels: 1,
                failure_rate,
                offline_rate: 0.0,
                bad_units_rate: 0.0,
            },
        );
        let names: Vec<String> = world.fleet.hosts.keys().cloned().collect();
        for (i, name) in names.iter().enumerate() {
            let host = world.fleet.hosts.get_mut(name).expect("host");
            host.tags = if i % 10 == 0 {
                vec!["db".into()]
            } else {
                vec!["web".into()]
            };
        }
        world.fleet.edges.clear();
        let db = Selector::tags(["db"]);
        let all = Selector::all();
        world.fleet.disruption_budgets = vec![
            DisruptionBudget {
                selector: db.clone(),
                max_in_flight: Some(5),
                max_in_flight_pct: None,
            },
            DisruptionBudget {
                selector: all.clone(),
                max_in_flight: None,
                max_in_flight_pct: Some(10),
            },
        ];
        let mut bounds = Vec::new();
        let mut acc = 0;
        for share in shares {
            acc += share;
            bounds.push(hosts * acc / 100);
        }
        let host_set = names
            .iter()
            .enumerate()
            .map(|(i, name)| HostSetEntry {
                hostname: name.clone(),
                wave_index: bounds
                    .iter()
                    .position(|b| i < *b)
                    .unwrap_or(shares.len() - 1) as u32,
                target_closure: format!("new-{name}"),
            })
            .collect();
        let budgets = world
            .fleet
            .disruption_budgets
            .iter()
            .map(|b| ManifestBudget {
                selector: b.selector.clone(),
                hosts: world.fleet.select(&b.selector),
                max_in_flight: b.max_in_flight,
                max_in_flight_pct: b.max_in_flight_pct,
            })
            .collect();
        let manifest = world.manifests.get_mut("c0-r1").expect("manifest");
        manifest.host_set = host_set;
        manifest.waves = soak_minutes
            .iter()
            .map(|m| ManifestWave { soak_minutes: *m })
            .collect();
        manifest.health_gate = gate;
        manifest.on_health_failure = on_health_failure;
        manifest.disruption_budgets = budgets;
        world.tick = Duration::seconds(30);
        world
    }

    /// The target closure of `host` in rollout `rollout_id`.
    pub fn target(&self, rollout_id: &str, host: &str) -> Option<&str> {
        self.manifests
            .get(rollout_id)?
            .entry(host)
            .map(|e| e.target_closure.as_str())
    }

    fn check_in(&mut self) {
        let now = self.now;
        let window = Duration::seconds(self.config.confirm_window_secs as i64);
        let names: Vec<String> = self.agents.keys().cloned().collect();
        for name in names {
            if !self.agents[&name].online {
                continue;
            }
            // What the control plane answers: a rollback signal or a target.
            let mut answer = None;
            for (id, record) in &self.observed.stored.rollouts {
                if matches!(record.state, RolloutState::Superseded { .. }) {
                    continue;
                }
                match record.hosts.get(&name).map(|h| &h.state) {
                    Some(HostState::RollingBack) => answer = Some((id.clone(), true)),
                    Some(HostState::Dispatched) => answer = Some((id.clone(), false)),
                    _ => {}
                }
            }
            let answer = answer.map(|(id, rollback)| {
                let target = self.target(&id, &name).unwrap_or_default().to_owned();
                (id, target, rollback)
            });
            let agent = self.agents.get_mut(&name).expect("agent");
            // The job in flight finishes, or times out.
            if let Some(job) = agent.job.clone() {
                match agent.fate {
                    Fate::Confirms { after } if after < window => {
                        let at = job.received_at + after;
                        if at <= now {
                            agent.previous = Some((agent.closure.clone(), agent.confirmed_at));
                            agent.closure = job.closure.clone();
                            agent.confirmed_at = Some(at);
                            agent.job = None;
                        }
                    }
                    Fate::Confirms { .. } => {
                        let at = job.received_at + window;
                        if at <= now {
                            agent.failed_targets.push(failed(
                                &job,
                                FailureCause::ConfirmTimeout,
                                "confirm timeout",
                                at,
                            ));
                            agent.job = None;
                        }
                    }
                    Fate::FailsActivation { after } => {
                        let at = job.received_at + after;
                        if at <= now {
                            agent.failed_targets.push(failed(
                                &job,
                                FailureCause::Activation,
                                "activation failed",
                                at,
                            ));
                            agent.job = None;
                        }
                    }
                }
            }
            match answer {
                Some((id, target, true)) => {
                    if agent.closure == target {
                        if let Some((closure, confirmed_at)) = agent.previous.take() {
                            agent.closure = closure;
                            agent.confirmed_at = confirmed_at;
                        }
                    }
                    agent.job = None;
                    if !agent.failed_targets.iter().any(|f| f.rollout_id == id) {
                        agent.failed_targets.push(FailedTarget {
                            rollout_id: id,
                            closure_hash: target,
                            reason: "rollback signal".into(),
                            at: now,
                            cause: Some(FailureCause::RollbackSignal),
                        });
                    }
                }
                Some((id, target, false)) => {
                    let refused = agent.failed_targets.iter().any(|f| f.rollout_id == id);
                    let busy = agent.job.as_ref().is_some_and(|j| j.rollout_id == id);
                    if !refused && !busy && agent.closure != target {
                        agent.job = Some(Job {
                            rollout_id: id.clone(),
                            closure: target,
                            received_at: now,
                        });
                        agent.delivered = Some(Delivery {
                            rollout_id: id,
                            at: now,
                        });
                    }
                }
                None => {}
            }
            let att = attestation(agent, now);
            self.observed.hosts.insert(name, att.into());
        }
    }

    /// Attestations as they come back after a wipe: the agents' word only.
    pub fn wiped(&self) -> Observed {
        let mut observed = self.observed.clone();
        observed.stored = StoredState::default();
        for att in observed.hosts.values_mut() {
            std::sync::Arc::make_mut(att).delivered = None;
        }
        observed
    }
}

fn failed(job: &Job, cause: FailureCause, reason: &str, at: OffsetDateTime) -> FailedTarget {
    FailedTarget {
        rollout_id: job.rollout_id.clone(),
        closure_hash: job.closure.clone(),
        reason: reason.into(),
        at,
        cause: Some(cause),
    }
}

fn attestation(agent: &Agent, seen: OffsetDateTime) -> Attestation {
    let on_new = agent.closure.starts_with("new-");
    Attestation {
        last_seen: seen,
        current_closure: Some(agent.closure.clone()),
        last_confirmed_at: agent.confirmed_at,
        failed_targets: agent.failed_targets.clone(),
        failed_units: if on_new { agent.bad_units } else { 0 },
        health_at: Some(seen),
        delivered: agent.delivered.clone(),
        activation: None,
        compliance: None,
        compliance_claimed_at: None,
    }
}

/// Selectors equal up to list order are one budget.
pub fn canonical(selector: &Selector) -> Selector {
    let set = |l: &Option<Vec<String>>| {
        l.as_ref().map(|l| {
            let mut l = l.clone();
            l.sort();
            l.dedup();
            l
        })
    };
    Selector {
        tags: set(&selector.tags),
        tags_any: set(&selector.tags_any),
        hosts: set(&selector.hosts),
        channel: selector.channel.clone(),
        all: selector.all,
        not: selector.not.as_deref().map(|s| Box::new(canonical(s))),
        and: selector
            .and
            .as_ref()
            .map(|a| a.iter().map(canonical).collect()),
    }
}

/// Per budget: (hosts in flight, limit), computed independently from the stored state.
pub fn budget_usage(
    stored: &StoredState,
    manifests: &BTreeMap<String, RolloutManifest>,
) -> Vec<(Selector, u32, u32)> {
    struct Acc {
        selector: Selector,
        max: Option<u32>,
        pct: Option<u32>,
        members: BTreeSet<String>,
        in_flight: u32,
    }
    let mut budgets: Vec<Acc> = Vec::new();
    for (id, record) in &stored.rollouts {
        if matches!(record.state, RolloutState::Superseded { .. }) {
            continue;
        }
        let Some(manifest) = manifests.get(id) else {
            continue;
        };
        let mut counted: BTreeSet<(usize, &str)> = BTreeSet::new();
        for mb in &manifest.disruption_budgets {
            let selector = canonical(&mb.selector);
            let k = match budgets.iter().position(|b| b.selector == selector) {
                Some(k) => k,
                None => {
                    budgets.push(Acc {
                        selector,
                        max: None,
                        pct: None,
                        members: BTreeSet::new(),
                        in_flight: 0,
                    });
                    budgets.len() - 1
                }
            };
            let b = &mut budgets[k];
            b.max = [b.max, mb.max_in_flight].into_iter().flatten().min();
            b.pct = [b.pct, mb.max_in_flight_pct].into_iter().flatten().min();
            b.members.extend(mb.hosts.iter().cloned());
            for (host, hr) in &record.hosts {
                let in_flight = matches!(
                    hr.state,
                    HostState::Dispatched | HostState::ConfirmWindow { .. } | HostState::Healthy
                );
                if in_flight
                    && mb.hosts.binary_search(host).is_ok()
                    && manifest.entry(host).is_some()
                    && counted.insert((k, host.as_str()))
                {
                    b.in_flight += 1;
                }
            }
        }
    }
    budgets
        .into_iter()
        .map(|b| {
            let mut limit = u32::MAX;
            if let Some(m) = b.max {
                limit = limit.min(m);
            }
            if let Some(p) = b.pct {
                limit = limit.min(((p as usize * b.members.len()) / 100).max(1) as u32);
            }
            (b.selector, b.in_flight, limit)
        })
        .collect()
}

/// The dispatches of a plan: (rollout, host, wave).
pub fn dispatches(plan: &Plan) -> Vec<(&str, &str, u32)> {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Host {
                event: HostEvent::Dispatch { wave },
                rollout,
                host,
            } => Some((rollout.as_str(), host.as_str(), *wave)),
            _ => None,
        })
        .collect()
}

/// Every invariant one tick must keep, given the state before it and the plan it made.
pub fn check_tick(world: &World, plan: &Plan) -> Result<(), String> {
    let before = &world.observed.stored;
    let again = world.plan();
    if &again != plan {
        return Err("the same input gave a different plan".into());
    }
    let mut after = before.clone();
    apply(plan, &mut after, world.now);
    let mut twice = after.clone();
    apply(plan, &mut twice, world.now);
    if twice != after {
        return Err("applying the plan twice changed the state again".into());
    }
    let mut next = world.observed.clone();
    next.stored = after.clone();
    let replan = world.plan_for(&next);
    if !replan.actions.is_empty() {
        return Err(format!(
            "reconciling again after applying the plan still decides {:?}",
            replan.actions
        ));
    }
    for (rollout, host, wave) in dispatches(plan) {
        let was = before
            .rollouts
            .get(rollout)
            .and_then(|r| r.hosts.get(host))
            .map_or(HostState::Queued, |h| h.state.clone());
        if was != HostState::Queued {
            return Err(format!(
                "{host} dispatched again in {rollout} (was {was:?})"
            ));
        }
        let state = after.rollouts.get(rollout).map(|r| &r.state);
        let before_state = before.rollouts.get(rollout).map(|r| &r.state);
        if matches!(
            before_state,
            Some(
                RolloutState::Halted { .. }
                    | RolloutState::Reverting { .. }
                    | RolloutState::Reverted { .. }
            )
        ) {
            return Err(format!("halted rollout {rollout} dispatched {host}"));
        }
        match state {
            Some(RolloutState::Executing { wave: current, .. }) if *current >= wave => {}
            Some(RolloutState::Converged) => {}
            other => {
                return Err(format!(
                    "{host} of wave {wave} dispatched while {rollout} is {other:?}"
                ))
            }
        }
        let target = world.target(rollout, host).unwrap_or_default();
        if world
            .observed
            .hosts
            .get(host)
            .and_then(|a| a.current_closure.as_deref())
            == Some(target)
        {
            return Err(format!(
                "{host} dispatched although it already runs its target"
            ));
        }
        let manifest = &world.manifests[rollout];
        for edge in world.fleet.edges.iter().filter(|e| e.after == host) {
            if manifest.entry(&edge.before).is_none() {
                continue;
            }
            let before_state = after.rollouts[rollout]
                .hosts
                .get(&edge.before)
                .map(|h| &h.state);
            if !matches!(before_state, Some(HostState::Soaked | HostState::Converged)) {
                return Err(format!(
                    "{host} dispatched before its edge predecessor {} was soaked ({before_state:?})",
                    edge.before
                ));
            }
        }
    }
    let dispatched: BTreeSet<(&str, &str)> = dispatches(plan)
        .into_iter()
        .map(|(r, h, _)| (r, h))
        .collect();
    if !dispatched.is_empty() {
        for (selector, in_flight, limit) in budget_usage(&after, &world.manifests) {
            let touched = after.rollouts.iter().any(|(id, _)| {
                world.manifests.get(id).is_some_and(|m| {
                    m.disruption_budgets.iter().any(|b| {
                        canonical(&b.selector) == selector
                            && b.hosts
                                .iter()
                                .any(|h| dispatched.contains(&(id.as_str(), h.as_str())))
                    })
                })
            });
            if touched && in_flight > limit {
                return Err(format!(
                    "budget {selector:?} has {in_flight} in flight, limit {limit}"
                ));
            }
        }
    }
    for (id, record) in &after.rollouts {
        if matches!(
            record.state,
            RolloutState::Halted { .. }
                | RolloutState::Reverting { .. }
                | RolloutState::Reverted { .. }
        ) && dispatches(plan).iter().any(|(r, _, _)| r == id)
        {
            return Err(format!("{id} halted but dispatched in the same tick"));
        }
    }
    Ok(())
}
