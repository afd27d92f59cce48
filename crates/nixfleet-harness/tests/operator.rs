//! The operator's view of a live fleet: `nixfleet status`, `nixfleet rollout list` and
//! `nixfleet rollout trace` against the real control plane, with test hosts checking in
//! over mTLS, and the control plane's `--event-hook`. No Nix needed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nixfleet_harness::terminal::{assert_aligned, Tmux};
use nixfleet_harness::*;
use nixfleet_trust::jcs;
use serde_json::{json, Value};

const COMMIT: &str = "1111111111111111111111111111111111111111";
const COMMIT2: &str = "2222222222222222222222222222222222222222";

/// A store basename that looks like a real one: 32 hash characters, then the name.
fn store_closure(host: &str, generation: u32) -> String {
    const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hex = jcs::sha256_hex(format!("{host}-{generation}").as_bytes());
    let hash: String = hex
        .as_bytes()
        .chunks(2)
        .take(32)
        .map(|pair| {
            let byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap();
            NIX_BASE32[usize::from(byte % 32)] as char
        })
        .collect();
    format!("{hash}-nixos-system-{host}-24.11.{generation}")
}

fn closures(hosts: &[Host], generation: u32) -> Value {
    hosts
        .iter()
        .map(|h| (h.name.clone(), json!(store_closure(&h.name, generation))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A fleet in channel `stable` (wave 0: the first host; wave 1: the rest), released and
/// served, with a control plane running and every host enrolled.
struct Fleet {
    /// Check-in loops that keep hosts online while a test looks at them.
    keepalive: Vec<tokio::task::JoinHandle<()>>,
    cp: Cp,
    port: u16,
    hosts: Vec<Host>,
    fleet: Value,
    forge_dir: PathBuf,
    _forge: Forge,
    pki: Pki,
    _tmp: tempfile::TempDir,
}

impl Fleet {
    async fn start(
        names: &[&str],
        fleet_edit: impl FnOnce(&mut Value),
        cp_extra: &[&str],
    ) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path());
        let mut hosts: Vec<Host> = names.iter().map(|n| Host::new(n)).collect();
        let mut fleet = fleet_json(&hosts.iter().collect::<Vec<_>>(), canary_policy("halt", 0));
        fleet_edit(&mut fleet);
        let forge_dir = tmp.path().join("forge");
        let gen1 = closures(&hosts, 1);
        release_with_fallback(&pki, &forge_dir, &fleet, &gen1, COMMIT, &[]);
        sign_revocations(&pki, &forge_dir, json!([]));
        let forge = Forge::start(&forge_dir);
        let port = free_port();
        let opts = CpOptions {
            extra: cp_extra.iter().map(|s| (*s).to_owned()).collect(),
            ..CpOptions::default()
        };
        let mut cp = Cp::start_on(&pki, &forge, port, &pki.path("var"), &opts);
        cp.wait_ready(&pki);
        for h in hosts.iter_mut() {
            assert_eq!(enroll(&pki, port, h).await.status, 200);
        }
        Fleet {
            cp,
            port,
            hosts,
            fleet,
            forge_dir,
            _forge: forge,
            pki,
            _tmp: tmp,
            keepalive: Vec::new(),
        }
    }

    /// Host `i` checks in every 2 s running `generation`, as its agent would, so that it
    /// stays online however long the test takes.
    fn keep_online(&mut self, i: usize, generation: u32) {
        let client = self.client(i);
        let body = checkin_body(
            self.name(i),
            &store_closure(self.name(i), generation),
            None,
            json!([]),
        );
        self.keepalive.push(tokio::spawn(async move {
            loop {
                let _ = client.try_post("/v1/agent/checkin", &body).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }));
    }

    fn client(&self, i: usize) -> Client {
        Client::host(&self.pki, self.port, &self.hosts[i])
    }

    fn name(&self, i: usize) -> &str {
        &self.hosts[i].name
    }

    async fn checkin(&self, i: usize, generation: u32) -> Value {
        let name = self.name(i);
        let r = self
            .client(i)
            .post(
                "/v1/agent/checkin",
                &checkin_body(name, &store_closure(name, generation), None, json!([])),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Host `i` takes its target from generation `from` and confirms it.
    async fn upgrade(&self, i: usize, from: u32) {
        let name = self.name(i);
        let target = until_target(&self.client(i), name, &store_closure(name, from)).await;
        assert_eq!(activate(&self.client(i), name, &target).await, 204);
        self.checkin(i, from + 1).await;
    }

    /// `nixfleet ARGS` as an operator, with the connection given by NIXFLEET_* variables.
    fn nixfleet(&self, args: &[&str]) -> Output {
        Command::new(bin("nixfleet"))
            .args(args)
            .env_remove("NO_COLOR")
            .env("NIXFLEET_URL", format!("https://localhost:{}", self.port))
            .env("NIXFLEET_CA_CERT", self.pki.path("etc/ca.pem"))
            .env("NIXFLEET_CERT", self.pki.path("operator/operator-cert.pem"))
            .env("NIXFLEET_KEY", self.pki.path("operator/operator-key.pem"))
            .env("XDG_CONFIG_HOME", self.pki.path("no-config"))
            .output()
            .unwrap()
    }

    fn nixfleet_ok(&self, args: &[&str]) -> String {
        let out = self.nixfleet(args);
        assert!(
            out.status.success(),
            "nixfleet {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.cp.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status_json(&self) -> Value {
        serde_json::from_str(&self.nixfleet_ok(&["status", "--json"])).unwrap()
    }
}

/// A disruption budget of one host in flight across the `web` hosts.
fn one_web_host_at_a_time(fleet: &mut Value) {
    fleet["disruptionBudgets"] =
        json!([{"selector": {"tags": ["web"]}, "maxInFlight": 1, "maxInFlightPct": null}]);
}

/// web-01 converged; web-02 dispatched and confirming; web-03 held by the budget; web-04
/// never seen.
async fn mixed_fleet() -> Fleet {
    let mut f = Fleet::start(
        &["web-01", "web-02", "web-03", "web-04"],
        one_web_host_at_a_time,
        &[],
    )
    .await;
    for i in 1..3 {
        let answer = f.checkin(i, 0).await;
        assert!(answer["target"].is_null(), "wave 1 waits for wave 0");
    }
    f.upgrade(0, 0).await;
    until_target(&f.client(1), "web-02", &store_closure("web-02", 0)).await;
    let reason_of = |status: &Value, host: &str| {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == host)
            .map(|h| h["waiting"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let start = Instant::now();
    loop {
        f.checkin(2, 0).await;
        let status = f.status_json();
        if reason_of(&status, "web-02").starts_with("confirming")
            && reason_of(&status, "web-03").contains("budget")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "fleet never settled: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.keep_online(0, 1);
    f.keep_online(1, 0);
    f.keep_online(2, 0);
    f
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.keepalive {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_waiting_reason_of_every_host_not_converged() {
    let f = mixed_fleet().await;
    let status = f.status_json();
    let hosts = status["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 4);
    let mut not_converged = 0;
    for h in hosts {
        if h["converged"] == false {
            not_converged += 1;
            let why = h["waiting"].as_str().unwrap_or("");
            assert!(!why.is_empty(), "no reason for {h}");
        }
    }
    assert_eq!(not_converged, 3, "{status:#}");

    let text = f.nixfleet_ok(&["status"]);
    let lines: Vec<&str> = text.lines().collect();
    // Every host row not converged is followed by its reason, indented.
    for h in hosts.iter().filter(|h| h["converged"] == false) {
        let name = h["name"].as_str().unwrap();
        let row = lines
            .iter()
            .position(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"));
        let why = h["waiting"].as_str().unwrap();
        let first_word = why.split_whitespace().next().unwrap();
        assert!(
            lines[row + 1].starts_with(&format!("  {first_word}")),
            "{name}'s reason is not under its row:\n{text}"
        );
    }
    assert!(
        text.contains("stable   stable@1111111  wave 1 active"),
        "{text}"
    );
    assert!(text.contains("waiting: budget"), "{text}");
    assert!(text.contains("confirming: deadline"), "{text}");
    // web-04 never checked in: said as such, not as "since the control plane started".
    assert!(text.contains("  waiting: never seen\n"), "{text}");
    assert!(text.ends_with('\n'), "{text:?}");
    assert!(
        text.contains("4 hosts: 1 converged, 3 not converged"),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no colour when stdout is a pipe:\n{text}"
    );
    for line in text.lines() {
        assert!(
            line.chars().count() <= 80,
            "wider than 80 columns: {line:?}"
        );
    }

    // One host in detail: its reason and its recent events.
    let detail = f.nixfleet_ok(&["status", "--host", "web-02"]);
    let platform = status["hosts"][0]["system"].as_str().unwrap().to_owned();
    assert!(
        detail
            .lines()
            .next()
            .unwrap()
            .ends_with(&format!("  {platform}")),
        "the platform on the first line:\n{detail}"
    );
    assert!(detail.contains("confirming: deadline"), "{detail}");
    assert!(detail.contains(&store_closure("web-02", 1)), "{detail}");
    assert!(detail.contains("Recent events"), "{detail}");
    assert!(detail.contains("dispatch"), "{detail}");

    // The rollout: listed, and its trail with the reconciler's words.
    let rollout = rollout_id(&f.forge_dir, "stable");
    let list = f.nixfleet_ok(&["rollout", "list"]);
    assert!(list.ends_with('\n'), "{list:?}");
    assert!(list.contains(&rollout[..12]), "{list}");
    assert!(list.contains("stable@1111111"), "{list}");
    assert!(list.contains("wave 1 active"), "{list}");
    let trace = f.nixfleet_ok(&["rollout", "trace", "stable@1111111"]);
    for word in [
        "open",
        "start",
        "dispatch",
        "confirm",
        "promoteWave",
        "web-01",
    ] {
        assert!(trace.contains(word), "{word} missing:\n{trace}");
    }
    assert_eq!(
        trace,
        f.nixfleet_ok(&["rollout", "trace", &rollout[..8]]),
        "a prefix names the same rollout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_errors_say_what_to_do() {
    let f = Fleet::start(&["web-01"], |_| {}, &[]).await;
    // A host certificate on operator routes.
    let dir = f.pki.path("host-cred");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), f.hosts[0].cert_pem.as_ref().unwrap()).unwrap();
    std::fs::write(dir.join("key.pem"), f.hosts[0].key.to_pkcs8_pem().unwrap()).unwrap();
    let out = Command::new(bin("nixfleet"))
        .args(["status", "--url", &format!("https://localhost:{}", f.port)])
        .arg("--ca-cert")
        .arg(f.pki.path("etc/ca.pem"))
        .arg("--cert")
        .arg(dir.join("cert.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("not a host certificate"), "{stderr}");
    // Nothing listening.
    let out = f.nixfleet(&[
        "status",
        "--url",
        &format!("https://localhost:{}", free_port()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
    assert!(stderr.contains("is the control plane running"), "{stderr}");
    // A missing certificate file.
    let out = f.nixfleet(&["status", "--cert", "/nonexistent/operator-cert.pem"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/operator-cert.pem"),
        "{stderr}"
    );
    assert!(stderr.contains("nixfleet cert operator"), "{stderr}");
    // A CA that did not issue the control plane's certificate.
    let wrong_ca = f.pki.path("operator/operator-cert.pem");
    let out = f.nixfleet(&["status", "--ca-cert", wrong_ca.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not chain to --ca-cert"), "{stderr}");
    // Something that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("https://localhost:{}", silent.local_addr().unwrap().port());
    let started = Instant::now();
    let out = f.nixfleet(&["status", "--url", &silent_url, "--timeout-secs", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gave no answer within 1 s"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // An unknown host.
    let out = f.nixfleet(&["status", "--host", "db-99"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("404") && stderr.contains("db-99"),
        "{stderr}"
    );
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

fn is_time(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

fn is_opt_str(v: &Value) -> bool {
    v.is_null() || v.is_string()
}

fn is_opt_time(v: &Value) -> bool {
    v.is_null() || is_time(v)
}

/// The documented shape of one host (docs/operator-cli.md).
fn check_host(h: &Value) {
    assert_eq!(
        keys(h),
        set(&[
            "name",
            "channel",
            "system",
            "declared_closure",
            "current_closure",
            "last_checkin",
            "online",
            "converged",
            "rollout",
            "rollout_state",
            "waiting",
            "revoked",
            "compliance"
        ]),
        "{h}"
    );
    assert!(
        h["compliance"].is_null() || h["compliance"]["failing"].is_array(),
        "{h}"
    );
    assert!(
        h["revoked"].is_null() || h["revoked"]["not_before"].is_string(),
        "{h}"
    );
    assert!(
        h["name"].is_string() && h["channel"].is_string() && h["system"].is_string(),
        "{h}"
    );
    for k in [
        "declared_closure",
        "current_closure",
        "rollout",
        "rollout_state",
        "waiting",
    ] {
        assert!(is_opt_str(&h[k]), "{k}: {h}");
    }
    assert!(is_opt_time(&h["last_checkin"]), "{h}");
    assert!(
        h["online"].is_boolean() && h["converged"].is_boolean(),
        "{h}"
    );
}

fn check_event(e: &Value) {
    assert_eq!(
        keys(e),
        set(&["rollout_id", "hostname", "kind", "detail", "at"]),
        "{e}"
    );
    assert!(e["rollout_id"].is_string() && e["kind"].is_string(), "{e}");
    assert!(is_opt_str(&e["hostname"]) && is_time(&e["at"]), "{e}");
    assert!(!e["detail"].is_null(), "{e}");
}

fn check_rollout(r: &Value) {
    assert_eq!(
        keys(r),
        set(&[
            "rollout_id",
            "channel",
            "display_name",
            "state",
            "opened_at",
            "hosts",
            "introduced",
            "latest"
        ]),
        "{r}"
    );
    // Provenance: the first release of the intent and the signature served now.
    for k in ["introduced", "latest"] {
        let p = &r[k];
        assert!(
            p.is_null()
                || (keys(p) == set(&["ci_commit", "signed_at"])
                    && is_opt_str(&p["ci_commit"])
                    && is_time(&p["signed_at"])),
            "{k}: {r}"
        );
    }
    assert!(
        r["rollout_id"].is_string() && r["channel"].is_string(),
        "{r}"
    );
    assert!(
        is_opt_str(&r["display_name"]) && is_time(&r["opened_at"]),
        "{r}"
    );
    assert!(r["state"].is_string() || r["state"].is_object(), "{r}");
    assert!(r["hosts"].is_object(), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_has_the_documented_shape() {
    let f = mixed_fleet().await;
    let status = f.status_json();
    assert_eq!(
        keys(&status),
        set(&[
            "control_plane",
            "generated_at",
            "version",
            "fleet_signed_at",
            "last_tick_at",
            "rollouts",
            "hosts"
        ])
    );
    assert_eq!(
        status["control_plane"],
        format!("https://localhost:{}", f.port)
    );
    assert!(is_time(&status["generated_at"]));
    assert!(is_opt_str(&status["version"]));
    assert!(is_time(&status["fleet_signed_at"]) && is_time(&status["last_tick_at"]));
    for h in status["hosts"].as_array().unwrap() {
        check_host(h);
    }
    let current = status["rollouts"].as_array().unwrap();
    assert_eq!(current.len(), 1, "one rollout per channel: {status:#}");
    for r in current {
        check_rollout(r);
    }

    let detail: Value =
        serde_json::from_str(&f.nixfleet_ok(&["status", "--host", "web-01", "--json"])).unwrap();
    let mut head = detail.clone();
    let events = head.as_object_mut().unwrap().remove("events").unwrap();
    check_host(&head);
    assert!(!events.as_array().unwrap().is_empty());
    for e in events.as_array().unwrap() {
        check_event(e);
    }

    let list: Value = serde_json::from_str(&f.nixfleet_ok(&["rollout", "list", "--json"])).unwrap();
    for r in list.as_array().unwrap() {
        check_rollout(r);
    }
    let rollout = rollout_id(&f.forge_dir, "stable");
    let trace: Value =
        serde_json::from_str(&f.nixfleet_ok(&["rollout", "trace", &rollout, "--json"])).unwrap();
    assert!(!trace.as_array().unwrap().is_empty());
    for e in trace.as_array().unwrap() {
        check_event(e);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_on_a_terminal_is_aligned_coloured_and_fits() {
    let f = mixed_fleet().await;
    // The connection comes from the config file this time.
    let config_home = f.pki.path("xdg");
    std::fs::create_dir_all(config_home.join("nixfleet")).unwrap();
    std::fs::write(
        config_home.join("nixfleet/config.toml"),
        format!(
            "url = \"https://localhost:{}\"\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            f.port,
            f.pki.path("etc/ca.pem").display(),
            f.pki.path("operator/operator-cert.pem").display(),
            f.pki.path("operator/operator-key.pem").display()
        ),
    )
    .unwrap();
    let nixfleet = bin("nixfleet");
    let env = [("XDG_CONFIG_HOME", config_home.as_path())];
    let tmux = Tmux::new();
    let rollout = rollout_id(&f.forge_dir, "stable");
    let screens = [
        ("status", format!("{} status", nixfleet.display())),
        (
            "host",
            format!("{} status --host web-02", nixfleet.display()),
        ),
        ("list", format!("{} rollout list", nixfleet.display())),
        (
            "trace",
            format!("{} rollout trace {}", nixfleet.display(), &rollout[..10]),
        ),
    ];
    let mut captured = Vec::new();
    for (session, script) in &screens {
        let (plain, coloured) = tmux.run(session, script, &env);
        for line in plain.lines() {
            assert!(
                line.chars().count() <= 80,
                "{session}: wider than the terminal: {line:?}"
            );
        }
        assert!(
            coloured.contains("\x1b["),
            "{session}: no colour on a terminal:\n{coloured}"
        );
        assert!(!plain.contains("error"), "{session}:\n{plain}");
        captured.push(plain);
    }
    assert_aligned(
        &captured[0],
        "HOST",
        &["web-01", "web-02", "web-03", "web-04"],
    );
    assert_aligned(&captured[0], "CHANNEL", &["stable "]);
    assert_aligned(&captured[2], "ROLLOUT", &[&rollout[..12]]);
    assert_aligned(&captured[3], "TIME", &[]);
    assert!(captured[0].contains("  waiting: budget"), "{}", captured[0]);

    // NO_COLOR is respected on a terminal too.
    let (_, coloured) = tmux.run(
        "nocolor",
        &format!("NO_COLOR=1 {} status", nixfleet.display()),
        &env,
    );
    for code in ["\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[1m"] {
        assert!(
            !coloured.contains(code),
            "colour despite NO_COLOR:\n{coloured}"
        );
    }
}

/// Live processes in process group `pgid`, from /proc.
fn process_group_members(pgid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the parenthesised command name: state, ppid, pgrp, …
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn event_hook_gets_convergence_failure_and_halt_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let events_file = tmp.path().join("events.jsonl");
    let groups_file = tmp.path().join("groups");
    // The hook writes its input, then dawdles past its timeout: it is killed with what
    // it started, logged, and nothing else waits for it.
    let hook = format!(
        "cat >> {}; echo $$ >> {}; sleep 30",
        events_file.display(),
        groups_file.display()
    );
    let mut f = Fleet::start(
        &["web-01", "web-02"],
        |_| {},
        &[
            "--event-hook",
            &hook,
            "--event-hook-timeout-secs",
            "1",
            "--confirm-window-secs",
            "2",
            "--activation-timeout-secs",
            "0",
        ],
    )
    .await;
    let first = rollout_id(&f.forge_dir, "stable");
    f.upgrade(0, 0).await;
    f.upgrade(1, 0).await;
    let read_events = || -> Vec<Value> {
        std::fs::read_to_string(&events_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_for_async("the convergence event", Duration::from_secs(20), || async {
        read_events()
            .iter()
            .any(|e| e["event"] == "rollout_converged")
    })
    .await;

    // A second release that web-01 never confirms: it fails and the rollout halts.
    let gen2 = closures(&f.hosts, 2);
    release_closures(&f.pki, &f.forge_dir, &f.fleet, &gen2, COMMIT2, &[]);
    let second = rollout_id(&f.forge_dir, "stable");
    until_target(&f.client(0), "web-01", &store_closure("web-01", 1)).await;
    wait_for_async("the halt event", Duration::from_secs(30), || async {
        read_events().iter().any(|e| e["event"] == "rollout_halted")
    })
    .await;

    let events = read_events();
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["rollout_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("rollout_converged", first.as_str()),
            ("host_failed", second.as_str()),
            ("rollout_halted", second.as_str())
        ],
        "{events:#?}"
    );
    let failed = &events[1];
    assert_eq!(failed["hostname"], "web-01");
    assert_eq!(failed["channel"], "stable");
    assert_eq!(failed["reason"], "confirm deadline passed");
    assert_eq!(failed["detail"]["action"], "fail");
    assert!(is_time(&failed["at"]));
    assert_eq!(
        keys(failed),
        set(&[
            "event",
            "rollout_id",
            "channel",
            "hostname",
            "reason",
            "detail",
            "at"
        ])
    );
    assert!(events[2]["reason"]
        .as_str()
        .unwrap()
        .contains("health gate tripped in wave 0"));

    // Each run outlived its timeout: killed and logged with the reason, while the
    // control plane kept answering.
    let log = f.cp.log_text();
    assert!(
        log.contains("still running after 1 s; killed"),
        "hook timeout not logged:\n{log}"
    );
    assert_eq!(f.checkin(1, 1).await["target"], Value::Null);
    let operator = Client::operator(&f.pki, f.port);
    wait_for_async(
        "three hook runs counted as failed",
        Duration::from_secs(10),
        || {
            let operator = operator.clone();
            async move {
                let metrics = String::from_utf8(operator.get("/metrics").await.body).unwrap();
                metrics.contains("nixfleet_event_hook_runs_total{result=\"failed\"} 3")
            }
        },
    )
    .await;

    let groups: Vec<u32> = std::fs::read_to_string(&groups_file)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(groups.len(), 3);
    wait_for(
        "the hooks' processes to be gone",
        Duration::from_secs(5),
        || groups.iter().all(|g| process_group_members(*g) == 0),
    );

    // The trail the operator reads carries the same reason.
    let trace = f.nixfleet_ok(&["rollout", "trace", &second]);
    assert!(trace.contains("confirm deadline passed"), "{trace}");
    assert!(trace.contains("halt"), "{trace}");
    let list = f.nixfleet_ok(&["rollout", "list"]);
    assert!(list.contains("halted: wave 0, 1 failure"), "{list}");
    assert_eq!(f.cp.terminate(), Some(0));
}
