//! The agent's activation state machine (SPEC.md §7): idle → fetching → switching →
//! probing (the closure's compliance probes) → awaiting confirm → confirmed (idle again)
//! or rolling back. Pure: no I/O, no clock; the
//! shell gathers an [`Event`], calls [`transition`], persists the result and carries out
//! its [`Effect`]s. Crash recovery is reading the persisted [`Phase`] back.

use nixfleet_proto::compliance::ComplianceMode;
use nixfleet_proto::wire::{FailedTarget, FailureCause, ReportKind, RollbackSignal, Target};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// One activation of a target: what the agent switches to and what it switches back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Activation {
    pub target: Target,
    /// Store basename of the system that was running when the activation started; a
    /// rollback returns to it.
    pub previous: String,
}

impl Activation {
    /// A name for this activation, safe in file names and unique per (rollout, closure):
    /// a closure is activated at most once per rollout.
    pub fn id(&self) -> String {
        let rollout: String = self.target.rollout_id.chars().take(16).collect();
        let closure: String = self.target.closure_hash.chars().take(32).collect();
        format!("{rollout}-{closure}")
    }
}

/// Why an activation is being undone; the reason text goes into the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "kebab-case")]
pub enum RollbackCause {
    /// No 204 arrived before the confirm window closed.
    ConfirmWindowExpired,
    /// The control plane answered the confirm with 410.
    ConfirmGone { reason: String },
    /// The control plane sent a rollback signal for the rollout. `unhealthy`: this host's
    /// own failed units were over the rollout's health gate when it came.
    Signal {
        reason: String,
        #[serde(default)]
        unhealthy: bool,
    },
    /// switch-to-configuration failed, or the running system is not the target after it.
    SwitchFailed { reason: String },
    /// In `enforce`, a compliance control failed or erred after the switch, or the probe
    /// set could not be used. `reason` starts with `compliance:` and names the controls.
    Compliance { reason: String },
}

impl RollbackCause {
    /// What the rollback says about the closure, for later rollouts.
    pub fn failure(&self) -> FailureCause {
        match self {
            RollbackCause::ConfirmWindowExpired | RollbackCause::ConfirmGone { .. } => {
                FailureCause::ConfirmTimeout
            }
            RollbackCause::Signal {
                unhealthy: true, ..
            } => FailureCause::Health,
            RollbackCause::Signal { .. } => FailureCause::RollbackSignal,
            RollbackCause::SwitchFailed { .. } => FailureCause::Activation,
            RollbackCause::Compliance { .. } => FailureCause::Compliance,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RollbackCause::ConfirmWindowExpired => {
                "no confirm was accepted before the confirm window closed".to_owned()
            }
            RollbackCause::ConfirmGone { reason } => {
                format!("the control plane refused the confirm (410): {reason}")
            }
            RollbackCause::Signal { reason, unhealthy } => {
                let own = if *unhealthy {
                    " (this host's failed units were over the health gate)"
                } else {
                    ""
                };
                format!("the control plane sent a rollback signal: {reason}{own}")
            }
            RollbackCause::SwitchFailed { reason } => format!("activation failed: {reason}"),
            RollbackCause::Compliance { reason } => reason.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing in flight: check in and wait.
    Idle,
    /// A target passed the gate; its closure is being realised from the binary cache.
    Fetching { activation: Activation },
    /// The profile is set and switch-to-configuration is (to be) running, detached.
    Switching { activation: Activation },
    /// The switch succeeded at `activated_at`; the closure's compliance probes run before
    /// any confirm. The confirm window already counts (`deadline`). After a restart they
    /// run again: evidence from before it is not used.
    Probing {
        activation: Activation,
        #[serde(with = "time::serde::rfc3339")]
        activated_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// The target is running; confirming until `deadline`.
    AwaitingConfirm {
        activation: Activation,
        #[serde(with = "time::serde::rfc3339")]
        deadline: OffsetDateTime,
    },
    /// Switching back to `activation.previous`.
    RollingBack {
        activation: Activation,
        cause: RollbackCause,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Fetching { .. } => "fetching",
            Phase::Switching { .. } => "switching",
            Phase::Probing { .. } => "probing",
            Phase::AwaitingConfirm { .. } => "awaiting-confirm",
            Phase::RollingBack { .. } => "rolling-back",
        }
    }

    /// The activation in flight, if any.
    pub fn activation(&self) -> Option<&Activation> {
        match self {
            Phase::Idle => None,
            Phase::Fetching { activation }
            | Phase::Switching { activation }
            | Phase::Probing { activation, .. }
            | Phase::AwaitingConfirm { activation, .. }
            | Phase::RollingBack { activation, .. } => Some(activation),
        }
    }
}

/// The persisted machine: the phase, and the last confirmed activation (kept so that a
/// later rollback signal for its rollout can still undo it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub phase: Phase,
    #[serde(default)]
    pub last_activation: Option<Activation>,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            phase: Phase::Idle,
            last_activation: None,
        }
    }
}

