//! The compliance controls of `nix/lib/compliance` (docs/compliance.md), evaluated with
//! the real `nix-instantiate` and no nixpkgs: every control passes its compliant and
//! fails its non-compliant configurations (one named case each way, and a control broken
//! to always pass or always fail is caught), an empty configuration gives the results
//! docs/compliance.md lists, `controlsFor` selects by framework, a fleet's own controls
//! are evaluated the same way, every control has the attributes it needs, and every probe
//! is a shell script that parses and, where it can run here, decides as documented.

mod support;
use support::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const FRAMEWORKS: &[&str] = &["anssi", "cis", "dora", "iso27001", "nis2"];

/// Evaluates `body` with `c` bound to the compliance library, strictly, to JSON.
fn eval(body: &str) -> Result<Value, String> {
    let expr = format!("let c = (import ./nix/lib).compliance; in {body}");
    let out = nix_instantiate(&["--eval", "--strict", "--json", "--expr", &expr]);
    if out.success {
        Ok(serde_json::from_str(&out.stdout).expect("nix-instantiate --json prints JSON"))
    } else {
        Err(out.stderr)
    }
}

fn eval_ok(body: &str) -> Value {
    eval(body).unwrap_or_else(|e| panic!("evaluating {body} failed:\n{e}"))
}

/// A configuration a control is evaluated on, and what it must give.
struct Case {
    control: &'static str,
    name: &'static str,
    passes: bool,
    /// A partial NixOS configuration, as a Nix expression.
    config: &'static str,
}

const fn pass(control: &'static str, name: &'static str, config: &'static str) -> Case {
    Case {
        control,
        name,
        passes: true,
        config,
    }
}

const fn fail(control: &'static str, name: &'static str, config: &'static str) -> Case {
    Case {
        control,
        name,
        passes: false,
        config,
    }
}

