//! What one reconcile tick decided, and how the control plane folds it into stored state.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::host::{HostEvent, HostState};
use crate::rollout::RolloutEvent;
use crate::stored::{HostRecord, RolloutRecord, StoredState};

/// The outcome of one tick. Everything is in a stable order: `actions` in decision order
/// (channels in channel-edge order, hosts by wave then hostname), the maps by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// State changes, to be applied in order and in one transaction.
    pub actions: Vec<Action>,
    /// Why each host of a live rollout that got no action this tick stays where it is.
    pub reasons: BTreeMap<String, String>,
    /// Why a channel's newest ref is not running (queued, deferred, manifest missing).
    pub channels: BTreeMap<String, String>,
}

/// One state change. Serialised flat: `{"action": "dispatch", "wave": 0, "rollout": …,
/// "host": …}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Action {
    Host {
        #[serde(flatten)]
        event: HostEvent,
        rollout: String,
        host: String,
    },
    Rollout {
        #[serde(flatten)]
        event: RolloutEvent,
        rollout: String,
    },
}

/// Folds `plan` into `stored`. Pure, and idempotent: every event carries enough to be
/// refused by a state it was already applied to, so applying a plan twice changes
/// nothing. Events that do not apply are skipped.
pub fn apply(plan: &Plan, stored: &mut StoredState, now: OffsetDateTime) {
    for action in &plan.actions {
        match action {
            Action::Rollout {
                event: RolloutEvent::Open { channel },
                rollout,
            } => {
                if let Entry::Vacant(slot) = stored.rollouts.entry(rollout.clone()) {
                    slot.insert(RolloutRecord::opened(channel, now));
                }
            }
            Action::Rollout { event, rollout } => {
                if let Some(record) = stored.rollouts.get_mut(rollout) {
                    if let Some(next) = record.state.on(event) {
                        record.state = next;
                        record.since = now;
                    }
                }
            }
            Action::Host {
                event,
                rollout,
                host,
            } => {
                if let Some(record) = stored.rollouts.get_mut(rollout) {
                    apply_host(&mut record.hosts, host, event, now);
                }
            }
        }
    }
}

fn apply_host(
    hosts: &mut BTreeMap<String, HostRecord>,
    host: &str,
    event: &HostEvent,
    now: OffsetDateTime,
) {
    let next = match hosts.get(host) {
        Some(record) => record.state.on(event),
        None => HostState::Queued.on(event),
    };
    let Some(next) = next else { return };
    if next == HostState::Queued {
        // Absent means Queued: keep the table to hosts that moved.
        hosts.remove(host);
        return;
    }
    let record = hosts.entry(host.to_owned()).or_insert(HostRecord {
        state: HostState::Queued,
        since: now,
        dispatched_at: None,
        confirmed_at: None,
    });
    record.state = next;
    record.since = now;
    match event {
        HostEvent::Dispatch { .. } => record.dispatched_at = Some(now),
        HostEvent::Confirm { since } => record.confirmed_at = Some(*since),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{RolloutState, WavePhase};
    use time::macros::datetime;

    const T: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

    fn host(event: HostEvent, name: &str) -> Action {
        Action::Host {
            event,
            rollout: "r1".into(),
            host: name.into(),
        }
    }

    fn rollout(event: RolloutEvent) -> Action {
        Action::Rollout {
            event,
            rollout: "r1".into(),
        }
    }

    fn plan() -> Plan {
        Plan {
            actions: vec![
                rollout(RolloutEvent::Open {
                    channel: "stable".into(),
                }),
                rollout(RolloutEvent::Start),
                host(HostEvent::Confirm { since: T }, "a"),
                host(HostEvent::Soak, "a"),
                rollout(RolloutEvent::SoakWave { wave: 0 }),
                rollout(RolloutEvent::PromoteWave { wave: 0 }),
                host(HostEvent::Dispatch { wave: 1 }, "b"),
            ],
            ..Plan::default()
        }
    }

    #[test]
    fn apply_folds_events_through_the_state_machines() {
        let mut stored = StoredState::default();
        apply(&plan(), &mut stored, T);
        let r = &stored.rollouts["r1"];
        assert_eq!(
            r.state,
            RolloutState::Executing {
                wave: 1,
                phase: WavePhase::Active
            }
        );
        assert_eq!(r.hosts["a"].state, HostState::Soaked);
        assert_eq!(r.hosts["a"].confirmed_at, Some(T));
        assert_eq!(r.hosts["b"].state, HostState::Dispatched);
        assert_eq!(r.hosts["b"].dispatched_at, Some(T));
    }

    #[test]
    fn applying_twice_changes_nothing() {
        let mut once = StoredState::default();
        apply(&plan(), &mut once, T);
        let mut twice = once.clone();
        apply(&plan(), &mut twice, T + time::Duration::minutes(5));
        assert_eq!(once, twice);
    }

    #[test]
    fn requeue_drops_the_record() {
        let mut stored = StoredState::default();
        apply(&plan(), &mut stored, T);
        let requeue = Plan {
            actions: vec![host(HostEvent::Requeue { reason: "x".into() }, "b")],
            ..Plan::default()
        };
        apply(&requeue, &mut stored, T);
        assert!(!stored.rollouts["r1"].hosts.contains_key("b"));
    }

    #[test]
    fn events_for_unknown_rollouts_are_skipped() {
        let mut stored = StoredState::default();
        let p = Plan {
            actions: vec![host(HostEvent::Dispatch { wave: 0 }, "a")],
            ..Plan::default()
        };
        apply(&p, &mut stored, T);
        assert!(stored.rollouts.is_empty());
    }

    #[test]
    fn actions_serialise_flat_and_round_trip() {
        let a = host(HostEvent::Dispatch { wave: 0 }, "web-01");
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"action":"dispatch","wave":0,"rollout":"r1","host":"web-01"}"#
        );
        assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), a);
        let c = rollout(RolloutEvent::Converge { wave: 2 });
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"action":"converge","wave":2,"rollout":"r1"}"#);
        assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), c);
        let s = rollout(RolloutEvent::Start);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"action":"start","rollout":"r1"}"#);
        assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), s);
        let soak = host(HostEvent::Soak, "a");
        let json = serde_json::to_string(&soak).unwrap();
        assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), soak);
    }
}
