//! The agent's CPU to verify its target from its proof (`gate::check_proof`): the signed
//! header, the freshness, the inclusion proof to the signed root and the entry itself.
//! One run per rollout size; the proof grows with log2 of the host set.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nixfleet_agent::gate;
use nixfleet_proto::wire::Target;
use nixfleet_proto::{
    Algorithm, HealthGate, HostSetEntry, KeySlot, ManifestWave, Meta, OnHealthFailure,
    RolloutManifest, TrustFile,
};
use nixfleet_trust::keys::PrivateKey;
use nixfleet_trust::{hostset, jcs, verify};
use time::macros::datetime;
use time::OffsetDateTime;

const SIGNED: OffsetDateTime = datetime!(2026-11-27 10:00 UTC);

struct Fixture {
    trust: TrustFile,
    target: Target,
    hostname: String,
    proof: Vec<u8>,
}

fn fixture(algorithm: Algorithm, hosts: usize) -> Fixture {
    let key = PrivateKey::generate(algorithm);
    let slot = KeySlot {
        current: key.public_key().to_entry(),
        previous: None,
        reject_before: None,
    };
    let host_set: Vec<HostSetEntry> = (0..hosts)
        .map(|i| HostSetEntry {
            hostname: format!("host-{i:06}"),
            // Three waves: every 100th host, every 10th, then the rest.
            wave_index: if i % 100 == 0 {
                0
            } else if i % 10 == 0 {
                1
            } else {
                2
            },
            target_closure: format!("pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-nixos-system-host-{i:06}-2"),
        })
        .collect();
    let plan = RolloutManifest {
        schema_version: 2,
        display_name: "ch-00@abc".into(),
        channel: "ch-00".into(),
        channel_ref: "abc".into(),
        fleet_resolved_hash: "0".repeat(64),
        host_set,
        waves: vec![ManifestWave { soak_minutes: 10 }; 3],
        health_gate: HealthGate {
            systemd_failed_units: None,
            max_failures: 0,
        },
        on_health_failure: OnHealthFailure::Halt,
        compliance_frameworks: Vec::new(),
        disruption_budgets: Vec::new(),
        freshness_window: Some(1440),
        introduced: None,
        compliance: None,
        meta: Meta {
            schema_version: 1,
            signed_at: Some(SIGNED),
            ci_commit: Some("1111111111111111111111111111111111111111".into()),
            signature_algorithm: Some(algorithm),
        },
    };
    let header = jcs::to_canonical(&hostset::header_of(&plan)).expect("header");
    let signature = key.sign(&header);
    let id = verify::rollout_id(&header).expect("rollout id");
    let text = String::from_utf8(header).expect("utf-8");
    let tree = hostset::tree(&plan.host_set);
    let hostname = format!("host-{:06}", hosts / 2 + 1);
    let doc = hostset::host_proof(&id, &text, &signature, &plan.host_set, &tree, &hostname)
        .expect("the host is in the set");
    let entry = plan.entry(&hostname).expect("entry");
    Fixture {
        trust: TrustFile {
            schema_version: 1,
            ci_release_key: slot.clone(),
            org_root_key: slot,
            cache_keys: Vec::new(),
        },
        target: Target {
            closure_hash: entry.target_closure.clone(),
            rollout_id: id,
            wave_index: entry.wave_index,
            signed_at: SIGNED,
            freshness_window_secs: 1440 * 60,
            confirm_window_secs: 120,
        },
        hostname,
        proof: serde_json::to_vec(&doc).expect("proof document"),
    }
}

fn bench(c: &mut Criterion) {
    let now = SIGNED + time::Duration::minutes(5);
    let newest = BTreeMap::new();
    let mut group = c.benchmark_group("check_proof");
    for (name, algorithm) in [
        ("ed25519", Algorithm::Ed25519),
        ("p256", Algorithm::EcdsaP256),
    ] {
        for hosts in [10_000, 100_000] {
            let f = fixture(algorithm, hosts);
            // A refusal would measure the wrong path.
            let passed = gate::check_proof(
                &f.target,
                &f.hostname,
                &f.proof,
                &f.trust,
                now,
                "bench",
                &newest,
            );
            assert!(passed.is_ok(), "{passed:?}");
            eprintln!(
                "{name}, {hosts} hosts: proof document of {} bytes",
                f.proof.len()
            );
            group.bench_with_input(BenchmarkId::new(name, hosts), &f, |b, f| {
                b.iter(|| {
                    gate::check_proof(
                        black_box(&f.target),
                        &f.hostname,
                        black_box(&f.proof),
                        &f.trust,
                        now,
                        "bench",
                        &newest,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = bench
}
criterion_main!(benches);
