//! Rollout manifests of schema 2 on the real binary (docs/release.md "Manifest format"):
//! `nixfleet release` signs a small header and writes the host set and each distinct
//! budget list beside it; `nixfleet verify manifest` checks the lists against the header;
//! `nixfleet verify proof` checks one host's proof document; `--manifest-schema 1` still
//! signs the whole plan, and a re-sign keeps either schema and every rollout id.

mod support;
use support::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use nixfleet_proto::{HostProof, HostSetEntry, RolloutHosts};
use nixfleet_trust::{hostset, jcs};
use serde_json::{json, Value};

static SIGNED: std::sync::LazyLock<time::OffsetDateTime> = std::sync::LazyLock::new(|| {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
});

/// RFC 3339 of `secs` seconds after the signing time.
fn at(secs: i64) -> String {
    (*SIGNED + time::Duration::seconds(secs))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn setup(dir: &Path) {
    let ci = ok(dir, &["keygen", "--out", "ci.pem"]);
    let org = ok(dir, &["keygen", "--out", "org.pem"]);
    #[rustfmt::skip]
    ok(dir, &["trust", "init", "--ci-release-key", ci.trim(), "--org-root-key", org.trim(),
              "--out", "trust.json"]);
}

/// Signs `fleet` + `closures` into `dir/out`; `extra` is appended to the command line.
/// Returns channel -> rollout id, from the manifests written under the channel's name.
fn release(
    dir: &Path,
    out: &str,
    fleet: &Value,
    closures: &Value,
    extra: &[&str],
) -> BTreeMap<String, String> {
    fs::write(dir.join(format!("{out}.fleet.json")), fleet.to_string()).unwrap();
    fs::write(
        dir.join(format!("{out}.closures.json")),
        closures.to_string(),
    )
    .unwrap();
    let (f, c) = (format!("{out}.fleet.json"), format!("{out}.closures.json"));
    #[rustfmt::skip]
    let mut args = vec!["release", "--fleet", &f, "--closures", &c,
        "--ci-commit", "0123456789abcdef0123456789abcdef01234567", "--signed-at", &SIGNED_AT,
        "--out", out, "--key", "ci.pem", "--trust-file", "trust.json"];
    args.extend_from_slice(extra);
    let summary = ok(dir, &args);
    assert!(summary.contains("verified against trust.json"), "{summary}");
    let mut ids = BTreeMap::new();
    for channel in fleet["channels"].as_object().unwrap().keys() {
        let bytes = fs::read(
            dir.join(out)
                .join(format!("rollouts/channel/{channel}.json")),
        )
        .unwrap();
        ids.insert(
            channel.clone(),
            nixfleet_trust::verify::rollout_id(&bytes).unwrap(),
        );
    }
    ids
}

static SIGNED_AT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| at(0));

/// The example fleet with a fleet-wide budget added: over edge it freezes the same list
/// as the example's `not db` budget ([lab-01]).
fn fleet_with_fleet_wide_budget() -> Value {
    let mut fleet = fixture("fleet.json");
    fleet["disruptionBudgets"]
        .as_array_mut()
        .unwrap()
        .push(json!({"selector": {"all": true}, "maxInFlight": 3, "maxInFlightPct": null}));
    fleet
}

