//! One reconcile tick.
//!
//! The tick runs in passes so that it reaches a fixpoint (reconciling again after applying
//! the plan decides nothing new) and so that budgets are counted once:
//!
//! 1. channels: open the newest ref where the channel allows it, supersede what it
//!    replaces; then settle every host of every live rollout against what its agent
//!    attested (delivery, confirm, failure, soak, recovery after a wipe);
//! 2. rollouts, in channel-edge order: start, health gate, wave promotion, convergence,
//!    revert;
//! 3. dispatch, in the same order, against budgets counted across all live rollouts;
//! 4. a reason for every host that got no action.
//!
//! Nothing here depends on stored state that agents cannot re-attest except the record of
//! decisions already taken; with no records at all (a wipe), passes 1 and 2 rebuild the
//! same current wave and halt from attestations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nixfleet_proto::compliance::{ComplianceMode, FailingControl};
use nixfleet_proto::wire::{closure_blocked, ActivationPhase, FailedTarget};
use nixfleet_proto::{ChannelEdge, FleetResolved, HostSetEntry, RolloutManifest, Selector};
use time::{Duration, OffsetDateTime};

use crate::budget;
use crate::host::{HostEvent, HostState};
use crate::observed::{Attestation, Config, Observed};
use crate::plan::{Action, Plan};
use crate::reason;
use crate::rollout::{RolloutEvent, RolloutState, WavePhase};
use crate::stored::RolloutRecord;

/// Bounds the per-host transition chain of one tick (the longest real chain is four).
const MAX_HOST_STEPS: usize = 8;

pub(crate) fn reconcile(
    fleet: &FleetResolved,
    fleet_resolved_hash: &str,
    manifests: &BTreeMap<&str, &RolloutManifest>,
    observed: &Observed,
    config: &Config,
    now: OffsetDateTime,
) -> Plan {
    let ctx = Ctx::new(fleet, observed, config, now);
    let mut tick = Tick {
        ctx,
        views: Vec::new(),
        channels: Vec::new(),
        actions: Vec::new(),
        notes: BTreeMap::new(),
        budgets: Vec::new(),
    };
    tick.open_channels(fleet, fleet_resolved_hash, manifests, observed);
    for v in 0..tick.views.len() {
        tick.settle_all(v);
    }
    tick.run_rollouts();
    tick.count_budgets(manifests);
    tick.dispatch();
    tick.finish()
}

struct Ctx<'a> {
    now: OffsetDateTime,
    confirm_window: Duration,
    activation_timeout: Duration,
    late_confirm_grace: Duration,
    offline_after: Duration,
    attestations_since: OffsetDateTime,
    /// Seen at or after this instant means online.
    online_since: OffsetDateTime,
    hosts: &'a BTreeMap<String, Arc<Attestation>>,
    /// Host edges: `after` → its `before`s, sorted.
    edges: BTreeMap<&'a str, Vec<&'a str>>,
    /// Channel edges: `after` → its `before`s, sorted.
    channel_preds: BTreeMap<&'a str, Vec<&'a str>>,
    /// Channels whose fleet declares `compliance.mode = "enforce"`.
    enforcing: BTreeSet<&'a str>,
}

impl<'a> Ctx<'a> {
    fn new(
        fleet: &'a FleetResolved,
        observed: &'a Observed,
        config: &Config,
        now: OffsetDateTime,
    ) -> Self {
        let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in &fleet.edges {
            edges.entry(&e.after).or_default().push(&e.before);
        }
        let mut channel_preds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in &fleet.channel_edges {
            if e.before != e.after {
                channel_preds.entry(&e.after).or_default().push(&e.before);
            }
        }
        for list in edges.values_mut().chain(channel_preds.values_mut()) {
            list.sort_unstable();
            list.dedup();
        }
        let offline_after = secs(config.offline_after_secs);
        let enforcing = fleet
            .channels
            .iter()
            .filter(|(_, c)| c.compliance.mode == ComplianceMode::Enforce.as_str())
            .map(|(name, _)| name.as_str())
            .collect();
        Ctx {
            now,
            confirm_window: secs(config.confirm_window_secs),
            activation_timeout: secs(config.activation_timeout_secs),
            late_confirm_grace: secs(config.late_confirm_grace_secs),
            offline_after,
            attestations_since: observed.attestations_since,
            online_since: now
                .checked_sub(offline_after)
                .unwrap_or_else(|| time::PrimitiveDateTime::MIN.assume_utc()),
            hosts: &observed.hosts,
            edges,
            channel_preds,
            enforcing,
        }
    }

    /// Whether a rollout's compliance evidence gates it: its signed manifest says
    /// `enforce` (or, for manifests from before that was recorded, its channel does), and
    /// it selects at least one framework.
    fn enforces_compliance(&self, manifest: &RolloutManifest) -> bool {
        if manifest.compliance_frameworks.is_empty() {
            return false;
        }
        match &manifest.compliance {
            Some(c) => c.mode == ComplianceMode::Enforce,
            None => self.enforcing.contains(manifest.channel.as_str()),
        }
    }

    fn later(&self, from: OffsetDateTime, by: Duration) -> OffsetDateTime {
        from.checked_add(by)
            .unwrap_or_else(|| time::PrimitiveDateTime::MAX.assume_utc())
    }

