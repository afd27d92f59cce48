//! Host-signed compliance evidence: what `verify_evidence` accepts and each way it refuses.

use std::collections::BTreeMap;

use base64::Engine as _;
use nixfleet_proto::compliance::{
    ComplianceMode, ControlEvidence, ControlStatus, Evidence, EvidenceRequest, EvidenceTrigger,
};
use nixfleet_proto::Algorithm;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use nixfleet_trust::verify::{verify_evidence, Artifact, Limits, Slot, VerifyError};
use time::macros::datetime;

const CLOSURE: &str = "0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-01";

fn evidence() -> Evidence {
    Evidence {
        hostname: "web-01".into(),
        rollout_id: Some("a".repeat(64)),
        closure_hash: CLOSURE.into(),
        boot_id: "boot".into(),
        activated_at: datetime!(2026-12-04 09:00:00 UTC),
        collected_at: datetime!(2026-12-04 09:00:05 UTC),
        trigger: EvidenceTrigger::Activation,
        mode: ComplianceMode::Enforce,
        frameworks: vec!["cis".into()],
        controls: vec![ControlEvidence {
            id: "ssh-root-login-key-only".into(),
            status: ControlStatus::Pass,
            articles: BTreeMap::from([("cis".to_owned(), vec!["5.2.8".to_owned()])]),
            output_hash: format!("sha256:{}", "0".repeat(64)),
            collected_at: datetime!(2026-12-04 09:00:04 UTC),
        }],
    }
}

fn sign(key: &PrivateKey, evidence: Evidence) -> Vec<u8> {
    let sig = key.sign(&jcs::to_canonical(&evidence).unwrap());
    serde_json::to_vec(&EvidenceRequest {
        evidence,
        signature: base64::engine::general_purpose::STANDARD.encode(sig),
    })
    .unwrap()
}

fn host() -> (PrivateKey, String) {
    let key = PrivateKey::generate(Algorithm::Ed25519);
    let line = keys::to_ssh_public_line(&key.public_key(), "root@web-01").unwrap();
    (key, line)
}

#[test]
fn evidence_signed_by_the_host_key_verifies_and_is_named_by_its_canonical_hash() {
    let (key, line) = host();
    let bytes = sign(&key, evidence());
    let v = verify_evidence(&bytes, "web-01", &line, &Limits::default()).unwrap();
    assert_eq!(v.value.evidence, evidence());
    assert_eq!(
        v.id,
        jcs::sha256_hex(&jcs::to_canonical(&evidence()).unwrap())
    );
    // Whitespace and key order of the envelope do not change what was signed.
    let reordered =
        serde_json::to_vec_pretty(&serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
            .unwrap();
    assert_eq!(
        verify_evidence(&reordered, "web-01", &line, &Limits::default())
            .unwrap()
            .id,
        v.id
    );
}

#[test]
fn forged_or_altered_evidence_is_refused() {
    let (key, line) = host();
    let (other, _) = host();
    let forged = sign(&other, evidence());
    assert!(matches!(
        verify_evidence(&forged, "web-01", &line, &Limits::default()).unwrap_err(),
        VerifyError::BadSignature {
            artifact: Artifact::Evidence,
            slot: Slot::HostKey
        }
    ));
    let altered = String::from_utf8(sign(&key, evidence()))
        .unwrap()
        .replace("\"pass\"", "\"fail\"");
    assert!(matches!(
        verify_evidence(altered.as_bytes(), "web-01", &line, &Limits::default()).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
}

#[test]
fn another_hosts_evidence_is_refused() {
    let (key, line) = host();
    let mut theirs = evidence();
    theirs.hostname = "db-01".into();
    // Signed with this host's key but naming another host: refused.
    let bytes = sign(&key, theirs);
    assert!(matches!(
        verify_evidence(&bytes, "web-01", &line, &Limits::default()).unwrap_err(),
        VerifyError::EvidenceHostMismatch { .. }
    ));
    // This host's evidence checked as another's (against that host's key) does not verify.
    let (_, db_line) = host();
    let bytes = sign(&key, evidence());
    assert!(matches!(
        verify_evidence(&bytes, "db-01", &db_line, &Limits::default()).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
}

#[test]
fn evidence_collected_before_the_activation_is_refused() {
    let (key, line) = host();
    let mut old = evidence();
    old.controls[0].collected_at = datetime!(2026-12-04 08:59:59 UTC);
    let err = verify_evidence(&sign(&key, old), "web-01", &line, &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::EvidenceBeforeActivation { control, .. } if control == "ssh-root-login-key-only"),
        "{err}"
    );
}

#[test]
fn malformed_evidence_is_refused_by_shape() {
    let (key, line) = host();
    type Mutation = Box<dyn Fn(&mut Evidence)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("closure", Box::new(|e| e.closure_hash = "../../etc".into())),
        ("rollout", Box::new(|e| e.rollout_id = Some("nope".into()))),
        (
            "hash",
            Box::new(|e| e.controls[0].output_hash = "md5:00".into()),
        ),
        ("id", Box::new(|e| e.controls[0].id = "Bad Id".into())),
        (
            "duplicate",
            Box::new(|e| {
                let c = e.controls[0].clone();
                e.controls.push(c)
            }),
        ),
        (
            "after",
            Box::new(|e| e.controls[0].collected_at = datetime!(2026-12-04 09:00:06 UTC)),
        ),
    ];
    for (name, mutate) in cases {
        let mut e = evidence();
        mutate(&mut e);
        let err = verify_evidence(&sign(&key, e), "web-01", &line, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Shape {
                    artifact: Artifact::Evidence,
                    ..
                }
            ),
            "{name}: {err}"
        );
    }
    let limits = Limits {
        evidence_bytes: 100,
        ..Limits::default()
    };
    assert!(matches!(
        verify_evidence(&sign(&key, evidence()), "web-01", &line, &limits).unwrap_err(),
        VerifyError::TooLarge { .. }
    ));
}
