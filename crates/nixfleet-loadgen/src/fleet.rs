//! The simulated fleet: host names, deterministic host keys and the fleet description
//! that `nixfleet release` signs. Keys come from a seed, so the fleet generator and the
//! load generator agree on every host's key without storing 100,000 of them.

use nixfleet_trust::keys::{self, PrivateKey};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::LoadgenError;

pub fn hostname(index: usize) -> String {
    format!("host-{index:06}")
}

/// A closure basename of the same shape as the store paths releases carry.
pub fn closure(hostname: &str, generation: u32) -> String {
    format!("{generation:032}-nixos-system-{hostname}-{generation}")
}

pub fn channel_name(index: usize) -> String {
    format!("ch-{index:02}")
}

/// The host's ed25519 key, derived from `seed` and the hostname. Load testing only: a real
/// host key comes from the OS RNG.
pub fn host_key(seed: &str, hostname: &str) -> PrivateKey {
    let mut h = Sha256::new();
    h.update(b"nixfleet-loadgen host key\0");
    h.update(seed.as_bytes());
    h.update([0]);
    h.update(hostname.as_bytes());
    PrivateKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&h.finalize().into()))
}

/// How the generated fleet is laid out.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hosts: usize,
    /// Hosts go to channels in contiguous blocks (`ch-00` holds the first hosts), so a
    /// channel is a range of host indices for `run --first-host`.
    pub channels: usize,
    pub seed: String,
    /// Minutes each wave soaks.
    pub soak_minutes: u32,
    /// Failures a wave tolerates before the rollout halts.
    pub max_failures: u32,
    /// A fleet-wide disruption budget (hosts in flight), if any.
    pub budget: Option<u32>,
}

impl Shape {
    pub fn new(hosts: usize, seed: &str) -> Shape {
        Shape {
            hosts,
            channels: 1,
            seed: seed.to_owned(),
            soak_minutes: 0,
            max_failures: 0,
            budget: None,
        }
    }

    pub fn channel_of(&self, index: usize) -> String {
        let per_channel = self.hosts.div_ceil(self.channels.max(1)).max(1);
        channel_name(index / per_channel)
    }
}

/// The fleet description (`nixfleet release --fleet`): every host in one of the channels,
/// three waves (tag `canary` = every 100th host, tag `early` = every 10th, then the rest).
pub fn fleet_json(shape: &Shape) -> Result<Value, LoadgenError> {
    let mut hosts = Map::new();
    for index in 0..shape.hosts {
        let name = hostname(index);
        let key = host_key(&shape.seed, &name);
        let pubkey =
            keys::to_ssh_public_line(&key.public_key(), &format!("root@{name}")).map_err(|e| {
                LoadgenError::Key {
                    what: format!("the public key line of {name}"),
                    detail: e.to_string(),
                }
            })?;
        let mut tags = vec!["web"];
        if index % 10 == 0 {
            tags.push("early");
        }
        if index % 100 == 0 {
            tags.push("canary");
        }
        hosts.insert(
            name,
            json!({"system": "x86_64-linux", "tags": tags, "channel": shape.channel_of(index),
                   "closureHash": null, "pubkey": pubkey}),
        );
    }
    let channels: Map<String, Value> = (0..shape.channels.max(1))
        .map(|i| {
            (
                channel_name(i),
                json!({"rolloutPolicy": "waves3", "reconcileIntervalMinutes": 1,
                       "signingIntervalMinutes": 60, "freshnessWindow": 1440}),
            )
        })
        .collect();
    let soak = shape.soak_minutes;
    let budgets = match shape.budget {
        Some(n) => json!([{"selector": {"all": true}, "maxInFlight": n, "maxInFlightPct": null}]),
        None => json!([]),
    };
    Ok(json!({
        "schemaVersion": 1,
        "hosts": hosts,
        "channels": channels,
        "rolloutPolicies": {"waves3": {
            "strategy": "canary",
            "waves": [{"selector": {"tags": ["canary"]}, "soakMinutes": soak},
                      {"selector": {"tags": ["early"]}, "soakMinutes": soak},
                      {"selector": {"all": true}, "soakMinutes": soak}],
            "healthGate": {"systemdFailedUnits": {"max": 0}, "maxFailures": shape.max_failures},
            "onHealthFailure": "halt"
        }},
        "edges": [], "channelEdges": [], "disruptionBudgets": budgets,
        "meta": {"schemaVersion": 1, "signedAt": null, "ciCommit": null, "signatureAlgorithm": null}
    }))
}

/// `{hostname: closure}` for `nixfleet release --closures`: hosts in `channels` (all
/// when empty) get `generation`, the others `base_generation`.
pub fn closures_json(
    shape: &Shape,
    generation: u32,
    base_generation: u32,
    channels: &[String],
) -> Value {
    let map: Map<String, Value> = (0..shape.hosts)
        .map(|index| {
            let name = hostname(index);
            let generation = if channels.is_empty() || channels.contains(&shape.channel_of(index)) {
                generation
            } else {
                base_generation
            };
            let closure = closure(&name, generation);
            (name, Value::String(closure))
        })
        .collect();
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_per_seed_and_host() {
        let a = host_key("s", "host-000001").public_key().to_base64();
        assert_eq!(a, host_key("s", "host-000001").public_key().to_base64());
        assert_ne!(a, host_key("t", "host-000001").public_key().to_base64());
        assert_ne!(a, host_key("s", "host-000002").public_key().to_base64());
    }

    #[test]
    fn fleet_has_every_host_in_a_channel_and_three_waves() {
        let mut shape = Shape::new(250, "s");
        shape.channels = 2;
        let fleet = fleet_json(&shape).unwrap();
        assert_eq!(fleet["hosts"].as_object().unwrap().len(), 250);
        assert_eq!(fleet["hosts"]["host-000124"]["channel"], "ch-00");
        assert_eq!(fleet["hosts"]["host-000125"]["channel"], "ch-01");
        assert_eq!(
            fleet["rolloutPolicies"]["waves3"]["waves"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let closures = closures_json(&shape, 2, 1, &["ch-00".to_owned()]);
        assert_eq!(closures["host-000000"], closure("host-000000", 2));
        assert_eq!(closures["host-000200"], closure("host-000200", 1));
    }
}
