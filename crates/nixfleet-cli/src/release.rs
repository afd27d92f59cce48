//! Turning the unsigned fleet description into a signed release: validation, wave
//! resolution, `meta` stamping and the per-channel rollout manifests (SPEC.md §4).
//! Pure: the caller reads files, signs and writes.

use std::collections::{BTreeMap, BTreeSet};

use nixfleet_proto::{
    Algorithm, FleetResolved, HostSetEntry, Introduced, ManifestBudget, ManifestWave, Meta,
    ResolvedWave, RolloutManifest, Selector, FLEET_SCHEMA_VERSION, MANIFEST_SCHEMA_V1,
    MANIFEST_SCHEMA_VERSION,
};
use nixfleet_trust::hostset;
use nixfleet_trust::verify::SignedManifest;
use time::OffsetDateTime;

/// The manifest schema a release signs (docs/release.md "Manifest format").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestSchema {
    /// The whole plan signed: for fleets with agents that predate schema 2.
    V1,
    /// A header committing to the host set and budget lists by hash; the lists are
    /// written beside it, unsigned.
    #[default]
    V2,
}

impl ManifestSchema {
    pub fn from_version(version: u32) -> Option<ManifestSchema> {
        match version {
            MANIFEST_SCHEMA_V1 => Some(ManifestSchema::V1),
            MANIFEST_SCHEMA_VERSION => Some(ManifestSchema::V2),
            _ => None,
        }
    }

    pub fn version(self) -> u32 {
        match self {
            ManifestSchema::V1 => MANIFEST_SCHEMA_V1,
            ManifestSchema::V2 => MANIFEST_SCHEMA_VERSION,
        }
    }

    /// What is signed for `plan` in this schema.
    pub fn signed_form(self, plan: &RolloutManifest) -> SignedManifest {
        match self {
            ManifestSchema::V1 => SignedManifest::V1(RolloutManifest {
                schema_version: MANIFEST_SCHEMA_V1,
                ..plan.clone()
            }),
            ManifestSchema::V2 => SignedManifest::V2(hostset::header_of(plan)),
        }
    }
}

/// The distinct frozen host lists of a release's budgets, by their SHA-256: each is
/// written once however many budgets and channels share it.
pub fn budget_lists<'a>(
    plans: impl IntoIterator<Item = &'a RolloutManifest>,
) -> BTreeMap<String, &'a [String]> {
    plans
        .into_iter()
        .flat_map(|plan| &plan.disruption_budgets)
        .map(|b| (hostset::budget_sha256(&b.hosts), b.hosts.as_slice()))
        .collect()
}

/// Everything wrong with a fleet description, one sentence each, naming the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    #[error("host {host}: unknown channel {channel:?}")]
    UnknownChannel { host: String, channel: String },
    #[error("channel {channel}: unknown rollout policy {policy:?}")]
    UnknownPolicy { channel: String, policy: String },
    #[error("channel {channel}: freshnessWindow {freshness} is less than 2 × signingIntervalMinutes ({signing}); a release would go stale before the next one is signed")]
    FreshnessTooShort {
        channel: String,
        freshness: u32,
        signing: u32,
    },
    #[error("rollout policy {policy}: has no waves")]
    NoWaves { policy: String },
    #[error("{place}: selector has no condition (an unknown key such as \"tag\" is ignored); use tags, tagsAny, hosts, channel, all, not or and")]
    EmptySelector { place: String },
    #[error("edge {before} -> {after}: unknown host {host:?}")]
    UnknownEdgeHost {
        before: String,
        after: String,
        host: String,
    },
    #[error("edges form a cycle: {0}")]
    EdgeCycle(String),
    #[error("channel edge {before} -> {after}: unknown channel {channel:?}")]
    UnknownEdgeChannel {
        before: String,
        after: String,
        channel: String,
    },
    #[error("channel edges form a cycle: {0}")]
    ChannelEdgeCycle(String),
    #[error("disruption budget {index}: set maxInFlight, maxInFlightPct or both")]
    BudgetWithoutLimit { index: usize },
    #[error("disruption budget {index}: maxInFlightPct {pct} is not between 1 and 100")]
    BudgetPct { index: usize, pct: u32 },
    #[error("disruption budget {index}: maxInFlight 0 would never let a host through")]
    BudgetZero { index: usize },
    #[error("host {host}: no closure in the closures file; build it and add \"{host}\": \"<store basename>\"")]
    MissingClosure { host: String },
    #[error(
        "host {host}: closure {closure:?} is not a Nix store basename (`<32-char hash>-<name>`)"
    )]
    BadClosure { host: String, closure: String },
    #[error(
        "host name {host:?} is not valid; use letters, digits, '-', '_' and '.', not first (at most 253)"
    )]
    BadHostname { host: String },
    #[error(
        "channel name {channel:?} is not valid; use letters, digits, '-', '_' and '.', not first (at most 64)"
    )]
    BadChannelName { channel: String },
    #[error(
        "fleet has schemaVersion {0}; this build writes only schemaVersion {FLEET_SCHEMA_VERSION}"
    )]
    Schema(u32),
}

