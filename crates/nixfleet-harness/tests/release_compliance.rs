//! The static compliance gate of `nixfleet release --flake` (issue #20, stage 3), with
//! real Nix: the fleet's controls (`fleet.compliance`, here nixfleet's library extended
//! with a control of the fleet's own) are evaluated on each host's configuration of a
//! channel with compliance frameworks. `enforce` stops a failing release with exit code
//! 12 before anything is pushed, signed or published; `permissive` releases and records
//! the failures in the channel's signed manifest; the record is outside the rollout id.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixfleet_harness::flake::{FlakeHost, ToyFlake, TEST_NIX_OPTIONS};
use nixfleet_harness::nix::{nix_available, Cache};
use nixfleet_harness::*;
use serde_json::{json, Value};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The fleet's own library: nixfleet's controls plus one that fails when the host's
/// configuration sets `fleetTest.failOwn`, so a result naming it shows that the gate
/// used `fleet.compliance` and not nixfleet's default.
const COMPLIANCE_NIX: &str = r#"lib: lib.compliance.extend {
  extraControls = [ {
    id = "fleet-own-control";
    title = "The fleet's own control";
    articles = { cis = [ "99.1" ]; };
    evaluate = config: {
      passed = !(config.fleetTest.failOwn or false);
      evidence = "fleetTest.failOwn = ${if config.fleetTest.failOwn or false then "true" else "false"}";
    };
    probe = null;
    noProbeReason = "a test control";
  } ];
}
"#;

fn sshd(permit_root_login: &str) -> Value {
    json!({
        "services": {"openssh": {"enable": true, "settings": {"PermitRootLogin": permit_root_login}}},
        "security": {"auditd": {"enable": true}},
    })
}

struct Ci {
    pki: Pki,
    cache: Cache,
    flake: ToyFlake,
    tmp: tempfile::TempDir,
}