    fn presence(&self, obs: Option<&Attestation>) -> Presence {
        match obs {
            Some(a) if a.last_seen >= self.online_since => Presence::Online,
            Some(a) => Presence::Offline { since: a.last_seen },
            None => Presence::Unseen {
                holds: self.now - self.attestations_since <= self.offline_after,
            },
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Online,
    Offline {
        since: OffsetDateTime,
    },
    /// No attestation since the control plane started. `holds` while that is recent: the
    /// host may simply not have checked in yet.
    Unseen {
        holds: bool,
    },
}

impl Presence {
    /// Keeps its wave from promoting while Queued.
    fn holds_wave(self) -> bool {
        matches!(self, Presence::Online | Presence::Unseen { holds: true })
    }

    /// Offline for good: a Dispatched host that never got its target is requeued.
    fn gone(self) -> bool {
        !self.holds_wave()
    }
}

/// How a rollout's state bears on its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Converged,
    Halted,
    Reverting,
}

impl Mode {
    fn of(state: &RolloutState) -> Mode {
        match state {
            RolloutState::Pending { .. } | RolloutState::Executing { .. } => Mode::Running,
            RolloutState::Converged => Mode::Converged,
            RolloutState::Halted { .. } | RolloutState::Superseded { .. } => Mode::Halted,
            RolloutState::Reverting { .. } | RolloutState::Reverted { .. } => Mode::Reverting,
        }
    }
}

/// One host of one live rollout, as this tick sees it.
struct Slot<'a> {
    entry: &'a HostSetEntry,
    /// The wave used for sequencing (clamped to the manifest's waves).
    wave: u32,
    obs: Option<&'a Attestation>,
    presence: Presence,
    state: HostState,
    since: OffsetDateTime,
    dispatched_at: Option<OffsetDateTime>,
    confirmed_at: Option<OffsetDateTime>,
    /// Got an action this tick (and so needs no reason).
    acted: bool,
    /// Why dispatch passed it over.
    note: Option<String>,
}

impl<'a> Slot<'a> {
    fn hostname(&self) -> &str {
        &self.entry.hostname
    }

    /// A failure of this host's target closure recorded in another rollout that keeps it
    /// from being sent again ([`closure_blocked`]).
    fn inherited_failure(&self, rollout_id: &str) -> Option<&'a FailedTarget> {
        let failed = &self.obs?.failed_targets;
        closure_blocked(failed, rollout_id, &self.entry.target_closure)
            .filter(|f| f.rollout_id != rollout_id)
    }

    fn on_target(&self) -> bool {
        self.obs.is_some_and(|a| {
            a.current_closure.as_deref() == Some(self.entry.target_closure.as_str())
        })
    }

    /// Activated this rollout's closure, so a rollback concerns it. A host that confirmed
    /// the closure before the intent was first signed already ran it: leave it alone. (Not
    /// this signature's time: a re-sign must not make the rollout's own hosts look older.)
    fn activated(&self, manifest: &RolloutManifest) -> bool {
        if self.dispatched_at.is_some() || matches!(self.state, HostState::ConfirmWindow { .. }) {
            return true;
        }
        match (self.confirmed_at, manifest.first_signed_at()) {
            (Some(confirmed), Some(signed)) => confirmed >= signed,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// One live rollout with a manifest.
struct View<'a> {
    id: &'a str,
    manifest: &'a RolloutManifest,
    /// Hosts soak only with passing compliance evidence for the target closure.
    enforce_compliance: bool,
    state: RolloutState,
    /// One per host of the manifest's host set, by hostname.
    slots: Vec<Slot<'a>>,
    /// Slot indices per wave, by hostname.
    waves: Vec<Vec<usize>>,
    /// Host reason while Pending behind a channel edge.
    deferred: Option<String>,
    /// Per slot, the (global) budgets it belongs to: `members[member_at[i]..member_at[i+1]]`.
    member_at: Vec<usize>,
    members: Vec<usize>,
}

impl View<'_> {
    fn wave_count(&self) -> u32 {
        u32::try_from(self.waves.len()).unwrap_or(u32::MAX)
    }

    fn index_of(&self, hostname: &str) -> Option<usize> {
        self.slots
            .binary_search_by(|s| s.entry.hostname.as_str().cmp(hostname))
            .ok()
    }

    fn budgets_of(&self, slot: usize) -> &[usize] {
        &self.members[self.member_at[slot]..self.member_at[slot + 1]]
    }

    fn soak(&self, wave: u32) -> Duration {
        let minutes = self
            .manifest
            .waves
            .get(wave as usize)
            .map_or(0, |w| w.soak_minutes);
        Duration::minutes(i64::from(minutes))
    }
}

struct ChannelRun<'a> {
    name: &'a str,
    /// The channel's newest ref while it has not been opened.
    newest: Option<(&'a str, &'a RolloutManifest)>,
    /// Live rollouts of the channel, oldest first; the last is the channel's current one.
    views: Vec<usize>,
    latest: Option<Latest<'a>>,
}

enum Latest<'a> {
    View(usize),
    /// A live record whose manifest the caller did not supply.
    Record(&'a str, &'a RolloutState),
}

/// A disruption budget, shared by every live rollout whose manifest carries its selector.
struct Budget {
    selector: Selector,
    label: String,
    max_in_flight: Option<u32>,
    max_in_flight_pct: Option<u32>,
    limit: u32,
    in_flight: u32,
}

struct Tick<'a> {
    ctx: Ctx<'a>,
    views: Vec<View<'a>>,
    /// In channel-edge order.
    channels: Vec<ChannelRun<'a>>,
    actions: Vec<Action>,
    /// Per channel, why its newest ref is not running.
    notes: BTreeMap<String, Vec<String>>,
    budgets: Vec<Budget>,
}

impl<'a> Tick<'a> {
    // Pass 1: channels.

    fn open_channels(
        &mut self,
        fleet: &'a FleetResolved,
        fleet_resolved_hash: &str,
        manifests: &'a BTreeMap<&'a str, &'a RolloutManifest>,
        observed: &'a Observed,
    ) {
        let mut live: BTreeMap<&str, Vec<(&str, &RolloutRecord)>> = BTreeMap::new();
        for (id, record) in &observed.stored.rollouts {
            if !matches!(record.state, RolloutState::Superseded { .. }) {
                live.entry(&record.channel).or_default().push((id, record));
            }
        }
        for list in live.values_mut() {
            list.sort_by(|a, b| (a.1.opened_at, a.0).cmp(&(b.1.opened_at, b.0)));
        }
        // The newest ref of a channel is its manifest projected from the current fleet.
        let mut newest: BTreeMap<&str, (&str, &RolloutManifest)> = BTreeMap::new();
        for (&id, &m) in manifests {
            if m.fleet_resolved_hash != fleet_resolved_hash {
                continue;
            }
            let entry = newest.entry(&m.channel).or_insert((id, m));
            if (m.meta.signed_at, id) > (entry.1.meta.signed_at, entry.0) {
                *entry = (id, m);
            }
        }
        let mut names: BTreeSet<&str> = fleet.channels.keys().map(String::as_str).collect();
        names.extend(newest.keys());
        names.extend(live.keys());

        for name in channel_order(&names, &fleet.channel_edges) {
            let mut run = ChannelRun {
                name,
                // A ref that has a record (live or superseded) is never opened again.
                newest: newest
                    .get(name)
                    .filter(|(id, _)| !observed.stored.rollouts.contains_key(*id))
                    .copied(),
                views: Vec::new(),
                latest: None,
            };
            for &(id, record) in live.get(name).map_or(&[][..], Vec::as_slice) {
                match manifests.get(id) {
                    Some(manifest) => {
                        run.views.push(self.views.len());
                        run.latest = Some(Latest::View(self.views.len()));
                        self.views.push(self.view(id, manifest, Some(record)));
                    }
                    None => {
                        run.latest = Some(Latest::Record(id, &record.state));
                        self.note(name, reason::manifest_missing(id));
                    }
                }
            }
            self.channels.push(run);
            let c = self.channels.len() - 1;
            self.open_newest(c);
        }
    }