/// What the shell observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A check-in target passed the gate; `current` is the running closure.
    TargetAccepted { target: Target, current: String },
    /// A check-in target failed the gate (manifest, hostSet, freshness, rollout swap).
    TargetRefused {
        target: Target,
        kind: ReportKind,
        reason: String,
    },
    /// A check-in carried a rollback signal; `current` is the running closure, and
    /// `unhealthy` whether this host's failed units were over the rollout's health gate.
    RollbackSignal {
        signal: RollbackSignal,
        current: String,
        unhealthy: bool,
    },
    /// The closure is in the local store and each of its `paths` carries a valid signature
    /// by a pinned cache key (`keys`: the names of those found).
    Realised { paths: usize, keys: Vec<String> },
    /// The closure was refused: a path unsigned or foreign-signed (fetched or already in
    /// the local store), or the cache's copy corrupted.
    ClosureRefused { reason: String },
    /// Realising failed for a reason that may pass (cache unreachable): try again later.
    RealiseFailed { reason: String },
    /// switch-to-configuration exited 0 and the running system is the target.
    SwitchSucceeded,
    /// The closure's compliance probes ran after the switch, in this process (or there
    /// was nothing to run).
    Probed(ProbeOutcome),
    /// switch-to-configuration failed, or left another system running.
    SwitchFailed { reason: String },
    /// The agent (re)started in probing or awaiting-confirm; whether the target is what
    /// runs now.
    Resumed { target_running: bool },
    /// The control plane answered the confirm with 204.
    Confirmed,
    /// The control plane answered the confirm with 410.
    ConfirmGone { reason: String },
    /// The confirm did not get through (network, 5xx); the window may have closed.
    ConfirmUnanswered,
    /// The previous generation runs again.
    RolledBack,
    /// Switching back failed too.
    RollbackFailed { reason: String },
}

/// What came of the compliance probes of a closure just switched to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Nothing to run: no probe set in the closure, or its mode is `disabled`.
    NotProbed { why: String },
    /// The probes ran: the probe set's mode, how many passed, and each control that did
    /// not pass, described (`control X failed (cis 5.2.8)`).
    Ran {
        mode: ComplianceMode,
        passed: usize,
        failing: Vec<String>,
    },
    /// The closure carries a probe set that cannot be read or is malformed. In doubt it
    /// is taken as an `enforce` failure: the closure's own compliance cannot be shown.
    Unusable { reason: String },
}

/// What the shell must do besides persisting the new phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Queue a signed report (re-sent until acknowledged).
    Report {
        kind: ReportKind,
        rollout_id: String,
        closure_hash: String,
        reason: String,
    },
    /// Never activate this closure again in this rollout; reported in every check-in.
    RecordFailed(FailedTarget),
    /// The CP accepted the confirm of this closure at `now` (sent as `lastConfirmedAt`).
    MarkConfirmed { closure_hash: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub machine: Machine,
    pub effects: Vec<Effect>,
    /// Why, for the log line every decision gets.
    pub reason: String,
}

/// An event that makes no sense in the current phase (e.g. a confirm answer while idle).
/// The shell logs it and keeps the phase: nothing is activated or undone on a stray event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} is not expected in phase {phase}; ignored")]
pub struct Unexpected {
    pub phase: &'static str,
    pub event: String,
}

fn failed(
    activation: &Activation,
    cause: FailureCause,
    reason: &str,
    now: OffsetDateTime,
) -> Effect {
    Effect::RecordFailed(FailedTarget {
        rollout_id: activation.target.rollout_id.clone(),
        closure_hash: activation.target.closure_hash.clone(),
        reason: reason.to_owned(),
        at: now,
        cause: Some(cause),
    })
}

fn report(kind: ReportKind, target: &Target, reason: &str) -> Effect {
    Effect::Report {
        kind,
        rollout_id: target.rollout_id.clone(),
        closure_hash: target.closure_hash.clone(),
        reason: reason.to_owned(),
    }
}

