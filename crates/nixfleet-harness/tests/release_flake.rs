//! `nixfleet release --flake` (issue #19): from a flake to a published, signed release in
//! one command, with real Nix: evaluate mkFleet, build each host's toy system, push it
//! to a signed file:// cache and read it back, sign, publish atomically, verify; a real
//! control plane polls the published directory and real agents activate the result.
//! Every refusal stops before anything is signed or published, with its stage's exit
//! code; a scheduled re-sign moves signedAt and keeps every rollout id.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use nixfleet_harness::agent::{AgentConfig, AgentProc};
use nixfleet_harness::flake::{FlakeHost, ToyFlake, TEST_NIX_OPTIONS};
use nixfleet_harness::nix::{delete_from_store, is_valid, nix_available, Cache, Machine};
use nixfleet_harness::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);

fn require_nix() {
    assert!(
        nix_available(),
        "nix-store not found: these tests need real Nix (apt-get install -y nix-bin)"
    );
}

/// Runs `nixfleet` in `dir` (not asserting anything).
fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("nixfleet"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run nixfleet")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// CI's side: keys (the CI release key, a pinned cache key, an unpinned one), a flake,
/// a signing command that records each use.
struct Ci {
    pki: Pki,
    cache: Cache,
    flake: ToyFlake,
    tmp: tempfile::TempDir,
}

impl Ci {
    fn new(hosts: &[FlakeHost]) -> Ci {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(&tmp.path().join("cache-srv/cache"), "fleet-cache-1");
        let pki = Pki::with_cache_keys(tmp.path(), &[&cache.public_key]);
        let flake = ToyFlake::new(&tmp.path().join("fleet-flake"), hosts);
        Ci {
            pki,
            cache,
            flake,
            tmp,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_owned()
    }

    /// A signing command that logs each call to sign.log, then signs with ci.pem.
    fn sign_cmd(&self) -> String {
        format!(
            r#"echo signed >> {log}; openssl pkeyutl -sign -rawin -inkey {key} -in "$NIXFLEET_INPUT" -out "$NIXFLEET_OUTPUT""#,
            log = self.path("sign.log").display(),
            key = self.pki.path("ci.pem").display()
        )
    }

    /// `nixfleet release --flake` with the test's nix settings, the trust file, --out and
    /// --publish-dir, plus `extra`.
    fn release(&self, extra: &[&str]) -> Output {
        let flake = self.flake.dir.to_str().unwrap().to_owned();
        let trust = self.pki.path("etc/trust.json").to_str().unwrap().to_owned();
        let (out, publish) = (self.s("out"), self.s("forge"));
        let mut args = vec![
            "release",
            "--flake",
            &flake,
            "--trust-file",
            &trust,
            "--out",
            &out,
            "--jobs",
            "2",
        ];
        if !extra.contains(&"--publish-dir") {
            args.extend(["--publish-dir", &publish]);
        }
        args.extend(TEST_NIX_OPTIONS);
        args.extend(extra);
        run(self.tmp.path(), &args)
    }

    /// Asserts that the release stopped with `code` and one error sentence containing
    /// `sentence`, before anything was signed or published.
    fn refused(&self, out: &Output, code: i32, sentence: &str) -> String {
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
        assert!(
            errors[0].contains(sentence),
            "{sentence:?} not in {:?}",
            errors[0]
        );
        assert!(
            !self.path("sign.log").exists(),
            "the release was signed before it was refused:\n{stderr}"
        );
        for dir in ["out", "forge"] {
            assert!(
                !self.path(dir).join("fleet.resolved.json").exists(),
                "{dir} got a release although it was refused"
            );
        }
        let leftovers: Vec<String> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".out.") || n.starts_with(".forge."))
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
        errors[0].to_owned()
    }
}

fn two_plain_hosts() -> Vec<FlakeHost> {
    vec![
        FlakeHost::plain("web-01", &["canary"], 1),
        FlakeHost::plain("web-02", &["web"], 1),
    ]
}

