//! The target gate (SPEC.md §7 "On a target"): what the control plane says is only
//! believed when the CI-signed rollout manifest says it too. Pure: the manifest bytes, the
//! trust roots and the time are arguments.

use nixfleet_proto::wire::{closure_blocked, FailedTarget, ReportKind, Target};
use nixfleet_proto::TrustFile;
use nixfleet_trust::verify::{
    self, Limits, ManifestContext, SignedManifest, Verified, VerifyError,
};
use time::OffsetDateTime;

use std::collections::BTreeMap;

use time::format_description::well_known::Rfc3339;

use crate::machine::Activation;

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// A refused target: the report kind and the one-sentence reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ReportKind,
    pub reason: String,
}

fn manifest_rejected(reason: String) -> Refusal {
    Refusal {
        kind: ReportKind::ManifestRejected,
        reason,
    }
}

pub use nixfleet_proto::wire::{is_rollout_id, is_store_basename};

/// Why a closure that already failed here is not activated again.
pub fn already_failed(target: &Target, f: &FailedTarget) -> String {
    if f.rollout_id == target.rollout_id {
        format!(
            "closure {} already failed on this host in rollout {} ({}); it is never activated again in that rollout",
            target.closure_hash, target.rollout_id, f.reason
        )
    } else {
        format!(
            "closure {} already failed on this host in rollout {} ({}); a later rollout does not send it again by itself (to retry it on purpose, see docs/release.md)",
            target.closure_hash, f.rollout_id, f.reason
        )
    }
}

/// Checks done before anything is fetched: the shape of the ids, a rollout swapped under
/// an activation in flight, and a closure that already failed on this host
/// ([`closure_blocked`]).
pub fn precheck(
    target: &Target,
    in_flight: Option<&Activation>,
    failed_targets: &[FailedTarget],
) -> Result<(), Refusal> {
    if !is_rollout_id(&target.rollout_id) {
        return Err(manifest_rejected(format!(
            "the control plane sent rollout id {:?}, which is not a SHA-256 hex digest",
            target.rollout_id
        )));
    }
    if !is_store_basename(&target.closure_hash) {
        return Err(manifest_rejected(format!(
            "the control plane sent closure {:?}, which is not a Nix store basename",
            target.closure_hash
        )));
    }
    if let Some(activation) = in_flight {
        if activation.target.rollout_id != target.rollout_id {
            return Err(manifest_rejected(format!(
                "the control plane changed the rollout of the activation in flight from {} to {}; a rollout id never changes mid-rollout",
                activation.target.rollout_id, target.rollout_id
            )));
        }
    }
    if let Some(f) = closure_blocked(failed_targets, &target.rollout_id, &target.closure_hash) {
        return Err(manifest_rejected(already_failed(target, f)));
    }
    Ok(())
}

/// What passed the gate: the rollout's channel and signature time (for the per-channel
/// high-water mark) and its health gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    pub channel: String,
    pub signed_at: OffsetDateTime,
}

fn verify_refusal(source: &str, e: VerifyError) -> Refusal {
    Refusal {
        kind: match e {
            VerifyError::Stale { .. } => ReportKind::StaleTarget,
            _ => ReportKind::ManifestRejected,
        },
        reason: format!("rollout manifest {source}: {e}"),
    }
}

fn disagrees(target: &Target, actual: String) -> Refusal {
    manifest_rejected(format!(
        "the control plane sent closure {} in wave {} of rollout {}, but the signed manifest disagrees: {actual}",
        target.closure_hash, target.wave_index, target.rollout_id
    ))
}

/// Refuses a manifest older than one of its channel this host already accepted.
fn not_replayed(
    target: &Target,
    verified: &Verified<SignedManifest>,
    newest: &BTreeMap<String, crate::store::Accepted>,
) -> Result<Passed, Refusal> {
    let channel = verified.value.channel();
    if let Some(mark) = newest.get(channel) {
        if verified.signed_at < mark.signed_at {
            return Err(manifest_rejected(format!(
                "rollout {} of channel {} was signed at {}, before the newest release this host already accepted for that channel (signed at {}); an older release is never activated (it is being replayed); to go back, CI signs a new release naming the older closure",
                target.rollout_id,
                channel,
                rfc3339(verified.signed_at),
                rfc3339(mark.signed_at)
            )));
        }
    }
    Ok(Passed {
        channel: channel.to_owned(),
        signed_at: verified.signed_at,
    })
}