    /// Opens the channel's newest ref if its current rollout allows (none, never started,
    /// or finished), superseding what it replaces. Runs again after the channel's
    /// rollouts moved, so a rollout that finishes lets the next one open in the same tick.
    fn open_newest(&mut self, c: usize) -> Option<usize> {
        let (newest_id, newest) = self.channels[c].newest?;
        let name = self.channels[c].name;
        let latest = match &self.channels[c].latest {
            None => None,
            Some(Latest::View(v)) => Some((
                self.views[*v].manifest.display_name.as_str(),
                &self.views[*v].state,
            )),
            Some(Latest::Record(id, state)) => Some((*id, *state)),
        };
        if let Some((display, state)) = latest {
            if !state.is_replaceable() {
                let note = format!(
                    "waiting: {} queued behind {} ({})",
                    newest.display_name,
                    display,
                    state.word()
                );
                self.note(name, note);
                return None;
            }
        }
        self.notes.remove(name);
        self.actions.push(Action::Rollout {
            event: RolloutEvent::Open {
                channel: name.to_owned(),
            },
            rollout: newest_id.to_owned(),
        });
        let supersede = RolloutEvent::Supersede {
            by: newest_id.to_owned(),
        };
        let views = std::mem::take(&mut self.channels[c].views);
        for v in views {
            if self.views[v].state.is_replaceable() {
                self.rollout_event(v, supersede.clone());
            } else {
                self.channels[c].views.push(v);
            }
        }
        if let Some(Latest::Record(id, state)) = self.channels[c].latest {
            if state.is_replaceable() {
                self.actions.push(Action::Rollout {
                    event: supersede,
                    rollout: id.to_owned(),
                });
            }
        }
        let v = self.views.len();
        self.views.push(self.view(newest_id, newest, None));
        let run = &mut self.channels[c];
        run.views.push(v);
        run.latest = Some(Latest::View(v));
        run.newest = None;
        Some(v)
    }

