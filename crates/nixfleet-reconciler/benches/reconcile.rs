//! One reconcile tick over 100,000 hosts in 20 channels, each with an active rollout
//! mid-way (earlier waves soaked, the current wave dispatching, soaking and confirming,
//! later waves queued), shared budgets, host edges and a few failures.
//!
//! `cargo bench -p nixfleet-reconciler`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use nixfleet_proto::wire::FailedTarget;
use nixfleet_proto::{
    Channel, Compliance, DisruptionBudget, Edge, FleetResolved, HealthGate, Host, HostSetEntry,
    ManifestBudget, ManifestWave, Meta, OnHealthFailure, RolloutManifest, Selector,
};
use nixfleet_reconciler::{
    reconcile, Attestation, Config, Delivery, HostRecord, HostState, Observed, RolloutRecord,
    RolloutState, StoredState, WavePhase,
};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const HOSTS: usize = 100_000;
const CHANNELS: usize = 20;
const NOW: OffsetDateTime = datetime!(2026-11-27 12:00:00 UTC);
/// Cumulative wave boundaries, in percent of a channel's hosts.
const WAVES: [usize; 4] = [5, 20, 50, 100];

struct Input {
    fleet: FleetResolved,
    manifests: BTreeMap<String, RolloutManifest>,
    observed: Observed,
    config: Config,
}

fn meta() -> Meta {
    Meta {
        schema_version: 1,
        signed_at: Some(NOW - Duration::hours(3)),
        ci_commit: Some("c2".into()),
        signature_algorithm: None,
    }
}