/// The signed manifest must be the target's rollout. The agent holds no fleet, so the
/// fleet binding is the control plane's check (it loads a manifest only with its fleet).
fn of_target(target: &Target) -> ManifestContext<'_> {
    ManifestContext {
        rollout_id: Some(&target.rollout_id),
        fleet: None,
    }
}

/// Verifies a whole manifest (signature against ciReleaseKey, id = hash of its intent,
/// freshness from its own signed window), that it gives this host this closure in this
/// wave, and that it is not older than a manifest of its channel this host already
/// accepted (`newest`, per channel). Only a schema-1 manifest names its hosts: a schema-2
/// one is believed for this host only with an inclusion proof ([`check_proof`]).
/// `manifest_source` names where the bytes came from.
#[allow(clippy::too_many_arguments)]
pub fn check(
    target: &Target,
    hostname: &str,
    manifest: &[u8],
    signature: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    manifest_source: &str,
    newest: &BTreeMap<String, crate::store::Accepted>,
) -> Result<Passed, Refusal> {
    let verified = verify::verify_manifest_header(
        manifest,
        signature,
        trust,
        now,
        of_target(target),
        &Limits::default(),
    )
    .map_err(|e| verify_refusal(manifest_source, e))?;
    let SignedManifest::V1(manifest) = &verified.value else {
        return Err(manifest_rejected(format!(
            "rollout manifest {manifest_source} has schemaVersion 2, which names its hosts only by a root, and the control plane gave no inclusion proof for {hostname}; nothing shows that rollout {} includes this host",
            target.rollout_id
        )));
    };
    if !manifest.contains(hostname, target.wave_index, &target.closure_hash) {
        let actual = match manifest.entry(hostname) {
            Some(e) => format!(
                "it gives {hostname} closure {} in wave {}",
                e.target_closure, e.wave_index
            ),
            None => format!("its hostSet does not list {hostname}"),
        };
        return Err(disagrees(target, actual));
    }
    not_replayed(target, &verified, newest)
}