/// One case per control and direction at least; `every_control_has_a_case_each_way`
/// keeps it so.
const CASES: &[Case] = &[
    pass(
        "ssh-password-auth-off",
        "sshd with password and keyboard-interactive logins off",
        r#"{ services.openssh = { enable = true; settings = { PasswordAuthentication = false; KbdInteractiveAuthentication = false; }; }; }"#,
    ),
    pass(
        "ssh-password-auth-off",
        "no sshd at all",
        r#"{ services.openssh.enable = false; }"#,
    ),
    fail(
        "ssh-password-auth-off",
        "sshd left at its defaults",
        r#"{ services.openssh.enable = true; }"#,
    ),
    fail(
        "ssh-password-auth-off",
        "password off but keyboard-interactive left on",
        r#"{ services.openssh = { enable = true; settings.PasswordAuthentication = false; }; }"#,
    ),
    pass(
        "ssh-root-login-key-only",
        "sshd at its default prohibit-password",
        r#"{ services.openssh.enable = true; }"#,
    ),
    pass(
        "ssh-root-login-key-only",
        "root may not log in at all",
        r#"{ services.openssh = { enable = true; settings.PermitRootLogin = "no"; }; }"#,
    ),
    fail(
        "ssh-root-login-key-only",
        "root may log in with a password",
        r#"{ services.openssh = { enable = true; settings.PermitRootLogin = "yes"; }; }"#,
    ),
    pass(
        "firewall-enabled",
        "firewall explicitly on",
        r#"{ networking.firewall.enable = true; }"#,
    ),
    fail(
        "firewall-enabled",
        "firewall turned off",
        r#"{ networking.firewall.enable = false; }"#,
    ),
    pass(
        "auditd-enabled",
        "auditd on",
        r#"{ security.auditd.enable = true; }"#,
    ),
    fail(
        "auditd-enabled",
        "auditd explicitly off",
        r#"{ security.auditd.enable = false; }"#,
    ),
    pass(
        "time-sync-enabled",
        "chrony instead of timesyncd",
        r#"{ services.timesyncd.enable = false; services.chrony.enable = true; }"#,
    ),
    pass(
        "time-sync-enabled",
        "timesyncd explicitly on",
        r#"{ services.timesyncd.enable = true; }"#,
    ),
    fail(
        "time-sync-enabled",
        "timesyncd off and no other daemon",
        r#"{ services.timesyncd.enable = false; }"#,
    ),
    fail(
        "time-sync-enabled",
        "a container, where timesyncd defaults to off",
        r#"{ boot.isContainer = true; }"#,
    ),
    pass(
        "etc-no-world-writable",
        "a symlink and a 0644 copy",
        r#"{ environment.etc = { "motd".text = "hi"; "app/conf" = { text = "x"; mode = "0644"; }; }; }"#,
    ),
    fail(
        "etc-no-world-writable",
        "a 0666 copy",
        r#"{ environment.etc = { "motd".text = "hi"; "app/conf" = { text = "x"; mode = "0666"; }; }; }"#,
    ),
    fail(
        "etc-no-world-writable",
        "a 3-digit 777 mode",
        r#"{ environment.etc."app/run.sh" = { text = "x"; mode = "777"; }; }"#,
    ),
    pass(
        "kernel-pointers-restricted",
        "dmesg_restrict set, kptr_restrict at its NixOS default",
        r#"{ boot.kernel.sysctl."kernel.dmesg_restrict" = 1; }"#,
    ),
    pass(
        "kernel-pointers-restricted",
        "both set, as strings",
        r#"{ boot.kernel.sysctl = { "kernel.dmesg_restrict" = "1"; "kernel.kptr_restrict" = "2"; }; }"#,
    ),
    fail(
        "kernel-pointers-restricted",
        "kptr_restrict turned off",
        r#"{ boot.kernel.sysctl = { "kernel.dmesg_restrict" = 1; "kernel.kptr_restrict" = 0; }; }"#,
    ),
    fail(
        "kernel-pointers-restricted",
        "dmesg_restrict left to the kernel",
        r#"{ boot.kernel.sysctl."kernel.kptr_restrict" = 2; }"#,
    ),
    pass(
        "aslr-full",
        "randomize_va_space 2",
        r#"{ boot.kernel.sysctl."kernel.randomize_va_space" = 2; }"#,
    ),
    fail(
        "aslr-full",
        "randomize_va_space 0",
        r#"{ boot.kernel.sysctl."kernel.randomize_va_space" = 0; }"#,
    ),
    pass(
        "nix-store-gc-bounded",
        "automatic GC and optimisation",
        r#"{ nix.gc = { automatic = true; options = "--delete-older-than 30d"; }; nix.optimise.automatic = true; }"#,
    ),
    pass(
        "nix-store-gc-bounded",
        "min-free threshold only",
        r#"{ nix.settings.min-free = 1073741824; }"#,
    ),
    fail(
        "nix-store-gc-bounded",
        "optimisation without any GC",
        r#"{ nix.optimise.automatic = true; nix.gc.automatic = false; }"#,
    ),
    pass(
        "no-failed-units",
        "agent with its default health check",
        r#"{ services.nixfleet-agent = { enable = true; controlPlaneUrl = "https://cp:8443"; healthCommand = null; }; }"#,
    ),
    fail(
        "no-failed-units",
        "agent with a health command that ignores failed units",
        r#"{ services.nixfleet-agent = { enable = true; healthCommand = "echo '{\"failedUnits\": 0}'"; }; }"#,
    ),
    pass(
        "sudo-requires-password",
        "sudo with a password-protected rule",
        r#"{ security.sudo = { enable = true; wheelNeedsPassword = true; extraRules = [ { groups = [ "ops" ]; commands = [ { command = "/run/current-system/sw/bin/systemctl"; options = [ "SETENV" ]; } ]; } ]; }; }"#,
    ),
    pass(
        "sudo-requires-password",
        "no sudo at all",
        r#"{ security.sudo.enable = false; security.sudo.wheelNeedsPassword = false; }"#,
    ),
    pass(
        "sudo-requires-password",
        "a NOPASSWD rule commented out in extraConfig",
        r#"{ security.sudo.extraConfig = "Defaults use_pty\n# deploy ALL=(ALL) NOPASSWD: ALL\n"; }"#,
    ),
    fail(
        "sudo-requires-password",
        "wheel without password",
        r#"{ security.sudo.wheelNeedsPassword = false; }"#,
    ),
    fail(
        "sudo-requires-password",
        "a NOPASSWD extra rule",
        r#"{ security.sudo.extraRules = [ { users = [ "deploy" ]; commands = [ { command = "ALL"; options = [ "NOPASSWD" ]; } ]; } ]; }"#,
    ),
    fail(
        "sudo-requires-password",
        "sudo-rs with NOPASSWD in extraConfig",
        r#"{ security.sudo.enable = false; security.sudo-rs = { enable = true; extraConfig = "deploy ALL=(ALL) NOPASSWD: ALL"; }; }"#,
    ),
    pass(
        "login-shells-allow-list",
        "system users with nologin, root with bash",
        r#"{ users.users = { svc = { isSystemUser = true; }; backup = { isSystemUser = true; shell = { type = "derivation"; shellPath = "/bin/nologin"; }; }; }; }"#,
    ),
    pass(
        "login-shells-allow-list",
        "root's shell is nologin too",
        r#"{ users.users.root.shell = "/run/current-system/sw/bin/nologin"; }"#,
    ),
    fail(
        "login-shells-allow-list",
        "a normal user gets the default shell",
        r#"{ users.users.alice.isNormalUser = true; }"#,
    ),
    fail(
        "login-shells-allow-list",
        "a system user given bash",
        r#"{ users.users.svc = { isSystemUser = true; shell = { type = "derivation"; shellPath = "/bin/bash"; }; }; }"#,
    ),
    pass(
        "agent-control-plane-tls",
        "agent with an https URL",
        r#"{ services.nixfleet-agent = { enable = true; controlPlaneUrl = "https://cp.example.org:8443"; }; }"#,
    ),
    fail(
        "agent-control-plane-tls",
        "agent with an http URL",
        r#"{ services.nixfleet-agent = { enable = true; controlPlaneUrl = "http://cp.example.org:8080"; }; }"#,
    ),
    fail(
        "agent-control-plane-tls",
        "agent enabled without a URL",
        r#"{ services.nixfleet-agent.enable = true; }"#,
    ),
    pass(
        "users-declarative",
        "immutable users",
        r#"{ users.mutableUsers = false; }"#,
    ),
    fail(
        "users-declarative",
        "mutable users",
        r#"{ users.mutableUsers = true; }"#,
    ),
];

/// A Nix string literal.
fn nix_string(s: &str) -> String {
    serde_json::to_string(s).unwrap().replace("${", "\\${")
}