#[test]
fn a_closure_missing_from_the_cache_is_not_released() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let sign = ci.sign_cmd();
    let empty = format!("file://{}", ci.s("empty-cache"));
    let out = ci.release(&["--sign-cmd", &sign, "--cache-url", &empty]);
    let error = ci.refused(&out, 13, "is not in the cache");
    assert!(
        error.starts_with("error: push failed: the closure /nix/store/"),
        "{error}"
    );
    assert!(error.contains("nothing was signed"), "{error}");
}

#[test]
fn a_closure_signed_by_an_unpinned_key_is_not_released() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let other = Cache::new(&ci.path("other-cache"), "other-cache-1");
    let sign = ci.sign_cmd();
    let url = ci.cache.file_url();
    let key = other.secret_key.to_str().unwrap().to_owned();
    let out = ci.release(&[
        "--sign-cmd",
        &sign,
        "--push-to",
        &url,
        "--cache-signing-key",
        &key,
    ]);
    let error = ci.refused(&out, 13, "by no key pinned");
    assert!(error.contains("other-cache-1"), "{error}");
    assert!(error.contains("fleet-cache-1"), "{error}");
}

#[test]
fn a_host_that_fails_to_build_stops_the_release() {
    require_nix();
    let mut hosts = two_plain_hosts();
    hosts[1].broken = true;
    let ci = Ci::new(&hosts);
    let sign = ci.sign_cmd();
    let url = ci.cache.file_url();
    let key = ci.cache.secret_key.to_str().unwrap().to_owned();
    let out = ci.release(&[
        "--sign-cmd",
        &sign,
        "--push-to",
        &url,
        "--cache-signing-key",
        &key,
    ]);
    let error = ci.refused(&out, 11, "1 of 2 host(s) did not build: web-02");
    assert!(error.contains("broken on purpose"), "{error}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("web-01: built /nix/store/"), "{stderr}");
    assert!(stderr.contains("web-02: FAILED"), "{stderr}");
    // Nothing was pushed either.
    let pushed = std::fs::read_dir(&ci.cache.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".narinfo"));
    assert!(
        !pushed,
        "a closure was pushed although a host did not build"
    );
}

#[test]
fn a_failing_sign_command_publishes_nothing() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let url = ci.cache.file_url();
    let key = ci.cache.secret_key.to_str().unwrap().to_owned();
    let out = ci.release(&[
        "--sign-cmd",
        "echo the HSM is unplugged >&2; exit 3",
        "--push-to",
        &url,
        "--cache-signing-key",
        &key,
    ]);
    let error = ci.refused(&out, 14, "sign failed: signing command");
    assert!(error.contains("nothing was published"), "{error}");
}

#[test]
fn a_failing_push_command_stops_before_signing() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let sign = ci.sign_cmd();
    let url = ci.cache.file_url();
    let out = ci.release(&[
        "--sign-cmd",
        &sign,
        "--push-cmd",
        r#"echo "cannot reach the cache for $NIXFLEET_HOST" >&2; exit 4"#,
        "--cache-url",
        &url,
    ]);
    let error = ci.refused(&out, 13, "push failed: push command");
    assert!(
        error.contains("cannot reach the cache for web-01"),
        "{error}"
    );
}