/// Nix store basenames are `<32 chars of nix-base32>-<name>`.
pub fn normalize_closure(closure: &str) -> Option<String> {
    let base = closure.strip_prefix("/nix/store/").unwrap_or(closure);
    let (hash, name) = base.split_at_checked(32)?;
    let nix32 = |c: char| c.is_ascii_digit() || (c.is_ascii_lowercase() && !"eotu".contains(c));
    let name_ok = name.len() > 1
        && name.starts_with('-')
        && !name.contains('/')
        && name[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-._?=".contains(c));
    (hash.chars().all(nix32) && name_ok).then(|| base.to_owned())
}

/// Host and channel names become file names and URL path segments: no "." or "..".
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The outcome of a valid fleet description: the fleet to sign, and warnings to print.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub fleet: FleetResolved,
    pub warnings: Vec<String>,
}

/// Release metadata stamped into `meta`.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub ci_commit: String,
    pub signed_at: OffsetDateTime,
    pub algorithm: Algorithm,
}

/// Validates the unsigned fleet, fills in closures, resolves waves and stamps `meta`.
/// Returns every error found, not just the first.
pub fn resolve(
    mut fleet: FleetResolved,
    closures: &BTreeMap<String, String>,
    stamp: &Stamp,
) -> Result<Resolved, Vec<FleetError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    if fleet.schema_version != FLEET_SCHEMA_VERSION {
        errors.push(FleetError::Schema(fleet.schema_version));
    }
    validate_structure(&fleet, &mut errors, &mut warnings);

    for (name, host) in fleet.hosts.iter_mut() {
        match closures.get(name) {
            None => errors.push(FleetError::MissingClosure { host: name.clone() }),
            Some(c) => match normalize_closure(c) {
                Some(base) => host.closure_hash = Some(base),
                None => errors.push(FleetError::BadClosure {
                    host: name.clone(),
                    closure: c.clone(),
                }),
            },
        }
    }
    for name in closures.keys().filter(|n| !fleet.hosts.contains_key(*n)) {
        warnings.push(format!(
            "closures file names {name}, which is not a host of the fleet; ignored"
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    fleet.waves = resolve_waves(&fleet, &mut warnings);
    fleet.meta = Meta {
        schema_version: FLEET_SCHEMA_VERSION,
        signed_at: Some(stamp.signed_at),
        ci_commit: Some(stamp.ci_commit.clone()),
        signature_algorithm: Some(stamp.algorithm),
    };
    Ok(Resolved { fleet, warnings })
}

fn validate_structure(
    fleet: &FleetResolved,
    errors: &mut Vec<FleetError>,
    warnings: &mut Vec<String>,
) {
    for (name, host) in &fleet.hosts {
        if !valid_hostname(name) {
            errors.push(FleetError::BadHostname { host: name.clone() });
        }
        if !fleet.channels.contains_key(&host.channel) {
            errors.push(FleetError::UnknownChannel {
                host: name.clone(),
                channel: host.channel.clone(),
            });
        }
    }
    for (name, channel) in &fleet.channels {
        // Channel names become file names and URL path segments.
        if name.len() > 64 || !valid_hostname(name) {
            errors.push(FleetError::BadChannelName {
                channel: name.clone(),
            });
        }
        if !fleet.rollout_policies.contains_key(&channel.rollout_policy) {
            errors.push(FleetError::UnknownPolicy {
                channel: name.clone(),
                policy: channel.rollout_policy.clone(),
            });
        }
        if u64::from(channel.freshness_window) < 2 * u64::from(channel.signing_interval_minutes) {
            errors.push(FleetError::FreshnessTooShort {
                channel: name.clone(),
                freshness: channel.freshness_window,
                signing: channel.signing_interval_minutes,
            });
        }
    }
    for (name, policy) in &fleet.rollout_policies {
        if policy.waves.is_empty() {
            errors.push(FleetError::NoWaves {
                policy: name.clone(),
            });
        }
        for (i, wave) in policy.waves.iter().enumerate() {
            check_selector(
                fleet,
                &wave.selector,
                format!("rollout policy {name} wave {i}"),
                errors,
                warnings,
            );
        }
    }
    for (index, budget) in fleet.disruption_budgets.iter().enumerate() {
        check_selector(
            fleet,
            &budget.selector,
            format!("disruption budget {index}"),
            errors,
            warnings,
        );
        match (budget.max_in_flight, budget.max_in_flight_pct) {
            (None, None) => errors.push(FleetError::BudgetWithoutLimit { index }),
            (Some(0), _) => errors.push(FleetError::BudgetZero { index }),
            (_, Some(pct)) if pct == 0 || pct > 100 => {
                errors.push(FleetError::BudgetPct { index, pct })
            }
            _ => {}
        }
    }
    for edge in &fleet.edges {
        for host in [&edge.before, &edge.after] {
            if !fleet.hosts.contains_key(host) {
                errors.push(FleetError::UnknownEdgeHost {
                    before: edge.before.clone(),
                    after: edge.after.clone(),
                    host: host.clone(),
                });
            }
        }
    }
    let host_edges = fleet
        .edges
        .iter()
        .map(|e| (e.before.as_str(), e.after.as_str()));
    if let Some(cycle) = find_cycle(host_edges) {
        errors.push(FleetError::EdgeCycle(cycle));
    }
    for edge in &fleet.channel_edges {
        for channel in [&edge.before, &edge.after] {
            if !fleet.channels.contains_key(channel) {
                errors.push(FleetError::UnknownEdgeChannel {
                    before: edge.before.clone(),
                    after: edge.after.clone(),
                    channel: channel.clone(),
                });
            }
        }
    }
    let channel_edges = fleet
        .channel_edges
        .iter()
        .map(|e| (e.before.as_str(), e.after.as_str()));
    if let Some(cycle) = find_cycle(channel_edges) {
        errors.push(FleetError::ChannelEdgeCycle(cycle));
    }
}

fn check_selector(
    fleet: &FleetResolved,
    selector: &Selector,
    place: String,
    errors: &mut Vec<FleetError>,
    warnings: &mut Vec<String>,
) {
    if !selector.is_well_formed() {
        errors.push(FleetError::EmptySelector { place });
    } else if fleet.select(selector).is_empty() {
        warnings.push(format!("{place}: selector matches no host"));
    }
}

/// A cycle in a directed graph, as `a -> b -> a`, or None. Deterministic: nodes are
/// visited in name order.
pub fn find_cycle<'a>(edges: impl Iterator<Item = (&'a str, &'a str)>) -> Option<String> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (before, after) in edges {
        graph.entry(before).or_default().insert(after);
        graph.entry(after).or_default();
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = graph.keys().map(|k| (*k, Mark::New)).collect();
    // Iterative DFS so a long chain of edges cannot overflow the stack.
    for &start in graph.keys() {
        if marks[start] != Mark::New {
            continue;
        }
        let mut path: Vec<(&str, Vec<&str>)> = Vec::new();
        marks.insert(start, Mark::OnPath);
        path.push((start, graph[start].iter().rev().copied().collect()));
        while let Some((node, pending)) = path.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) => match marks[next] {
                    Mark::New => {
                        marks.insert(next, Mark::OnPath);
                        path.push((next, graph[next].iter().rev().copied().collect()));
                    }
                    Mark::OnPath => {
                        let from = path.iter().position(|(n, _)| *n == next).unwrap_or(0);
                        let mut names: Vec<&str> = path[from..].iter().map(|(n, _)| *n).collect();
                        names.push(next);
                        return Some(names.join(" -> "));
                    }
                    Mark::Done => {}
                },
                None => {
                    marks.insert(node, Mark::Done);
                    path.pop();
                }
            }
        }
    }
    None
}