    fn view(
        &self,
        id: &'a str,
        manifest: &'a RolloutManifest,
        record: Option<&'a RolloutRecord>,
    ) -> View<'a> {
        let ctx = &self.ctx;
        let last_wave = manifest.waves.len().saturating_sub(1);
        let wave_count = manifest.waves.len().max(1);
        let mut waves = vec![Vec::new(); wave_count];
        // The host set is sorted by hostname (SPEC.md §4); everything below relies on it,
        // so a manifest that is not gets sorted here rather than misread.
        let mut entries: Vec<&HostSetEntry> = manifest.host_set.iter().collect();
        if !entries.windows(2).all(|w| w[0].hostname < w[1].hostname) {
            entries.sort_by(|a, b| a.hostname.cmp(&b.hostname));
            entries.dedup_by(|b, a| a.hostname == b.hostname);
        }
        let mut slots = Vec::with_capacity(entries.len());
        // Both sorted by hostname: walk them together instead of looking each host up.
        let mut records = record.map(|r| r.hosts.iter().peekable());
        for (i, entry) in entries.into_iter().enumerate() {
            let obs = ctx.hosts.get(&entry.hostname).map(Arc::as_ref);
            // A wave index past the manifest's waves sequences with the last wave.
            let wave = (entry.wave_index as usize).min(last_wave);
            waves[wave].push(i);
            let mut host = None;
            if let Some(records) = records.as_mut() {
                while let Some((name, h)) =
                    records.next_if(|(name, _)| name.as_str() <= entry.hostname.as_str())
                {
                    if *name == entry.hostname {
                        host = Some(h);
                    }
                }
            }
            slots.push(Slot {
                entry,
                wave: u32::try_from(wave).unwrap_or(u32::MAX),
                obs,
                presence: ctx.presence(obs),
                state: host.map_or(HostState::Queued, |h| h.state.clone()),
                since: host.map_or(ctx.now, |h| h.since),
                dispatched_at: host.and_then(|h| h.dispatched_at),
                confirmed_at: host.and_then(|h| h.confirmed_at),
                acted: false,
                note: None,
            });
        }
        View {
            id,
            manifest,
            enforce_compliance: ctx.enforces_compliance(manifest),
            state: record.map_or(RolloutState::Pending { reason: None }, |r| r.state.clone()),
            slots,
            waves,
            deferred: None,
            member_at: Vec::new(),
            members: Vec::new(),
        }
    }

    fn settle_all(&mut self, v: usize) {
        if matches!(self.views[v].state, RolloutState::Superseded { .. }) {
            return;
        }
        for i in 0..self.views[v].slots.len() {
            self.settle(v, i);
        }
    }

    /// Moves one host as far as its attestation and the clock allow.
    fn settle(&mut self, v: usize, i: usize) {
        let view = &mut self.views[v];
        let mode = Mode::of(&view.state);
        let soak = view.soak(view.slots[i].wave);
        for _ in 0..MAX_HOST_STEPS {
            let slot = &mut view.slots[i];
            let rollout = Rollout {
                id: view.id,
                manifest: view.manifest,
                mode,
                soak,
                enforce_compliance: view.enforce_compliance,
            };
            let Some(event) = next_event(&self.ctx, &rollout, slot) else {
                return;
            };
            let Some(next) = slot.state.on(&event) else {
                return;
            };
            if let HostEvent::Confirm { since } = &event {
                slot.confirmed_at = Some(*since);
            }
            slot.state = next;
            slot.since = self.ctx.now;
            slot.acted = true;
            self.actions.push(Action::Host {
                event,
                rollout: view.id.to_owned(),
                host: slot.entry.hostname.clone(),
            });
        }
    }

    // Pass 2: rollouts.

    fn run_rollouts(&mut self) {
        let mut status: BTreeMap<&'a str, (String, RolloutState)> = BTreeMap::new();
        for c in 0..self.channels.len() {
            if let Some(s) = self.channel_status(c) {
                status.insert(self.channels[c].name, s);
            }
        }
        for c in 0..self.channels.len() {
            let name = self.channels[c].name;
            for k in 0..self.channels[c].views.len() {
                let v = self.channels[c].views[k];
                self.run_rollout(v, name, &status);
            }
            if let Some(v) = self.open_newest(c) {
                self.settle_all(v);
                self.run_rollout(v, name, &status);
            }
            if let Some(s) = self.channel_status(c) {
                status.insert(name, s);
            }
        }
    }

    fn channel_status(&self, c: usize) -> Option<(String, RolloutState)> {
        match self.channels[c].latest.as_ref()? {
            Latest::View(v) => {
                let view = &self.views[*v];
                Some((view.manifest.display_name.clone(), view.state.clone()))
            }
            Latest::Record(id, state) => Some(((*id).to_owned(), (*state).clone())),
        }
    }

    fn run_rollout(
        &mut self,
        v: usize,
        channel: &str,
        status: &BTreeMap<&'a str, (String, RolloutState)>,
    ) {
        if matches!(self.views[v].state, RolloutState::Pending { .. }) {
            let blocker = self.ctx.channel_preds.get(channel).and_then(|preds| {
                preds.iter().find_map(|p| {
                    status
                        .get(p)
                        .filter(|(_, s)| *s != RolloutState::Converged)
                        .map(|(display, s)| (*p, display.as_str(), s.word()))
                })
            });
            match blocker {
                Some((pred, display, word)) => {
                    let host_reason = reason::channel_edge(pred);
                    self.note(channel, format!("{host_reason} ({display} is {word})"));
                    self.views[v].deferred = Some(host_reason);
                    self.rollout_event(
                        v,
                        RolloutEvent::Defer {
                            reason: reason::deferred(pred, display, word),
                        },
                    );
                    return;
                }
                None => {
                    self.rollout_event(v, RolloutEvent::Start);
                }
            }
        }
        if matches!(self.views[v].state, RolloutState::Executing { .. }) {
            self.execute(v);
        }
        self.check_revert(v);
    }

    fn note(&mut self, channel: &str, text: String) {
        let notes = self.notes.entry(channel.to_owned()).or_default();
        if !notes.contains(&text) {
            notes.push(text);
        }
    }

    /// Emits `event` if it applies, and moves the working state.
    fn rollout_event(&mut self, v: usize, event: RolloutEvent) -> bool {
        let view = &mut self.views[v];
        let Some(next) = view.state.on(&event) else {
            return false;
        };
        view.state = next;
        self.actions.push(Action::Rollout {
            event,
            rollout: view.id.to_owned(),
        });
        true
    }

    fn execute(&mut self, v: usize) {
        if let Some((wave, failures)) = gate(&self.views[v]) {
            let on_health_failure = self.views[v].manifest.on_health_failure;
            self.rollout_event(
                v,
                RolloutEvent::Halt {
                    wave,
                    failures,
                    on_health_failure,
                },
            );
            // Requeue what was never delivered, or send the rollback signals.
            self.settle_all(v);
            return;
        }
        while let RolloutState::Executing { wave, phase } = self.views[v].state {
            let (holding, soaking) = wave_counts(&self.views[v], wave);
            let event = match phase {
                WavePhase::Active if holding == 0 => RolloutEvent::SoakWave { wave },
                WavePhase::Soaking if holding > 0 => RolloutEvent::ResumeWave { wave },
                WavePhase::Soaking if soaking == 0 => {
                    if wave.saturating_add(1) < self.views[v].wave_count() {
                        RolloutEvent::PromoteWave { wave }
                    } else {
                        RolloutEvent::Converge { wave }
                    }
                }
                _ => break,
            };
            let resumed = matches!(event, RolloutEvent::ResumeWave { .. });
            if !self.rollout_event(v, event) || resumed {
                break;
            }
        }
        if self.views[v].state == RolloutState::Converged {
            self.settle_all(v);
        }
    }

    /// Reverting ends once no online host told to roll back is still on the target; a
    /// Reverted rollout is Reverting again if one shows up on it (an activation that was
    /// under way, or a host back online), which is also what a rebuild would find.
    fn check_revert(&mut self, v: usize) {
        let view = &self.views[v];
        let rolling_back = view
            .slots
            .iter()
            .any(|s| s.state == HostState::RollingBack && s.presence.holds_wave());
        match view.state {
            RolloutState::Reverting { .. } if !rolling_back => {
                self.rollout_event(v, RolloutEvent::FinishRevert);
            }
            RolloutState::Reverted { .. } if rolling_back => {
                self.rollout_event(v, RolloutEvent::ResumeRevert);
            }
            _ => {}
        }
    }

    // Pass 3: budgets and dispatch.

    fn count_budgets(&mut self, manifests: &'a BTreeMap<&'a str, &'a RolloutManifest>) {
        let mut budgets: Vec<Budget> = Vec::new();
        let live = |view: &View| !matches!(view.state, RolloutState::Superseded { .. });
        for view in self.views.iter_mut().filter(|v| live(v)) {
            let manifest = view.manifest;
            let mut pairs: Vec<(usize, usize)> = Vec::new();
            for mb in &manifest.disruption_budgets {
                let selector = budget::canonical(&mb.selector);
                let id = match budgets.iter().position(|b| b.selector == selector) {
                    Some(id) => id,
                    None => {
                        budgets.push(Budget {
                            label: budget::label(&selector),
                            selector,
                            max_in_flight: None,
                            max_in_flight_pct: None,
                            limit: u32::MAX,
                            in_flight: 0,
                        });
                        budgets.len() - 1
                    }
                };
                let b = &mut budgets[id];
                b.max_in_flight = min_some(b.max_in_flight, mb.max_in_flight);
                b.max_in_flight_pct = min_some(b.max_in_flight_pct, mb.max_in_flight_pct);
                if mb.hosts.windows(2).all(|w| w[0] < w[1]) {
                    intersect_sorted(&view.slots, Slot::hostname, &mb.hosts, |i| {
                        pairs.push((i, id));
                    });
                } else {
                    let mut hosts = mb.hosts.clone();
                    hosts.sort();
                    hosts.dedup();
                    intersect_sorted(&view.slots, Slot::hostname, &hosts, |i| {
                        pairs.push((i, id));
                    });
                }
            }
            // One manifest may carry the same budget twice: count a host once.
            pairs.sort_unstable();
            pairs.dedup();
            let mut member_at = Vec::with_capacity(view.slots.len() + 1);
            let mut next = 0;
            for i in 0..view.slots.len() {
                member_at.push(next);
                while next < pairs.len() && pairs[next].0 == i {
                    next += 1;
                }
            }
            member_at.push(next);
            view.members = pairs.into_iter().map(|(_, k)| k).collect();
            view.member_at = member_at;
        }
        // Fleet-wide: a percentage is of every host the budget covers in any channel. Each
        // channel's manifest lists only its own hosts, and the caller passes the current
        // release's manifest of every channel, so the union over all of them is that count.
        let mut all: Vec<Vec<&'a [String]>> = vec![Vec::new(); budgets.len()];
        for m in manifests.values() {
            for mb in &m.disruption_budgets {
                let selector = budget::canonical(&mb.selector);
                if let Some(i) = budgets.iter().position(|b| b.selector == selector) {
                    all[i].push(&mb.hosts);
                }
            }
        }
        for (b, lists) in budgets.iter_mut().zip(&all) {
            let hosts = match b.max_in_flight_pct {
                Some(_) => budget::union_len(lists),
                None => 0,
            };
            b.limit = budget::limit(b.max_in_flight, b.max_in_flight_pct, hosts);
        }
        for view in self.views.iter().filter(|v| live(v)) {
            for (i, slot) in view.slots.iter().enumerate() {
                if slot.state.in_flight() {
                    for &b in view.budgets_of(i) {
                        budgets[b].in_flight += 1;
                    }
                }
            }
        }
        self.budgets = budgets;
    }

    fn dispatch(&mut self) {
        for c in 0..self.channels.len() {
            for k in 0..self.channels[c].views.len() {
                let v = self.channels[c].views[k];
                self.dispatch_rollout(v);
            }
        }
    }

    fn dispatch_rollout(&mut self, v: usize) {
        let view = &mut self.views[v];
        let reach = match view.state {
            RolloutState::Executing { wave, .. } => wave,
            // Hosts that were offline when their wave promoted.
            RolloutState::Converged => view.wave_count().saturating_sub(1),
            _ => return,
        };
        let now = self.ctx.now;
        for wave in 0..=reach {
            let Some(members) = view.waves.get(wave as usize) else {
                break;
            };
            for &i in members {
                let slot = &view.slots[i];
                if slot.state != HostState::Queued || slot.presence != Presence::Online {
                    continue;
                }
                let edge = self
                    .ctx
                    .edges
                    .get(slot.entry.hostname.as_str())
                    .and_then(|befores| {
                        befores.iter().copied().find(|before| {
                            view.index_of(before).is_some_and(|j| {
                                !matches!(
                                    view.slots[j].state,
                                    HostState::Soaked | HostState::Converged
                                )
                            })
                        })
                    });
                if let Some(before) = edge {
                    view.slots[i].note = Some(reason::edge(before));
                    continue;
                }
                let full = view
                    .budgets_of(i)
                    .iter()
                    .map(|&b| &self.budgets[b])
                    .find(|b| b.in_flight >= b.limit);
                if let Some(b) = full {
                    view.slots[i].note = Some(reason::budget(&b.label, b.in_flight, b.limit));
                    continue;
                }
                for &b in view.budgets_of(i) {
                    self.budgets[b].in_flight += 1;
                }
                let slot = &mut view.slots[i];
                slot.state = HostState::Dispatched;
                slot.dispatched_at = Some(now);
                slot.since = now;
                slot.acted = true;
                self.actions.push(Action::Host {
                    event: HostEvent::Dispatch { wave },
                    rollout: view.id.to_owned(),
                    host: slot.entry.hostname.clone(),
                });
            }
        }
    }

    // Pass 4: reasons.

    fn finish(self) -> Plan {
        let mut reasons: Vec<(&str, String)> = Vec::new();
        for run in &self.channels {
            for &v in &run.views {
                let view = &self.views[v];
                // Once per rollout, not per held host: a halted rollout holds them all.
                let first = match view.state {
                    RolloutState::Halted { wave, .. }
                    | RolloutState::Reverting { wave, .. }
                    | RolloutState::Reverted { wave, .. } => first_failure(view, wave),
                    _ => None,
                };
                for slot in view.slots.iter().filter(|s| !s.acted) {
                    reasons.push((
                        &slot.entry.hostname,
                        host_reason(&self.ctx, view, slot, first),
                    ));
                }
            }
        }
        // A host in two live rollouts (it changed channel) keeps the first reason.
        reasons.sort_by(|a, b| a.0.cmp(b.0));
        reasons.dedup_by(|b, a| a.0 == b.0);
        Plan {
            actions: self.actions,
            reasons: reasons
                .into_iter()
                .map(|(host, why)| (host.to_owned(), why))
                .collect(),
            channels: self
                .notes
                .into_iter()
                .filter(|(_, notes)| !notes.is_empty())
                .map(|(channel, notes)| (channel, notes.join("; ")))
                .collect(),
        }
    }
}

