//! mkFleet, the Nix half of a release, evaluated with the real `nix-instantiate`:
//! golden fixtures under `nix/tests/positive`, error fixtures under `nix/tests/negative`
//! (adding a case is adding a directory), every `.nix` file parses, and every golden
//! fleet goes through `nixfleet release` and `nixfleet verify` with the waves mkFleet
//! resolved.

mod support;
use support::*;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// Now, and five minutes later. A fixed instant would go stale once the fixtures'
/// freshness window has passed, and `release` checks what it signed against the clock.
fn signing_times() -> (String, String) {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    (rfc3339(now), rfc3339(now + time::Duration::minutes(5)))
}
/// Set to rewrite every positive fixture's expected.json from mkFleet's output.
const BLESS: &str = "NIXFLEET_BLESS";

/// Evaluates an attribute of mkFleet's result for one fixture (via nix/tests/eval.nix).
fn eval_fixture(fixture: &Path, attr: &str) -> Result<Value, String> {
    let fleet_nix = fixture.join("fleet.nix");
    let out = nix_instantiate(&[
        OsStr::new("--eval"),
        OsStr::new("--strict"),
        OsStr::new("--json"),
        OsStr::new("nix/tests/eval.nix"),
        OsStr::new("--argstr"),
        OsStr::new("fixture"),
        fleet_nix.as_os_str(),
        OsStr::new("--argstr"),
        OsStr::new("attr"),
        OsStr::new(attr),
    ]);
    if out.success {
        Ok(serde_json::from_str(&out.stdout).expect("nix-instantiate --json prints JSON"))
    } else {
        Err(out.stderr)
    }
}

fn eval_expr(expr: &str) -> Nix {
    nix_instantiate(&["--eval", "--strict", "--json", "--expr", expr])
}