fn verify_manifest(dir: &Path, manifest: &str, extra: &[&str]) -> std::process::Output {
    let now = at(300);
    #[rustfmt::skip]
    let mut args = vec!["verify", "manifest", manifest, "--trust-file", "trust.json",
                        "--now", &now];
    args.extend_from_slice(extra);
    nixfleet(dir, &args)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The names of the files in `dir`.
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn release_writes_the_header_its_hosts_file_and_each_distinct_budget_list_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let fleet = fleet_with_fleet_wide_budget();
    let ids = release(dir, "rel", &fleet, &fixture("closures.json"), &[]);
    let rollouts = dir.join("rel/rollouts");

    let mut committed = BTreeSet::new();
    let mut commitments = 0;
    for (channel, id) in &ids {
        // The signed header: no host names, a root and a size, budgets by hash.
        let header = read_json(&rollouts.join(format!("{id}.json")));
        assert_eq!(header["schemaVersion"], 2);
        assert!(header.get("hostSet").is_none(), "{header}");
        assert_eq!(
            fs::read(rollouts.join(format!("channel/{channel}.json"))).unwrap(),
            fs::read(rollouts.join(format!("{id}.json"))).unwrap(),
            "{channel}: the channel copy is the same header"
        );
        // The hosts file: the rollout's sorted entries, hashing to the signed root.
        let hosts: RolloutHosts =
            serde_json::from_value(read_json(&rollouts.join(format!("{id}.hosts.json")))).unwrap();
        assert_eq!(&hosts.rollout_id, id);
        assert_eq!(
            fs::read(rollouts.join(format!("{id}.hosts.json"))).unwrap(),
            fs::read(rollouts.join(format!("channel/{channel}.hosts.json"))).unwrap()
        );
        let names: Vec<&str> = hosts.host_set.iter().map(|e| e.hostname.as_str()).collect();
        let expect: Vec<&str> = fleet["hosts"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, h)| h["channel"] == channel.as_str())
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, expect, "{channel}");
        assert_eq!(header["hostSetSize"], expect.len());
        assert_eq!(
            header["hostSetRoot"],
            hex::encode(hostset::tree(&hosts.host_set).root())
        );
        for budget in header["disruptionBudgets"].as_array().unwrap() {
            committed.insert(budget["hostsSha256"].as_str().unwrap().to_owned());
            commitments += 1;
        }
    }
    // stable: db, not-db, all; edge: not-db and all freeze the same [lab-01].
    assert_eq!(commitments, 5);
    assert_eq!(committed.len(), 4, "{committed:?}");
    let files: BTreeSet<String> = committed.iter().map(|s| format!("{s}.json")).collect();
    assert_eq!(names(&rollouts.join("budgets")), files);
    assert_eq!(names(&rollouts.join("channel/budgets")), files);
    for sha in &committed {
        // Each list's bytes are the RFC 8785 bytes its name is the hash of.
        let bytes = fs::read(rollouts.join(format!("budgets/{sha}.json"))).unwrap();
        assert_eq!(&jcs::sha256_hex(&bytes), sha);
        let list: Vec<String> = serde_json::from_slice(&bytes).unwrap();
        assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
    }

    // Both copies verify with their lists, found beside them.
    for channel in ids.keys() {
        for path in [
            format!("rel/rollouts/{}.json", ids[channel]),
            format!("rel/rollouts/channel/{channel}.json"),
        ] {
            let out = verify_manifest(dir, &path, &["--fleet", "rel/fleet.resolved.json"]);
            assert!(out.status.success(), "{path}: {}", stderr(&out));
            assert!(
                stdout(&out).contains("host set and budget lists match the signed hashes"),
                "{}",
                stdout(&out)
            );
        }
    }
}

#[test]
fn the_header_of_a_thousand_host_fleet_is_under_4_kib() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let mut fleet = fixture("fleet.json");
    let mut hosts = serde_json::Map::new();
    let mut closures = serde_json::Map::new();
    for i in 0..1000 {
        let name = format!("node-{i:04}");
        let tags = if i < 10 {
            json!(["canary"])
        } else {
            json!(["web"])
        };
        hosts.insert(
            name.clone(),
            json!({"system": "x86_64-linux", "tags": tags, "channel": "stable", "closureHash": null, "pubkey": null}),
        );
        closures.insert(name.clone(), json!(format!("{i:032}-nixos-system-{name}")));
    }
    fleet["hosts"] = Value::Object(hosts);
    fleet["edges"] = json!([]);
    fleet["channels"].as_object_mut().unwrap().remove("edge");
    fleet["channelEdges"] = json!([]);
    let ids = release(dir, "big", &fleet, &Value::Object(closures), &[]);
    let header = dir.join(format!("big/rollouts/{}.json", ids["stable"]));
    let size = fs::metadata(&header).unwrap().len();
    assert!(size < 4096, "the header is {size} bytes");
    let hosts = dir.join(format!("big/rollouts/{}.hosts.json", ids["stable"]));
    assert!(fs::metadata(hosts).unwrap().len() > 50_000);
    let out = verify_manifest(
        dir,
        header.to_str().unwrap(),
        &["--fleet", "big/fleet.resolved.json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1000 host(s)"), "{}", stdout(&out));
}