/// Every transition of the agent, in one place.
pub fn transition(
    machine: &Machine,
    event: Event,
    now: OffsetDateTime,
) -> Result<Step, Unexpected> {
    let last = machine.last_activation.clone();
    let step =
        |phase: Phase, last: Option<Activation>, effects: Vec<Effect>, reason: String| Step {
            machine: Machine {
                phase,
                last_activation: last,
            },
            effects,
            reason,
        };
    let unexpected = |event: &Event| Unexpected {
        phase: machine.phase.name(),
        event: format!("{event:?}"),
    };
    Ok(match (&machine.phase, event) {
        (Phase::Idle, Event::TargetAccepted { target, current }) => {
            let reason = format!(
                "target {} of rollout {} wave {} passed the gate; realising it",
                target.closure_hash, target.rollout_id, target.wave_index
            );
            step(
                Phase::Fetching {
                    activation: Activation {
                        target,
                        previous: current,
                    },
                },
                last,
                vec![],
                reason,
            )
        }
        (Phase::Idle | Phase::AwaitingConfirm { .. }, Event::TargetRefused { target, kind, reason }) => {
            let why = format!("refused target {} of rollout {}: {reason}", target.closure_hash, target.rollout_id);
            let effects = vec![
                report(kind, &target, &reason),
                Effect::RecordFailed(FailedTarget {
                    rollout_id: target.rollout_id.clone(),
                    closure_hash: target.closure_hash.clone(),
                    reason: reason.clone(),
                    at: now,
                    cause: Some(FailureCause::Refused),
                }),
            ];
            step(machine.phase.clone(), last, effects, why)
        }
        (
            Phase::Idle,
            Event::RollbackSignal {
                signal,
                current,
                unhealthy,
            },
        ) => match last {
            Some(activation)
                if activation.target.rollout_id == signal.rollout_id
                    && activation.target.closure_hash == current =>
            {
                let reason = format!(
                    "rollback signal for rollout {}: {}; switching back to {}",
                    signal.rollout_id, signal.reason, activation.previous
                );
                step(
                    Phase::RollingBack {
                        activation,
                        cause: RollbackCause::Signal {
                            reason: signal.reason,
                            unhealthy,
                        },
                    },
                    None,
                    vec![],
                    reason,
                )
            }
            last => step(
                Phase::Idle,
                last,
                vec![],
                format!(
                    "rollback signal for rollout {} ignored: this host does not run a closure it activated in that rollout",
                    signal.rollout_id
                ),
            ),
        },
        (Phase::Fetching { activation }, Event::RollbackSignal { signal, .. })
            if activation.target.rollout_id == signal.rollout_id =>
        {
            let reason = format!(
                "rollout {} is rolling back ({}); {} was not activated",
                signal.rollout_id, signal.reason, activation.target.closure_hash
            );
            step(
                Phase::Idle,
                last,
                vec![
                    report(ReportKind::ActivationFailed, &activation.target, &reason),
                    failed(activation, FailureCause::RollbackSignal, &reason, now),
                ],
                reason,
            )
        }
        (
            Phase::AwaitingConfirm { activation, .. } | Phase::Probing { activation, .. },
            Event::RollbackSignal {
                signal, unhealthy, ..
            },
        ) if activation.target.rollout_id == signal.rollout_id => {
            step(
                Phase::RollingBack {
                    activation: activation.clone(),
                    cause: RollbackCause::Signal {
                        reason: signal.reason.clone(),
                        unhealthy,
                    },
                },
                last,
                vec![],
                format!(
                    "rollback signal for rollout {} while {}: {}",
                    signal.rollout_id,
                    machine.phase.name(),
                    signal.reason
                ),
            )
        }
        (Phase::Fetching { activation }, Event::Realised { paths, keys }) => step(
            Phase::Switching {
                activation: activation.clone(),
            },
            last,
            vec![],
            format!(
                "{} realised; every path of its closure ({paths}) carries a signature by a pinned cache key ({}); switching to it",
                activation.target.closure_hash,
                keys.join(", ")
            ),
        ),
        (Phase::Fetching { activation }, Event::ClosureRefused { reason }) => step(
            Phase::Idle,
            last,
            vec![
                report(ReportKind::ClosureRejected, &activation.target, &reason),
                failed(activation, FailureCause::Refused, &reason, now),
            ],
            format!(
                "closure {} refused, nothing activated: {reason}",
                activation.target.closure_hash
            ),
        ),
        (Phase::Fetching { activation }, Event::RealiseFailed { reason }) => step(
            Phase::Idle,
            last,
            vec![],
            format!(
                "could not realise {} ({reason}); nothing activated, trying again at the next check-in",
                activation.target.closure_hash
            ),
        ),
        (Phase::Switching { activation }, Event::SwitchSucceeded) => {
            let deadline = now + confirm_window(activation);
            step(
                Phase::Probing {
                    activation: activation.clone(),
                    activated_at: now,
                    deadline,
                },
                last,
                vec![],
                format!(
                    "{} is running; running its compliance probes, then confirming until {deadline}",
                    activation.target.closure_hash
                ),
            )
        }
        (
            Phase::Probing {
                activation,
                deadline,
                ..
            },
            Event::Probed(outcome),
        ) => {
            let closure = &activation.target.closure_hash;
            let enforce_failure = match &outcome {
                ProbeOutcome::Ran {
                    mode: ComplianceMode::Enforce,
                    failing,
                    ..
                } if !failing.is_empty() => Some(format!("compliance: {}", failing.join("; "))),
                ProbeOutcome::Unusable { reason } => Some(format!(
                    "compliance: {reason} (in doubt, taken as an enforce failure)"
                )),
                _ => None,
            };
            if let Some(reason) = enforce_failure {
                let why = format!(
                    "{reason}; enforce: no confirm, rolling back from {closure} to {}",
                    activation.previous
                );
                step(
                    Phase::RollingBack {
                        activation: activation.clone(),
                        cause: RollbackCause::Compliance { reason },
                    },
                    last,
                    vec![],
                    why,
                )
            } else if now > *deadline {
                step(
                    Phase::RollingBack {
                        activation: activation.clone(),
                        cause: RollbackCause::ConfirmWindowExpired,
                    },
                    last,
                    vec![],
                    format!("the compliance probes of {closure} ended after the confirm window closed at {deadline}; rolling back (keep a probe set's timeouts well under confirmWindowSecs)"),
                )
            } else {
                let what = match &outcome {
                    ProbeOutcome::NotProbed { why } => why.clone(),
                    ProbeOutcome::Ran {
                        mode, passed, failing,
                    } if failing.is_empty() => format!(
                        "all {passed} compliance controls passed ({})",
                        mode.as_str()
                    ),
                    ProbeOutcome::Ran { mode, failing, .. } => format!(
                        "{} recorded, not enforced ({}): {}",
                        failing.len(),
                        mode.as_str(),
                        failing.join("; ")
                    ),
                    ProbeOutcome::Unusable { reason } => reason.clone(),
                };
                step(
                    Phase::AwaitingConfirm {
                        activation: activation.clone(),
                        deadline: *deadline,
                    },
                    last,
                    vec![],
                    format!("{closure}: {what}; confirming until {deadline}"),
                )
            }
        }
        (
            Phase::Probing {
                activation,
                deadline,
                ..
            },
            Event::Resumed { target_running },
        ) => {
            if let Some((phase, why)) =
                resume_failure(activation, *deadline, now, target_running, "while probing")
            {
                step(phase, last, vec![], why)
            } else {
                step(
                    machine.phase.clone(),
                    last,
                    vec![],
                    format!(
                        "resumed while probing {}; results from before the restart are discarded, running its compliance probes again",
                        activation.target.closure_hash
                    ),
                )
            }
        }
        (Phase::Switching { activation }, Event::SwitchFailed { reason }) => step(
            Phase::RollingBack {
                activation: activation.clone(),
                cause: RollbackCause::SwitchFailed {
                    reason: reason.clone(),
                },
            },
            last,
            vec![],
            format!(
                "switch to {} failed ({reason}); rolling back to {}",
                activation.target.closure_hash, activation.previous
            ),
        ),
        (Phase::AwaitingConfirm { activation, deadline }, Event::Resumed { target_running }) => {
            if let Some((phase, why)) =
                resume_failure(activation, *deadline, now, target_running, "awaiting confirm")
            {
                step(phase, last, vec![], why)
            } else {
                step(
                    machine.phase.clone(),
                    last,
                    vec![],
                    format!("resumed with {} running and the confirm window open until {deadline}; confirming", activation.target.closure_hash),
                )
            }
        }
        (Phase::AwaitingConfirm { activation, .. }, Event::Confirmed) => {
            let reason = format!(
                "confirm of {} in rollout {} accepted",
                activation.target.closure_hash, activation.target.rollout_id
            );
            step(
                Phase::Idle,
                Some(activation.clone()),
                vec![
                    Effect::MarkConfirmed {
                        closure_hash: activation.target.closure_hash.clone(),
                    },
                    report(ReportKind::Activated, &activation.target, &reason),
                ],
                reason,
            )
        }
        (Phase::AwaitingConfirm { activation, .. }, Event::ConfirmGone { reason }) => step(
            Phase::RollingBack {
                activation: activation.clone(),
                cause: RollbackCause::ConfirmGone {
                    reason: reason.clone(),
                },
            },
            last,
            vec![],
            format!("confirm refused with 410 ({reason}); rolling back"),
        ),
        (Phase::AwaitingConfirm { activation, deadline }, Event::ConfirmUnanswered) => {
            if now > *deadline {
                step(
                    Phase::RollingBack {
                        activation: activation.clone(),
                        cause: RollbackCause::ConfirmWindowExpired,
                    },
                    last,
                    vec![],
                    format!("confirm window closed at {deadline} without a 204; rolling back"),
                )
            } else {
                step(
                    machine.phase.clone(),
                    last,
                    vec![],
                    format!("confirm not answered; retrying until {deadline}"),
                )
            }
        }
        (Phase::RollingBack { activation, cause }, Event::RolledBack) => {
            let reason = format!(
                "rolled back from {} to {}: {}",
                activation.target.closure_hash,
                activation.previous,
                cause.describe()
            );
            step(
                Phase::Idle,
                None,
                vec![
                    failed(activation, cause.failure(), &cause.describe(), now),
                    report(ReportKind::RolledBack, &activation.target, &reason),
                ],
                reason,
            )
        }
        (Phase::RollingBack { activation, cause }, Event::RollbackFailed { reason }) => {
            let why = format!(
                "rollback from {} to {} failed ({reason}) after: {}; the host needs an operator",
                activation.target.closure_hash,
                activation.previous,
                cause.describe()
            );
            step(
                Phase::Idle,
                None,
                vec![
                    failed(activation, cause.failure(), &cause.describe(), now),
                    report(ReportKind::RollbackFailed, &activation.target, &why),
                ],
                why,
            )
        }
        (_, event) => return Err(unexpected(&event)),
    })
}

