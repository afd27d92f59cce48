//! The rollout state machine (SPEC.md §6).

use nixfleet_proto::OnHealthFailure;
use serde::{Deserialize, Serialize};

/// Where a rollout stands.
///
/// Pending → Executing (wave k: Active → Soaking → promoted) → Converged; the failure
/// branches Halted (`halt`) and Reverting → Reverted (`rollback-and-halt`); Superseded
/// once its channel moved on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum RolloutState {
    /// Opened but not started: a channel-edge predecessor is not done (`reason` says
    /// which). A newer ref supersedes it.
    Pending {
        #[serde(default)]
        reason: Option<String>,
    },
    /// Dispatching wave `wave` (waves before it are promoted).
    Executing { wave: u32, phase: WavePhase },
    /// Every wave promoted. Hosts that were offline are still dispatched when they return.
    Converged,
    /// The health gate tripped under `halt`: no new dispatch.
    Halted { wave: u32, failures: u32 },
    /// The health gate tripped under `rollback-and-halt`: hosts that activated the target
    /// are being rolled back.
    Reverting { wave: u32, failures: u32 },
    /// Every online host that was told to roll back has been seen off the target.
    Reverted { wave: u32, failures: u32 },
    /// The channel moved on to rollout `by`. Nothing happens in it any more.
    Superseded { by: String },
}

/// The phase of the current wave. Promotion is the transition out of `Soaking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WavePhase {
    /// Some online member is still queued, dispatched or confirming.
    Active,
    /// Every online member is healthy or done; waiting for the soak clocks.
    Soaking,
}

/// Something that moves a rollout from one state to the next. Serialised as the `action`
/// of a [`crate::Action`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum RolloutEvent {
    /// Creates the record (Pending). The only event that applies to no record.
    Open { channel: String },
    /// Pending stays Pending, for a new reason.
    Defer { reason: String },
    /// Pending → Executing wave 0.
    Start,
    /// Active → Soaking.
    SoakWave { wave: u32 },
    /// Soaking → Active: a member came back online and needs its target.
    ResumeWave { wave: u32 },
    /// Soaking → the next wave, Active.
    PromoteWave { wave: u32 },
    /// The last wave promoted: → Converged.
    Converge { wave: u32 },
    /// The health gate tripped in `wave` after `failures` failures: → Halted or Reverting.
    Halt {
        wave: u32,
        failures: u32,
        on_health_failure: OnHealthFailure,
    },
    /// Reverting → Reverted.
    FinishRevert,
    /// Reverted → Reverting: a host turned up on the target again.
    ResumeRevert,
    /// A finished or never-started rollout gives way to the channel's newer ref.
    Supersede { by: String },
}

impl RolloutState {
    /// The state after `event`, or `None` when the event does not apply here (an illegal
    /// transition, or one already applied: this is what makes `apply` idempotent).
    pub fn on(&self, event: &RolloutEvent) -> Option<RolloutState> {
        use RolloutEvent as E;
        use RolloutState as S;
        let next = match (self, event) {
            (S::Pending { reason }, E::Defer { reason: new })
                if reason.as_deref() != Some(new.as_str()) =>
            {
                S::Pending {
                    reason: Some(new.clone()),
                }
            }
            (S::Pending { .. }, E::Start) => S::Executing {
                wave: 0,
                phase: WavePhase::Active,
            },
            (
                S::Executing {
                    wave,
                    phase: WavePhase::Active,
                },
                E::SoakWave { wave: w },
            ) if wave == w => S::Executing {
                wave: *wave,
                phase: WavePhase::Soaking,
            },
            (
                S::Executing {
                    wave,
                    phase: WavePhase::Soaking,
                },
                E::ResumeWave { wave: w },
            ) if wave == w => S::Executing {
                wave: *wave,
                phase: WavePhase::Active,
            },
            (
                S::Executing {
                    wave,
                    phase: WavePhase::Soaking,
                },
                E::PromoteWave { wave: w },
            ) if wave == w => S::Executing {
                wave: wave.saturating_add(1),
                phase: WavePhase::Active,
            },
            (
                S::Executing {
                    wave,
                    phase: WavePhase::Soaking,
                },
                E::Converge { wave: w },
            ) if wave == w => S::Converged,
            (
                S::Executing { .. },
                E::Halt {
                    wave,
                    failures,
                    on_health_failure,
                },
            ) => match on_health_failure {
                OnHealthFailure::Halt => S::Halted {
                    wave: *wave,
                    failures: *failures,
                },
                OnHealthFailure::RollbackAndHalt => S::Reverting {
                    wave: *wave,
                    failures: *failures,
                },
            },
            (S::Reverting { wave, failures }, E::FinishRevert) => S::Reverted {
                wave: *wave,
                failures: *failures,
            },
            (S::Reverted { wave, failures }, E::ResumeRevert) => S::Reverting {
                wave: *wave,
                failures: *failures,
            },
            (
                S::Pending { .. } | S::Converged | S::Halted { .. } | S::Reverted { .. },
                E::Supersede { by },
            ) => S::Superseded { by: by.clone() },
            _ => return None,
        };
        Some(next)
    }