#[test]
fn verify_manifest_refuses_an_altered_host_set_or_a_missing_budget_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let ids = release(
        dir,
        "rel",
        &fixture("fleet.json"),
        &fixture("closures.json"),
        &[],
    );
    let stable = format!("rel/rollouts/{}.json", ids["stable"]);
    let hosts_path = dir.join(format!("rel/rollouts/{}.hosts.json", ids["stable"]));

    // The lists, elsewhere: named with --hosts and --budgets.
    fs::create_dir(dir.join("lists")).unwrap();
    fs::copy(&hosts_path, dir.join("lists/stable.hosts.json")).unwrap();
    let out = verify_manifest(
        dir,
        &stable,
        &[
            "--hosts",
            "lists/stable.hosts.json",
            "--budgets",
            "rel/rollouts/channel/budgets",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // One closure changed in the hosts file.
    let mut hosts: RolloutHosts =
        serde_json::from_value(read_json(&dir.join("lists/stable.hosts.json"))).unwrap();
    hosts.host_set[1].target_closure = "00000000000000000000000000000009-nixos-system-x".into();
    fs::write(
        dir.join("lists/altered.hosts.json"),
        serde_json::to_vec(&hosts).unwrap(),
    )
    .unwrap();
    let out = verify_manifest(dir, &stable, &["--hosts", "lists/altered.hosts.json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("lists/altered.hosts.json")
            && err.contains("the host set's root is")
            && err.contains("do not match what it signs"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Another rollout's hosts file.
    let edge_hosts = format!("rel/rollouts/{}.hosts.json", ids["edge"]);
    let err = stderr(&verify_manifest(dir, &stable, &["--hosts", &edge_hosts]));
    assert!(
        err.contains(&format!("is for rollout {}", ids["edge"])),
        "{err}"
    );

    // A budget list missing.
    let header = read_json(&dir.join(&stable));
    let sha = header["disruptionBudgets"][0]["hostsSha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let budget = dir.join(format!("rel/rollouts/budgets/{sha}.json"));
    fs::rename(&budget, dir.join("moved.json")).unwrap();
    let out = verify_manifest(dir, &stable, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("budget list {sha} is missing"))
            && err.contains(&format!("rel/rollouts/budgets/{sha}.json is not there")),
        "{err}"
    );
    // A budget list with a host added.
    let mut list: Vec<String> =
        serde_json::from_slice(&fs::read(dir.join("moved.json")).unwrap()).unwrap();
    list.push("zz-intruder".into());
    fs::write(&budget, serde_json::to_vec(&list).unwrap()).unwrap();
    let err = stderr(&verify_manifest(dir, &stable, &[]));
    assert!(
        err.contains(&format!("budget list {sha} hashes to")),
        "{err}"
    );

    // The hosts file missing.
    fs::remove_file(&hosts_path).unwrap();
    let err = stderr(&verify_manifest(dir, &stable, &[]));
    assert!(
        err.contains("has schemaVersion 2")
            && err.contains(&format!(
                "{} is not there",
                hosts_path.strip_prefix(dir).unwrap().display()
            )),
        "{err}"
    );
}

/// The proof document of `host` in the rollout at `manifest` (a path under `dir`), built
/// from the release's files as the control plane serves it.
fn proof_of(dir: &Path, manifest: &str, host: &str) -> HostProof {
    let manifest = dir.join(manifest);
    let text = fs::read_to_string(&manifest).unwrap();
    let signature = fs::read(manifest.with_extension("json.sig")).unwrap();
    let hosts: RolloutHosts =
        serde_json::from_value(read_json(&manifest.with_extension("hosts.json"))).unwrap();
    let tree = hostset::tree(&hosts.host_set);
    let index = hosts
        .host_set
        .iter()
        .position(|e| e.hostname == host)
        .unwrap();
    HostProof {
        rollout_id: hosts.rollout_id.clone(),
        manifest: text,
        signature: base64::engine::general_purpose::STANDARD.encode(signature),
        entry: hosts.host_set[index].clone(),
        index: index as u64,
        proof: tree.proof(index).unwrap().iter().map(hex::encode).collect(),
    }
}

fn write_proof(dir: &Path, name: &str, proof: &HostProof) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, serde_json::to_vec_pretty(proof).unwrap()).unwrap();
    path
}

fn verify_proof(dir: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "verify",
        "proof",
        file.to_str().unwrap(),
        "--trust-file",
        "trust.json",
    ];
    args.extend_from_slice(extra);
    nixfleet(dir, &args)
}

#[test]
fn verify_proof_accepts_a_host_s_own_proof_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let (fleet, closures) = (fixture("fleet.json"), fixture("closures.json"));
    let ids = release(dir, "a", &fleet, &closures, &[]);
    let id = &ids["stable"];
    let manifest = format!("a/rollouts/{id}.json");
    let now = at(300);

    // As the agent keeps it: <rolloutId>.proof.json.
    let proof = proof_of(dir, &manifest, "web-02");
    let file = write_proof(dir, &format!("{id}.proof.json"), &proof);
    let closure = "00000000000000000000000000000005-nixos-system-web-02";
    let out = verify_proof(
        dir,
        &file,
        &[
            "--host",
            "web-02",
            "--closure",
            &format!("/nix/store/{closure}"),
            "--now",
            &now,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = stdout(&out);
    for part in [
        "ok: host web-02",
        &format!("rollout {id}"),
        &format!("signed {}", at(0)),
        "wave 1",
        &format!("closure {closure}"),
        "channel stable",
    ] {
        assert!(line.contains(part), "{part:?} not in {line}");
    }
    // Without --now: checked as of the clock (the release was signed just now).
    let out = verify_proof(dir, &file, &["--rollout", id]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Every entry of every channel, and every tree shape here, proves.
    for channel in ["edge", "stable"] {
        let m = format!("a/rollouts/channel/{channel}.json");
        let hosts: RolloutHosts = serde_json::from_value(read_json(
            &dir.join(format!("a/rollouts/channel/{channel}.hosts.json")),
        ))
        .unwrap();
        for HostSetEntry { hostname, .. } in &hosts.host_set {
            let file = write_proof(dir, "each.json", &proof_of(dir, &m, hostname));
            let out = verify_proof(dir, &file, &["--host", hostname, "--now", &now]);
            assert!(out.status.success(), "{hostname}: {}", stderr(&out));
        }
    }

    // A proof hash altered.
    let mut tampered = proof.clone();
    let first = tampered.proof[0].clone();
    let flipped = if first.starts_with('0') { "1" } else { "0" };
    tampered.proof[0] = format!("{flipped}{}", &first[1..]);
    let file = write_proof(dir, "tampered.json", &tampered);
    let err = stderr(&verify_proof(dir, &file, &["--now", &now]));
    assert!(
        err.contains("does not lead to the hostSetRoot signed in rollout manifest"),
        "{err}"
    );

    // A neighbour's entry, presented for web-02.
    let neighbour = write_proof(dir, "neighbour.json", &proof_of(dir, &manifest, "web-03"));
    let out = verify_proof(dir, &neighbour, &["--host", "web-02", "--now", &now]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("proof refused: its entry is web-03's, not web-02's"),
        "{}",
        stderr(&out)
    );
    // web-02's entry with another closure than asked.
    let err = stderr(&verify_proof(
        dir,
        &write_proof(dir, "p.json", &proof),
        &[
            "--closure",
            "00000000000000000000000000000006-nixos-system-web-03",
            "--now",
            &now,
        ],
    ));
    assert!(
        err.contains(&format!("gives web-02 the closure {closure}")),
        "{err}"
    );

    // Another release with a changed closure: a new stable rollout.
    let mut changed = closures.clone();
    changed["web-02"] = "00000000000000000000000000000009-nixos-system-web-02".into();
    let other = release(dir, "b", &fleet, &changed, &[]);
    assert_ne!(other["stable"], *id);
    // A proof of release a, asked for release b's rollout (or kept under its name).
    let err = stderr(&verify_proof(
        dir,
        &file_named(dir, &proof),
        &["--rollout", &other["stable"], "--now", &now],
    ));
    assert!(err.contains("not to its id"), "{err}");
    let renamed = write_proof(dir, &format!("{}.proof.json", other["stable"]), &proof);
    let err = stderr(&verify_proof(dir, &renamed, &["--now", &now]));
    assert!(err.contains("not to its id"), "{err}");
    // Release a's entry and path under release b's signed manifest.
    let b = proof_of(
        dir,
        &format!("b/rollouts/{}.json", other["stable"]),
        "web-02",
    );
    let mut spliced = proof.clone();
    spliced.manifest = b.manifest;
    spliced.signature = b.signature;
    spliced.rollout_id = b.rollout_id;
    let err = stderr(&verify_proof(
        dir,
        &write_proof(dir, "spliced.json", &spliced),
        &["--now", &now],
    ));
    assert!(err.contains("does not lead to the hostSetRoot"), "{err}");

    // Stale: past the freshness window (1440 minutes) and its 60 s of slack.
    let err = stderr(&verify_proof(
        dir,
        &write_proof(dir, "p.json", &proof),
        &["--now", &at(1440 * 60 + 61)],
    ));
    assert!(err.contains("is stale"), "{err}");
}

fn file_named(dir: &Path, proof: &HostProof) -> PathBuf {
    write_proof(dir, "unnamed.json", proof)
}

#[test]
fn manifest_schema_1_signs_the_whole_plan_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let (fleet, closures) = (fixture("fleet.json"), fixture("closures.json"));
    let v1 = release(dir, "v1", &fleet, &closures, &["--manifest-schema", "1"]);
    let v2 = release(dir, "v2", &fleet, &closures, &[]);
    for (channel, id) in &v1 {
        assert_ne!(
            &v2[channel], id,
            "the schemas name the same intent differently"
        );
        let manifest = read_json(&dir.join(format!("v1/rollouts/{id}.json")));
        assert_eq!(manifest["schemaVersion"], 1);
        assert!(manifest["hostSet"]
            .as_array()
            .is_some_and(|h| !h.is_empty()));
        assert!(manifest.get("hostSetRoot").is_none());
        assert!(!dir.join(format!("v1/rollouts/{id}.hosts.json")).exists());
        let path = format!("v1/rollouts/{id}.json");
        let out = verify_manifest(dir, &path, &["--fleet", "v1/fleet.resolved.json"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(!dir.join("v1/rollouts/budgets").exists());
    // A schema-1 manifest carries no root: no proof of it.
    let stable = format!("v1/rollouts/{}.json", v1["stable"]);
    let text = fs::read_to_string(dir.join(&stable)).unwrap();
    let mut proof = proof_of(dir, &format!("v2/rollouts/{}.json", v2["stable"]), "web-01");
    proof.manifest = text;
    proof.signature = base64::engine::general_purpose::STANDARD
        .encode(fs::read(dir.join(format!("{stable}.sig"))).unwrap());
    proof.rollout_id = v1["stable"].clone();
    let err = stderr(&verify_proof(
        dir,
        &write_proof(dir, "v1.json", &proof),
        &["--now", &at(300)],
    ));
    assert!(err.contains("schemaVersion 1"), "{err}");
}

#[test]
fn a_re_sign_keeps_the_schema_and_every_rollout_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir);
    let (fleet, closures) = (fixture("fleet.json"), fixture("closures.json"));
    for (out, extra) in [("v2", &[][..]), ("v1", &["--manifest-schema", "1"][..])] {
        let ids = release(dir, out, &fleet, &closures, extra);
        // Half a minute later (within the 60 s a signature may be ahead of the clock).
        let later = at(30);
        #[rustfmt::skip]
        let line = ok(dir, &["release", "--resign", "--from", out, "--key", "ci.pem",
                             "--trust-file", "trust.json", "--signed-at", &later]);
        assert!(line.contains("rollout ids unchanged"), "{line}");
        for (channel, id) in &ids {
            let path = dir.join(format!("{out}/rollouts/channel/{channel}.json"));
            assert_eq!(
                &nixfleet_trust::verify::rollout_id(&fs::read(&path).unwrap()).unwrap(),
                id
            );
            let manifest = read_json(&path);
            assert_eq!(manifest["meta"]["signedAt"], at(30), "{out}: not re-signed");
            assert_eq!(manifest["introduced"]["signedAt"], at(0));
            let expect = if out == "v1" { 1 } else { 2 };
            assert_eq!(manifest["schemaVersion"], expect);
        }
    }
    // The schema of a re-sign is the release's own.
    let err = fails(
        dir,
        &[
            "release",
            "--resign",
            "--from",
            "v1",
            "--key",
            "ci.pem",
            "--trust-file",
            "trust.json",
            "--manifest-schema",
            "2",
        ],
    );
    assert!(err.contains("--manifest-schema"), "{err}");
}