/// Verifies a host proof ([`verify::verify_host_proof`]: the signed manifest as
/// [`check`] does, and the inclusion proof of the entry), then that the entry is this
/// host's and gives it this closure in this wave, and that it is not replayed.
#[allow(clippy::too_many_arguments)]
pub fn check_proof(
    target: &Target,
    hostname: &str,
    proof: &[u8],
    trust: &TrustFile,
    now: OffsetDateTime,
    source: &str,
    newest: &BTreeMap<String, crate::store::Accepted>,
) -> Result<Passed, Refusal> {
    let verified =
        verify::verify_host_proof(proof, trust, now, of_target(target), &Limits::default())
            .map_err(|e| verify_refusal(source, e))?;
    let e = &verified.entry;
    if e.hostname != hostname {
        return Err(disagrees(
            target,
            format!(
                "the entry the control plane proved is {}'s, not {hostname}'s (a neighbour's entry is never taken for this host's)",
                e.hostname
            ),
        ));
    }
    if e.target_closure != target.closure_hash || e.wave_index != target.wave_index {
        return Err(disagrees(
            target,
            format!(
                "it gives {hostname} closure {} in wave {}",
                e.target_closure, e.wave_index
            ),
        ));
    }
    not_replayed(target, &verified.manifest, newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::wire::FailureCause;
    use time::macros::datetime;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const CLOSURE: &str = "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-nixos-system-a-1";

    fn target(rollout: &str, closure: &str) -> Target {
        Target {
            closure_hash: closure.to_owned(),
            rollout_id: rollout.to_owned(),
            wave_index: 0,
            signed_at: datetime!(2026-11-27 10:00 UTC),
            freshness_window_secs: 3600,
            confirm_window_secs: 60,
        }
    }

    #[test]
    fn store_basenames_are_checked() {
        assert!(is_store_basename(CLOSURE));
        for bad in [
            "",
            "nohash",
            "../../etc/passwd",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-a/b",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci1-short",
            "Pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-upper",
            "pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-",
        ] {
            assert!(!is_store_basename(bad), "{bad}");
        }
    }

    #[test]
    fn a_swapped_rollout_id_is_refused() {
        let in_flight = Activation {
            target: target(ID, CLOSURE),
            previous: "x".into(),
        };
        let other = ID.replace('0', "f");
        let r = precheck(&target(&other, CLOSURE), Some(&in_flight), &[]).unwrap_err();
        assert_eq!(r.kind, ReportKind::ManifestRejected);
        assert!(r.reason.contains("changed the rollout"), "{}", r.reason);
        assert!(precheck(&target(ID, CLOSURE), Some(&in_flight), &[]).is_ok());
    }

    fn failure(rollout: &str, cause: FailureCause) -> FailedTarget {
        FailedTarget {
            rollout_id: rollout.into(),
            closure_hash: CLOSURE.into(),
            reason: "switch-to-configuration exited with status 1".into(),
            at: datetime!(2026-11-27 10:00 UTC),
            cause: Some(cause),
        }
    }

    #[test]
    fn a_closure_that_failed_in_the_rollout_is_refused() {
        let failed = failure(ID, FailureCause::ConfirmTimeout);
        assert!(precheck(&target(ID, CLOSURE), None, &[failed]).is_err());
    }

    #[test]
    fn a_closure_whose_activation_failed_here_is_refused_in_a_later_rollout() {
        let later = ID.replace('0', "f");
        let r = precheck(
            &target(&later, CLOSURE),
            None,
            &[failure(ID, FailureCause::Activation)],
        )
        .unwrap_err();
        assert_eq!(r.kind, ReportKind::ManifestRejected);
        assert!(r.reason.contains("does not send it again"), "{}", r.reason);
        assert!(
            r.reason.contains("status 1"),
            "the original reason: {}",
            r.reason
        );
        // A rollback on the control plane's signal says nothing about the closure here.
        let signalled = failure(ID, FailureCause::RollbackSignal);
        assert!(precheck(&target(&later, CLOSURE), None, &[signalled]).is_ok());
    }

    #[test]
    fn malformed_ids_are_refused() {
        assert!(precheck(&target("abc", CLOSURE), None, &[]).is_err());
        assert!(precheck(&target(ID, "/nix/store/x"), None, &[]).is_err());
    }

    // ---- the proof gate: every refusal of the whole-manifest gate has its counterpart.

    use nixfleet_proto::{
        Algorithm, HealthGate, HostSetEntry, KeySlot, ManifestWave, Meta, OnHealthFailure,
        RolloutManifest,
    };
    use nixfleet_trust::hostset;
    use nixfleet_trust::keys::PrivateKey;

    const SIGNED: OffsetDateTime = datetime!(2026-11-27 10:00 UTC);

    struct Release {
        key: PrivateKey,
        plan: RolloutManifest,
        id: String,
        text: String,
        signature: Vec<u8>,
    }

    fn slot(key: &PrivateKey) -> KeySlot {
        KeySlot {
            current: key.public_key().to_entry(),
            previous: None,
            reject_before: None,
        }
    }

    fn trust(key: &PrivateKey) -> TrustFile {
        TrustFile {
            schema_version: 1,
            ci_release_key: slot(key),
            org_root_key: slot(key),
            cache_keys: Vec::new(),
        }
    }

    fn entry(host: &str, wave: u32) -> HostSetEntry {
        HostSetEntry {
            hostname: host.into(),
            wave_index: wave,
            target_closure: format!("pwp4xibhl7wv3hrz4mc9g5lkrzc9ci16-nixos-system-{host}-1"),
        }
    }

    fn release(
        key: PrivateKey,
        channel: &str,
        hosts: &[(&str, u32)],
        signed_at: OffsetDateTime,
    ) -> Release {
        let plan = RolloutManifest {
            schema_version: 2,
            display_name: format!("{channel}@abc"),
            channel: channel.into(),
            channel_ref: "abc".into(),
            fleet_resolved_hash: "0".repeat(64),
            host_set: hosts.iter().map(|(h, w)| entry(h, *w)).collect(),
            waves: vec![ManifestWave { soak_minutes: 1 }; 2],
            health_gate: HealthGate {
                systemd_failed_units: None,
                max_failures: 0,
            },
            on_health_failure: OnHealthFailure::Halt,
            compliance_frameworks: Vec::new(),
            disruption_budgets: Vec::new(),
            freshness_window: Some(60),
            introduced: None,
            compliance: None,
            meta: Meta {
                schema_version: 1,
                signed_at: Some(signed_at),
                ci_commit: None,
                signature_algorithm: Some(Algorithm::Ed25519),
            },
        };
        let bytes = nixfleet_trust::jcs::to_canonical(&hostset::header_of(&plan)).unwrap();
        let signature = key.sign(&bytes).to_vec();
        Release {
            id: verify::rollout_id(&bytes).unwrap(),
            text: String::from_utf8(bytes).unwrap(),
            signature,
            key,
            plan,
        }
    }

    impl Release {
        fn proof(&self, host: &str) -> serde_json::Value {
            let tree = hostset::tree(&self.plan.host_set);
            let p = hostset::host_proof(
                &self.id,
                &self.text,
                &self.signature,
                &self.plan.host_set,
                &tree,
                host,
            )
            .unwrap();
            serde_json::to_value(p).unwrap()
        }

        fn target(&self, host: &str) -> Target {
            let e = self.plan.entry(host).unwrap();
            Target {
                closure_hash: e.target_closure.clone(),
                rollout_id: self.id.clone(),
                wave_index: e.wave_index,
                signed_at: SIGNED,
                freshness_window_secs: 3600,
                confirm_window_secs: 60,
            }
        }
    }

    fn fleet() -> Release {
        release(
            PrivateKey::generate(Algorithm::Ed25519),
            "prod",
            &[
                ("db-01", 1),
                ("web-01", 0),
                ("web-02", 0),
                ("web-03", 1),
                ("web-04", 1),
            ],
            SIGNED,
        )
    }

    fn gate(
        r: &Release,
        target: &Target,
        host: &str,
        doc: &serde_json::Value,
        now: OffsetDateTime,
    ) -> Result<Passed, Refusal> {
        gate_with(&trust(&r.key), target, host, doc, now, &BTreeMap::new())
    }

    fn gate_with(
        trust: &TrustFile,
        target: &Target,
        host: &str,
        doc: &serde_json::Value,
        now: OffsetDateTime,
        newest: &BTreeMap<String, crate::store::Accepted>,
    ) -> Result<Passed, Refusal> {
        let bytes = serde_json::to_vec(doc).unwrap();
        check_proof(target, host, &bytes, trust, now, "test", newest)
    }

    const NOW: OffsetDateTime = datetime!(2026-11-27 10:05 UTC);

    fn rejected(r: Result<Passed, Refusal>, needle: &str) {
        let r = r.unwrap_err();
        assert_eq!(r.kind, ReportKind::ManifestRejected, "{}", r.reason);
        assert!(r.reason.contains(needle), "{needle:?} not in {}", r.reason);
    }

    #[test]
    fn the_hosts_own_proof_passes_for_every_host() {
        let r = fleet();
        for e in &r.plan.host_set {
            let passed = gate(
                &r,
                &r.target(&e.hostname),
                &e.hostname,
                &r.proof(&e.hostname),
                NOW,
            )
            .unwrap();
            assert_eq!(passed.channel, "prod");
            assert_eq!(passed.signed_at, SIGNED);
        }
    }

    #[test]
    fn a_neighbours_real_entry_with_a_valid_proof_is_refused() {
        let r = fleet();
        // The control plane sends web-01 web-02's closure, proved for web-02.
        let mut t = r.target("web-02");
        t.wave_index = 0;
        rejected(
            gate(&r, &t, "web-01", &r.proof("web-02"), NOW),
            "web-02's, not web-01's",
        );
    }

    #[test]
    fn wrong_closure_or_wave_is_refused() {
        let r = fleet();
        let mut t = r.target("web-01");
        t.closure_hash = r.plan.entry("web-03").unwrap().target_closure.clone();
        rejected(
            gate(&r, &t, "web-01", &r.proof("web-01"), NOW),
            "it gives web-01 closure",
        );
        let mut t = r.target("web-01");
        t.wave_index = 1;
        rejected(gate(&r, &t, "web-01", &r.proof("web-01"), NOW), "in wave 0");
    }

    #[test]
    fn an_altered_entry_or_proof_does_not_reach_the_signed_root() {
        let r = fleet();
        let t = r.target("web-01");
        let good = r.proof("web-01");
        let mut closure = good.clone();
        closure["entry"]["targetClosure"] = t.closure_hash.replace("web-01", "evil-1").into();
        let mut target = t.clone();
        target.closure_hash = closure["entry"]["targetClosure"].as_str().unwrap().into();
        rejected(
            gate(&r, &target, "web-01", &closure, NOW),
            "does not lead to the hostSetRoot",
        );
        let mut wave = good.clone();
        wave["entry"]["waveIndex"] = 1.into();
        let mut target = t.clone();
        target.wave_index = 1;
        rejected(
            gate(&r, &target, "web-01", &wave, NOW),
            "does not lead to the hostSetRoot",
        );
        let mut hash = good.clone();
        let h = hash["proof"][0].as_str().unwrap().to_owned();
        let first = if h.starts_with('0') { "1" } else { "0" };
        let flipped = format!("{first}{}", &h[1..]);
        hash["proof"][0] = flipped.into();
        rejected(
            gate(&r, &t, "web-01", &hash, NOW),
            "does not lead to the hostSetRoot",
        );
        let mut index = good.clone();
        index["index"] = 2.into();
        rejected(
            gate(&r, &t, "web-01", &index, NOW),
            "does not lead to the hostSetRoot",
        );
        let mut short = good.clone();
        short["proof"].as_array_mut().unwrap().pop();
        rejected(
            gate(&r, &t, "web-01", &short, NOW),
            "does not lead to the hostSetRoot",
        );
    }

    #[test]
    fn a_proof_from_another_rollout_is_refused() {
        let r = fleet();
        // Same key, same hosts, another closure for web-01: another rollout.
        let other = release(
            PrivateKey::from_pem(&r.key.to_pkcs8_pem().unwrap()).unwrap(),
            "prod",
            &[("web-01", 0), ("web-02", 0)],
            SIGNED,
        );
        let t = r.target("web-01");
        // Its header under this rollout's id: the id is the hash of the intent.
        rejected(
            gate(&r, &t, "web-01", &other.proof("web-01"), NOW),
            "not to its id",
        );
        // Its proof spliced under this rollout's header.
        let mut spliced = r.proof("web-01");
        spliced["proof"] = other.proof("web-01")["proof"].clone();
        rejected(
            gate(&r, &t, "web-01", &spliced, NOW),
            "does not lead to the hostSetRoot",
        );
    }

    #[test]
    fn stale_foreign_tampered_and_replayed_manifests_are_refused() {
        let r = fleet();
        let t = r.target("web-01");
        let doc = r.proof("web-01");
        let stale = gate(&r, &t, "web-01", &doc, SIGNED + time::Duration::hours(3)).unwrap_err();
        assert_eq!(stale.kind, ReportKind::StaleTarget, "{}", stale.reason);
        let foreign = trust(&PrivateKey::generate(Algorithm::Ed25519));
        rejected(
            gate_with(&foreign, &t, "web-01", &doc, NOW, &BTreeMap::new()),
            "does not verify",
        );
        let mut header = doc.clone();
        header["manifest"] = r.text.replace("\"halt\"", "\"rollback-and-halt\"").into();
        rejected(gate(&r, &t, "web-01", &header, NOW), "does not verify");
        let newer = BTreeMap::from([(
            "prod".to_owned(),
            crate::store::Accepted {
                signed_at: SIGNED + time::Duration::minutes(1),
            },
        )]);
        rejected(
            gate_with(&trust(&r.key), &t, "web-01", &doc, NOW, &newer),
            "being replayed",
        );
    }

    #[test]
    fn a_schema_2_manifest_without_a_proof_is_refused() {
        let r = fleet();
        let t = r.target("web-01");
        let res = check(
            &t,
            "web-01",
            r.text.as_bytes(),
            &r.signature,
            &trust(&r.key),
            NOW,
            "test",
            &BTreeMap::new(),
        );
        rejected(res, "gave no inclusion proof for web-01");
    }
}