#[test]
fn a_push_command_gets_each_closure_and_the_cache_is_read_back() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let sign = ci.sign_cmd();
    let url = ci.cache.file_url();
    // What CI would script: sign the closure and copy it, per host.
    let push = format!(
        r#"echo "$NIXFLEET_HOST $NIXFLEET_CLOSURE $NIXFLEET_CACHE_URL" >> {log} && nix --extra-experimental-features nix-command store sign --recursive --key-file {key} "$NIXFLEET_CLOSURE" && nix --extra-experimental-features nix-command copy --to "$NIXFLEET_CACHE_URL" "$NIXFLEET_CLOSURE""#,
        log = ci.path("push.log").display(),
        key = ci.cache.secret_key.display()
    );
    let out = ci.release(&[
        "--sign-cmd",
        &sign,
        "--push-cmd",
        &push,
        "--cache-url",
        &url,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(ci.path("push.log")).unwrap();
    let fleet = json_file(&ci.path("forge/fleet.resolved.json"));
    for host in ["web-01", "web-02"] {
        let closure = fleet["hosts"][host]["closureHash"].as_str().unwrap();
        assert!(
            log.contains(&format!("{host} /nix/store/{closure} {url}")),
            "{log}"
        );
    }
}

#[test]
fn an_unwritable_publish_target_stops_before_building() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let sign = ci.sign_cmd();
    std::fs::write(ci.path("a-file"), b"").unwrap();
    let target = ci.s("a-file/forge");
    let out = ci.release(&["--sign-cmd", &sign, "--publish-dir", &target]);
    ci.refused(&out, 15, "publish failed: could not create");
    assert!(
        !text(&out.stderr).contains("building"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_dirty_tree_is_refused_unless_allowed() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let sign = ci.sign_cmd();
    std::fs::write(ci.flake.dir.join("notes.txt"), b"uncommitted").unwrap();
    let out = ci.release(&["--sign-cmd", &sign]);
    ci.refused(&out, 10, "evaluate failed: the git tree");
    let out = ci.release(&["--sign-cmd", &sign, "--allow-dirty"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fleet = json_file(&ci.path("forge/fleet.resolved.json"));
    assert_eq!(fleet["meta"]["ciCommit"], ci.flake.head().as_str());

    // The release's own output inside the checkout (CI's `--out release`) is not a change.
    std::fs::remove_file(ci.flake.dir.join("notes.txt")).unwrap();
    let flake = ci.flake.dir.to_str().unwrap().to_owned();
    let inside = ci.flake.dir.join("release");
    let trust = ci.s("etc/trust.json");
    let mut args = vec![
        "release",
        "--flake",
        &flake,
        "--trust-file",
        &trust,
        "--key",
        "ci.pem",
        "--out",
        inside.to_str().unwrap(),
    ];
    args.extend(TEST_NIX_OPTIONS);
    for _ in 0..2 {
        let out = run(ci.pki.dir.as_path(), &args);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(inside.join("fleet.resolved.json").exists());
}

/// The stamp of `dir`'s release: signedAt, and each manifest's (file name, id in
/// channel file, signedAt, introduced).
fn stamps(dir: &Path) -> (String, Vec<String>, String, Value) {
    let fleet = json_file(&dir.join("fleet.resolved.json"));
    let mut ids: Vec<String> = std::fs::read_dir(dir.join("rollouts"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    ids.sort();
    let manifest = json_file(&dir.join("rollouts/channel/stable.json"));
    (
        fleet["meta"]["signedAt"].as_str().unwrap().to_owned(),
        ids,
        manifest["meta"]["signedAt"].as_str().unwrap().to_owned(),
        manifest["introduced"].clone(),
    )
}

#[test]
fn resign_moves_signed_at_keeps_rollout_ids_and_check_fresh_says_when() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let url = ci.cache.file_url();
    let key = ci.cache.secret_key.to_str().unwrap().to_owned();
    let two_hours_ago = (time::OffsetDateTime::now_utc() - time::Duration::hours(2))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let out = ci.release(&[
        "--key",
        "ci.pem",
        "--push-to",
        &url,
        "--cache-signing-key",
        &key,
        "--signed-at",
        &two_hours_ago,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forge = ci.path("forge");
    let before = stamps(&forge);
    let trust = ci.s("etc/trust.json");
    let fresh = |within: &str| {
        run(
            ci.tmp.path(),
            &[
                "release",
                "check-fresh",
                "--from",
                forge.to_str().unwrap(),
                "--trust-file",
                &trust,
                "--within-minutes",
                within,
            ],
        )
    };
    // 1440-minute window, signed two hours ago: about 1320 minutes left.
    let check = fresh("1300");
    assert!(check.status.success(), "{}", text(&check.stderr));
    let check = fresh("1330");
    assert_eq!(check.status.code(), Some(20), "{}", text(&check.stderr));
    assert!(text(&check.stderr).contains("re-sign it now"));

    // A tampered release is never re-signed.
    let good = std::fs::read(forge.join("fleet.resolved.json")).unwrap();
    let tampered = String::from_utf8(good.clone())
        .unwrap()
        .replace("\"canary\"", "\"canarx\"");
    std::fs::write(forge.join("fleet.resolved.json"), tampered).unwrap();
    let resign = [
        "release",
        "--resign",
        "--from",
        forge.to_str().unwrap(),
        "--key",
        "ci.pem",
        "--trust-file",
        &trust,
    ];
    let out = run(ci.pki.dir.as_path(), &resign);
    assert_eq!(out.status.code(), Some(16), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("refusing to re-sign"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(forge.join("fleet.resolved.json"), &good).unwrap();

    let out = run(ci.pki.dir.as_path(), &resign);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = stamps(&forge);
    assert_ne!(after.0, before.0, "fleet signedAt did not move");
    assert_ne!(after.2, before.2, "manifest signedAt did not move");
    assert_eq!(after.1, before.1, "rollout ids changed on a re-sign");
    assert_eq!(after.3, before.3, "introduced changed on a re-sign");
    let check = fresh("1330");
    assert!(check.status.success(), "{}", text(&check.stderr));
}

#[test]
fn one_command_from_flake_to_agents_running_it_and_a_resign_opens_nothing() {
    require_nix();
    let names = ["web-01", "web-02"];
    let tmp0 = tempfile::tempdir().unwrap();
    // Machines first: their switch scripts go into the flake.
    let mut machines = Vec::new();
    let mut hosts = Vec::new();
    let mut flake_hosts = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key_dir = tmp0.path().join(format!("hostkey-{name}"));
        let host = Host::from_ssh_keygen(name, &key_dir);
        let machine = Machine::new(&tmp0.path().join(format!("machine-{name}")));
        let gen0 = machine.build(&format!("nixos-system-{name}-0"));
        machine.install(&gen0);
        let closure_name = format!("nixos-system-{name}-1");
        flake_hosts.push(FlakeHost {
            name: (*name).to_owned(),
            tags: vec![if i == 0 { "canary" } else { "web" }.to_owned()],
            pubkey: Some(host.pubkey_line()),
            switch_script: machine.switch_script(&closure_name),
            closure_name,
            broken: false,
        });
        machines.push((machine, key_dir));
        hosts.push(host);
    }
    let ci = Ci::new(&flake_hosts);
    let cache_srv = Forge::start(&ci.path("cache-srv"));
    let cache_http = cache_srv.url("cache");
    let push = ci.cache.file_url();
    let key = ci.cache.secret_key.to_str().unwrap().to_owned();

    // The one command: evaluate, build, push (signed), read back over HTTP, sign,
    // publish, verify.
    let out = ci.release(&[
        "--key",
        "ci.pem",
        "--push-to",
        &push,
        "--cache-signing-key",
        &key,
        "--cache-url",
        &cache_http,
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for name in names {
        assert!(
            stderr.contains(&format!("{name}: built /nix/store/")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("is in {cache_http}, signed by a pinned cache key")),
            "{stderr}"
        );
    }
    let stdout = text(&out.stdout);
    assert!(stdout.contains("verified as agents will"), "{stdout}");
    let forge_dir = ci.path("forge");
    let fleet = json_file(&forge_dir.join("fleet.resolved.json"));
    assert_eq!(fleet["meta"]["ciCommit"], ci.flake.head().as_str());
    // The same bytes as --out: one release, published.
    assert_eq!(
        std::fs::read(forge_dir.join("fleet.resolved.json.sig")).unwrap(),
        std::fs::read(ci.path("out/fleet.resolved.json.sig")).unwrap()
    );
    let closures: Vec<String> = names
        .iter()
        .map(|n| {
            fleet["hosts"][n]["closureHash"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // The hosts fetch their systems from the cache, not from this store.
    for closure in &closures {
        delete_from_store(closure);
        assert!(!is_valid(closure));
    }

    sign_revocations(&ci.pki, &forge_dir, json!([]));
    let forge = Forge::start(&forge_dir);
    let mut cp = Cp::start(
        &ci.pki,
        &forge,
        &ci.path("cp-state"),
        &CpOptions {
            build_time_artifact: false,
            ..CpOptions::default()
        },
    );
    cp.wait_ready(&ci.pki);
    let mut agents = Vec::new();
    for (host, (machine, key_dir)) in hosts.iter().zip(&machines) {
        host.token_file(&ci.pki, &machine.dir.join("token.json"));
        let config = AgentConfig::new(&ci.pki, cp.port, host, key_dir, machine, &cache_http);
        agents.push(AgentProc::start(&config));
    }
    for ((machine, _), closure) in machines.iter().zip(&closures) {
        wait_for("the agents to activate the release", LONG, || {
            machine.current().as_deref() == Some(closure.as_str())
        });
        assert_eq!(machine.activations(), vec![closure.clone()]);
    }
    let rollout = rollout_id(&forge_dir, "stable");
    let operator = Client::operator(&ci.pki, cp.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rollouts = |rt: &tokio::runtime::Runtime| -> Vec<(String, String)> {
        rt.block_on(operator.get("/v1/rollouts"))
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["rollout_id"].as_str().unwrap_or_default().to_owned(),
                    r["state"].to_string(),
                )
            })
            .collect()
    };
    wait_for("the rollout to converge", LONG, || {
        rollouts(&rt)
            .iter()
            .any(|(id, state)| id == &rollout && state.contains("onverged"))
    });

    // The scheduled re-sign: signedAt moves, the id stays, the control plane takes the
    // new signature and opens nothing.
    let signed_before = fleet["meta"]["signedAt"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    let trust = ci.s("etc/trust.json");
    let out = run(
        ci.pki.dir.as_path(),
        &[
            "release",
            "--resign",
            "--from",
            forge_dir.to_str().unwrap(),
            "--key",
            "ci.pem",
            "--trust-file",
            &trust,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let resigned = json_file(&forge_dir.join("fleet.resolved.json"));
    let signed_after = resigned["meta"]["signedAt"].as_str().unwrap().to_owned();
    assert_ne!(signed_after, signed_before);
    assert_eq!(rollout_id(&forge_dir, "stable"), rollout);
    wait_for(
        "the control plane to take the re-signed fleet",
        LONG,
        || {
            rt.block_on(operator.get("/v1/channels/stable")).json()["signed_at"]
                == signed_after.as_str()
        },
    );
    // A few reconcile ticks later, still the one converged rollout and no new activation.
    std::thread::sleep(Duration::from_secs(4));
    let all = rollouts(&rt);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].0, rollout);
    assert!(all[0].1.contains("onverged"), "{all:?}");
    for ((machine, _), closure) in machines.iter().zip(&closures) {
        assert_eq!(machine.activations(), vec![closure.clone()]);
    }
    drop(agents);
    drop(cp);
}

fn git_show(repo: &Path, spec: &str) -> Vec<u8> {
    let out = Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(["show", spec])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git show {spec}: {}",
        text(&out.stderr)
    );
    out.stdout
}

#[test]
fn publish_git_commits_the_release_to_a_branch_and_an_unreachable_remote_stops_first() {
    require_nix();
    let ci = Ci::new(&two_plain_hosts());
    let remote = ci.path("release.git");
    let init = Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(&remote)
        .status()
        .unwrap();
    assert!(init.success());
    let sign = ci.sign_cmd();
    let unreachable = format!("{}:release", ci.s("no-such-remote.git"));
    let out = ci.release(&["--sign-cmd", &sign, "--publish-git", &unreachable]);
    ci.refused(&out, 15, "cannot reach git remote");
    assert!(!text(&out.stderr).contains("building"));

    let url = ci.cache.file_url();
    let key = ci.cache.secret_key.to_str().unwrap().to_owned();
    let target = format!("{}:release", remote.display());
    let out = ci.release(&[
        "--key",
        "ci.pem",
        "--push-to",
        &url,
        "--cache-signing-key",
        &key,
        "--publish-git",
        &target,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forge = ci.path("forge");
    for rel in [
        "fleet.resolved.json",
        "fleet.resolved.json.sig",
        "rollouts/channel/stable.json",
        "rollouts/channel/stable.json.sig",
    ] {
        assert_eq!(
            git_show(&remote, &format!("release:{rel}")),
            std::fs::read(forge.join(rel)).unwrap(),
            "{rel} on the branch is not the published one"
        );
    }
    let id = rollout_id(&forge, "stable");
    git_show(&remote, &format!("release:rollouts/{id}.json.sig"));
}