/// The cases evaluated with `controls` (a Nix expression over `c`): one result per case,
/// { name; passed; evidence; }.
fn evaluate_cases(controls: &str) -> Vec<(bool, String)> {
    let cases: Vec<String> = CASES
        .iter()
        .map(|case| {
            format!(
                "{{ id = {}; config = {}; }}",
                nix_string(case.control),
                case.config
            )
        })
        .collect();
    let got = eval_ok(&format!(
        r#"
        let
          controls = {controls};
          byId = builtins.listToAttrs (map (x: {{ name = x.id; value = x; }}) controls);
        in
        map (case: builtins.head (c.evaluateHost {{ controls = [ byId.${{case.id}} ]; inherit (case) config; }}))
          [ {} ]
        "#,
        cases.join("\n")
    ));
    got.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["passed"].as_bool().unwrap(),
                r["evidence"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The cases whose result is not the expected one.
fn wrong_cases(results: &[(bool, String)]) -> Vec<String> {
    CASES
        .iter()
        .zip(results)
        .filter(|(case, (passed, _))| case.passes != *passed)
        .map(|(case, (passed, evidence))| {
            format!(
                "{} / {}: expected {}, got {} ({evidence})",
                case.control,
                case.name,
                if case.passes { "pass" } else { "fail" },
                if *passed { "pass" } else { "fail" },
            )
        })
        .collect()
}

fn describe() -> Vec<Value> {
    eval_ok("c.describe c.controls").as_array().unwrap().clone()
}

fn ids(controls: &Value) -> Vec<String> {
    controls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_str()
                .unwrap_or_else(|| c["id"].as_str().unwrap())
                .to_owned()
        })
        .collect()
}

#[test]
fn every_control_passes_its_compliant_and_fails_its_non_compliant_cases() {
    let results = evaluate_cases("c.controls");
    let wrong = wrong_cases(&results);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    for (case, (_, evidence)) in CASES.iter().zip(&results) {
        assert!(
            !evidence.is_empty() && evidence.len() <= 400,
            "{} / {}: evidence should be a short, non-empty string: {evidence:?}",
            case.control,
            case.name
        );
    }
}

#[test]
fn every_control_has_a_case_each_way() {
    let shipped: BTreeSet<String> = describe()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        shipped.len() >= 12,
        "at least 12 starter controls: {shipped:?}"
    );
    for id in &shipped {
        for passes in [true, false] {
            assert!(
                CASES.iter().any(|c| c.control == id && c.passes == passes),
                "control {id} has no {} case",
                if passes { "compliant" } else { "non-compliant" }
            );
        }
    }
    for case in CASES {
        assert!(
            shipped.contains(case.control),
            "case {:?} names no shipped control {}",
            case.name,
            case.control
        );
    }
    let names: BTreeSet<(&str, &str)> = CASES.iter().map(|c| (c.control, c.name)).collect();
    assert_eq!(names.len(), CASES.len(), "case names repeat");
}

#[test]
fn a_control_broken_to_always_pass_or_always_fail_is_caught() {
    for id in describe()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
    {
        for constant in [true, false] {
            let broken = format!(
                r#"map (x: if x.id == "{id}" then x // {{ evaluate = _: {{ passed = {constant}; evidence = "broken"; }}; }} else x) c.controls"#
            );
            let wrong = wrong_cases(&evaluate_cases(&broken));
            let direction = if constant {
                "expected fail"
            } else {
                "expected pass"
            };
            assert!(
                wrong
                    .iter()
                    .any(|w| w.starts_with(&format!("{id} / ")) && w.contains(direction)),
                "{id} always {}: no case noticed",
                if constant { "passing" } else { "failing" }
            );
            assert!(
                wrong.iter().all(|w| w.starts_with(&format!("{id} / "))),
                "breaking {id} changed other controls' results: {wrong:?}"
            );
        }
    }
}

/// The rows of docs/compliance.md's starter-controls table: id -> cells.
fn doc_table() -> BTreeMap<String, Vec<String>> {
    let doc = fs::read_to_string(repo().join("docs/compliance.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        if line.trim_start().starts_with("| `") && cells.len() >= 6 {
            let id = cells[0].trim_matches('`').to_owned();
            rows.insert(id, cells);
        }
    }
    rows
}

/// The header of the table: column name -> index.
fn doc_columns() -> BTreeMap<String, usize> {
    let doc = fs::read_to_string(repo().join("docs/compliance.md")).unwrap();
    let header = doc
        .lines()
        .find(|l| l.starts_with("| id |"))
        .expect("docs/compliance.md has the controls table, starting `| id |`");
    header
        .trim()
        .trim_matches('|')
        .split('|')
        .enumerate()
        .map(|(i, c)| (c.trim().to_owned(), i))
        .collect()
}

