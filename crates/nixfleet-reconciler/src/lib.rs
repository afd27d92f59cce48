//! The nixfleet rollout engine (SPEC.md §6).
//!
//! [`reconcile`] takes the verified fleet, the verified rollout manifests, what agents
//! attested, the stored rollout records and the time, and returns a [`Plan`]: the state
//! changes to make and, for every host that stays where it is, why. [`apply`] folds a plan
//! into the stored records. Both are pure: no I/O, no clock, no randomness; the control
//! plane gathers the inputs and carries out the plan.
//!
//! What the tests hold it to: the same input gives the same plan; reconciling again after
//! applying a plan decides nothing new; no dispatch overruns a budget, jumps a wave or an
//! edge, or comes out of a halted rollout; and with the stored records wiped, the
//! attestations alone rebuild the same current wave and halt without dispatching a host
//! already on its target.
//!
//! # What the control plane does around it
//!
//! - A Dispatched host gets its target in the answer to its next check-in; the control
//!   plane records that as [`Attestation::delivered`], and the confirm deadline runs from
//!   then (ConfirmWindow).
//! - An accepted confirm is recorded as an attestation too (`current_closure` and
//!   `last_confirmed_at`). A host on its target with `last_confirmed_at` is Healthy since
//!   then, never later than now: one rule for live confirms and for recovery.
//! - A host in RollingBack gets the rollback signal at each check-in until it is seen off
//!   the target.
//! - [`Observed::attestations_since`] is when the process started collecting check-ins, so
//!   that hosts not heard from yet hold their wave instead of counting as offline.
//!
//! # Decisions
//!
//! - The newest ref of a channel is its manifest whose `fleetResolvedHash` is the current
//!   fleet's. It opens once the channel's current rollout is absent, Pending, Converged,
//!   Halted or Reverted (superseding it), and waits while it is Executing or Reverting;
//!   refs in between are never opened (queue depth 1, newest wins). A finishing rollout
//!   lets the next one open in the same tick.
//! - Channel edges gate the start (Pending → Executing): a predecessor whose current
//!   rollout is anything but Converged defers it. Channels run in channel-edge order, so a
//!   successor starts in the tick its predecessor converges.
//! - A wave goes Soaking when no online member is queued, dispatched or confirming, and
//!   promotes when none is healthy-but-not-soaked either. Offline queued members do not
//!   hold it and are dispatched when they return, in any later wave or after convergence.
//! - The health gate trips on the wave whose failures first exceeded `maxFailures` in
//!   time (so a rebuild, seeing the failed targets of rolled-back hosts, finds the same
//!   wave). It is checked while Executing only.
//! - On a trip, hosts dispatched but never handed the target go back to Queued; under
//!   `rollback-and-halt` every host that activated the closure (confirm window onwards,
//!   earlier waves included, failed hosts still on it) is told to roll back. A host that
//!   confirmed the closure before the manifest was signed already ran it and is left
//!   alone. Reverting ends once no online host told to roll back is still on the target,
//!   and resumes if one turns up on it again.
//! - Budgets are identified by their selector (lists as sets); a host counts for a budget
//!   when its rollout's manifest lists it there; in flight is Dispatched, ConfirmWindow or
//!   Healthy across every live rollout; the limit is the strictest of the manifests
//!   carrying the budget, with `maxInFlightPct` taken of the distinct hosts they list.
//!
//! # What a wipe cannot bring back
//!
//! Attestations do not say who was online when a wave promoted, nor which failures came
//! from the health gate. So after a wipe: a host that returned after its wave promoted
//! holds that wave again until it soaks (conservative: nothing is skipped); a host that got
//! its target and went offline before confirming is Queued rather than Failed; and a gate
//! trip caused by failed units is found again only while the units still fail (a
//! rolled-back host reports a failed target, but not why).

mod budget;
mod host;
mod observed;
mod plan;
mod reason;
mod rollout;
mod stored;
mod tick;

use std::borrow::Borrow;
use std::collections::BTreeMap;

use nixfleet_proto::{FleetResolved, RolloutManifest};
use time::OffsetDateTime;

pub use host::{HostEvent, HostState};
pub use observed::{Attestation, Config, Delivery, Observed};
pub use plan::{apply, Action, Plan};
pub use rollout::{RolloutEvent, RolloutState, WavePhase};
pub use stored::{HostRecord, RolloutRecord, StoredState};

/// One reconcile tick.
///
/// - `fleet` and `manifests` are verified by the caller; `manifests` is keyed by rolloutId
///   and holds the current fleet's manifest of each channel plus those of every live
///   stored rollout.
/// - `fleet_resolved_hash` identifies `fleet`: a channel's manifest with that
///   `fleetResolvedHash` is the channel's newest ref.
///   Values are anything that borrows as a manifest, so a caller holding its verified
///   manifests elsewhere passes references instead of a copy of every host set.
pub fn reconcile<M: Borrow<RolloutManifest>>(
    fleet: &FleetResolved,
    fleet_resolved_hash: &str,
    manifests: &BTreeMap<String, M>,
    observed: &Observed,
    config: &Config,
    now: OffsetDateTime,
) -> Plan {
    let manifests: BTreeMap<&str, &RolloutManifest> = manifests
        .iter()
        .map(|(id, m)| (id.as_str(), m.borrow()))
        .collect();
    tick::reconcile(
        fleet,
        fleet_resolved_hash,
        &manifests,
        observed,
        config,
        now,
    )
}
