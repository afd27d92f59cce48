//! Helpers shared by the control-plane test binaries (each uses some of them).
#![allow(dead_code)]

use std::path::Path;

use nixfleet_harness::*;

/// Starts the control plane on a free port and enrolls the first `count` hosts.
pub async fn start_enrolled(
    s: &mut Setup,
    state: &Path,
    opts: &CpOptions,
    count: usize,
) -> (Cp, u16, Vec<Host>) {
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, state, opts);
    cp.wait_ready(&s.pki);
    let mut hosts = std::mem::take(&mut s.hosts);
    for h in hosts.iter_mut().take(count) {
        assert_eq!(enroll(&s.pki, port, h).await.status, 200);
    }
    (cp, port, hosts)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A release signed here rather than by `nixfleet release`, so that what the control
/// plane is given (schema 1 or 2, lists missing or altered) is up to the test: keys and
/// certificates from the CLI, hosts `names` in channel `stable` (wave 0 = the first,
/// tag `canary`; wave 1 = the rest, tag `web`, under a disruption budget), a signed
/// fleet and empty revocation list in the forge, which serves them.
pub struct HandRelease {
    pub pki: Pki,
    pub forge_dir: std::path::PathBuf,
    pub forge: Forge,
    pub hosts: Vec<Host>,
    /// The fleet as last signed, and the SHA-256 of its canonical bytes.
    pub fleet: serde_json::Value,
    pub fleet_sha256: String,
    pub trust: nixfleet_proto::TrustFile,
    // Last: the forge stops before its directory goes.
    pub tmp: tempfile::TempDir,
}