    /// A newer ref may replace it: it never started, or it finished.
    pub fn is_replaceable(&self) -> bool {
        matches!(
            self,
            RolloutState::Pending { .. }
                | RolloutState::Converged
                | RolloutState::Halted { .. }
                | RolloutState::Reverted { .. }
        )
    }

    /// One word for operators and reasons.
    pub fn word(&self) -> &'static str {
        match self {
            RolloutState::Pending { .. } => "pending",
            RolloutState::Executing { .. } => "executing",
            RolloutState::Converged => "converged",
            RolloutState::Halted { .. } => "halted",
            RolloutState::Reverting { .. } => "reverting",
            RolloutState::Reverted { .. } => "reverted",
            RolloutState::Superseded { .. } => "superseded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(wave: u32, phase: WavePhase) -> RolloutState {
        RolloutState::Executing { wave, phase }
    }

    fn pending(reason: Option<&str>) -> RolloutState {
        RolloutState::Pending {
            reason: reason.map(str::to_owned),
        }
    }

    fn halt(policy: OnHealthFailure) -> RolloutEvent {
        RolloutEvent::Halt {
            wave: 1,
            failures: 2,
            on_health_failure: policy,
        }
    }

    #[test]
    fn open_never_applies_to_an_existing_record() {
        let e = RolloutEvent::Open {
            channel: "stable".into(),
        };
        assert_eq!(pending(None).on(&e), None);
        assert_eq!(RolloutState::Converged.on(&e), None);
    }

    #[test]
    fn pending_is_deferred_only_for_a_new_reason() {
        let e = RolloutEvent::Defer {
            reason: "edge".into(),
        };
        assert_eq!(pending(None).on(&e), Some(pending(Some("edge"))));
        assert_eq!(pending(Some("edge")).on(&e), None);
        assert_eq!(pending(Some("other")).on(&e), Some(pending(Some("edge"))));
        assert_eq!(exec(0, WavePhase::Active).on(&e), None);
    }

    #[test]
    fn pending_starts_at_wave_zero() {
        assert_eq!(
            pending(Some("x")).on(&RolloutEvent::Start),
            Some(exec(0, WavePhase::Active))
        );
        assert_eq!(exec(0, WavePhase::Active).on(&RolloutEvent::Start), None);
    }

    #[test]
    fn active_wave_soaks_then_resumes() {
        let soak = RolloutEvent::SoakWave { wave: 1 };
        assert_eq!(
            exec(1, WavePhase::Active).on(&soak),
            Some(exec(1, WavePhase::Soaking))
        );
        assert_eq!(exec(0, WavePhase::Active).on(&soak), None, "other wave");
        assert_eq!(exec(1, WavePhase::Soaking).on(&soak), None);
        let resume = RolloutEvent::ResumeWave { wave: 1 };
        assert_eq!(
            exec(1, WavePhase::Soaking).on(&resume),
            Some(exec(1, WavePhase::Active))
        );
        assert_eq!(exec(1, WavePhase::Active).on(&resume), None);
    }

