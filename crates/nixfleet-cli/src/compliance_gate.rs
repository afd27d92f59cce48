//! The static compliance gate (docs/compliance.md, "The static gate"): what a release
//! does with each host's `evaluateHost` results. One decision for both paths: the
//! manual `nixfleet release --compliance-results FILE` and `nixfleet release --flake`
//! (whose stage 3 evaluates the hosts, writes that file and passes it on).

use std::collections::BTreeMap;

use nixfleet_proto::compliance::{ComplianceMode, StaticFailure};
use nixfleet_proto::manifest::ManifestCompliance;
use nixfleet_proto::FleetResolved;
use serde::{Deserialize, Serialize};

/// One element of `lib.compliance.evaluateHost`'s list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlResult {
    pub id: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub articles: BTreeMap<String, Vec<String>>,
    pub passed: bool,
    pub evidence: String,
}

/// The `--compliance-results` file: host name -> its `evaluateHost` list.
pub type Results = BTreeMap<String, Vec<ControlResult>>;

/// A channel whose static gate runs: frameworks set and mode not disabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatedChannel {
    pub mode: ComplianceMode,
    pub frameworks: Vec<String>,
}

/// Why a release may not go ahead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// `enforce` and at least one control failed: every failure, one line each.
    #[error("{} control(s) failed on hosts of enforce channels, so nothing was released; fix the hosts' configuration (or set the channel's compliance.mode to \"permissive\" to release and record the failures):\n{}", .0.len(), .0.iter().map(|f| format!("  {}", failure_line(f))).collect::<Vec<_>>().join("\n"))]
    Refused(Vec<StaticFailure>),
    #[error("channel {channel}: compliance.mode {mode:?} is not enforce, permissive or disabled")]
    UnknownMode { channel: String, mode: String },
    #[error("the compliance results name no result for host {host} (channel {channel}, mode {mode}); evaluate every host of the channel (nixfleet release --flake does), or set the channel's compliance.mode to \"disabled\"")]
    MissingHost {
        host: String,
        channel: String,
        mode: &'static str,
    },
}

/// What the gate lets through: per gated channel, what its manifest records, and
/// warnings to print (the failures of permissive channels, ignored results).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub channels: BTreeMap<String, ManifestCompliance>,
    pub warnings: Vec<String>,
}

