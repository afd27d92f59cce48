//! A host's state machine within one rollout (SPEC.md §6).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a host stands in one rollout.
///
/// Queued → Dispatched → ConfirmWindow → Healthy → Soaked → Converged, with the failure
/// branches Failed and RollingBack → Reverted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum HostState {
    /// Waiting for its turn. A host without a record is Queued.
    Queued,
    /// The control plane will hand this host the target at its next check-in.
    Dispatched,
    /// The agent has the target and must confirm before `deadline`.
    ConfirmWindow {
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// Confirmed; soaking since the record's `confirmedAt`.
    Healthy,
    /// Healthy for its wave's `soakMinutes`.
    Soaked,
    /// The rollout finished with this host on the target.
    Converged,
    /// Activation failure, confirm timeout or health gate. Never dispatched again in
    /// this rollout (the agent refuses the closure too).
    Failed {
        reason: String,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// Told to roll back (`rollback-and-halt`); not yet seen off the target.
    RollingBack,
    /// Seen off the target after a rollback signal.
    Reverted,
}

/// Something that moves a host from one state to the next. Serialised as the `action`
/// of a [`crate::Action`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum HostEvent {
    /// Queued → Dispatched: hand out the target at the next check-in.
    Dispatch { wave: u32 },
    /// Dispatched → Queued: the target was never handed out (host went offline, or the
    /// rollout halted), so nothing is disrupted and the budget slot is freed.
    Requeue { reason: String },
    /// Dispatched → ConfirmWindow: a check-in answer carried the target.
    Deliver {
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// ConfirmWindow → ConfirmWindow with an earlier deadline: the agent reported that its
    /// switch finished at `at`, so the confirm window runs from then.
    Switched {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// Queued/Dispatched → ConfirmWindow: the host already runs the target but has not
    /// confirmed it (recovered from its attestation, e.g. after a wipe).
    Activate {
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// → Healthy: the host runs the target and confirmed it at `since`.
    Confirm {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
    /// Healthy → Soaked.
    Soak,
    /// Soaked → Converged: the rollout finished.
    Complete,
    /// → Failed.
    Fail {
        reason: String,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// → RollingBack: send the rollback signal.
    Rollback,
    /// RollingBack → Reverted: seen off the target.
    Revert,
}

impl HostState {
    /// The state after `event`, or `None` when the event does not apply here (an illegal
    /// transition, or one already applied: this is what makes `apply` idempotent).
    pub fn on(&self, event: &HostEvent) -> Option<HostState> {
        use HostEvent as E;
        use HostState as S;
        let next = match (self, event) {
            (S::Queued, E::Dispatch { .. }) => S::Dispatched,
            (S::Dispatched, E::Requeue { .. }) => S::Queued,
            (S::Dispatched, E::Deliver { deadline }) => S::ConfirmWindow {
                deadline: *deadline,
            },
            (S::ConfirmWindow { deadline: old }, E::Switched { deadline, .. })
                if deadline < old =>
            {
                S::ConfirmWindow {
                    deadline: *deadline,
                }
            }
            (S::Queued | S::Dispatched, E::Activate { deadline }) => S::ConfirmWindow {
                deadline: *deadline,
            },
            (S::Queued | S::Dispatched | S::ConfirmWindow { .. }, E::Confirm { .. }) => S::Healthy,
            (S::Healthy, E::Soak) => S::Soaked,
            (S::Soaked, E::Complete) => S::Converged,
            (
                S::Queued
                | S::Dispatched
                | S::ConfirmWindow { .. }
                | S::Healthy
                | S::Soaked
                | S::Converged,
                E::Fail { reason, at },
            ) => S::Failed {
                reason: reason.clone(),
                at: *at,
            },
            // A Dispatched host never got the target: it is requeued, not rolled back. A
            // Reverted host seen on the target again (it finished an activation that was
            // under way) is told again.
            (
                S::ConfirmWindow { .. }
                | S::Healthy
                | S::Soaked
                | S::Converged
                | S::Failed { .. }
                | S::Reverted,
                E::Rollback,
            ) => S::RollingBack,
            (S::RollingBack, E::Revert) => S::Reverted,
            _ => return None,
        };
        Some(next)
    }

    /// Counts against disruption budgets: Dispatched through Healthy (SPEC.md §6).
    pub fn in_flight(&self) -> bool {
        matches!(
            self,
            HostState::Dispatched | HostState::ConfirmWindow { .. } | HostState::Healthy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T: OffsetDateTime = datetime!(2026-11-27 10:00:00 UTC);

    fn fail() -> HostEvent {
        HostEvent::Fail {
            reason: "x".into(),
            at: T,
        }
    }

    fn failed() -> HostState {
        HostState::Failed {
            reason: "x".into(),
            at: T,
        }
    }

    fn cw() -> HostState {
        HostState::ConfirmWindow { deadline: T }
    }

    #[test]
    fn queued_is_dispatched() {
        assert_eq!(
            HostState::Queued.on(&HostEvent::Dispatch { wave: 0 }),
            Some(HostState::Dispatched)
        );
    }

    #[test]
    fn dispatched_is_requeued() {
        let e = HostEvent::Requeue { reason: "r".into() };
        assert_eq!(HostState::Dispatched.on(&e), Some(HostState::Queued));
        assert_eq!(HostState::Queued.on(&e), None);
    }

    #[test]
    fn dispatched_is_delivered() {
        assert_eq!(
            HostState::Dispatched.on(&HostEvent::Deliver { deadline: T }),
            Some(cw())
        );
        assert_eq!(
            HostState::Queued.on(&HostEvent::Deliver { deadline: T }),
            None
        );
    }

    #[test]
    fn queued_or_dispatched_host_found_on_target_is_activating() {
        let e = HostEvent::Activate { deadline: T };
        assert_eq!(HostState::Queued.on(&e), Some(cw()));
        assert_eq!(HostState::Dispatched.on(&e), Some(cw()));
        assert_eq!(cw().on(&e), None);
    }

    #[test]
    fn confirm_makes_healthy() {
        let e = HostEvent::Confirm { since: T };
        for s in [HostState::Queued, HostState::Dispatched, cw()] {
            assert_eq!(s.on(&e), Some(HostState::Healthy), "{s:?}");
        }
        assert_eq!(HostState::Healthy.on(&e), None);
        assert_eq!(HostState::Soaked.on(&e), None);
    }

    #[test]
    fn healthy_soaks_and_soaked_completes() {
        assert_eq!(
            HostState::Healthy.on(&HostEvent::Soak),
            Some(HostState::Soaked)
        );
        assert_eq!(HostState::Soaked.on(&HostEvent::Soak), None);
        assert_eq!(
            HostState::Soaked.on(&HostEvent::Complete),
            Some(HostState::Converged)
        );
        assert_eq!(HostState::Healthy.on(&HostEvent::Complete), None);
    }

    #[test]
    fn any_live_state_can_fail_but_only_once() {
        for s in [
            HostState::Queued,
            HostState::Dispatched,
            cw(),
            HostState::Healthy,
            HostState::Soaked,
            HostState::Converged,
        ] {
            assert_eq!(s.on(&fail()), Some(failed()), "{s:?}");
        }
        for s in [failed(), HostState::RollingBack, HostState::Reverted] {
            assert_eq!(s.on(&fail()), None, "{s:?}");
        }
    }

    #[test]
    fn activated_states_roll_back_and_revert() {
        for s in [
            cw(),
            HostState::Healthy,
            HostState::Soaked,
            HostState::Converged,
            failed(),
            HostState::Reverted,
        ] {
            assert_eq!(
                s.on(&HostEvent::Rollback),
                Some(HostState::RollingBack),
                "{s:?}"
            );
        }
        assert_eq!(HostState::Queued.on(&HostEvent::Rollback), None);
        assert_eq!(HostState::Dispatched.on(&HostEvent::Rollback), None);
        assert_eq!(HostState::RollingBack.on(&HostEvent::Rollback), None);
        assert_eq!(
            HostState::RollingBack.on(&HostEvent::Revert),
            Some(HostState::Reverted)
        );
        assert_eq!(HostState::Reverted.on(&HostEvent::Revert), None);
    }

    #[test]
    fn in_flight_is_dispatched_through_healthy() {
        assert!(!HostState::Queued.in_flight());
        assert!(HostState::Dispatched.in_flight());
        assert!(cw().in_flight());
        assert!(HostState::Healthy.in_flight());
        assert!(!HostState::Soaked.in_flight());
        assert!(!HostState::RollingBack.in_flight());
        assert!(!failed().in_flight());
    }
}