impl HandRelease {
    pub fn new(names: &[&str]) -> HandRelease {
        use serde_json::json;
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path());
        let hosts: Vec<Host> = names.iter().map(|n| Host::new(n)).collect();
        let fleet = fleet_json(&hosts.iter().collect::<Vec<_>>(), canary_policy("halt", 0));
        let mut fleet = fleet;
        fleet["waves"] = json!({"stable": [
            {"hosts": [names[0]], "soakMinutes": 0},
            {"hosts": names[1..], "soakMinutes": 0},
        ]});
        fleet["disruptionBudgets"] = json!([{"selector": {"tags": ["web"]}, "maxInFlight": 1}]);
        let forge_dir = tmp.path().join("forge");
        std::fs::create_dir_all(forge_dir.join("rollouts/channel/budgets")).unwrap();
        std::fs::create_dir_all(forge_dir.join("rollouts/budgets")).unwrap();
        let trust = nixfleet_trust::verify::read_trust_file(
            &pki.path("etc/trust.json"),
            &nixfleet_trust::verify::Limits::default(),
        )
        .unwrap();
        let mut release = HandRelease {
            forge: Forge::start(&forge_dir),
            pki,
            forge_dir,
            hosts,
            fleet,
            fleet_sha256: String::new(),
            trust,
            tmp,
        };
        release.sign_fleet(1);
        let revocations = json!({"schemaVersion": 1, "revocations": [], "freshnessWindow": null,
                                 "meta": release.meta()});
        release.sign("revocations.json", &revocations);
        release
    }

    /// Signs the fleet with closures of `generation`, now, into the forge.
    pub fn sign_fleet(&mut self, generation: u32) {
        let mut fleet = self.fleet.clone();
        for (name, host) in fleet["hosts"].as_object_mut().unwrap() {
            host["closureHash"] = serde_json::json!(closure(name, generation));
        }
        fleet["meta"] = self.meta();
        let canonical = self.sign("fleet.resolved.json", &fleet);
        self.fleet_sha256 = nixfleet_trust::jcs::sha256_hex(&canonical);
        self.fleet = fleet;
    }

    pub fn ci_key(&self) -> nixfleet_trust::keys::PrivateKey {
        nixfleet_trust::keys::PrivateKey::from_pem(&self.pki.read("ci.pem")).unwrap()
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({"schemaVersion": 1, "signedAt": now_rfc3339(),
                           "ciCommit": "1111111111111111111111111111111111111111",
                           "signatureAlgorithm": self.ci_key().algorithm()})
    }

    /// Writes `value`'s canonical bytes to `rel` in the forge and the CI key's raw
    /// signature to `rel.sig`; returns the bytes.
    pub fn sign(&self, rel: &str, value: &impl serde::Serialize) -> Vec<u8> {
        let canonical = nixfleet_trust::jcs::to_canonical(value).unwrap();
        std::fs::write(self.forge_dir.join(rel), &canonical).unwrap();
        std::fs::write(
            self.forge_dir.join(format!("{rel}.sig")),
            self.ci_key().sign(&canonical),
        )
        .unwrap();
        canonical
    }

    /// The plan of channel `stable` on closures of `generation`: what the fleet says.
    pub fn plan(&self, generation: u32) -> nixfleet_proto::RolloutManifest {
        let mut names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        names.sort();
        let canary = self.hosts[0].name.as_str();
        let host_set: Vec<_> = names
            .iter()
            .map(|h| {
                serde_json::json!({"hostname": h, "waveIndex": u32::from(*h != canary),
                                        "targetClosure": closure(h, generation)})
            })
            .collect();
        let web: Vec<&str> = names.iter().copied().filter(|h| *h != canary).collect();
        serde_json::from_value(serde_json::json!({
            "schemaVersion": 1,
            "displayName": "stable@1111111",
            "channel": "stable",
            "channelRef": "1111111111111111111111111111111111111111",
            "fleetResolvedHash": self.fleet_sha256,
            "hostSet": host_set,
            "waves": [{"soakMinutes": 0}, {"soakMinutes": 0}],
            "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": 0},
            "onHealthFailure": "halt",
            "complianceFrameworks": [],
            "disruptionBudgets": [{"selector": {"tags": ["web"]}, "hosts": web, "maxInFlight": 1}],
            "freshnessWindow": 1440,
            "meta": self.meta(),
        }))
        .unwrap()
    }

    /// Publishes `plan` as a schema-1 manifest (the whole plan signed); returns its id.
    pub fn publish_schema_1(&self, plan: &nixfleet_proto::RolloutManifest) -> String {
        let mut plan = plan.clone();
        plan.schema_version = nixfleet_proto::MANIFEST_SCHEMA_V1;
        let id =
            nixfleet_trust::verify::rollout_id(&nixfleet_trust::jcs::to_canonical(&plan).unwrap())
                .unwrap();
        self.sign(&format!("rollouts/{id}.json"), &plan);
        self.sign("rollouts/channel/stable.json", &plan);
        id
    }

    /// Publishes `plan` as `nixfleet release` does with schema 2: the signed header, the
    /// hosts file and the budget lists, next to each other and as the channel's copy.
    /// Returns the rollout id.
    pub fn publish_schema_2(&self, plan: &nixfleet_proto::RolloutManifest) -> String {
        let header = nixfleet_trust::hostset::header_of(plan);
        let id = nixfleet_trust::verify::rollout_id(
            &nixfleet_trust::jcs::to_canonical(&header).unwrap(),
        )
        .unwrap();
        let hosts = nixfleet_proto::RolloutHosts {
            rollout_id: id.clone(),
            host_set: plan.host_set.clone(),
        };
        let hosts = serde_json::to_vec(&hosts).unwrap();
        for (manifest, hosts_file, budgets) in [
            (
                format!("rollouts/{id}.json"),
                format!("rollouts/{id}.hosts.json"),
                "rollouts/budgets",
            ),
            (
                "rollouts/channel/stable.json".to_owned(),
                "rollouts/channel/stable.hosts.json".to_owned(),
                "rollouts/channel/budgets",
            ),
        ] {
            self.sign(&manifest, &header);
            std::fs::write(self.forge_dir.join(hosts_file), &hosts).unwrap();
            for b in &plan.disruption_budgets {
                let sha256 = nixfleet_trust::hostset::budget_sha256(&b.hosts);
                std::fs::write(
                    self.forge_dir.join(format!("{budgets}/{sha256}.json")),
                    serde_json::to_vec(&b.hosts).unwrap(),
                )
                .unwrap();
            }
        }
        id
    }

    /// The path of a file in the forge.
    pub fn path(&self, rel: &str) -> std::path::PathBuf {
        self.forge_dir.join(rel)
    }

    /// Starts a control plane on the forge (no build-time artifact) with `opts`, and
    /// waits until it has ticked.
    pub fn start(&self, name: &str, opts: CpOptions) -> Cp {
        let mut cp = Cp::start(&self.pki, &self.forge, &self.tmp.path().join(name), &opts);
        cp.wait_ready(&self.pki);
        cp
    }
}