/// `articles` as `cis 5.2.8; iso27001 A.8.2, A.8.5`.
pub fn articles_text(articles: &BTreeMap<String, Vec<String>>) -> String {
    if articles.is_empty() {
        return "no articles".to_owned();
    }
    articles
        .iter()
        .map(|(fw, list)| format!("{fw} {}", list.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The one line an operator reads per failure.
pub fn failure_line(f: &StaticFailure) -> String {
    format!(
        "host {}: control {} failed ({}): {}",
        f.hostname,
        f.control,
        articles_text(&f.articles),
        f.evidence
    )
}

/// The channels whose gate runs; an unknown mode is an error (mkFleet does not check it).
pub fn gated_channels(fleet: &FleetResolved) -> Result<BTreeMap<String, GatedChannel>, GateError> {
    let mut out = BTreeMap::new();
    for (name, channel) in &fleet.channels {
        if channel.compliance.frameworks.is_empty() {
            continue;
        }
        let mode = ComplianceMode::parse(&channel.compliance.mode).ok_or_else(|| {
            GateError::UnknownMode {
                channel: name.clone(),
                mode: channel.compliance.mode.clone(),
            }
        })?;
        if mode == ComplianceMode::Disabled {
            continue;
        }
        out.insert(
            name.clone(),
            GatedChannel {
                mode,
                frameworks: channel.compliance.frameworks.clone(),
            },
        );
    }
    Ok(out)
}

/// Applies the gate: every host of a gated channel must have results; in `enforce` any
/// failed control refuses the release (all failures listed), in `permissive` the failures
/// are recorded and warned about.
pub fn decide(fleet: &FleetResolved, results: &Results) -> Result<Decision, GateError> {
    let gated = gated_channels(fleet)?;
    let mut decision = Decision::default();
    let mut refused = Vec::new();
    for (name, channel) in &gated {
        let mut failures = Vec::new();
        for (host, _) in fleet.channel_hosts(name) {
            let list = results.get(host).ok_or_else(|| GateError::MissingHost {
                host: host.to_owned(),
                channel: name.clone(),
                mode: channel.mode.as_str(),
            })?;
            failures.extend(list.iter().filter(|r| !r.passed).map(|r| StaticFailure {
                hostname: host.to_owned(),
                control: r.id.clone(),
                articles: r.articles.clone(),
                evidence: r.evidence.clone(),
            }));
        }
        match channel.mode {
            ComplianceMode::Enforce => {
                refused.extend(failures);
                decision.channels.insert(
                    name.clone(),
                    ManifestCompliance {
                        mode: ComplianceMode::Enforce,
                        static_failures: Vec::new(),
                    },
                );
            }
            _ => {
                decision.warnings.extend(failures.iter().map(|f| {
                    format!(
                        "compliance (channel {name}, permissive, recorded in its manifest): {}",
                        failure_line(f)
                    )
                }));
                decision.channels.insert(
                    name.clone(),
                    ManifestCompliance {
                        mode: ComplianceMode::Permissive,
                        static_failures: failures,
                    },
                );
            }
        }
    }
    if !refused.is_empty() {
        return Err(GateError::Refused(refused));
    }
    for host in results.keys() {
        let gated_host = fleet
            .hosts
            .get(host)
            .is_some_and(|h| gated.contains_key(&h.channel));
        if !gated_host {
            decision.warnings.push(format!(
                "the compliance results name {host}, which is not a host of a channel with compliance; ignored"
            ));
        }
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(mode: &str, frameworks: &[&str]) -> FleetResolved {
        let mut fleet: FleetResolved =
            serde_json::from_str(include_str!("../../../examples/fleet.json")).unwrap();
        for channel in fleet.channels.values_mut() {
            channel.compliance.mode = mode.to_owned();
            channel.compliance.frameworks = frameworks.iter().map(|f| (*f).to_owned()).collect();
        }
        fleet
    }

    fn results(fleet: &FleetResolved, failing: &str) -> Results {
        fleet
            .hosts
            .keys()
            .map(|h| {
                let passed = h != failing;
                (
                    h.clone(),
                    vec![ControlResult {
                        id: "ssh-root-login-key-only".into(),
                        title: String::new(),
                        articles: [("cis".to_owned(), vec!["5.2.8".to_owned()])].into(),
                        passed,
                        evidence: "services.openssh.settings.PermitRootLogin = \"yes\"".into(),
                    }],
                )
            })
            .collect()
    }

    #[test]
    fn enforce_refuses_permissive_records_disabled_ignores() {
        let f = fleet("enforce", &["cis"]);
        let host = f.hosts.keys().next().unwrap().clone();
        match decide(&f, &results(&f, &host)) {
            Err(GateError::Refused(failures)) => {
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].hostname, host);
                let text = GateError::Refused(failures).to_string();
                assert!(text.contains(&format!("host {host}: control ssh-root-login-key-only failed (cis 5.2.8): services.openssh.settings.PermitRootLogin = \"yes\"")), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let ok = decide(&f, &results(&f, "nobody")).unwrap();
        assert!(ok
            .channels
            .values()
            .all(|c| c.mode == ComplianceMode::Enforce && c.static_failures.is_empty()));

        let f = fleet("permissive", &["cis"]);
        let d = decide(&f, &results(&f, &host)).unwrap();
        let recorded: Vec<&StaticFailure> = d
            .channels
            .values()
            .flat_map(|c| &c.static_failures)
            .collect();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].control, "ssh-root-login-key-only");
        assert_eq!(d.warnings.len(), 1);

        for f in [fleet("disabled", &["cis"]), fleet("enforce", &[])] {
            let d = decide(&f, &results(&f, &host)).unwrap();
            assert!(d.channels.is_empty());
        }
    }

    #[test]
    fn a_missing_host_and_an_unknown_mode_are_errors() {
        let f = fleet("enforce", &["cis"]);
        let mut r = results(&f, "nobody");
        let host = r.keys().next().unwrap().clone();
        r.remove(&host);
        assert!(matches!(decide(&f, &r), Err(GateError::MissingHost { host: h, .. }) if h == host));
        let f = fleet("strict", &["cis"]);
        assert!(matches!(
            decide(&f, &results(&f, "nobody")),
            Err(GateError::UnknownMode { .. })
        ));
    }
}