impl Ci {
    /// Two hosts in channel `stable` with `compliance`, their configurations
    /// (`nixosConfigurations.<host>.config`, also `hostConfigs.<host>`) from `configs`.
    fn new(compliance: Value, configs: Value) -> Ci {
        assert!(
            nix_available(),
            "nix-store not found: these tests need real Nix (apt-get install -y nix-bin)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(&tmp.path().join("cache-srv/cache"), "fleet-cache-1");
        let pki = Pki::with_cache_keys(tmp.path(), &[&cache.public_key]);
        let hosts = [
            FlakeHost::plain("web-01", &["canary"], 1),
            FlakeHost::plain("web-02", &["web"], 1),
        ];
        let flake = ToyFlake::new(&tmp.path().join("fleet-flake"), &hosts);
        // The harness's toy flake, with configurations next to the toplevels and the
        // fleet's own compliance library given to mkFleet.
        let nix = std::fs::read_to_string(flake.dir.join("flake.nix")).unwrap();
        let edited = nix
            .replace(
                "hosts = builtins.fromJSON (builtins.readFile ./hosts.json);",
                "hosts = builtins.fromJSON (builtins.readFile ./hosts.json);\n      configs = builtins.fromJSON (builtins.readFile ./configs.json);",
            )
            .replace(
                "fleet = lib.mkFleet (builtins.fromJSON (builtins.readFile ./fleet.json));",
                "fleet = lib.mkFleet (builtins.fromJSON (builtins.readFile ./fleet.json) // { compliance = import ./compliance.nix lib; });\n      hostConfigs = configs;",
            )
            .replace(
                "config.system.build.toplevel = toplevel name h;",
                "config = (configs.${name} or { }) // { system.build.toplevel = toplevel name h; };",
            );
        assert_eq!(edited.matches("configs").count(), 4, "{edited}");
        std::fs::write(flake.dir.join("flake.nix"), edited).unwrap();
        std::fs::write(flake.dir.join("compliance.nix"), COMPLIANCE_NIX).unwrap();
        let ci = Ci {
            pki,
            cache,
            flake,
            tmp,
        };
        ci.set(compliance, configs);
        ci
    }

    /// Sets the channel's compliance and the hosts' configurations, committed.
    fn set(&self, compliance: Value, configs: Value) {
        let path = self.flake.dir.join("fleet.json");
        let mut fleet = json_file(&path);
        fleet["channels"]["stable"]["compliance"] = compliance;
        std::fs::write(&path, fleet.to_string()).unwrap();
        std::fs::write(self.flake.dir.join("configs.json"), configs.to_string()).unwrap();
        self.flake.commit("compliance");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `nixfleet release --flake`, pushing to the signed cache, into `out` and `forge`.
    fn release(&self, extra: &[&str]) -> Output {
        let sign = format!(
            r#"echo signed >> {log}; openssl pkeyutl -sign -rawin -inkey {key} -in "$NIXFLEET_INPUT" -out "$NIXFLEET_OUTPUT""#,
            log = self.path("sign.log").display(),
            key = self.pki.path("ci.pem").display()
        );
        let (flake, trust) = (
            self.flake.dir.display().to_string(),
            self.pki.path("etc/trust.json").display().to_string(),
        );
        let (out, forge) = (
            self.path("out").display().to_string(),
            self.path("forge").display().to_string(),
        );
        let (url, key) = (
            self.cache.file_url(),
            self.cache.secret_key.display().to_string(),
        );
        let mut args = vec![
            "release",
            "--flake",
            &flake,
            "--trust-file",
            &trust,
            "--out",
            &out,
            "--publish-dir",
            &forge,
            "--sign-cmd",
            &sign,
            "--push-to",
            &url,
            "--cache-signing-key",
            &key,
        ];
        args.extend(TEST_NIX_OPTIONS);
        args.extend(extra);
        Command::new(bin("nixfleet"))
            .current_dir(self.tmp.path())
            .args(&args)
            .output()
            .expect("run nixfleet")
    }

    /// `nixfleet release --resign --from forge`, a second later than the release.
    fn resign(&self) -> Output {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let sign = format!(
            r#"openssl pkeyutl -sign -rawin -inkey {key} -in "$NIXFLEET_INPUT" -out "$NIXFLEET_OUTPUT""#,
            key = self.pki.path("ci.pem").display()
        );
        let (trust, forge) = (
            self.pki.path("etc/trust.json").display().to_string(),
            self.path("forge").display().to_string(),
        );
        Command::new(bin("nixfleet"))
            .current_dir(self.tmp.path())
            .args([
                "release",
                "--resign",
                "--from",
                &forge,
                "--trust-file",
                &trust,
                "--sign-cmd",
                &sign,
            ])
            .output()
            .expect("run nixfleet")
    }

    /// The published manifest of channel `stable` and its rollout id (its file name).
    fn manifest(&self) -> (Value, String) {
        let manifest = json_file(&self.path("forge/rollouts/channel/stable.json"));
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let id = nixfleet_trust::verify::rollout_id(&bytes).unwrap();
        assert!(
            self.path(&format!("forge/rollouts/{id}.json")).is_file(),
            "the manifest is published under its id {id}"
        );
        (manifest, id)
    }
}

#[test]
fn an_enforce_channel_with_a_failing_host_is_not_released() {
    let ci = Ci::new(
        json!({"frameworks": ["cis"], "mode": "enforce"}),
        json!({"web-01": sshd("yes"), "web-02": sshd("no")}),
    );
    let out = ci.release(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "stderr:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("error: compliance failed: 1 control(s) failed"),
        "{stderr}"
    );
    // One line per failure: host, control, articles, evidence.
    let line = r#"host web-01: control ssh-root-login-key-only failed (cis 5.2.8; dora 9.4.d; iso27001 A.8.2, A.8.5; nis2 21.2.i): services.openssh.settings.PermitRootLogin = "yes""#;
    assert!(
        stderr.lines().any(|l| l.trim() == line),
        "{line:?} not a line of:\n{stderr}"
    );
    assert!(!stderr.contains("host web-02: control"), "{stderr}");
    // Stage 3 comes before the push: nothing pushed, signed or published.
    assert!(!ci.path("sign.log").exists(), "signed although refused");
    for dir in ["out", "forge"] {
        assert!(!ci.path(dir).join("fleet.resolved.json").exists(), "{dir}");
    }
    let pushed = std::fs::read_dir(&ci.cache.dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        })
        .unwrap_or(false);
    assert!(
        !pushed,
        "a closure was pushed although the release was refused"
    );
}

#[test]
fn a_permissive_channel_releases_and_records_the_failures_outside_the_rollout_id() {
    let mut own_fails = sshd("no");
    own_fails["fleetTest"] = json!({"failOwn": true});
    let ci = Ci::new(
        json!({"frameworks": ["cis"], "mode": "permissive"}),
        json!({"web-01": sshd("yes"), "web-02": own_fails}),
    );
    let out = ci.release(&[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with("warning: compliance")
            && l.contains("host web-01: control ssh-root-login-key-only failed")),
        "the failure is printed as a warning:\n{stderr}"
    );

    let (manifest, id) = ci.manifest();
    assert_eq!(manifest["compliance"]["mode"], "permissive", "{manifest}");
    let failures = manifest["compliance"]["staticFailures"].as_array().unwrap();
    assert_eq!(
        failures,
        &vec![
            json!({"hostname": "web-01", "control": "ssh-root-login-key-only",
                   "articles": {"cis": ["5.2.8"], "dora": ["9.4.d"], "iso27001": ["A.8.2", "A.8.5"], "nis2": ["21.2.i"]},
                   "evidence": "services.openssh.settings.PermitRootLogin = \"yes\""}),
            // The fleet's own control: the gate used fleet.compliance.
            json!({"hostname": "web-02", "control": "fleet-own-control",
                   "articles": {"cis": ["99.1"]}, "evidence": "fleetTest.failOwn = true"}),
        ]
    );
    // The record is signed (the release verified it as agents will) but is no part of
    // the intent: the id is the same without it.
    let mut without = manifest.clone();
    without.as_object_mut().unwrap().remove("compliance");
    let id_without =
        nixfleet_trust::verify::rollout_id(&serde_json::to_vec(&without).unwrap()).unwrap();
    assert_eq!(id, id_without);

    // A scheduled re-sign keeps the record (nothing is evaluated again).
    let out = ci.resign();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (resigned, resigned_id) = ci.manifest();
    assert_ne!(resigned["meta"]["signedAt"], manifest["meta"]["signedAt"]);
    assert_eq!(resigned_id, id);
    assert_eq!(resigned["compliance"], manifest["compliance"]);

    // The same closures with the gate off: no record, the same rollout id.
    let mut configs = json!({"web-01": sshd("yes"), "web-02": sshd("no")});
    configs["web-02"]["fleetTest"] = json!({"failOwn": true});
    ci.set(json!({"frameworks": ["cis"], "mode": "disabled"}), configs);
    let out = ci.release(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (manifest, id_disabled) = ci.manifest();
    assert!(manifest.get("compliance").is_none(), "{manifest}");
    assert_eq!(id_disabled, id);
}

#[test]
fn a_compliant_enforce_channel_releases_with_an_empty_record() {
    let ci = Ci::new(
        json!({"frameworks": ["cis"], "mode": "enforce"}),
        // nixosConfigurations.<host>.config would fail (it is the failing one); the
        // configuration read is the one --config-attr names.
        json!({"web-01": sshd("no"), "web-02": sshd("prohibit-password")}),
    );
    // Break the default attribute: only --config-attr's is sound.
    let nix = std::fs::read_to_string(ci.flake.dir.join("flake.nix")).unwrap();
    std::fs::write(
        ci.flake.dir.join("flake.nix"),
        nix.replace(
            "config = (configs.${name} or { })",
            "config = { services.openssh = { enable = true; settings.PermitRootLogin = \"yes\"; }; }",
        ),
    )
    .unwrap();
    ci.flake.commit("default config fails");
    let out = ci.release(&[]);
    assert_eq!(out.status.code(), Some(12), "{}", text(&out.stderr));

    let out = ci.release(&["--config-attr", "hostConfigs.{host}"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (manifest, _) = ci.manifest();
    assert_eq!(
        manifest["compliance"],
        json!({"mode": "enforce", "staticFailures": []}),
        "{manifest}"
    );
}