    #[test]
    fn soaking_wave_promotes_to_the_next() {
        let e = RolloutEvent::PromoteWave { wave: 0 };
        assert_eq!(
            exec(0, WavePhase::Soaking).on(&e),
            Some(exec(1, WavePhase::Active))
        );
        assert_eq!(exec(0, WavePhase::Active).on(&e), None, "not soaking yet");
        assert_eq!(exec(1, WavePhase::Active).on(&e), None, "already promoted");
    }

    #[test]
    fn soaking_last_wave_converges() {
        let e = RolloutEvent::Converge { wave: 2 };
        assert_eq!(
            exec(2, WavePhase::Soaking).on(&e),
            Some(RolloutState::Converged)
        );
        assert_eq!(exec(1, WavePhase::Soaking).on(&e), None);
        assert_eq!(RolloutState::Converged.on(&e), None);
    }

    #[test]
    fn gate_halts_or_reverts_by_policy() {
        for phase in [WavePhase::Active, WavePhase::Soaking] {
            assert_eq!(
                exec(3, phase).on(&halt(OnHealthFailure::Halt)),
                Some(RolloutState::Halted {
                    wave: 1,
                    failures: 2
                })
            );
            assert_eq!(
                exec(3, phase).on(&halt(OnHealthFailure::RollbackAndHalt)),
                Some(RolloutState::Reverting {
                    wave: 1,
                    failures: 2
                })
            );
        }
        let halted = RolloutState::Halted {
            wave: 1,
            failures: 2,
        };
        assert_eq!(halted.on(&halt(OnHealthFailure::Halt)), None);
        assert_eq!(
            RolloutState::Converged.on(&halt(OnHealthFailure::Halt)),
            None
        );
    }

    #[test]
    fn reverted_resumes_when_a_host_turns_up_on_the_target() {
        let reverted = RolloutState::Reverted {
            wave: 0,
            failures: 1,
        };
        assert_eq!(
            reverted.on(&RolloutEvent::ResumeRevert),
            Some(RolloutState::Reverting {
                wave: 0,
                failures: 1
            })
        );
        assert_eq!(
            RolloutState::Reverting {
                wave: 0,
                failures: 1
            }
            .on(&RolloutEvent::ResumeRevert),
            None
        );
    }

    #[test]
    fn reverting_finishes() {
        let reverting = RolloutState::Reverting {
            wave: 0,
            failures: 1,
        };
        assert_eq!(
            reverting.on(&RolloutEvent::FinishRevert),
            Some(RolloutState::Reverted {
                wave: 0,
                failures: 1
            })
        );
        assert_eq!(
            RolloutState::Halted {
                wave: 0,
                failures: 1
            }
            .on(&RolloutEvent::FinishRevert),
            None
        );
    }

    #[test]
    fn only_finished_or_unstarted_rollouts_are_superseded() {
        let e = RolloutEvent::Supersede { by: "r2".into() };
        let superseded = RolloutState::Superseded { by: "r2".into() };
        for s in [
            pending(None),
            RolloutState::Converged,
            RolloutState::Halted {
                wave: 0,
                failures: 1,
            },
            RolloutState::Reverted {
                wave: 0,
                failures: 1,
            },
        ] {
            assert!(s.is_replaceable());
            assert_eq!(s.on(&e), Some(superseded.clone()), "{s:?}");
        }
        for s in [
            exec(0, WavePhase::Active),
            RolloutState::Reverting {
                wave: 0,
                failures: 1,
            },
            superseded.clone(),
        ] {
            assert!(!s.is_replaceable());
            assert_eq!(s.on(&e), None, "{s:?}");
        }
    }
}