/// A confirm window of 0 would roll back at once; the CP always sends one, but a floor
/// keeps a bad value from causing a false rollback.
/// A resumed activation that cannot go on, `doing` what it was doing: the target no
/// longer runs, or the confirm window closed while the agent was down.
fn resume_failure(
    activation: &Activation,
    deadline: OffsetDateTime,
    now: OffsetDateTime,
    target_running: bool,
    doing: &str,
) -> Option<(Phase, String)> {
    let (cause, why) = if !target_running {
        (
            RollbackCause::SwitchFailed {
                reason: "the running system is no longer the target".to_owned(),
            },
            format!(
                "resumed {doing}, but {} is not running; rolling back",
                activation.target.closure_hash
            ),
        )
    } else if now > deadline {
        (
            RollbackCause::ConfirmWindowExpired,
            format!("resumed {doing} after the confirm window closed at {deadline}; rolling back"),
        )
    } else {
        return None;
    };
    Some((
        Phase::RollingBack {
            activation: activation.clone(),
            cause,
        },
        why,
    ))
}

fn window_secs(confirm_window_secs: u64) -> i64 {
    i64::try_from(confirm_window_secs.max(10)).unwrap_or(i64::MAX / 2)
}

/// The confirm window of an activation, counted from the end of its switch.
pub fn confirm_window(activation: &Activation) -> Duration {
    Duration::seconds(window_secs(activation.target.confirm_window_secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-27 10:00 UTC);

    fn target(rollout: &str, closure: &str) -> Target {
        Target {
            closure_hash: closure.to_owned(),
            rollout_id: rollout.to_owned(),
            wave_index: 0,
            signed_at: NOW,
            freshness_window_secs: 3600,
            confirm_window_secs: 120,
        }
    }

    fn activation() -> Activation {
        Activation {
            target: target("r1", "new"),
            previous: "old".to_owned(),
        }
    }

    fn in_phase(phase: Phase) -> Machine {
        Machine {
            phase,
            last_activation: None,
        }
    }

    fn awaiting() -> Machine {
        in_phase(Phase::AwaitingConfirm {
            activation: activation(),
            deadline: NOW + Duration::seconds(60),
        })
    }

    fn kinds(step: &Step) -> Vec<ReportKind> {
        step.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Report { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect()
    }

    fn records_failed(step: &Step) -> bool {
        step.effects
            .iter()
            .any(|e| matches!(e, Effect::RecordFailed(f) if f.closure_hash == "new" && f.rollout_id == "r1"))
    }

    #[test]
    fn idle_target_accepted_starts_fetching_from_the_running_system() {
        let s = transition(
            &Machine::default(),
            Event::TargetAccepted {
                target: target("r1", "new"),
                current: "old".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(
            s.machine.phase,
            Phase::Fetching {
                activation: activation()
            }
        );
        assert!(s.effects.is_empty());
    }

    #[test]
    fn idle_target_refused_reports_and_records_and_activates_nothing() {
        let s = transition(
            &Machine::default(),
            Event::TargetRefused {
                target: target("r1", "new"),
                kind: ReportKind::ManifestRejected,
                reason: "not in hostSet".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(kinds(&s), vec![ReportKind::ManifestRejected]);
        assert!(records_failed(&s));
    }

    #[test]
    fn awaiting_confirm_target_refused_keeps_the_activation() {
        let s = transition(
            &awaiting(),
            Event::TargetRefused {
                target: target("r2", "new"),
                kind: ReportKind::ManifestRejected,
                reason: "rolloutId changed".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, awaiting().phase);
        assert_eq!(kinds(&s), vec![ReportKind::ManifestRejected]);
    }

    #[test]
    fn idle_rollback_signal_undoes_the_last_confirmed_activation() {
        let m = Machine {
            phase: Phase::Idle,
            last_activation: Some(activation()),
        };
        let signal = RollbackSignal {
            rollout_id: "r1".into(),
            reason: "health gate".into(),
        };
        let s = transition(
            &m,
            Event::RollbackSignal {
                signal,
                current: "new".into(),
                unhealthy: true,
            },
            NOW,
        )
        .unwrap();
        let Phase::RollingBack { cause, .. } = &s.machine.phase else {
            panic!("{:?}", s.machine.phase);
        };
        assert!(matches!(cause, RollbackCause::Signal { .. }));
        // This host's own units were over the gate: the closure is unhealthy here.
        assert_eq!(cause.failure(), FailureCause::Health);
    }

    #[test]
    fn idle_rollback_signal_for_another_rollout_or_closure_is_ignored() {
        let m = Machine {
            phase: Phase::Idle,
            last_activation: Some(activation()),
        };
        for (rollout, current) in [("r2", "new"), ("r1", "old")] {
            let s = transition(
                &m,
                Event::RollbackSignal {
                    signal: RollbackSignal {
                        rollout_id: rollout.into(),
                        reason: "x".into(),
                    },
                    current: current.into(),
                    unhealthy: false,
                },
                NOW,
            )
            .unwrap();
            assert_eq!(s.machine, m);
            assert!(s.effects.is_empty());
        }
    }

    #[test]
    fn fetching_rollback_signal_abandons_without_activating() {
        let m = in_phase(Phase::Fetching {
            activation: activation(),
        });
        let s = transition(
            &m,
            Event::RollbackSignal {
                signal: RollbackSignal {
                    rollout_id: "r1".into(),
                    reason: "halted".into(),
                },
                current: "old".into(),
                unhealthy: false,
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(kinds(&s), vec![ReportKind::ActivationFailed]);
        assert!(records_failed(&s));
    }

    #[test]
    fn awaiting_confirm_rollback_signal_rolls_back() {
        let s = transition(
            &awaiting(),
            Event::RollbackSignal {
                signal: RollbackSignal {
                    rollout_id: "r1".into(),
                    reason: "halted".into(),
                },
                current: "new".into(),
                unhealthy: false,
            },
            NOW,
        )
        .unwrap();
        let Phase::RollingBack { cause, .. } = &s.machine.phase else {
            panic!("{:?}", s.machine.phase);
        };
        // Rolled back because the rollout halted: nothing said about the closure here.
        assert_eq!(cause.failure(), FailureCause::RollbackSignal);
    }

    #[test]
    fn fetching_realised_switches() {
        let m = in_phase(Phase::Fetching {
            activation: activation(),
        });
        let realised = Event::Realised {
            paths: 3,
            keys: vec!["fleet-cache-1".into()],
        };
        let s = transition(&m, realised, NOW).unwrap();
        assert_eq!(
            s.machine.phase,
            Phase::Switching {
                activation: activation()
            }
        );
        assert!(
            s.reason.contains("every path of its closure (3) carries a signature by a pinned cache key (fleet-cache-1)"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn fetching_closure_refused_reports_records_and_goes_idle() {
        let m = in_phase(Phase::Fetching {
            activation: activation(),
        });
        let s = transition(
            &m,
            Event::ClosureRefused {
                reason: "unsigned".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(kinds(&s), vec![ReportKind::ClosureRejected]);
        assert!(records_failed(&s));
    }

    #[test]
    fn fetching_realise_failed_goes_idle_without_recording() {
        let m = in_phase(Phase::Fetching {
            activation: activation(),
        });
        let s = transition(
            &m,
            Event::RealiseFailed {
                reason: "cache down".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert!(s.effects.is_empty());
    }

    #[test]
    fn switching_succeeded_probes_first_with_the_confirm_window_already_counting() {
        let m = in_phase(Phase::Switching {
            activation: activation(),
        });
        let s = transition(&m, Event::SwitchSucceeded, NOW).unwrap();
        assert_eq!(s.machine.phase, probing().phase);
        assert!(s.effects.is_empty());
    }

    fn probing() -> Machine {
        in_phase(Phase::Probing {
            activation: activation(),
            activated_at: NOW,
            deadline: NOW + Duration::seconds(120),
        })
    }

    fn ran(mode: ComplianceMode, failing: &[&str]) -> Event {
        Event::Probed(ProbeOutcome::Ran {
            mode,
            passed: 2,
            failing: failing.iter().map(|f| f.to_string()).collect(),
        })
    }

    fn awaits_confirm_until_the_switch_deadline(s: &Step) {
        assert_eq!(
            s.machine.phase,
            Phase::AwaitingConfirm {
                activation: activation(),
                deadline: NOW + Duration::seconds(120)
            },
            "{}",
            s.reason
        );
        assert!(s.effects.is_empty());
    }

    #[test]
    fn probes_passing_or_nothing_to_probe_go_on_to_the_confirm_with_the_same_deadline() {
        let later = NOW + Duration::seconds(30);
        let s = transition(&probing(), ran(ComplianceMode::Enforce, &[]), later).unwrap();
        awaits_confirm_until_the_switch_deadline(&s);
        let none = Event::Probed(ProbeOutcome::NotProbed {
            why: "no probe set".into(),
        });
        let s = transition(&probing(), none, later).unwrap();
        awaits_confirm_until_the_switch_deadline(&s);
    }

    #[test]
    fn permissive_failures_are_recorded_and_confirmed() {
        let failing = "control ssh-root-login-key-only failed (cis 5.2.8)";
        let s = transition(&probing(), ran(ComplianceMode::Permissive, &[failing]), NOW).unwrap();
        awaits_confirm_until_the_switch_deadline(&s);
        assert!(s.reason.contains(failing), "{}", s.reason);
    }

    #[test]
    fn enforce_failure_rolls_back_and_records_a_compliance_failure_naming_the_control() {
        let failing = "control ssh-root-login-key-only failed (cis 5.2.8, nis2 21.2.i)";
        let s = transition(&probing(), ran(ComplianceMode::Enforce, &[failing]), NOW).unwrap();
        let Phase::RollingBack { cause, .. } = &s.machine.phase else {
            panic!("{:?}", s.machine.phase);
        };
        assert_eq!(cause.failure(), FailureCause::Compliance);
        assert_eq!(cause.describe(), format!("compliance: {failing}"));
        assert!(s.effects.is_empty(), "reported once rolled back");
        let s = transition(&s.machine, Event::RolledBack, NOW).unwrap();
        assert_eq!(kinds(&s), vec![ReportKind::RolledBack]);
        let recorded = s.effects.iter().find_map(|e| match e {
            Effect::RecordFailed(f) => Some(f.clone()),
            _ => None,
        });
        let recorded = recorded.unwrap();
        assert_eq!(recorded.cause, Some(FailureCause::Compliance));
        assert_eq!(recorded.reason, format!("compliance: {failing}"));
    }

    #[test]
    fn an_unusable_probe_set_is_an_enforce_failure() {
        let s = transition(
            &probing(),
            Event::Probed(ProbeOutcome::Unusable {
                reason: "the probe set is malformed".into(),
            }),
            NOW,
        )
        .unwrap();
        let Phase::RollingBack { cause, .. } = &s.machine.phase else {
            panic!("{:?}", s.machine.phase);
        };
        assert_eq!(cause.failure(), FailureCause::Compliance);
        assert!(cause
            .describe()
            .starts_with("compliance: the probe set is malformed"));
    }

    #[test]
    fn probes_that_end_after_the_window_roll_back() {
        let late = NOW + Duration::seconds(121);
        let s = transition(&probing(), ran(ComplianceMode::Enforce, &[]), late).unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::ConfirmWindowExpired,
                ..
            }
        ));
    }

    #[test]
    fn resumed_while_probing_probes_again_and_never_confirms_without_fresh_results() {
        let s = transition(
            &probing(),
            Event::Resumed {
                target_running: true,
            },
            NOW + Duration::seconds(5),
        )
        .unwrap();
        assert_eq!(s.machine, probing());
        assert!(s.effects.is_empty());
        // Only a fresh Probed leaves probing: a confirm answer cannot skip it.
        assert!(transition(&probing(), Event::Confirmed, NOW).is_err());
        let s = transition(
            &probing(),
            Event::Resumed {
                target_running: true,
            },
            NOW + Duration::seconds(121),
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::ConfirmWindowExpired,
                ..
            }
        ));
        let s = transition(
            &probing(),
            Event::Resumed {
                target_running: false,
            },
            NOW,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::SwitchFailed { .. },
                ..
            }
        ));
    }

    #[test]
    fn probing_rollback_signal_rolls_back() {
        let s = transition(
            &probing(),
            Event::RollbackSignal {
                signal: RollbackSignal {
                    rollout_id: "r1".into(),
                    reason: "halted".into(),
                },
                current: "new".into(),
                unhealthy: false,
            },
            NOW,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::Signal { .. },
                ..
            }
        ));
    }

    #[test]
    fn switching_failed_rolls_back() {
        let m = in_phase(Phase::Switching {
            activation: activation(),
        });
        let s = transition(
            &m,
            Event::SwitchFailed {
                reason: "exit 1".into(),
            },
            NOW,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::SwitchFailed { .. },
                ..
            }
        ));
        assert!(
            s.effects.is_empty(),
            "success is never reported, failure only after the rollback"
        );
    }

    #[test]
    fn resumed_awaiting_confirm_confirms_while_the_window_is_open() {
        let s = transition(
            &awaiting(),
            Event::Resumed {
                target_running: true,
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine, awaiting());
    }

    #[test]
    fn resumed_awaiting_confirm_after_the_window_rolls_back() {
        let later = NOW + Duration::seconds(61);
        let s = transition(
            &awaiting(),
            Event::Resumed {
                target_running: true,
            },
            later,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::ConfirmWindowExpired,
                ..
            }
        ));
    }

    #[test]
    fn resumed_awaiting_confirm_with_the_target_not_running_rolls_back() {
        let s = transition(
            &awaiting(),
            Event::Resumed {
                target_running: false,
            },
            NOW,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::SwitchFailed { .. },
                ..
            }
        ));
    }

    #[test]
    fn confirmed_goes_idle_remembers_the_activation_and_reports_activated() {
        let s = transition(&awaiting(), Event::Confirmed, NOW).unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(s.machine.last_activation, Some(activation()));
        assert!(s.effects.contains(&Effect::MarkConfirmed {
            closure_hash: "new".into()
        }));
        assert_eq!(kinds(&s), vec![ReportKind::Activated]);
    }

    #[test]
    fn confirm_gone_rolls_back() {
        let s = transition(
            &awaiting(),
            Event::ConfirmGone {
                reason: "failed".into(),
            },
            NOW,
        )
        .unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::ConfirmGone { .. },
                ..
            }
        ));
    }

    #[test]
    fn confirm_unanswered_retries_inside_the_window_and_rolls_back_after_it() {
        let s = transition(&awaiting(), Event::ConfirmUnanswered, NOW).unwrap();
        assert_eq!(s.machine, awaiting());
        let later = NOW + Duration::seconds(61);
        let s = transition(&awaiting(), Event::ConfirmUnanswered, later).unwrap();
        assert!(matches!(
            s.machine.phase,
            Phase::RollingBack {
                cause: RollbackCause::ConfirmWindowExpired,
                ..
            }
        ));
    }

    #[test]
    fn rolled_back_records_the_failure_and_never_reports_success() {
        let m = in_phase(Phase::RollingBack {
            activation: activation(),
            cause: RollbackCause::ConfirmWindowExpired,
        });
        let s = transition(&m, Event::RolledBack, NOW).unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(s.machine.last_activation, None);
        assert_eq!(kinds(&s), vec![ReportKind::RolledBack]);
        assert!(records_failed(&s));
        assert!(!s
            .effects
            .iter()
            .any(|e| matches!(e, Effect::MarkConfirmed { .. })));
    }

    #[test]
    fn rollback_failed_reports_it_and_records_the_failure() {
        let m = in_phase(Phase::RollingBack {
            activation: activation(),
            cause: RollbackCause::ConfirmWindowExpired,
        });
        let s = transition(
            &m,
            Event::RollbackFailed {
                reason: "exit 1".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(s.machine.phase, Phase::Idle);
        assert_eq!(kinds(&s), vec![ReportKind::RollbackFailed]);
        assert!(records_failed(&s));
    }

    #[test]
    fn stray_events_are_refused_and_change_nothing() {
        assert!(transition(&Machine::default(), Event::Confirmed, NOW).is_err());
        assert!(transition(&Machine::default(), Event::RolledBack, NOW).is_err());
        let m = in_phase(Phase::Switching {
            activation: activation(),
        });
        assert!(transition(
            &m,
            Event::TargetAccepted {
                target: target("r2", "x"),
                current: "old".into()
            },
            NOW
        )
        .is_err());
    }

    #[test]
    fn phases_round_trip_through_json() {
        for m in [
            Machine::default(),
            awaiting(),
            probing(),
            in_phase(Phase::RollingBack {
                activation: activation(),
                cause: RollbackCause::Compliance {
                    reason: "compliance: x".into(),
                },
            }),
            in_phase(Phase::RollingBack {
                activation: activation(),
                cause: RollbackCause::ConfirmGone { reason: "x".into() },
            }),
        ] {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<Machine>(&text).unwrap(), m);
        }
    }
}