/// Per channel, each host joins the first policy wave whose selector matches it; a host
/// matched by none joins the last wave. Every policy wave is kept (possibly empty) so that
/// wave indices match the policy.
fn resolve_waves(
    fleet: &FleetResolved,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Vec<ResolvedWave>> {
    let mut out = BTreeMap::new();
    for (channel_name, channel) in &fleet.channels {
        let Some(policy) = fleet.rollout_policies.get(&channel.rollout_policy) else {
            continue;
        };
        let mut waves: Vec<ResolvedWave> = policy
            .waves
            .iter()
            .map(|w| ResolvedWave {
                hosts: Vec::new(),
                soak_minutes: w.soak_minutes,
            })
            .collect();
        let last = waves.len().saturating_sub(1);
        for (name, host) in fleet.channel_hosts(channel_name) {
            let index = policy
                .waves
                .iter()
                .position(|w| w.selector.matches(name, host))
                .unwrap_or(last);
            if let Some(wave) = waves.get_mut(index) {
                wave.hosts.push(name.to_owned());
            }
        }
        for (i, wave) in waves.iter().enumerate() {
            if wave.hosts.is_empty() && fleet.channel_hosts(channel_name).next().is_some() {
                warnings.push(format!(
                    "channel {channel_name}: wave {i} of policy {} has no host",
                    channel.rollout_policy
                ));
            }
        }
        out.insert(channel_name.clone(), waves);
    }
    out
}

/// One manifest per channel, projected from the resolved and stamped fleet whose
/// canonical bytes hash to `fleet_hash`. `introduced` is this release; the caller keeps
/// an earlier release's when the intent is unchanged.
pub fn manifests(fleet: &FleetResolved, fleet_hash: &str) -> Vec<RolloutManifest> {
    let commit = fleet.meta.ci_commit.clone().unwrap_or_default();
    let short: String = commit.chars().take(7).collect();
    let budgets: Vec<(usize, Vec<String>)> = fleet
        .disruption_budgets
        .iter()
        .enumerate()
        .map(|(i, b)| (i, fleet.select(&b.selector)))
        .collect();
    let mut out = Vec::new();
    for (channel_name, channel) in &fleet.channels {
        let Some(policy) = fleet.rollout_policies.get(&channel.rollout_policy) else {
            continue;
        };
        let waves = fleet
            .waves
            .get(channel_name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut host_set: Vec<HostSetEntry> = waves
            .iter()
            .enumerate()
            .flat_map(|(index, wave)| {
                wave.hosts.iter().filter_map(move |h| {
                    let closure = fleet.hosts.get(h)?.closure_hash.clone()?;
                    Some(HostSetEntry {
                        hostname: h.clone(),
                        wave_index: u32::try_from(index).ok()?,
                        target_closure: closure,
                    })
                })
            })
            .collect();
        host_set.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        let members: BTreeSet<&str> = host_set.iter().map(|e| e.hostname.as_str()).collect();
        // Only this channel's hosts: the budget's hosts in other channels are theirs, so a
        // change there leaves this channel's intent (and rollout id) as it is.
        let disruption_budgets = budgets
            .iter()
            .filter_map(|(i, hosts)| {
                let mine: Vec<String> = hosts
                    .iter()
                    .filter(|h| members.contains(h.as_str()))
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                let budget = &fleet.disruption_budgets[*i];
                Some(ManifestBudget {
                    selector: budget.selector.clone(),
                    hosts: mine,
                    max_in_flight: budget.max_in_flight,
                    max_in_flight_pct: budget.max_in_flight_pct,
                })
            })
            .collect();
        out.push(RolloutManifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            display_name: format!("{channel_name}@{short}"),
            channel: channel_name.clone(),
            channel_ref: commit.clone(),
            fleet_resolved_hash: fleet_hash.to_owned(),
            host_set,
            waves: waves
                .iter()
                .map(|w| ManifestWave {
                    soak_minutes: w.soak_minutes,
                })
                .collect(),
            health_gate: policy.health_gate.clone(),
            on_health_failure: policy.on_health_failure,
            compliance_frameworks: channel.compliance.frameworks.clone(),
            disruption_budgets,
            freshness_window: Some(channel.freshness_window),
            compliance: None,
            introduced: fleet.meta.signed_at.map(|signed_at| Introduced {
                ci_commit: fleet.meta.ci_commit.clone(),
                signed_at,
            }),
            meta: fleet.meta.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_and_named() {
        assert_eq!(find_cycle([("a", "b"), ("b", "c")].into_iter()), None);
        assert_eq!(
            find_cycle([("a", "b"), ("b", "c"), ("c", "a")].into_iter()).as_deref(),
            Some("a -> b -> c -> a")
        );
        assert_eq!(
            find_cycle([("x", "x")].into_iter()).as_deref(),
            Some("x -> x")
        );
        let long: Vec<(String, String)> = (0..100_000)
            .map(|i| (i.to_string(), (i + 1).to_string()))
            .collect();
        assert_eq!(
            find_cycle(long.iter().map(|(a, b)| (a.as_str(), b.as_str()))),
            None
        );
    }

    #[test]
    fn host_names_must_be_safe_path_segments() {
        for bad in ["", ".", "..", ".web", "web 01", "a/b", &"h".repeat(254)] {
            assert!(!valid_hostname(bad), "{bad:?} passed");
        }
        for good in ["web-01", "db_02.example.org", "h"] {
            assert!(valid_hostname(good), "{good:?} refused");
        }
    }

    #[test]
    fn channel_names_must_be_safe_path_segments() {
        let mut fleet: FleetResolved =
            serde_json::from_str(include_str!("../../../examples/fleet.json")).unwrap();
        let stable = fleet.channels["stable"].clone();
        let long = "c".repeat(65);
        let bad = ["../edge", ".hidden", "a/b", "", long.as_str()];
        for name in bad {
            fleet.channels.insert(name.to_owned(), stable.clone());
        }
        fleet.channels.insert("ok-1_2.3".into(), stable.clone());
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        validate_structure(&fleet, &mut errors, &mut warnings);
        let mut refused: Vec<String> = errors
            .iter()
            .filter_map(|e| match e {
                FleetError::BadChannelName { channel } => Some(channel.clone()),
                _ => None,
            })
            .collect();
        refused.sort();
        let mut want = bad.to_vec();
        want.sort();
        assert_eq!(refused, want);
    }

    #[test]
    fn closures_must_be_store_basenames() {
        let good = "0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-01-24.05";
        assert_eq!(normalize_closure(good).as_deref(), Some(good));
        assert_eq!(
            normalize_closure(&format!("/nix/store/{good}")).as_deref(),
            Some(good)
        );
        assert_eq!(normalize_closure("short-name"), None);
        assert_eq!(
            normalize_closure("0123456789abcdfghijklmnpqrsvwxye-x"),
            None,
            "e is not nix-base32"
        );
        assert_eq!(
            normalize_closure("0123456789abcdfghijklmnpqrsvwxyz-a/b"),
            None
        );
    }
}
