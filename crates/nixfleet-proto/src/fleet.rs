//! `fleet.resolved.json` (SPEC.md §4) and the selector language used by waves and budgets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::meta::Meta;

/// The only fleet.resolved schema this build understands.
pub const FLEET_SCHEMA_VERSION: u32 = 1;

/// The resolved fleet as CI signs it. The unsigned form that `nixfleet release` takes has
/// the same shape with `meta.signedAt` null and no closure hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetResolved {
    pub schema_version: u32,
    pub hosts: BTreeMap<String, Host>,
    pub channels: BTreeMap<String, Channel>,
    #[serde(default)]
    pub rollout_policies: BTreeMap<String, RolloutPolicy>,
    /// Pre-resolved waves per channel.
    #[serde(default)]
    pub waves: BTreeMap<String, Vec<ResolvedWave>>,
    #[serde(default)]
    pub edges: Vec<Edge>,
    #[serde(default)]
    pub channel_edges: Vec<ChannelEdge>,
    #[serde(default)]
    pub disruption_budgets: Vec<DisruptionBudget>,
    pub meta: Meta,
}

impl FleetResolved {
    /// Hosts of one channel, in name order.
    pub fn channel_hosts<'a>(
        &'a self,
        channel: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Host)> + 'a {
        self.hosts
            .iter()
            .filter(move |(_, h)| h.channel == channel)
            .map(|(n, h)| (n.as_str(), h))
    }

    /// Names of the hosts a selector matches, in name order.
    pub fn select(&self, selector: &Selector) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(name, host)| selector.matches(name, host))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The shortest freshness window over all channels, in minutes: the fleet artifact is
    /// one signature over every channel, so it is stale as soon as any channel's data is.
    pub fn freshness_window_minutes(&self) -> Option<u32> {
        self.channels.values().map(|c| c.freshness_window).min()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    pub system: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub channel: String,
    /// Nix store basename (`hash-name`) of the host's system closure.
    #[serde(default)]
    pub closure_hash: Option<String>,
    /// The host's SSH public key line (`ssh-ed25519 AAAA… comment`).
    #[serde(default)]
    pub pubkey: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Channel {
    pub rollout_policy: String,
    pub reconcile_interval_minutes: u32,
    pub signing_interval_minutes: u32,
    /// Minutes; must be at least twice `signingIntervalMinutes`.
    pub freshness_window: u32,
    #[serde(default)]
    pub compliance: Compliance,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Compliance {
    #[serde(default)]
    pub frameworks: Vec<String>,
    #[serde(default = "Compliance::default_mode")]
    pub mode: String,
}

impl Compliance {
    fn default_mode() -> String {
        "disabled".to_owned()
    }
}

impl Default for Compliance {
    fn default() -> Self {
        Compliance {
            frameworks: Vec::new(),
            mode: Compliance::default_mode(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    pub strategy: String,
    pub waves: Vec<PolicyWave>,
    pub health_gate: HealthGate,
    pub on_health_failure: OnHealthFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyWave {
    pub selector: Selector,
    pub soak_minutes: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthGate {
    #[serde(default)]
    pub systemd_failed_units: Option<FailedUnitsGate>,
    #[serde(default)]
    pub max_failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedUnitsGate {
    pub max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OnHealthFailure {
    #[serde(rename = "halt")]
    Halt,
    #[serde(rename = "rollback-and-halt")]
    RollbackAndHalt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedWave {
    pub hosts: Vec<String>,
    pub soak_minutes: u32,
}

/// Host `after` is not dispatched until host `before` is Soaked or Converged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub before: String,
    pub after: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// No rollout opens on channel `after` while channel `before` has a non-terminal rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelEdge {
    pub before: String,
    pub after: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    pub selector: Selector,
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    #[serde(default)]
    pub max_in_flight_pct: Option<u32>,
}

/// A host selector. Every key present must hold (an object with several keys is their
/// conjunction). Absent keys are omitted rather than written as null: a selector is a
/// sum of conditions, and `{"tags":["db"]}` is the form CI and operators write.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    /// The host carries every one of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// The host carries at least one of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags_any: Option<Vec<String>>,
    /// The host is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// The host is on this channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// `true` matches every host, `false` none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Selector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub and: Option<Vec<Selector>>,
}

impl Selector {
    pub fn all() -> Self {
        Selector {
            all: Some(true),
            ..Selector::default()
        }
    }

    pub fn tags<I: IntoIterator<Item = S>, S: Into<String>>(tags: I) -> Self {
        Selector {
            tags: Some(tags.into_iter().map(Into::into).collect()),
            ..Selector::default()
        }
    }

    pub fn hosts<I: IntoIterator<Item = S>, S: Into<String>>(hosts: I) -> Self {
        Selector {
            hosts: Some(hosts.into_iter().map(Into::into).collect()),
            ..Selector::default()
        }
    }

    /// A selector with no condition at all, anywhere in its tree, is almost certainly a
    /// typo (an unknown key is ignored); release validation refuses it.
    pub fn is_empty(&self) -> bool {
        self.tags.is_none()
            && self.tags_any.is_none()
            && self.hosts.is_none()
            && self.channel.is_none()
            && self.all.is_none()
            && self.not.is_none()
            && self.and.is_none()
    }

    /// Every nested selector is non-empty.
    pub fn is_well_formed(&self) -> bool {
        !self.is_empty()
            && self.not.as_deref().is_none_or(Selector::is_well_formed)
            && self
                .and
                .as_deref()
                .is_none_or(|all| all.iter().all(Selector::is_well_formed))
    }

    pub fn matches(&self, hostname: &str, host: &Host) -> bool {
        if self.is_empty() {
            return false;
        }
        let has = |t: &String| host.tags.contains(t);
        self.tags.as_ref().is_none_or(|tags| tags.iter().all(has))
            && self
                .tags_any
                .as_ref()
                .is_none_or(|tags| tags.iter().any(has))
            && self
                .hosts
                .as_ref()
                .is_none_or(|hosts| hosts.iter().any(|h| h == hostname))
            && self.channel.as_ref().is_none_or(|c| *c == host.channel)
            && self.all.is_none_or(|all| all)
            && self.not.as_ref().is_none_or(|s| !s.matches(hostname, host))
            && self
                .and
                .as_ref()
                .is_none_or(|all| all.iter().all(|s| s.matches(hostname, host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(tags: &[&str], channel: &str) -> Host {
        Host {
            system: "x86_64-linux".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            channel: channel.into(),
            closure_hash: None,
            pubkey: None,
        }
    }

    fn sel(json: &str) -> Selector {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn every_selector_form() {
        let web = host(&["web", "canary"], "stable");
        let db = host(&["db"], "edge");
        let cases = [
            (r#"{"tags":["web","canary"]}"#, true, false),
            (r#"{"tags":["web","db"]}"#, false, false),
            (r#"{"tagsAny":["canary","db"]}"#, true, true),
            (r#"{"hosts":["web-01"]}"#, true, false),
            (r#"{"channel":"edge"}"#, false, true),
            (r#"{"all":true}"#, true, true),
            (r#"{"all":false}"#, false, false),
            (r#"{"not":{"tags":["db"]}}"#, true, false),
            (
                r#"{"and":[{"all":true},{"channel":"stable"}]}"#,
                true,
                false,
            ),
            (r#"{"tags":["web"],"channel":"edge"}"#, false, false),
            (r#"{}"#, false, false),
            (r#"{"not":{}}"#, true, true),
        ];
        for (json, want_web, want_db) in cases {
            let s = sel(json);
            assert_eq!(s.matches("web-01", &web), want_web, "{json} on web-01");
            assert_eq!(s.matches("db-01", &db), want_db, "{json} on db-01");
        }
    }

    #[test]
    fn empty_selectors_are_not_well_formed() {
        assert!(!sel("{}").is_well_formed());
        assert!(!sel(r#"{"not":{}}"#).is_well_formed());
        assert!(!sel(r#"{"and":[{"all":true},{"tag":["x"]}]}"#).is_well_formed());
        assert!(sel(r#"{"and":[{"all":true},{"not":{"tags":["x"]}}]}"#).is_well_formed());
    }

    #[test]
    fn selector_serialises_only_present_keys() {
        let s = Selector::tags(["db"]);
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"tags":["db"]}"#);
    }
}