/// The next transition a host's attestation and the clock call for, if any.
/// What [`next_event`] needs to know of the rollout a host is in.
struct Rollout<'a> {
    id: &'a str,
    manifest: &'a RolloutManifest,
    mode: Mode,
    soak: Duration,
    enforce_compliance: bool,
}

/// Where a soaking host's compliance evidence for its target closure stands.
enum Evidence<'a> {
    /// Every control passed.
    Passed,
    /// Controls did not pass: `(id, status)`.
    Failing(&'a [FailingControl]),
    /// None stored for this closure, or the agent holds newer than what is stored.
    Awaited,
}

fn evidence_for<'a>(obs: Option<&'a Attestation>, closure: &str) -> Evidence<'a> {
    let Some(obs) = obs else {
        return Evidence::Awaited;
    };
    match &obs.compliance {
        Some(s)
            if s.closure_hash == closure
                && obs
                    .compliance_claimed_at
                    .is_none_or(|c| c <= s.collected_at) =>
        {
            if s.failing.is_empty() {
                Evidence::Passed
            } else {
                Evidence::Failing(&s.failing)
            }
        }
        _ => Evidence::Awaited,
    }
}

fn next_event(ctx: &Ctx, rollout: &Rollout, slot: &Slot) -> Option<HostEvent> {
    let Rollout {
        id: rollout_id,
        manifest,
        mode,
        soak,
        enforce_compliance,
    } = *rollout;
    let on_target = slot.on_target();
    let confirmed = if on_target {
        slot.obs.and_then(|a| a.last_confirmed_at)
    } else {
        None
    };
    // Found on the target: confirmed counts as Healthy since then (never later than now),
    // unconfirmed gets a fresh confirm window. Either way it is never dispatched again.
    let arrived = || match confirmed {
        Some(at) => HostEvent::Confirm {
            since: at.min(ctx.now),
        },
        None => HostEvent::Activate {
            deadline: ctx.later(ctx.now, ctx.confirm_window),
        },
    };

    let reported = slot.obs.and_then(|a| {
        a.failed_targets
            .iter()
            .filter(|f| f.rollout_id == rollout_id)
            .min_by_key(|f| f.at)
    });

    if mode == Mode::Reverting {
        match slot.state {
            HostState::RollingBack => {
                return (slot.obs.is_some() && !on_target).then_some(HostEvent::Revert);
            }
            // Never handed the target: requeued below, nothing to roll back.
            HostState::Queued | HostState::Dispatched => {}
            // Off the target already. A Reverted host that shows up on the target again
            // (an activation that was under way when the signal went out) is told again.
            HostState::Failed { .. } | HostState::Reverted if !on_target => {}
            _ if slot.activated(manifest) => return Some(HostEvent::Rollback),
            _ => {}
        }
    }

    if !matches!(
        slot.state,
        HostState::Failed { .. } | HostState::RollingBack | HostState::Reverted
    ) {
        if let Some(f) = reported {
            let reason = if f.reason.is_empty() {
                "reported by the agent".to_owned()
            } else {
                f.reason.clone()
            };
            return Some(HostEvent::Fail {
                reason,
                at: f.at.min(ctx.now),
            });
        }
    }

    // A closure that already failed on this host is not sent to it again by a later
    // rollout: the host counts as failed at once, with the original reason.
    if matches!(slot.state, HostState::Queued | HostState::Dispatched) && !on_target {
        if let Some(f) = slot.inherited_failure(rollout_id) {
            return Some(HostEvent::Fail {
                reason: reason::already_failed(&f.rollout_id, &f.reason),
                at: f.at.min(ctx.now),
            });
        }
    }

    match &slot.state {
        HostState::Queued => on_target.then(arrived),
        HostState::Dispatched => {
            if on_target {
                return Some(arrived());
            }
            if matches!(mode, Mode::Halted | Mode::Reverting) {
                return Some(HostEvent::Requeue {
                    reason: "rollout halted before delivery".to_owned(),
                });
            }
            // A delivery before this dispatch answered an earlier one; one after now is
            // not a delivery yet.
            let delivered = slot.obs.and_then(|a| a.delivered.as_ref()).filter(|d| {
                d.rollout_id == rollout_id
                    && slot.dispatched_at.is_none_or(|t| d.at > t)
                    && d.at <= ctx.now
            });
            if let Some(d) = delivered {
                return Some(HostEvent::Deliver {
                    deadline: ctx.later(d.at, ctx.activation_timeout + ctx.confirm_window),
                });
            }
            if slot.presence.gone() {
                let reason = match slot.presence {
                    Presence::Offline { since } => reason::offline(since),
                    _ => reason::not_seen(ctx.attestations_since),
                };
                return Some(HostEvent::Requeue { reason });
            }
            None
        }
        HostState::ConfirmWindow { deadline } => {
            if let Some(at) = confirmed {
                return Some(HostEvent::Confirm {
                    since: at.min(ctx.now),
                });
            }
            let progress = slot.obs.and_then(|a| a.activation.as_ref()).filter(|p| {
                p.rollout_id == rollout_id && p.closure_hash == slot.entry.target_closure
            });
            if let Some(p) = progress {
                match p.phase {
                    // The window runs from the end of the switch, as on the agent.
                    ActivationPhase::AwaitingConfirm => {
                        let since = p.since.min(ctx.now);
                        let by_switch = ctx.later(since, ctx.confirm_window);
                        if by_switch < *deadline {
                            return Some(HostEvent::Switched {
                                at: since,
                                deadline: by_switch,
                            });
                        }
                    }
                    ActivationPhase::Fetching | ActivationPhase::Switching
                        if ctx.activation_timeout > Duration::ZERO =>
                    {
                        let delivered = slot
                            .obs
                            .and_then(|a| a.delivered.as_ref())
                            .filter(|d| d.rollout_id == rollout_id);
                        if let Some(d) = delivered {
                            let timeout = ctx.later(d.at, ctx.activation_timeout);
                            if ctx.now >= timeout {
                                return Some(HostEvent::Fail {
                                    reason: reason::activation_timeout(
                                        p.phase.describe(),
                                        p.since,
                                        ctx.activation_timeout,
                                    ),
                                    at: timeout,
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            (ctx.now >= ctx.later(*deadline, ctx.late_confirm_grace)).then(|| HostEvent::Fail {
                reason: "confirm deadline passed".to_owned(),
                at: *deadline,
            })
        }
        HostState::Healthy => {
            let start = slot.confirmed_at.unwrap_or(slot.since);
            let gate = manifest.health_gate.systemd_failed_units.as_ref();
            // Only a report made since the confirm speaks for the new closure: the one
            // before it may describe the old system, or a switch still under way.
            let reported = slot
                .obs
                .filter(|obs| obs.health_at.is_some_and(|at| at >= start));
            if let Some(gate) = gate {
                let obs = reported?;
                if on_target && obs.failed_units > gate.max {
                    return Some(HostEvent::Fail {
                        reason: format!(
                            "health gate: {} failed unit{}, max {}",
                            obs.failed_units,
                            if obs.failed_units == 1 { "" } else { "s" },
                            gate.max
                        ),
                        at: ctx.now,
                    });
                }
            }
            if enforce_compliance && on_target {
                match evidence_for(slot.obs, &slot.entry.target_closure) {
                    Evidence::Failing(failing) => {
                        return Some(HostEvent::Fail {
                            reason: reason::compliance_failed(failing),
                            at: ctx.now,
                        })
                    }
                    // Never promoted on a host that has not shown its controls pass.
                    Evidence::Awaited => return None,
                    Evidence::Passed => {}
                }
            }
            (ctx.now - start >= soak).then_some(HostEvent::Soak)
        }
        HostState::Soaked => (mode == Mode::Converged).then_some(HostEvent::Complete),
        _ => None,
    }
}

/// The wave whose failures first exceeded `maxFailures`, and how many it had by then.
///
/// "First" is by failure time, not by wave: after a `rollback-and-halt` every rolled-back
/// host reports a failed target, earlier waves included, and only the order in time tells
/// which wave actually tripped. That keeps a rebuild after a wipe on the same wave.
fn gate(view: &View) -> Option<(u32, u32)> {
    let max = view.manifest.health_gate.max_failures as usize;
    // A failure carried over from another rollout is not this rollout's: it neither trips
    // the gate nor holds the wave, so the other hosts' new closures still go out. One
    // recorded without a cause (before rollout ids were intents) may have been this very
    // intent under its old id, so it counts: a halt holds across the upgrade.
    let mut failures: Vec<(u32, OffsetDateTime)> = view
        .slots
        .iter()
        .filter_map(|s| match s.state {
            HostState::Failed { at, .. }
                if s.inherited_failure(view.id)
                    .is_none_or(|f| f.cause.is_none()) =>
            {
                Some((s.wave, at))
            }
            _ => None,
        })
        .collect();
    if failures.len() <= max {
        return None;
    }
    failures.sort_unstable();
    let mut tripped: Option<(OffsetDateTime, u32, u32)> = None;
    for group in failures.chunk_by(|a, b| a.0 == b.0) {
        if group.len() <= max {
            continue;
        }
        let (wave, at) = group[max];
        let count = group.iter().filter(|(_, t)| *t <= at).count();
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        if tripped.is_none_or(|(t, _, _)| at < t) {
            tripped = Some((at, wave, count));
        }
    }
    tripped.map(|(_, wave, count)| (wave, count))
}

/// Members of `wave` that keep it Active, and members still soaking.
fn wave_counts(view: &View, wave: u32) -> (usize, usize) {
    let mut holding = 0;
    let mut soaking = 0;
    for &i in view.waves.get(wave as usize).map_or(&[][..], Vec::as_slice) {
        let slot = &view.slots[i];
        match slot.state {
            HostState::Queued if slot.presence.holds_wave() => holding += 1,
            HostState::Dispatched | HostState::ConfirmWindow { .. } => holding += 1,
            HostState::Healthy => soaking += 1,
            _ => {}
        }
    }
    (holding, soaking)
}

/// The earliest failure in `wave`: its host and reason, so that a held host says what
/// tripped the gate (a failed unit, a compliance control, a confirm deadline).
fn first_failure<'v>(view: &'v View, wave: u32) -> Option<(&'v str, &'v str)> {
    view.slots
        .iter()
        .filter(|s| s.wave == wave)
        .filter_map(|s| match &s.state {
            HostState::Failed { reason, at } => Some((*at, s.hostname(), reason.as_str())),
            _ => None,
        })
        .min()
        .map(|(_, host, reason)| (host, reason))
}

/// `first`: the earliest failure of the wave that halted the rollout, if it did.
fn host_reason(ctx: &Ctx, view: &View, slot: &Slot, first: Option<(&str, &str)>) -> String {
    if let Some(note) = &slot.note {
        return note.clone();
    }
    match &slot.state {
        HostState::Queued => match &view.state {
            RolloutState::Pending { .. } => view
                .deferred
                .clone()
                .unwrap_or_else(|| "waiting: rollout not started".to_owned()),
            RolloutState::Executing { wave, .. } if slot.wave > *wave => {
                reason::wave_not_reached(slot.wave)
            }
            RolloutState::Executing { .. } | RolloutState::Converged => match slot.presence {
                Presence::Offline { since } => reason::offline(since),
                Presence::Unseen { .. } => reason::not_seen(ctx.attestations_since),
                Presence::Online => "waiting: queued".to_owned(),
            },
            RolloutState::Halted { wave, failures } => {
                reason::held("halted", *failures, *wave, first)
            }
            RolloutState::Reverting { wave, failures } => {
                reason::held("reverting", *failures, *wave, first)
            }
            RolloutState::Reverted { wave, failures } => {
                reason::held("reverted", *failures, *wave, first)
            }
            RolloutState::Superseded { by } => format!("held: superseded by {by}"),
        },
        HostState::Dispatched => match stale_since(view.manifest) {
            Some(since) if ctx.now > since => format!(
                "dispatched: held until CI re-signs (the release went stale at {})",
                reason::rfc3339(since)
            ),
            _ => "dispatched: target goes out at the next check-in".to_owned(),
        },
        HostState::ConfirmWindow { deadline } => {
            let progress = slot
                .obs
                .and_then(|a| a.activation.as_ref())
                .filter(|p| p.rollout_id == view.id && p.closure_hash == slot.entry.target_closure);
            match progress {
                Some(p) if p.phase != ActivationPhase::AwaitingConfirm => format!(
                    "activating: {} since {}; confirm due by {}",
                    p.phase.describe(),
                    reason::rfc3339(p.since),
                    reason::rfc3339(*deadline)
                ),
                _ => format!("confirming: deadline {}", reason::rfc3339(*deadline)),
            }
        }
        HostState::Healthy => {
            let start = slot.confirmed_at.unwrap_or(slot.since);
            let soak = view.soak(slot.wave);
            if ctx.now - start >= soak {
                let awaited = view.enforce_compliance
                    && slot.on_target()
                    && matches!(
                        evidence_for(slot.obs, &slot.entry.target_closure),
                        Evidence::Awaited
                    );
                if awaited {
                    reason::compliance_awaited(slot.hostname())
                } else {
                    // Soaked long enough, so only the health gate holds it.
                    "soaking: waiting for a health report since the confirm".to_owned()
                }
            } else {
                reason::soaking(
                    (ctx.now - start).whole_minutes().max(0),
                    u32::try_from(soak.whole_minutes()).unwrap_or(u32::MAX),
                )
            }
        }
        HostState::Soaked => match view.state {
            RolloutState::Executing { wave, .. } if wave == slot.wave => {
                format!("soaked: waiting for the rest of wave {wave}")
            }
            _ => "soaked".to_owned(),
        },
        HostState::Converged => "converged".to_owned(),
        HostState::Failed { reason, .. } => format!("failed: {reason}"),
        HostState::RollingBack => "rolling back: rollback signal sent".to_owned(),
        HostState::Reverted => "reverted".to_owned(),
    }
}

/// When the manifest's signature goes stale (its freshness window and the verifiers' 60 s
/// of grace after `signedAt`): the control plane holds its targets back from then on.
fn stale_since(manifest: &RolloutManifest) -> Option<OffsetDateTime> {
    let window = Duration::minutes(i64::from(manifest.freshness_window?));
    Some(nixfleet_proto::stale_after(
        manifest.meta.signed_at?,
        window,
    ))
}

/// Channels with every channel-edge predecessor before its successors; ties (and any
/// cycle, which CI should refuse) by name.
fn channel_order<'a>(names: &BTreeSet<&'a str>, edges: &'a [ChannelEdge]) -> Vec<&'a str> {
    let mut indegree: BTreeMap<&str, usize> = names.iter().map(|n| (*n, 0)).collect();
    let mut successors: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in edges {
        if e.before != e.after
            && names.contains(e.before.as_str())
            && names.contains(e.after.as_str())
            && successors
                .entry(e.before.as_str())
                .or_default()
                .insert(e.after.as_str())
        {
            *indegree.entry(e.after.as_str()).or_default() += 1;
        }
    }
    let mut ready: BTreeSet<&str> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(n, _)| *n)
        .collect();
    let mut order = Vec::with_capacity(names.len());
    while let Some(name) = ready.pop_first() {
        order.push(name);
        for next in successors.get(name).into_iter().flatten() {
            if let Some(d) = indegree.get_mut(next) {
                *d -= 1;
                if *d == 0 {
                    ready.insert(next);
                }
            }
        }
    }
    for name in names {
        if !order.contains(name) {
            order.push(name);
        }
    }
    order
}

fn min_some(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The first index at or after `from` whose item is not `before` the key, in a slice
/// sorted so that `before` holds for a prefix. Gallops: cheap when the answer is near.
fn gallop<T>(items: &[T], from: usize, before: impl Fn(&T) -> bool) -> usize {
    let rest = items.get(from..).unwrap_or(&[]);
    let mut step = 1;
    while step <= rest.len() && before(&rest[step - 1]) {
        step *= 2;
    }
    let lo = step / 2;
    let hi = rest.len().min(step);
    from + lo + rest[lo..hi].partition_point(before)
}

/// Calls `found(i)` for every `items[i]` (sorted by `key`) named in the sorted `hosts`.
/// Budget lists may be fleet-wide, so this gallops rather than searching from scratch.
fn intersect_sorted<T>(
    items: &[T],
    key: impl Fn(&T) -> &str,
    hosts: &[String],
    mut found: impl FnMut(usize),
) {
    let mut at = 0;
    for name in hosts {
        at = gallop(items, at, |item| key(item) < name.as_str());
        match items.get(at) {
            Some(item) if key(item) == name => {
                found(at);
                at += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(names: &[&str]) -> Vec<HostSetEntry> {
        names
            .iter()
            .map(|n| HostSetEntry {
                hostname: (*n).to_owned(),
                wave_index: 0,
                target_closure: "c".to_owned(),
            })
            .collect()
    }

    #[test]
    fn intersection_finds_every_common_host() {
        let set = entries(&["a", "c", "e", "g", "i", "k", "m"]);
        let hosts: Vec<String> = ["b", "c", "d", "k", "m", "z"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        fn key(e: &HostSetEntry) -> &str {
            &e.hostname
        }
        let mut found = Vec::new();
        intersect_sorted(&set, key, &hosts, |i| found.push(i));
        assert_eq!(found, [1, 5, 6]);
        let mut all = Vec::new();
        let every: Vec<String> = set.iter().map(|e| e.hostname.clone()).collect();
        intersect_sorted(&set, key, &every, |i| all.push(i));
        assert_eq!(all, (0..set.len()).collect::<Vec<_>>());
    }

    #[test]
    fn channels_are_ordered_by_edges_then_name() {
        let names: BTreeSet<&str> = ["a", "b", "edge", "stable"].into_iter().collect();
        let edges = vec![
            ChannelEdge {
                before: "stable".into(),
                after: "a".into(),
                reason: None,
            },
            ChannelEdge {
                before: "edge".into(),
                after: "stable".into(),
                reason: None,
            },
        ];
        assert_eq!(channel_order(&names, &edges), ["b", "edge", "stable", "a"]);
        let cycle = vec![
            ChannelEdge {
                before: "a".into(),
                after: "b".into(),
                reason: None,
            },
            ChannelEdge {
                before: "b".into(),
                after: "a".into(),
                reason: None,
            },
        ];
        assert_eq!(channel_order(&names, &cycle), ["edge", "stable", "a", "b"]);
    }
}
