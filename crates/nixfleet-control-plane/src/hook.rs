//! `--event-hook CMD`: runs an operator command for rollout events (halted, converged,
//! host failed) with the event as JSON on stdin, so that email or chat can be wired up
//! without polling. The tick only queues events; one background task runs the command,
//! one event at a time, each run bounded by a timeout. A slow or failing hook is logged
//! and never holds up the tick or check-ins.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nixfleet_proto::api::HookEvent;
use nixfleet_reconciler::{Action, HostEvent, RolloutEvent, StoredState};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// Events waiting for the hook beyond this are dropped (and logged): a hook that cannot
/// keep up must not make the control plane hold memory without bound.
const QUEUE: usize = 1024;

/// The sending half, held by the tick.
#[derive(Clone)]
pub struct EventHook {
    queue: mpsc::Sender<HookEvent>,
    metrics: Arc<Metrics>,
}

impl EventHook {
    /// Starts the task that runs `command` (through `/bin/sh -c`) for each queued event.
    pub fn start(
        command: String,
        timeout: Duration,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> (EventHook, tokio::task::JoinHandle<()>) {
        let (queue, events) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run_hooks(command, timeout, events, metrics.clone(), stop));
        (EventHook { queue, metrics }, task)
    }

    /// Queues events without waiting.
    pub fn send(&self, events: Vec<HookEvent>) {
        for event in events {
            let (name, rollout) = (event.event.clone(), event.rollout_id.clone());
            if let Err(e) = self.queue.try_send(event) {
                Metrics::inc(&self.metrics.hook_dropped);
                tracing::warn!(event = %name, rollout = %rollout, "event hook skipped: {}", match e {
                    mpsc::error::TrySendError::Full(_) => "the hook is more than 1024 events behind",
                    mpsc::error::TrySendError::Closed(_) => "the hook runner has stopped",
                });
            }
        }
    }
}

/// The events of one tick's plan that the hook is run for, in decision order.
pub fn events_of(actions: &[Action], stored: &StoredState, now: OffsetDateTime) -> Vec<HookEvent> {
    let channel = |rollout: &str| stored.rollouts.get(rollout).map(|r| r.channel.clone());
    let detail = |action: &Action| serde_json::to_value(action).unwrap_or_default();
    actions
        .iter()
        .filter_map(|action| {
            let (event, rollout, hostname, reason) = match action {
                Action::Rollout {
                    event:
                        RolloutEvent::Halt {
                            wave,
                            failures,
                            on_health_failure,
                        },
                    rollout,
                } => (
                    "rollout_halted",
                    rollout,
                    None,
                    Some(format!(
                        "health gate tripped in wave {wave} after {failures} failure{}; onHealthFailure {}",
                        if *failures == 1 { "" } else { "s" },
                        serde_json::to_value(on_health_failure)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    )),
                ),
                Action::Rollout {
                    event: RolloutEvent::Converge { .. },
                    rollout,
                } => ("rollout_converged", rollout, None, None),
                Action::Host {
                    event: HostEvent::Fail { reason, .. },
                    rollout,
                    host,
                } => ("host_failed", rollout, Some(host.clone()), Some(reason.clone())),
                _ => return None,
            };
            Some(HookEvent {
                event: event.to_owned(),
                rollout_id: rollout.clone(),
                channel: channel(rollout),
                hostname,
                reason,
                detail: detail(action),
                at: now,
            })
        })
        .collect()
}

async fn run_hooks(
    command: String,
    timeout: Duration,
    mut events: mpsc::Receiver<HookEvent>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
            _ = stop.changed() => return,
        };
        match run_one(&command, &event, timeout).await {
            Ok(()) => {
                Metrics::inc(&metrics.hook_ok);
                tracing::info!(event = %event.event, rollout = %event.rollout_id, "event hook ran")
            }
            Err(why) => {
                Metrics::inc(&metrics.hook_failed);
                tracing::warn!(
                    event = %event.event,
                    rollout = %event.rollout_id,
                    "event hook {command:?} failed: {why}"
                )
            }
        }
    }
}

async fn run_one(command: &str, event: &HookEvent, timeout: Duration) -> Result<(), String> {
    let mut input = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    input.push(b'\n');
    // An absolute path: a NixOS service's PATH has no shell.
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a timeout also ends what the hook started.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let run = async {
        if let Some(stdin) = stdin.as_mut() {
            // A hook that ignores its input closes the pipe early; that is its business.
            let _ = stdin.write_all(&input).await;
        }
        drop(stdin);
        child.wait_with_output().await
    };
    let outcome = tokio::time::timeout(timeout, run).await;
    if outcome.is_err() {
        if let Some(pid) = pid {
            kill_group(pid).await;
        }
    }
    match outcome {
        Err(_) => Err(format!(
            "still running after {} s; killed (raise --event-hook-timeout-secs or make the hook return sooner)",
            timeout.as_secs()
        )),
        Ok(Err(e)) => Err(format!("cannot wait for it: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim();
            Err(format!(
                "exited with {}{}",
                out.status,
                if last.is_empty() {
                    String::new()
                } else {
                    format!(": {last}")
                }
            ))
        }
    }
}

/// SIGKILL to the hook's process group (the shell is killed when its future is dropped).
async fn kill_group(pid: u32) {
    let killed = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = killed {
        tracing::warn!("cannot end the event hook's processes (group {pid}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::OnHealthFailure;
    use nixfleet_reconciler::{RolloutRecord, RolloutState};
    use time::macros::datetime;

    #[test]
    fn only_halts_convergences_and_host_failures_run_the_hook() {
        let now = datetime!(2026-11-27 10:00:00 UTC);
        let mut stored = StoredState::default();
        stored.rollouts.insert(
            "r1".into(),
            RolloutRecord {
                channel: "stable".into(),
                state: RolloutState::Converged,
                opened_at: now,
                since: now,
                hosts: Default::default(),
            },
        );
        let actions = vec![
            Action::Host {
                event: HostEvent::Dispatch { wave: 0 },
                rollout: "r1".into(),
                host: "web-01".into(),
            },
            Action::Host {
                event: HostEvent::Fail {
                    reason: "confirm deadline passed".into(),
                    at: now,
                },
                rollout: "r1".into(),
                host: "web-01".into(),
            },
            Action::Rollout {
                event: RolloutEvent::Halt {
                    wave: 0,
                    failures: 1,
                    on_health_failure: OnHealthFailure::Halt,
                },
                rollout: "r1".into(),
            },
            Action::Rollout {
                event: RolloutEvent::Converge { wave: 1 },
                rollout: "r1".into(),
            },
        ];
        let events = events_of(&actions, &stored, now);
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(
            names,
            ["host_failed", "rollout_halted", "rollout_converged"]
        );
        assert_eq!(events[0].hostname.as_deref(), Some("web-01"));
        assert_eq!(events[0].reason.as_deref(), Some("confirm deadline passed"));
        assert_eq!(events[1].channel.as_deref(), Some("stable"));
        assert_eq!(
            events[1].reason.as_deref(),
            Some("health gate tripped in wave 0 after 1 failure; onHealthFailure halt")
        );
    }
}