/// The fixture directories of one kind, by name.
fn fixtures(kind: &str) -> Vec<(String, PathBuf)> {
    let dir = repo().join("nix/tests").join(kind);
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_dir())
        .map(|path| {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                path,
            )
        })
        .collect();
    out.sort();
    out
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn positive_fixtures_evaluate_to_their_golden_json() {
    let cases = fixtures("positive");
    assert!(cases.len() >= 10, "expected at least 10 positive fixtures");
    let bless = std::env::var_os(BLESS).is_some();
    let mut failures = Vec::new();
    for (name, dir) in &cases {
        let got = match eval_fixture(dir, "resolved") {
            Ok(got) => got,
            Err(stderr) => {
                failures.push(format!("{name}: evaluation failed:\n{stderr}"));
                continue;
            }
        };
        let golden = dir.join("expected.json");
        let pretty = serde_json::to_string_pretty(&got).unwrap() + "\n";
        if bless {
            fs::write(&golden, pretty).unwrap();
        } else if !golden.exists() {
            failures.push(format!(
                "{name}: no expected.json; run with {BLESS}=1 to write it, then review it"
            ));
        } else if read_json(&golden) != got {
            failures.push(format!(
                "{name}: mkFleet's output differs from expected.json ({BLESS}=1 rewrites it):\n{pretty}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn negative_fixtures_fail_with_their_message() {
    let cases = fixtures("negative");
    assert!(cases.len() >= 8, "expected at least 8 negative fixtures");
    let mut failures = Vec::new();
    for (name, dir) in &cases {
        // Each non-empty line of expected-error.txt must appear in the error.
        let expected = fs::read_to_string(dir.join("expected-error.txt"))
            .unwrap_or_else(|e| panic!("{name}/expected-error.txt: {e}"));
        let wanted: Vec<&str> = expected.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!wanted.is_empty(), "{name}/expected-error.txt is empty");
        match eval_fixture(dir, "resolved") {
            Ok(got) => failures.push(format!("{name}: evaluated instead of failing:\n{got}")),
            Err(stderr) => {
                for line in wanted.iter().filter(|l| !stderr.contains(*l)) {
                    failures.push(format!(
                        "{name}: error does not contain {line:?}:\n{stderr}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_nix_file_in_the_repository_parses() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                // Build output, git data and the demo's scratch directory hold no sources.
                if !name.starts_with('.') && name != "target" && name != "nixfleet-demo" {
                    walk(&path, out);
                }
            } else if name.ends_with(".nix") {
                out.push(path);
            }
        }
    }
    let root = repo();
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    for required in ["flake.nix", "nix/lib/default.nix", "nix/lib/mk-fleet.nix"] {
        assert!(
            files.contains(&root.join(required)),
            "{required} is missing"
        );
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let out = nix_instantiate(&[OsStr::new("--parse"), file.as_os_str()]);
            (!out.success).then(|| format!("{}:\n{}", file.display(), out.stderr))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_example_fixture_is_examples_fleet_json() {
    // examples/fleet.json (what the docs and scripts/run-local release) is exactly what
    // mkFleet makes of the example fixture, less the waves that release resolves anyway.
    let mut golden = read_json(&repo().join("nix/tests/positive/example/expected.json"));
    golden.as_object_mut().unwrap().remove("waves");
    assert_eq!(golden, read_json(&repo().join("examples/fleet.json")));
}

#[test]
fn flake_exposes_the_library_without_any_input() {
    // Every input but `self` throws: lib must evaluate without nixpkgs.
    let out = eval_expr(
        r#"
        let
          flake = import ./flake.nix;
          inputs = builtins.mapAttrs (name: _: throw "lib needs the flake input ${name}")
            (builtins.functionArgs flake.outputs);
          outputs = flake.outputs (inputs // { self = outputs; });
          fleet = import ./nix/tests/positive/example/fleet.nix;
        in {
          lib = builtins.attrNames outputs.lib;
          resolved = (outputs.lib.mkFleet fleet).resolved;
          merged = (outputs.lib.mkFleet (outputs.lib.mergeFleets [ fleet ])).resolved;
        }
        "#,
    );
    assert!(out.success, "{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        got["lib"],
        serde_json::json!(["compliance", "mergeFleets", "mkFleet"])
    );
    let golden = read_json(&repo().join("nix/tests/positive/example/expected.json"));
    assert_eq!(got["resolved"], golden);
    assert_eq!(got["merged"], golden, "merging one fleet changes nothing");
}

#[test]
fn host_configurations_are_for_ci_and_guarded_by_validation() {
    let out = eval_expr(
        r#"
        let
          fleet = (import ./nix/lib).mkFleet (import ./nix/tests/positive/defaults-and-nulls/fleet.nix);
          configurations = fleet.hostConfigurations;
        in {
          names = builtins.attrNames configurations;
          isModule = builtins.isFunction configurations.configured-01;
        }
        "#,
    );
    assert!(out.success, "{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        got,
        serde_json::json!({"names": ["configured-01"], "isModule": true}),
        "only hosts with a configuration, passed through untouched"
    );

    // CI must not build closures for a fleet that release would refuse.
    let out = eval_expr(
        r#"builtins.attrNames ((import ./nix/lib).mkFleet (import ./nix/tests/negative/unknown-channel/fleet.nix)).hostConfigurations"#,
    );
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr
            .contains(r#"host web-04: unknown channel "stabel""#),
        "{}",
        out.stderr
    );
}

/// Issue #18 item 10: a fleet written for the reference mkFleet evaluates unchanged, and
/// every optional attribute it leaves out resolves to the reference default (the table in
/// docs/declare-your-fleet.md). `bare` sets nothing optional at all; the
/// reference-defaults fixture has optional sections whose members set nothing optional.
#[test]
fn a_fleet_setting_no_optional_attribute_gets_the_reference_defaults() {
    let out = eval_expr(
        r#"
        let
          lib = import ./nix/lib;
          bare = {
            hosts.web-01 = {
              system = "x86_64-linux";
              channel = "stable";
              configuration = { ... }: { };   # required by the reference, optional here
            };
            channels.stable = { rolloutPolicy = "default"; freshnessWindow = 1440; };
            rolloutPolicies.default = { strategy = "canary"; };
          };
          # The same fleet with every reference default written out.
          explicit = bare // {
            hosts.web-01 = bare.hosts.web-01 // { tags = [ ]; pubkey = null; };
            tags = { };
            channels.stable = bare.channels.stable // {
              description = "";
              reconcileIntervalMinutes = 30;
              signingIntervalMinutes = 60;
              compliance = { frameworks = [ ]; mode = "enforce"; };
            };
            rolloutPolicies.default = bare.rolloutPolicies.default // {
              waves = [ ];
              healthGate = { };
              onHealthFailure = "rollback-and-halt";
            };
            edges = [ ];
            channelEdges = [ ];
            disruptionBudgets = [ ];
            complianceFrameworks = [ "anssi-bp028" "nis2" "dora" "iso27001" ];
            revocations = [ ];
          };
          members = import ./nix/tests/positive/reference-defaults/fleet.nix;
          result = fleet: { inherit (lib.mkFleet fleet) resolved warnings revocations; };
        in {
          bare = result bare;
          explicit = result explicit;
          members = result members;
          merged = result (lib.mergeFleets [ members ]);
        }
        "#,
    );
    assert!(
        out.success,
        "a fleet setting no optional attribute must evaluate:\n{}",
        out.stderr
    );
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    let bare = &got["bare"]["resolved"];
    let host = &bare["hosts"]["web-01"];
    let channel = &bare["channels"]["stable"];
    let policy = &bare["rolloutPolicies"]["default"];
    use serde_json::json;

    // Hosts.
    assert_eq!(host["tags"], json!([]), "host tags: reference default [ ]");
    assert_eq!(
        host["pubkey"],
        Value::Null,
        "host pubkey: reference default null"
    );
    // Channels.
    assert_eq!(
        channel["reconcileIntervalMinutes"],
        json!(30),
        "channel reconcileIntervalMinutes: reference default 30"
    );
    assert_eq!(
        channel["signingIntervalMinutes"],
        json!(60),
        "channel signingIntervalMinutes: reference default 60"
    );
    assert_eq!(
        channel["compliance"]["frameworks"],
        json!([]),
        "channel compliance.frameworks: reference default [ ]"
    );
    assert_eq!(
        channel["compliance"]["mode"],
        json!("enforce"),
        "channel compliance.mode: reference default \"enforce\""
    );
    assert!(
        channel.get("description").is_none(),
        "channel description (reference default \"\") is not part of fleet.resolved: {channel}"
    );
    // Rollout policies.
    assert_eq!(
        policy["waves"],
        json!([]),
        "policy waves: reference default [ ]"
    );
    assert_eq!(
        policy["healthGate"],
        json!({"systemdFailedUnits": null, "maxFailures": 0}),
        "policy healthGate: reference default {{ }}, written with its fields' defaults"
    );
    assert_eq!(
        policy["onHealthFailure"],
        json!("rollback-and-halt"),
        "policy onHealthFailure: reference default \"rollback-and-halt\""
    );
    // A policy without waves puts no host in a wave, as in the reference, and says so.
    assert_eq!(
        bare["waves"]["stable"],
        json!([]),
        "waves of a wave-less policy"
    );
    let warnings = got["bare"]["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .starts_with("rollout policy default: has no waves")),
        "a policy without waves is warned about: {warnings:?}"
    );
    // Fleet sections.
    assert_eq!(
        bare["edges"],
        json!([]),
        "fleet edges: reference default [ ]"
    );
    assert_eq!(
        bare["channelEdges"],
        json!([]),
        "fleet channelEdges: reference default [ ]"
    );
    assert_eq!(
        bare["disruptionBudgets"],
        json!([]),
        "fleet disruptionBudgets: reference default [ ]"
    );
    assert_eq!(
        got["bare"]["revocations"],
        json!([]),
        "fleet revocations: reference default [ ]"
    );
    // Writing every default out changes nothing.
    assert_eq!(
        got["explicit"], got["bare"],
        "the reference defaults written out give the same fleet"
    );

    // Members of optional sections that set nothing optional.
    let members = &got["members"]["resolved"];
    let staged = &members["rolloutPolicies"]["staged"];
    for (i, wave) in staged["waves"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            wave["soakMinutes"],
            json!(0),
            "wave {i} soakMinutes: reference default 0"
        );
    }
    assert_eq!(
        staged["healthGate"], policy["healthGate"],
        "policy healthGate = {{ }} is the default"
    );
    assert_eq!(
        members["channels"]["edge"]["compliance"],
        json!({"frameworks": [], "mode": "enforce"}),
        "channel compliance = {{ }}: frameworks [ ] and mode \"enforce\""
    );
    assert_eq!(
        members["edges"][0]["reason"],
        json!(""),
        "edge reason: reference default \"\""
    );
    assert_eq!(
        members["channelEdges"][0]["reason"],
        json!(""),
        "channel edge reason: reference default \"\""
    );
    assert_eq!(
        members["disruptionBudgets"][0]["maxInFlightPct"],
        Value::Null,
        "budget maxInFlightPct: reference default null"
    );
    assert_eq!(
        members["disruptionBudgets"][1]["maxInFlight"],
        Value::Null,
        "budget maxInFlight: reference default null"
    );
    assert_eq!(
        got["members"]["revocations"],
        json!([{"hostname": "old-01", "notBefore": "2026-01-01T00:00:00Z",
                "reason": null, "revokedBy": null}]),
        "revocation reason and revokedBy: reference default null"
    );
    assert_eq!(
        got["merged"], got["members"],
        "mergeFleets keeps tags, descriptions and revocations"
    );
}

// ---------------------------------------------------------------- through release

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A CI release key and trust.json in `dir`.
fn trust_roots(dir: &Path) {
    let ci = stdout(&succeeds(
        dir,
        &["keygen", "--algorithm", "ed25519", "--out", "ci.pem"],
    ));
    let org = stdout(&succeeds(
        dir,
        &["keygen", "--algorithm", "ed25519", "--out", "org.pem"],
    ));
    succeeds(
        dir,
        &[
            "trust",
            "init",
            "--ci-release-key",
            &ci,
            "--org-root-key",
            &org,
            "--cache-key",
            "cache-1:Ff8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "--out",
            "trust.json",
        ],
    );
}

/// A fake but well-formed store basename per host, as CI's build step would list them.
fn closures(fleet: &Value) -> BTreeMap<String, String> {
    fleet["hosts"]
        .as_object()
        .unwrap()
        .keys()
        .enumerate()
        .map(|(i, host)| (host.clone(), format!("{:032}-nixos-system-{host}", i + 1)))
        .collect()
}

#[test]
fn golden_fleets_round_trip_through_release_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trust_roots(dir);
    let (signed_at, soon_after) = signing_times();
    for (name, fixture) in fixtures("positive") {
        let fleet = eval_fixture(&fixture, "resolved").unwrap_or_else(|e| panic!("{name}: {e}"));
        let nix_warnings = eval_fixture(&fixture, "warnings").unwrap_or_else(|e| panic!("{e}"));
        let closures = closures(&fleet);
        fs::write(dir.join(format!("{name}.json")), fleet.to_string()).unwrap();
        fs::write(
            dir.join(format!("{name}-closures.json")),
            serde_json::to_string(&closures).unwrap(),
        )
        .unwrap();
        let out_dir = format!("release-{name}");
        let released = succeeds(
            dir,
            &[
                "release",
                "--fleet",
                &format!("{name}.json"),
                "--closures",
                &format!("{name}-closures.json"),
                "--ci-commit",
                "0123456789abcdef0123456789abcdef01234567",
                "--signed-at",
                &signed_at,
                "--key",
                "ci.pem",
                "--trust-file",
                "trust.json",
                "--out",
                &out_dir,
            ],
        );

        // mkFleet warns about what release warns about.
        let release_warnings = String::from_utf8_lossy(&released.stderr).into_owned();
        for warning in nix_warnings.as_array().unwrap() {
            let warning = warning.as_str().unwrap();
            assert!(
                release_warnings.contains(&format!("warning: {warning}")),
                "{name}: mkFleet warns {warning:?}, release does not:\n{release_warnings}"
            );
        }

        // The signed fleet verifies, and so does each channel's manifest against it.
        let signed = format!("{out_dir}/fleet.resolved.json");
        let verify = |args: &[&str]| {
            let out = succeeds(dir, args);
            assert!(stdout(&out).starts_with("ok: "), "{name}: {}", stdout(&out));
        };
        verify(&[
            "verify",
            "fleet",
            &signed,
            "--trust-file",
            "trust.json",
            "--now",
            &soon_after,
        ]);
        let mut manifests: Vec<PathBuf> = fs::read_dir(dir.join(&out_dir).join("rollouts"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.ends_with(".json") && !name.ends_with(".hosts.json")
            })
            .collect();
        manifests.sort();
        let channels = fleet["channels"].as_object().unwrap();
        assert_eq!(
            manifests.len(),
            channels.len(),
            "{name}: one manifest per channel"
        );
        for manifest in &manifests {
            verify(&[
                "verify",
                "manifest",
                manifest.to_str().unwrap(),
                "--trust-file",
                "trust.json",
                "--fleet",
                &signed,
                "--now",
                &soon_after,
            ]);
            // Each host's wave in the manifest's host set (schema 2: in its hosts file) is
            // the wave mkFleet put it in.
            let hosts = read_json(&manifest.with_extension("hosts.json"));
            let manifest = read_json(manifest);
            let waves = &fleet["waves"][manifest["channel"].as_str().unwrap()];
            for entry in hosts["hostSet"].as_array().unwrap() {
                let index = entry["waveIndex"].as_u64().unwrap() as usize;
                assert!(
                    waves[index]["hosts"]
                        .as_array()
                        .unwrap()
                        .contains(&entry["hostname"]),
                    "{name}: {entry} is not in mkFleet's wave {index}"
                );
            }
        }

        // Release changed nothing but what it stamps: closures and meta. In particular
        // its waves are mkFleet's.
        let mut round_tripped = read_json(&dir.join(&signed));
        assert_eq!(
            round_tripped["waves"], fleet["waves"],
            "{name}: release resolved other waves than mkFleet"
        );
        for (host, closure) in &closures {
            let entry = &mut round_tripped["hosts"][host];
            assert_eq!(entry["closureHash"], closure.as_str(), "{name}: {host}");
            entry["closureHash"] = Value::Null;
        }
        assert_eq!(round_tripped["meta"]["signedAt"], signed_at.as_str());
        round_tripped["meta"] = fleet["meta"].clone();
        assert_eq!(round_tripped, fleet, "{name}: release changed the fleet");
    }
}

/// `fleet.compliance` is the library the static gate of `nixfleet release --flake` uses:
/// nixfleet's own by default, the fleet's when it passes `compliance` (one merged fleet at
/// most); anything else is refused, and `resolved` is the same either way.
#[test]
fn the_fleet_exposes_the_compliance_library_its_gate_uses() {
    let out = eval_expr(
        r#"
        let
          lib = import ./nix/lib;
          input = import ./nix/tests/positive/example/fleet.nix;
          own = lib.compliance.extend { allowedLoginUsers = [ "root" "alice" ]; };
          plain = lib.mkFleet input;
          extended = lib.mkFleet (input // { compliance = own; });
          merged = lib.mkFleet (lib.mergeFleets [ { compliance = own; } input ]);
        in {
          plain = plain.compliance.allowedLoginUsers;
          extended = extended.compliance.allowedLoginUsers;
          merged = merged.compliance.allowedLoginUsers;
          cis = map (c: c.id) (extended.compliance.controlsFor [ "cis" ]);
          same = plain.resolved == extended.resolved && plain.resolved == merged.resolved;
        }
        "#,
    );
    assert!(out.success, "{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(got["plain"], serde_json::json!(["root"]));
    assert_eq!(got["extended"], serde_json::json!(["root", "alice"]));
    assert_eq!(got["merged"], serde_json::json!(["root", "alice"]));
    assert!(got["cis"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("ssh-root-login-key-only")));
    assert_eq!(got["same"], true);

    let out = eval_expr(
        r#"((import ./nix/lib).mkFleet ((import ./nix/tests/positive/example/fleet.nix) // { compliance = { }; })).resolved"#,
    );
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("fleet: compliance must be a compliance library"),
        "{}",
        out.stderr
    );
    let out = eval_expr(
        r#"let lib = import ./nix/lib; in lib.mergeFleets [ { compliance = lib.compliance; } { compliance = lib.compliance; } ]"#,
    );
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("compliance: set by more than one merged fleet (fleets 0, 1)"),
        "{}",
        out.stderr
    );
}