fn input() -> Input {
    let channel_of = |i: usize| format!("c{:02}", i % CHANNELS);
    let name = |i: usize| format!("h{i:06}");
    let mut hosts = BTreeMap::new();
    for i in 0..HOSTS {
        let mut tags = vec![if i % 10 == 0 { "db" } else { "web" }.to_owned()];
        tags.push(format!("rack{}", i % 50));
        hosts.insert(
            name(i),
            Host {
                system: "x86_64-linux".into(),
                tags,
                channel: channel_of(i),
                closure_hash: Some(format!("new-{}", name(i))),
                pubkey: None,
            },
        );
    }
    let channels: BTreeMap<String, Channel> = (0..CHANNELS)
        .map(|c| {
            (
                format!("c{c:02}"),
                Channel {
                    rollout_policy: "default".into(),
                    reconcile_interval_minutes: 30,
                    signing_interval_minutes: 60,
                    freshness_window: 1440,
                    compliance: Compliance::default(),
                },
            )
        })
        .collect();
    let edges = (0..1000)
        .map(|k| Edge {
            before: name(k * 97 % HOSTS),
            after: name((k * 97 + CHANNELS) % HOSTS),
            reason: None,
        })
        .collect();
    let db = Selector::tags(["db"]);
    let fleet = FleetResolved {
        schema_version: 1,
        hosts,
        channels,
        rollout_policies: BTreeMap::new(),
        waves: BTreeMap::new(),
        edges,
        channel_edges: vec![],
        disruption_budgets: vec![DisruptionBudget {
            selector: db.clone(),
            max_in_flight: Some(200),
            max_in_flight_pct: None,
        }],
        meta: meta(),
    };
    // The db budget is fleet-wide (10,000 hosts frozen in every manifest); the per-channel
    // budget holds the channel's own hosts.
    let db_hosts = fleet.select(&db);

    let mut manifests = BTreeMap::new();
    let mut rollouts = BTreeMap::new();
    let mut attestations = BTreeMap::new();
    for c in 0..CHANNELS {
        let channel = format!("c{c:02}");
        let members: Vec<String> = fleet
            .channel_hosts(&channel)
            .map(|(n, _)| n.to_owned())
            .collect();
        let n = members.len();
        let wave_of = |k: usize| WAVES.iter().position(|p| k * 100 < p * n).unwrap_or(3);
        let current = 1 + c % 2;
        let host_set: Vec<HostSetEntry> = members
            .iter()
            .enumerate()
            .map(|(k, h)| HostSetEntry {
                hostname: h.clone(),
                wave_index: wave_of(k) as u32,
                target_closure: format!("new-{h}"),
            })
            .collect();
        let id = format!("{channel}-r2");
        let manifest = RolloutManifest {
            schema_version: 1,
            display_name: format!("{channel}@c2"),
            channel: channel.clone(),
            channel_ref: "c2".into(),
            fleet_resolved_hash: "fleet-2".into(),
            host_set,
            waves: [10, 10, 10, 0]
                .into_iter()
                .map(|soak_minutes| ManifestWave { soak_minutes })
                .collect(),
            health_gate: HealthGate {
                systemd_failed_units: Some(nixfleet_proto::FailedUnitsGate { max: 0 }),
                max_failures: 25,
            },
            on_health_failure: OnHealthFailure::RollbackAndHalt,
            compliance_frameworks: vec![],
            disruption_budgets: vec![
                ManifestBudget {
                    selector: db.clone(),
                    hosts: db_hosts.clone(),
                    max_in_flight: Some(200),
                    max_in_flight_pct: None,
                },
                ManifestBudget {
                    selector: Selector {
                        channel: Some(channel.clone()),
                        ..Selector::default()
                    },
                    hosts: members.clone(),
                    max_in_flight: None,
                    max_in_flight_pct: Some(20),
                },
            ],
            freshness_window: Some(1440),
            introduced: None,
            meta: meta(),
            compliance: None,
        };
        let mut records = BTreeMap::new();
        for (k, h) in members.iter().enumerate() {
            let wave = wave_of(k);
            let soaked_at = NOW - Duration::hours(2);
            let mut att = Attestation {
                last_seen: NOW - Duration::seconds((k % 120) as i64),
                current_closure: Some(format!("old-{h}")),
                last_confirmed_at: Some(NOW - Duration::days(3)),
                failed_targets: vec![],
                failed_units: 0,
                health_at: None,
                delivered: None,
                activation: None,
                compliance: None,
                compliance_claimed_at: None,
            };
            if k % 200 == 7 {
                att.last_seen = NOW - Duration::hours(1);
            }
            att.health_at = Some(att.last_seen);
            let record = |state: HostState, confirmed: Option<OffsetDateTime>| HostRecord {
                state,
                since: NOW - Duration::minutes(5),
                dispatched_at: Some(NOW - Duration::minutes(20)),
                confirmed_at: confirmed,
            };
            if wave < current {
                att.current_closure = Some(format!("new-{h}"));
                att.last_confirmed_at = Some(soaked_at);
                records.insert(h.clone(), record(HostState::Soaked, Some(soaked_at)));
            } else if wave == current {
                match k % 6 {
                    0 if k % 12 == 0 => {
                        records.insert(h.clone(), record(HostState::Dispatched, None));
                    }
                    1 => {
                        att.delivered = Some(Delivery {
                            rollout_id: id.clone(),
                            at: NOW - Duration::minutes(2),
                        });
                        records.insert(
                            h.clone(),
                            record(
                                HostState::ConfirmWindow {
                                    deadline: NOW + Duration::minutes(8),
                                },
                                None,
                            ),
                        );
                    }
                    2 | 3 => {
                        let confirmed = NOW - Duration::minutes((k % 9) as i64);
                        att.current_closure = Some(format!("new-{h}"));
                        att.last_confirmed_at = Some(confirmed);
                        records.insert(h.clone(), record(HostState::Healthy, Some(confirmed)));
                    }
                    _ => {}
                }
                if k % 997 == 0 {
                    att.failed_targets.push(FailedTarget {
                        rollout_id: id.clone(),
                        closure_hash: format!("new-{h}"),
                        reason: "activation failed".into(),
                        at: NOW - Duration::minutes(3),
                        cause: None,
                    });
                }
            }
            attestations.insert(h.clone(), att.into());
        }
        rollouts.insert(
            id.clone(),
            RolloutRecord {
                channel,
                state: RolloutState::Executing {
                    wave: current as u32,
                    phase: WavePhase::Active,
                },
                opened_at: NOW - Duration::hours(3),
                since: NOW - Duration::hours(1),
                hosts: records,
            },
        );
        manifests.insert(id, manifest);
    }
    Input {
        fleet,
        manifests,
        observed: Observed {
            attestations_since: NOW - Duration::hours(6),
            hosts: attestations,
            stored: StoredState { rollouts },
        },
        config: Config {
            confirm_window_secs: 600,
            activation_timeout_secs: 0,
            offline_after_secs: 300,
            late_confirm_grace_secs: 0,
        },
    }
}

fn tick(c: &mut Criterion) {
    let input = input();
    let run = || {
        reconcile(
            &input.fleet,
            "fleet-2",
            &input.manifests,
            &input.observed,
            &input.config,
            NOW,
        )
    };
    let plan = run();
    let dispatched = plan
        .actions
        .iter()
        .filter(|a| serde_json_free_kind(a) == "dispatch")
        .count();
    eprintln!(
        "one tick: {} hosts, {} rollouts, {} actions ({} dispatches), {} reasons",
        input.observed.hosts.len(),
        input.manifests.len(),
        plan.actions.len(),
        dispatched,
        plan.reasons.len()
    );
    let mut group = c.benchmark_group("reconcile");
    group.sample_size(20);
    group.bench_function("100k_hosts_20_channels", |b| b.iter(|| black_box(run())));
    group.finish();
}

fn serde_json_free_kind(action: &nixfleet_reconciler::Action) -> &'static str {
    match action {
        nixfleet_reconciler::Action::Host {
            event: nixfleet_reconciler::HostEvent::Dispatch { .. },
            ..
        } => "dispatch",
        _ => "other",
    }
}

criterion_group!(benches, tick);
criterion_main!(benches);