#[test]
fn an_empty_configuration_gives_the_documented_results() {
    let got = eval_ok("c.evaluateHost { controls = c.controls; config = { }; }");
    let rows = doc_table();
    let columns = doc_columns();
    let column = columns["empty config"];
    let got = got.as_array().unwrap();
    assert_eq!(
        rows.keys().cloned().collect::<Vec<_>>(),
        got.iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        "docs/compliance.md's table lists exactly the starter controls, by id"
    );
    for result in got {
        let id = result["id"].as_str().unwrap();
        let documented = &rows[id][column];
        let actual = if result["passed"].as_bool().unwrap() {
            "pass"
        } else {
            "fail"
        };
        assert!(
            documented.starts_with(actual),
            "{id}: an empty configuration gives {actual} ({}), docs/compliance.md says {documented:?}",
            result["evidence"]
        );
    }
    // The defaults that matter most, spelled out.
    let by_id: BTreeMap<&str, &Value> =
        got.iter().map(|r| (r["id"].as_str().unwrap(), r)).collect();
    for (id, passed, evidence) in [
        (
            "firewall-enabled",
            true,
            "networking.firewall.enable = true (NixOS default)",
        ),
        (
            "auditd-enabled",
            false,
            "security.auditd.enable = false (NixOS default)",
        ),
        (
            "time-sync-enabled",
            true,
            "services.timesyncd.enable = true (NixOS default)",
        ),
        (
            "sudo-requires-password",
            true,
            "security.sudo.wheelNeedsPassword = true (NixOS default)",
        ),
        ("nix-store-gc-bounded", false, "nix.gc.automatic = false"),
        (
            "kernel-pointers-restricted",
            false,
            "\"kernel.dmesg_restrict\" not set",
        ),
        ("users-declarative", false, "users.mutableUsers = true"),
        (
            "ssh-password-auth-off",
            true,
            "services.openssh.enable = false",
        ),
        ("login-shells-allow-list", true, "login shells: root"),
    ] {
        assert_eq!(by_id[id]["passed"], Value::Bool(passed), "{id}");
        let found = by_id[id]["evidence"].as_str().unwrap();
        assert!(found.contains(evidence), "{id}: {found:?}");
    }
    // With sshd enabled and nothing else set, password logins are on (the NixOS default).
    let ssh = eval_ok(
        r#"map (r: r.passed) (c.evaluateHost { controls = c.controlsFor [ "nis2" ]; config = { services.openssh.enable = true; }; })"#,
    );
    let nis2 = ids(&eval_ok(r#"map (x: x.id) (c.controlsFor [ "nis2" ])"#));
    let at = nis2
        .iter()
        .position(|id| id == "ssh-password-auth-off")
        .unwrap();
    assert_eq!(ssh[at], Value::Bool(false));
}

#[test]
fn the_documented_articles_are_the_controls_articles() {
    let rows = doc_table();
    let columns = doc_columns();
    for control in describe() {
        let id = control["id"].as_str().unwrap();
        let row = rows
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not in docs/compliance.md's table"));
        for fw in FRAMEWORKS {
            let cell = &row[columns[*fw]];
            let documented: BTreeSet<String> = cell
                .split(',')
                .map(|a| a.trim().trim_end_matches('*').trim().to_owned())
                .filter(|a| !a.is_empty() && a != "–")
                .collect();
            let actual: BTreeSet<String> = control["articles"][*fw]
                .as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            assert_eq!(
                documented, actual,
                "{id}: {fw} articles in docs/compliance.md"
            );
        }
    }
}

#[test]
fn controls_for_selects_the_controls_listing_the_framework() {
    let all = describe();
    for fw in FRAMEWORKS {
        let expected: Vec<String> = all
            .iter()
            .filter(|c| c["articles"].get(*fw).is_some())
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(!expected.is_empty(), "no starter control lists {fw}");
        let got = ids(&eval_ok(&format!(
            r#"map (x: x.id) (c.controlsFor [ "{fw}" ])"#
        )));
        assert_eq!(got, expected, "controlsFor [ \"{fw}\" ]");
    }
    // Exactly CIS: every selected control lists CIS articles, and no other does.
    let cis = ids(&eval_ok(r#"map (x: x.id) (c.controlsFor [ "cis" ])"#));
    assert!(cis.contains(&"ssh-root-login-key-only".to_owned()));
    assert!(!cis.contains(&"agent-control-plane-tls".to_owned()));

    // A union, each control once.
    let union = ids(&eval_ok(
        r#"map (x: x.id) (c.controlsFor [ "cis" "nis2" "cis" ])"#,
    ));
    let expected: Vec<String> = all
        .iter()
        .filter(|c| c["articles"].get("cis").is_some() || c["articles"].get("nis2").is_some())
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(union, expected);
    assert_eq!(
        ids(&eval_ok(r#"map (x: x.id) (c.controlsFor [ ])"#)),
        Vec::<String>::new()
    );
    // mkFleet's reference name for ANSSI-BP-028.
    assert_eq!(
        eval_ok(r#"c.controlsFor [ "anssi-bp028" ] == c.controlsFor [ "anssi" ]"#),
        Value::Bool(true)
    );
    let err = eval(r#"c.controlsFor [ "cys" ]"#).unwrap_err();
    assert!(err.contains("unknown framework \"cys\""), "{err}");
}

const FLEET_CONTROL: &str = r#"{
  id = "journald-persistent";
  title = "The journal is kept on disk";
  articles = { nis2 = [ "21.2.b" ]; iso27001 = [ "A.8.15" ]; };
  evaluate = config:
    let storage = config.services.journald.storage or "persistent";
    in { passed = storage == "persistent"; evidence = "services.journald.storage = ${storage}"; };
  probe = { command = [ "/bin/sh" "-c" "test -d /var/log/journal" ]; timeoutSecs = 5; expect = "exit0"; };
}"#;

#[test]
fn a_fleet_control_is_selected_and_evaluated_like_a_starter_control() {
    let got = eval_ok(&format!(
        r#"
        let
          fleet = c.extend {{ extraControls = [ {FLEET_CONTROL} ]; allowedLoginUsers = [ "root" "alice" ]; }};
          run = config: map (r: {{ inherit (r) id passed evidence; }})
            (builtins.filter (r: r.id == "journald-persistent" || r.id == "login-shells-allow-list")
              (fleet.evaluateHost {{ controls = fleet.controlsFor [ "nis2" ]; inherit config; }}));
        in {{
          nis2 = map (x: x.id) (fleet.controlsFor [ "nis2" ]);
          cis = map (x: x.id) (fleet.controlsFor [ "cis" ]);
          good = run {{ users.users.alice.isNormalUser = true; }};
          bad = run {{ services.journald.storage = "volatile"; users.users.bob.isNormalUser = true; }};
          probes = builtins.filter (p: p.id == "journald-persistent" || p.id == "login-shells-allow-list") (fleet.probesFor fleet.controls);
          starterUnchanged = map (x: x.id) c.controls == builtins.filter (id: id != "journald-persistent") (map (x: x.id) fleet.controls);
          again = map (x: x.id) ((fleet.extend {{ }}).controlsFor [ "nis2" ]) == map (x: x.id) (fleet.controlsFor [ "nis2" ]);
        }}
        "#
    ));
    assert!(ids(&got["nis2"]).contains(&"journald-persistent".to_owned()));
    assert!(!ids(&got["cis"]).contains(&"journald-persistent".to_owned()));
    for r in got["good"].as_array().unwrap() {
        assert_eq!(r["passed"], Value::Bool(true), "{r}");
    }
    for r in got["bad"].as_array().unwrap() {
        assert_eq!(r["passed"], Value::Bool(false), "{r}");
    }
    assert!(got["bad"].to_string().contains("volatile"));
    assert!(got["bad"].to_string().contains("bob"));
    let probes = got["probes"].to_string();
    assert!(
        probes.contains("root alice"),
        "the allow-list reaches the probe: {probes}"
    );
    assert!(probes.contains("test -d /var/log/journal"));
    assert_eq!(got["starterUnchanged"], Value::Bool(true));
    assert_eq!(
        got["again"],
        Value::Bool(true),
        "a second extend keeps the control"
    );
}

#[test]
fn invalid_controls_are_refused_naming_the_problem() {
    for (what, control, expected) in [
        (
            "a starter id again",
            r#"{ id = "firewall-enabled"; title = "x"; articles.cis = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = null; noProbeReason = "none"; }"#,
            "control id \"firewall-enabled\" is defined more than once",
        ),
        (
            "an unknown framework",
            r#"{ id = "x"; title = "x"; articles.pci = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = null; noProbeReason = "none"; }"#,
            "unknown framework \"pci\"",
        ),
        (
            "no articles",
            r#"{ id = "x"; title = "x"; articles = { }; evaluate = _: { passed = true; evidence = ""; }; probe = null; noProbeReason = "none"; }"#,
            "belongs to no framework",
        ),
        (
            "no evaluate",
            r#"{ id = "x"; title = "x"; articles.cis = [ "1" ]; probe = null; noProbeReason = "none"; }"#,
            "evaluate must be a function",
        ),
        (
            "a null probe without a reason",
            r#"{ id = "x"; title = "x"; articles.cis = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = null; }"#,
            "noProbeReason must say why",
        ),
        (
            "a probe with a relative command and no timeout",
            r#"{ id = "x"; title = "x"; articles.cis = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = { command = [ "sh" "-c" "true" ]; expect = "exit0"; }; }"#,
            "probe.command must be a non-empty list of strings starting with an absolute path",
        ),
        (
            "a probe with an unknown expectation",
            r#"{ id = "x"; title = "x"; articles.cis = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = { command = [ "/bin/true" ]; timeoutSecs = 5; expect = "stdout"; }; }"#,
            "probe.expect must be one of [\"exit0\"]",
        ),
        (
            "a misspelt attribute",
            r#"{ id = "x"; title = "x"; articles.cis = [ "1" ]; evaluate = _: { passed = true; evidence = ""; }; probe = null; noProbeReason = "n"; artciles = { }; }"#,
            "unknown attributes [\"artciles\"]",
        ),
    ] {
        let err = eval(&format!(
            "map (x: x.id) (c.extend {{ extraControls = [ {control} ]; }}).controls"
        ))
        .expect_err(what);
        assert!(err.contains(expected), "{what}: {err}");
    }
    // Every problem of a control at once.
    let err = eval(r#"(c.extend { extraControls = [ { id = "Bad Id"; articles.pci = [ ]; probe = null; } ]; }).controls"#)
        .unwrap_err();
    for problem in [
        "id must be a string of lower-case letters",
        "title must be a non-empty string",
        "unknown framework \"pci\"",
        "articles.pci must be a non-empty list of strings",
        "evaluate must be a function",
        "noProbeReason must say why",
    ] {
        assert!(err.contains(problem), "{problem}: {err}");
    }
    // An evaluate that returns the wrong shape is an error naming the control.
    let err = eval(
        r#"c.evaluateHost { config = { }; controls = [ { id = "x"; title = "x"; articles.cis = [ "1" ]; evaluate = _: true; probe = null; noProbeReason = "n"; } ]; }"#,
    )
    .unwrap_err();
    assert!(
        err.contains("control x: evaluate must return { passed = <bool>; evidence = <string>; }"),
        "{err}"
    );
    // A bad allow-list entry could break out of the probe's shell quoting.
    let err = eval(r#"(c.extend { allowedLoginUsers = [ "root' ; rm -rf / ; '" ]; }).controls"#)
        .unwrap_err();
    assert!(
        err.contains("allowedLoginUsers must be a list of user names"),
        "{err}"
    );
}

#[test]
fn every_control_has_the_required_attributes_with_the_right_types() {
    let checked = eval_ok(
        r#"map (x: {
             inherit (x) id;
             evaluateIsFunction = builtins.isFunction x.evaluate;
             keys = builtins.attrNames x;
           }) c.controls"#,
    );
    for c in checked.as_array().unwrap() {
        assert_eq!(c["evaluateIsFunction"], Value::Bool(true), "{c}");
    }
    let allowed_keys: BTreeSet<&str> = [
        "id",
        "title",
        "description",
        "articles",
        "evaluate",
        "probe",
        "noProbeReason",
    ]
    .into();
    for c in checked.as_array().unwrap() {
        for key in c["keys"].as_array().unwrap() {
            assert!(allowed_keys.contains(key.as_str().unwrap()), "{c}");
        }
    }
    let mut ids = BTreeSet::new();
    for control in describe() {
        let id = control["id"].as_str().expect("id is a string");
        assert!(
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{id}"
        );
        assert!(ids.insert(id.to_owned()), "{id} repeats");
        assert!(
            control["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{id}: title"
        );
        assert!(control["description"].is_string(), "{id}: description");
        let articles = control["articles"].as_object().expect("articles");
        assert!(!articles.is_empty(), "{id}: no framework");
        for (fw, list) in articles {
            assert!(FRAMEWORKS.contains(&fw.as_str()), "{id}: framework {fw}");
            let list = list.as_array().expect("a list of articles");
            assert!(!list.is_empty(), "{id}: {fw} lists no article");
            for article in list {
                let a = article.as_str().expect("an article is a string");
                let well_formed = match fw.as_str() {
                    "cis" => a.split('.').all(|n| n.parse::<u32>().is_ok()),
                    "nis2" => a.starts_with("21.2.") && a.len() == 6,
                    "iso27001" => a.starts_with("A.5.") || a.starts_with("A.8."),
                    "anssi" => a.starts_with('R') && a[1..].parse::<u32>().is_ok(),
                    "dora" => a
                        .split('.')
                        .next()
                        .is_some_and(|n| n.parse::<u32>().is_ok()),
                    _ => false,
                };
                assert!(well_formed, "{id}: {fw} article {a:?}");
            }
        }
        match &control["probe"] {
            Value::Null => assert!(
                control["noProbeReason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "{id}: a null probe needs noProbeReason"
            ),
            probe => {
                let command = probe["command"].as_array().expect("command");
                assert!(!command.is_empty() && command.iter().all(Value::is_string));
                assert!(command[0].as_str().unwrap().starts_with('/'), "{id}");
                let timeout = probe["timeoutSecs"].as_u64().expect("timeoutSecs");
                assert!((1..=300).contains(&timeout), "{id}: {timeout}");
                assert_eq!(probe["expect"], "exit0", "{id}");
            }
        }
    }
    // probesFor is plain JSON for the agent: one entry per control with a probe.
    let probes = eval_ok("c.probesFor c.controls");
    let with_probe = describe().iter().filter(|c| !c["probe"].is_null()).count();
    assert_eq!(probes.as_array().unwrap().len(), with_probe);
    for p in probes.as_array().unwrap() {
        let keys: BTreeSet<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["articles", "command", "expect", "id", "timeoutSecs"].into()
        );
    }
}

#[test]
fn the_flake_exports_the_library_without_any_input() {
    let out = nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--expr",
        r#"
        let
          flake = import ./flake.nix;
          inputs = builtins.mapAttrs (name: _: throw "lib needs the flake input ${name}")
            (builtins.functionArgs flake.outputs);
          outputs = flake.outputs (inputs // { self = outputs; });
        in map (x: x.id) (outputs.lib.compliance.controlsFor [ "iso27001" ])
        "#,
    ]);
    assert!(out.success, "{}", out.stderr);
    let got: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(ids(&got).contains(&"time-sync-enabled".to_owned()), "{got}");
}

/// The shell script of a probe command `[ "/bin/sh" "-c" script ]`.
fn scripts() -> Vec<(String, String)> {
    eval_ok("c.probesFor c.controls")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let command: Vec<&str> = p["command"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap())
                .collect();
            assert_eq!(&command[..2], ["/bin/sh", "-c"], "{p}");
            (p["id"].as_str().unwrap().to_owned(), command[2].to_owned())
        })
        .collect()
}

#[test]
fn every_probe_script_parses_as_posix_sh_and_bash() {
    for (id, script) in scripts() {
        for shell in ["sh", "bash"] {
            let out = Command::new(shell)
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{id}: {shell} -n: {}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Runs a probe's script with stub commands first on PATH: `stubs` maps a command name to
/// its shell body. Returns (exit code, stdout).
fn run_with_stubs(script: &str, stubs: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in stubs {
        let path = dir.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .env("PATH", path)
        .env("LC_ALL", "C")
        .current_dir(Path::new("/"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn probes_decide_as_documented_with_stub_commands() {
    let scripts: BTreeMap<String, String> = scripts().into_iter().collect();
    let passwd = "root:x:0:0::/root:/run/current-system/sw/bin/bash\n\
                  sshd:x:993:993::/var/empty:/run/current-system/sw/bin/nologin\n\
                  nobody:x:65534:65534::/var/empty:/run/current-system/sw/bin/false";
    let getent = |extra: &str| format!("printf '%s\\n' '{passwd}' {extra}");
    let login = &scripts["login-shells-allow-list"];
    let (code, out) = run_with_stubs(login, &[("getent", &getent(""))]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("root /run/current-system/sw/bin/bash"),
        "{out}"
    );
    let (code, out) = run_with_stubs(
        login,
        &[(
            "getent",
            &getent("'mallory:x:1000:100::/home/mallory:/run/current-system/sw/bin/bash'"),
        )],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not allowed: mallory"), "{out}");

    // systemctl stubs: `active` lists the units that are active.
    let systemctl = |active: &str, failed: &str, exec: &str| {
        format!(
            r#"case "$1" in
  is-active) for a in "$@"; do case " {active} " in *" $a "*) [ "$2" = --quiet ] || echo active; exit 0 ;; esac; done; [ "$2" = --quiet ] || echo inactive; exit 3 ;;
  list-units) printf '%s' '{failed}' ;;
  cat) exit 0 ;;
  show) echo '{exec}' ;;
esac"#
        )
    };
    let run = |id: &str, active: &str, failed: &str, exec: &str| {
        run_with_stubs(
            &scripts[id],
            &[
                ("systemctl", &systemctl(active, failed, exec)),
                ("nft", "exit 0"),
            ],
        )
    };
    assert_eq!(run("time-sync-enabled", "chronyd.service", "", "").0, 0);
    assert_eq!(run("time-sync-enabled", "sshd.service", "", "").0, 1);
    assert_eq!(run("firewall-enabled", "firewall.service", "", "").0, 0);
    assert_eq!(run("firewall-enabled", "nftables.service", "", "").0, 0);
    assert_eq!(run("firewall-enabled", "", "", "").0, 1);
    assert_eq!(run("auditd-enabled", "auditd.service", "", "").0, 0);
    assert_eq!(run("auditd-enabled", "", "", "").0, 1);
    assert_eq!(run("nix-store-gc-bounded", "nix-gc.timer", "", "").0, 0);
    assert_eq!(run("no-failed-units", "", "", "").0, 0);
    let (code, out) = run(
        "no-failed-units",
        "",
        "foo.service loaded failed failed Foo",
        "",
    );
    assert_eq!(code, 1);
    assert!(out.contains("foo.service"), "{out}");
    let exec = |url: &str| {
        format!("{{ path=/nix/store/x/bin/nixfleet-agent ; argv[]=/nix/store/x/bin/nixfleet-agent --control-plane-url {url} --poll-interval-secs 60 ; ignore_errors=no }}")
    };
    let (code, out) = run(
        "agent-control-plane-tls",
        "",
        "",
        &exec("https://cp.example.org:8443"),
    );
    assert_eq!(
        (code, out.trim()),
        (0, "--control-plane-url https://cp.example.org:8443")
    );
    assert_eq!(
        run("agent-control-plane-tls", "", "", &exec("http://cp:8080")).0,
        1
    );
}

/// The `sh tested` blocks of docs/compliance.md, in order, as one bash script (the
/// convention of crates/nixfleet-harness/tests/docs.rs, which runs them too).
fn doc_script() -> String {
    let doc = fs::read_to_string(repo().join("docs/compliance.md")).unwrap();
    let mut script = String::from("set -euo pipefail\n");
    let mut inside: Option<bool> = None;
    let mut blocks = 0;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            inside = match inside {
                None => {
                    let tested = line.trim_start().trim_start_matches('`').trim() == "sh tested";
                    blocks += usize::from(tested);
                    Some(tested)
                }
                Some(_) => None,
            };
        } else if inside == Some(true) {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(
        blocks >= 3,
        "docs/compliance.md has {blocks} `sh tested` blocks"
    );
    script
}

#[test]
fn the_docs_shell_blocks_run() {
    let scratch = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args(["-c", &doc_script()])
        .current_dir(scratch.path())
        .env("NIXFLEET_SRC", repo())
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("HOME", scratch.path())
        .env("PATH", {
            // The auditor's walk runs this build's `nixfleet`.
            let bin = Path::new(env!("CARGO_BIN_EXE_nixfleet")).parent().unwrap();
            format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            )
        })
        .env_remove("NIX_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docs/compliance.md's tested blocks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL  login-shells-allow-list: not allowed a login shell: alice"),
        "{stdout}"
    );
}

/// Runs probe `id` with the host paths in `paths` replaced by stand-ins (the test cannot
/// write /etc or /proc) and the stub commands in `stubs`. Returns (exit code, stdout).
fn run_probe_on(
    scripts: &BTreeMap<String, String>,
    id: &str,
    paths: &[(&str, &Path)],
    stubs: &[(&str, &str)],
) -> (i32, String) {
    let mut script = scripts[id].clone();
    for (from, to) in paths {
        assert!(script.contains(from), "{id}'s probe does not read {from}");
        script = script.replace(from, &to.display().to_string());
    }
    run_with_stubs(&script, stubs)
}

#[test]
fn probes_decide_as_documented_on_stand_in_files() {
    let scripts: BTreeMap<String, String> = scripts().into_iter().collect();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, text: &str| {
        let path = d.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    };

    // sshd -T's effective settings, from a stub sshd.
    let sshd_config = write("sshd_config", "# NixOS writes this\n");
    let sshd = |settings: &str| format!("printf '%s\\n' {settings}");
    let ssh = |id: &str, settings: &str| {
        run_probe_on(
            &scripts,
            id,
            &[("/etc/ssh/sshd_config", &sshd_config)],
            &[("sshd", &sshd(settings))],
        )
    };
    let (code, out) = ssh(
        "ssh-password-auth-off",
        "'port 22' 'passwordauthentication no' 'kbdinteractiveauthentication no'",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("passwordauthentication no"), "{out}");
    assert_eq!(
        ssh(
            "ssh-password-auth-off",
            "'passwordauthentication no' 'kbdinteractiveauthentication yes'"
        )
        .0,
        1
    );
    assert_eq!(
        ssh(
            "ssh-root-login-key-only",
            "'permitrootlogin without-password'"
        )
        .0,
        0
    );
    assert_eq!(ssh("ssh-root-login-key-only", "'permitrootlogin yes'").0, 1);
    // sshd -T failing is an error, not a pass or a fail.
    let (code, _) = run_probe_on(
        &scripts,
        "ssh-password-auth-off",
        &[("/etc/ssh/sshd_config", &sshd_config)],
        &[("sshd", "echo 'no hostkeys available' >&2; exit 1")],
    );
    assert_eq!(code, 2);
    // No sshd_config: no SSH server.
    let (code, out) = run_probe_on(
        &scripts,
        "ssh-password-auth-off",
        &[("/etc/ssh/sshd_config", &d.join("absent"))],
        &[],
    );
    assert_eq!((code, out.contains("no SSH server")), (0, true), "{out}");

    // /proc/sys/kernel, as files.
    let kernel = |kptr: &str, dmesg: &str, aslr: &str| {
        let k = d.join(format!("kernel-{kptr}-{dmesg}-{aslr}"));
        fs::create_dir_all(&k).unwrap();
        fs::write(k.join("kptr_restrict"), format!("{kptr}\n")).unwrap();
        fs::write(k.join("dmesg_restrict"), format!("{dmesg}\n")).unwrap();
        fs::write(k.join("randomize_va_space"), format!("{aslr}\n")).unwrap();
        k.join("")
    };
    let sysctl = |id: &str, k: &Path| run_probe_on(&scripts, id, &[("/proc/sys/kernel/", k)], &[]);
    assert_eq!(
        sysctl("kernel-pointers-restricted", &kernel("1", "1", "2")).0,
        0
    );
    assert_eq!(
        sysctl("kernel-pointers-restricted", &kernel("2", "0", "2")).0,
        1
    );
    assert_eq!(
        sysctl("kernel-pointers-restricted", &kernel("0", "1", "2")).0,
        1
    );
    assert_eq!(sysctl("aslr-full", &kernel("1", "1", "2")).0, 0);
    assert_eq!(sysctl("aslr-full", &kernel("1", "1", "1")).0, 1);

    // /etc, as a directory.
    let etc = d.join("etc");
    fs::create_dir_all(etc.join("ssh")).unwrap();
    fs::write(etc.join("hosts"), "127.0.0.1 localhost\n").unwrap();
    let find = |etc: &Path| run_probe_on(&scripts, "etc-no-world-writable", &[("/etc ", etc)], &[]);
    let mut with_space = etc.clone().into_os_string();
    with_space.push(" ");
    let (code, out) = find(Path::new(&with_space));
    assert_eq!(code, 0, "{out}");
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(etc.join("hosts"), fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out) = find(Path::new(&with_space));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("/etc/hosts"), "{out}");

    // The sudoers files.
    let sudoers = write("sudoers", "root ALL=(ALL:ALL) SETENV: ALL\n%wheel ALL=(ALL:ALL) SETENV: ALL\n# deploy ALL=(ALL) NOPASSWD: ALL\n");
    let sudo = || {
        run_probe_on(
            &scripts,
            "sudo-requires-password",
            &[("/etc/sudoers", &sudoers)],
            &[],
        )
    };
    assert_eq!(sudo().0, 0, "a commented-out NOPASSWD does not count");
    write("sudoers.d/deploy", "deploy ALL=(ALL) NOPASSWD: ALL\n");
    let (code, out) = sudo();
    assert_eq!(code, 1);
    assert!(out.contains("deploy ALL=(ALL) NOPASSWD: ALL"), "{out}");

    // nix.conf's min-free, with nix-gc.timer inactive.
    let inactive = "exit 3";
    let gc = |conf: &str| {
        let path = write("nix.conf", conf);
        run_probe_on(
            &scripts,
            "nix-store-gc-bounded",
            &[("/etc/nix/nix.conf", &path)],
            &[("systemctl", inactive)],
        )
    };
    assert_eq!(gc("max-jobs = auto\nmin-free = 1073741824\n").0, 0);
    assert_eq!(gc("max-jobs = auto\n").0, 1);
    assert_eq!(gc("min-free = 0\n").0, 1);
}
