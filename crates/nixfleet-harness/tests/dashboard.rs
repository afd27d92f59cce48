//! `nixfleet dashboard` in a real browser: headless Chromium opens the dashboard of a
//! live test fleet (the real control plane, test hosts checking in over mTLS) and the
//! tests assert on the DOM it built. Screenshots go to `target/tmp/dashboard/`.
//! No Nix needed; needs `chromium` (apt-get install -y chromium).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nixfleet_harness::browser::{
    self, dump_dom, http_get, http_get_as, http_request, png_size, screenshot,
};
use nixfleet_harness::*;
use serde_json::{json, Value};

/// A failure reason a compromised or buggy host could send: it must be shown as text.
const EVIL_REASON: &str =
    "switch failed: <script>alert(\"pwned\")</script><b id=\"injected\">bold</b>";
/// A revocation reason with markup in it (the revocation list is signed, but its text is
/// still not the dashboard's to interpret).
const EVIL_REVOCATION: &str = "stolen <img src=x id=\"injected-img\" onerror=alert(1)>";

fn now_rfc3339(offset: time::Duration) -> String {
    (time::OffsetDateTime::now_utc() + offset)
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// `nixfleet dashboard` on a free loopback port; stopped on drop.
struct Dashboard {
    child: Child,
    addr: SocketAddr,
}

impl Dashboard {
    fn start(pki: &Pki, cp_port: u16, extra: &[&str]) -> Dashboard {
        let mut child = Command::new(bin("nixfleet"))
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("NIXFLEET_URL", format!("https://localhost:{cp_port}"))
            .env("NIXFLEET_CA_CERT", pki.path("etc/ca.pem"))
            .env("NIXFLEET_CERT", pki.path("operator/operator-cert.pem"))
            .env("NIXFLEET_KEY", pki.path("operator/operator-key.pem"))
            .env("NIXFLEET_TIMEOUT_SECS", "3")
            .env("XDG_CONFIG_HOME", pki.path("no-config"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the dashboard printed its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Dashboard { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get(&self, path: &str) -> browser::Page {
        http_get(self.addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Waits until the server-rendered `path` satisfies `f`.
    fn wait_page(&self, what: &str, path: &str, f: impl Fn(&str) -> bool) {
        let start = std::time::Instant::now();
        loop {
            let page = self.get(path);
            if f(&page.body) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what} at {path}; last page:\n{}",
                page.body
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rows of the hosts table in a DOM: (hostname, state slug).
fn host_rows(dom: &str) -> Vec<(String, String)> {
    dom.split("<tr data-host=\"")
        .skip(1)
        .map(|rest| {
            let host = rest.split('"').next().unwrap().to_owned();
            let state = rest
                .split("data-state=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap()
                .to_owned();
            (host, state)
        })
        .collect()
}

/// The fleet view's count for `state`.
fn fleet_count(dom: &str, state: &str) -> usize {
    let counts = dom
        .split("id=\"fleet-counts\"")
        .nth(1)
        .and_then(|s| s.split("</ul>").next())
        .unwrap_or_else(|| panic!("no fleet counts in\n{dom}"));
    let needle = format!("data-state=\"{state}\" data-count=\"");
    counts
        .split(&needle)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn data_seq(dom: &str) -> u64 {
    dom.split("data-seq=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no data-seq in\n{dom}"))
}

fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard")
}

/// Keeps `host` checking in on `closure`, as its agent would.
fn keep_online(client: Client, host: &str, closure: &str) -> tokio::task::JoinHandle<()> {
    let body = checkin_body(host, closure, None, json!([]));
    tokio::spawn(async move {
        loop {
            let _ = client.try_post("/v1/agent/checkin", &body).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn assert_no_injection(dom: &str) {
    assert!(
        !dom.contains("<script>alert"),
        "a reason became a script:\n{dom}"
    );
    assert!(
        !dom.contains("<b id=\"injected\""),
        "a reason became markup:\n{dom}"
    );
    assert!(!dom.contains("<img"), "a reason became markup:\n{dom}");
}

/// canary-01 (wave 0) takes the new release and fails it with a reason full of markup:
/// the rollout halts. web-01 and web-02 wait for wave 1; web-03 is revoked and never
/// seen. Every view is checked in Chromium, before and after the failure, and once the
/// control plane is gone.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_a_live_fleet_in_a_real_browser() {
    assert!(
        browser::chromium().is_some(),
        "chromium is required: apt-get install -y chromium"
    );
    let s = Setup::new(
        &["canary-01", "web-01", "web-02", "web-03"],
        canary_policy("halt", 0),
        json!([{"hostname": "web-03", "notBefore": now_rfc3339(time::Duration::hours(1)),
                "reason": EVIL_REVOCATION, "revokedBy": "ops"}]),
    );
    let mut cp = Cp::start(&s.pki, &s.forge, &s.pki.path("var"), &CpOptions::default());
    cp.wait_ready(&s.pki);
    let mut hosts = s.hosts;
    for h in hosts.iter_mut().take(3) {
        assert_eq!(enroll(&s.pki, cp.port, h).await.status, 200);
    }
    let client = |i: usize| Client::host(&s.pki, cp.port, &hosts[i]);
    let keepalive: Vec<_> = (1..3)
        .map(|i| keep_online(client(i), &hosts[i].name, &closure(&hosts[i].name, 0)))
        .collect();

    let dash = Dashboard::start(&s.pki, cp.port, &["--refresh-secs", "1"]);
    let rollout = rollout_id(&s.forge_dir, "stable");

    // The page's own headers.
    let page = dash.get("/");
    assert_eq!(page.status, 200, "{}", page.body);
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    // A page of another site that resolves its name to 127.0.0.1 gets nothing.
    let rebound = http_get_as(dash.addr, "evil.example", "/hosts").unwrap();
    assert_eq!(rebound.status, 403);
    assert!(!rebound.body.contains("canary-01"));
    // Read-only, and a page that does not exist says so.
    let local = dash.addr.to_string();
    let post = http_request(dash.addr, "POST", &local, "/hosts").unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(dash.get("/nowhere").status, 404);
    let js = dash.get("/dashboard.js");
    assert_eq!(js.status, 200);
    assert!(js.body.contains("getElementById(\"live\")"), "{}", js.body);

    // canary-01 takes the target: it is confirming.
    let target = until_target(&client(0), "canary-01", &closure("canary-01", 0)).await;
    dash.wait_page("canary-01 confirming", "/hosts?state=confirming", |b| {
        host_rows(b) == [("canary-01".to_owned(), "confirming".to_owned())]
    });
    dash.wait_page("web-01 and web-02 online", "/hosts?state=offline", |b| {
        host_rows(b).iter().all(|(h, _)| h == "web-03")
    });
    let before = dump_dom(&dash.url("/"), None);
    assert_eq!(fleet_count(&before, "confirming"), 1, "{before}");
    assert_eq!(fleet_count(&before, "queued"), 2, "{before}");
    assert_eq!(fleet_count(&before, "revoked"), 1, "{before}");
    assert_eq!(fleet_count(&before, "failed"), 0, "{before}");
    assert!(!before.contains("banner halt"), "{before}");
    assert!(before.contains("Wave 0"), "{before}");
    for link in ["href=\"/hosts\"", "href=\"/rollouts\"", "href=\"/\""] {
        assert!(before.contains(link), "{link} missing:\n{before}");
    }

    // canary-01 fails the target with markup in its reason: the rollout halts.
    let failed = json!([{"rolloutId": rollout, "closureHash": target["closureHash"],
                         "reason": EVIL_REASON, "at": now_rfc3339(time::Duration::ZERO),
                         "cause": "activation"}]);
    let r = client(0)
        .post(
            "/v1/agent/checkin",
            &checkin_body("canary-01", &closure("canary-01", 0), None, failed.clone()),
        )
        .await;
    assert_eq!(r.status, 200);
    let _failing = keep_online_failed(client(0), failed);
    dash.wait_page("the halt", "/", |b| b.contains("banner halt"));

    // The same URL, loaded again, shows the change.
    let after = dump_dom(&dash.url("/"), None);
    assert_ne!(before, after);
    assert_eq!(fleet_count(&after, "failed"), 1, "{after}");
    assert_eq!(fleet_count(&after, "confirming"), 0, "{after}");
    assert_eq!(fleet_count(&after, "queued"), 2, "{after}");
    assert_eq!(fleet_count(&after, "revoked"), 1, "{after}");
    let halt = after
        .split("banner halt")
        .nth(1)
        .and_then(|s| s.split("</div>").next())
        .unwrap();
    assert!(halt.contains("halted: wave 0, 1 failure"), "{halt}");
    assert!(halt.contains("canary-01"), "{halt}");
    // The reason is there, as text.
    assert!(
        halt.contains(
            "&lt;script&gt;alert(\"pwned\")&lt;/script&gt;&lt;b id=\"injected\"&gt;bold&lt;/b&gt;"
        ),
        "{halt}"
    );
    assert_no_injection(&after);

    // Hosts: every host, offline and revoked ones as such; filters narrow the table.
    let all = dump_dom(&dash.url("/hosts"), None);
    let rows = host_rows(&all);
    assert_eq!(
        rows,
        [
            ("canary-01".to_owned(), "failed".to_owned()),
            ("web-01".to_owned(), "queued".to_owned()),
            ("web-02".to_owned(), "queued".to_owned()),
            ("web-03".to_owned(), "revoked".to_owned()),
        ],
        "{all}"
    );
    assert!(all.contains("data-online=\"false\""), "{all}");
    assert!(all.contains("offline"), "{all}");
    assert!(all.contains("stolen &lt;img"), "{all}");
    assert_no_injection(&all);
    let queued = dump_dom(&dash.url("/hosts?state=queued"), None);
    assert_eq!(host_rows(&queued).len(), 2, "{queued}");
    assert!(queued.contains("2 of 4 hosts"), "{queued}");
    // The form keeps the filter it shows.
    assert!(
        queued.contains("<option value=\"queued\" selected=\"\">"),
        "{queued}"
    );
    let narrowed = dump_dom(&dash.url("/hosts?state=queued&q=web-02"), None);
    assert_eq!(
        host_rows(&narrowed),
        [("web-02".to_owned(), "queued".to_owned())],
        "{narrowed}"
    );
    // The failed canary's reason, and the held hosts' reasons that quote it.
    let by_reason = dump_dom(&dash.url("/hosts?q=pwned"), None);
    assert_eq!(host_rows(&by_reason).len(), 3, "{by_reason}");
    let by_state_reason = dump_dom(&dash.url("/hosts?q=pwned&state=failed"), None);
    assert_eq!(
        host_rows(&by_state_reason),
        [("canary-01".to_owned(), "failed".to_owned())],
        "{by_state_reason}"
    );
    let sorted = dump_dom(&dash.url("/hosts?sort=name&dir=desc"), None);
    assert_eq!(host_rows(&sorted)[0].0, "web-03", "{sorted}");

    // One host: detail and its event trail, the reason as text.
    let host = dump_dom(&dash.url("/hosts/canary-01"), None);
    assert!(host.contains("st-failed"), "{host}");
    for kind in ["dispatch", "fail"] {
        assert!(
            host.contains(&format!("data-kind=\"{kind}\"")),
            "{kind}:\n{host}"
        );
    }
    assert!(host.contains("&lt;script&gt;"), "{host}");
    assert_no_injection(&host);
    let revoked = dump_dom(&dash.url("/hosts/web-03"), None);
    assert!(revoked.contains("by ops"), "{revoked}");
    assert_no_injection(&revoked);

    // The rollout: a timeline and the chart of hosts on target.
    let list = dump_dom(&dash.url("/rollouts"), None);
    assert!(
        list.contains(&format!("data-rollout=\"{rollout}\"")),
        "{list}"
    );
    let trace = dump_dom(&dash.url(&format!("/rollouts/{rollout}")), None);
    assert!(trace.contains("<ol class=\"timeline\">"), "{trace}");
    assert!(trace.contains("data-kind=\"halt\""), "{trace}");
    assert!(trace.contains("<svg viewBox=\"0 0 720 230\""), "{trace}");
    assert!(trace.contains("Hosts on the target"), "{trace}");
    assert_no_injection(&trace);

    // The script re-fetches the page by itself: after a few (virtual) seconds the DOM
    // holds a page the server rendered after the one Chromium first loaded.
    let seq = data_seq(&dash.get("/rollouts").body);
    let live = dump_dom(&dash.url("/rollouts?refresh=1"), Some(5_000));
    assert!(
        data_seq(&live) >= seq + 2,
        "no refresh after page {seq}:\n{live}"
    );
    assert!(
        live.contains(&format!("data-rollout=\"{rollout}\"")),
        "{live}"
    );

    // Screenshots at desktop and phone width.
    let dir = shots_dir();
    for (name, path, w, h) in [
        ("fleet-desktop.png", "/", 1280, 800),
        ("hosts-desktop.png", "/hosts", 1280, 800),
        ("fleet-phone.png", "/", 390, 844),
        ("hosts-phone.png", "/hosts", 390, 844),
        (
            "rollout-desktop.png",
            &format!("/rollouts/{rollout}") as &str,
            1280,
            800,
        ),
    ] {
        let file = dir.join(name);
        screenshot(&dash.url(&format!("{path}?refresh=0")), &file, w, h);
        assert_eq!(png_size(&file), (w, h), "{}", file.display());
    }

    // The control plane goes away: a banner, not a crash.
    for k in keepalive {
        k.abort();
    }
    assert_eq!(cp.terminate(), Some(0));
    let down = dash.get("/");
    assert_eq!(down.status, 502, "{}", down.body);
    let dom = dump_dom(&dash.url("/hosts?state=failed"), None);
    assert!(
        dom.contains("class=\"banner error\" role=\"alert\""),
        "{dom}"
    );
    assert!(dom.contains("cannot reach the control plane"), "{dom}");
    assert!(dom.contains("href=\"/hosts\""), "{dom}");
}

/// Keeps `client`'s host checking in with its failed target, as its agent would.
fn keep_online_failed(client: Client, failed: Value) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let host = "canary-01";
        let body = checkin_body(host, &closure(host, 0), None, failed);
        loop {
            let _ = client.try_post("/v1/agent/checkin", &body).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

#[test]
fn dashboard_refuses_a_non_loopback_address() {
    let out = Command::new(bin("nixfleet"))
        .args([
            "dashboard",
            "--listen",
            "0.0.0.0:0",
            "--url",
            "https://cp:8443",
        ])
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--allow-remote"), "{err}");
}

/// A rollout moving through its waves: canary-01 (wave 0) and two web hosts on the
/// target, web-03 confirming, web-04 not seen yet; then everyone converges. The fleet
/// bar, the counts and the chart of hosts on target follow; the desktop screenshot of
/// the midpoint is the one in docs/dashboard.md.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_follows_a_rollout_through_its_waves() {
    assert!(
        browser::chromium().is_some(),
        "chromium is required: apt-get install -y chromium"
    );
    let s = Setup::new(
        &["canary-01", "web-01", "web-02", "web-03", "web-04"],
        canary_policy("halt", 0),
        json!([]),
    );
    let mut cp = Cp::start(&s.pki, &s.forge, &s.pki.path("var"), &CpOptions::default());
    cp.wait_ready(&s.pki);
    let mut hosts = s.hosts;
    for h in hosts.iter_mut() {
        assert_eq!(enroll(&s.pki, cp.port, h).await.status, 200);
    }
    let client = |i: usize| Client::host(&s.pki, cp.port, &hosts[i]);
    let name = |i: usize| hosts[i].name.clone();
    let dash = Dashboard::start(&s.pki, cp.port, &[]);
    let rollout = rollout_id(&s.forge_dir, "stable");

    let mut keepalive = Vec::new();
    // canary-01, then web-01 and web-02, take the target and confirm it.
    for i in 0..3 {
        let target = until_target(&client(i), &name(i), &closure(&name(i), 0)).await;
        assert_eq!(activate(&client(i), &name(i), &target).await, 204);
        keepalive.push(keep_online(client(i), &name(i), &closure(&name(i), 1)));
    }
    // web-03 has the target and has not confirmed it yet.
    let web03 = until_target(&client(3), "web-03", &closure("web-03", 0)).await;
    keepalive.push(keep_online(client(3), "web-03", &closure("web-03", 0)));
    dash.wait_page("wave 1 under way", "/", |b| {
        fleet_count(b, "confirming") == 1
            && fleet_count(b, "healthy") + fleet_count(b, "soaked") == 3
            && fleet_count(b, "queued") == 1
    });
    let fleet = dump_dom(&dash.url("/"), None);
    assert!(
        fleet.contains("<strong>Wave 0</strong> (1 host)"),
        "{fleet}"
    );
    assert!(
        fleet.contains("<strong>Wave 1</strong> (3 hosts)"),
        "{fleet}"
    );
    assert!(fleet.contains("wave 1 active"), "{fleet}");
    assert!(!fleet.contains("banner"), "{fleet}");
    let trace = dump_dom(&dash.url(&format!("/rollouts/{}", &rollout[..12])), None);
    assert!(trace.contains("3 of 5 now"), "{trace}");
    assert_eq!(trace.matches("<circle class=\"dot\"").count(), 3, "{trace}");
    let offline = dump_dom(&dash.url("/hosts?state=offline"), None);
    assert_eq!(
        host_rows(&offline),
        [("web-04".to_owned(), "queued".to_owned())],
        "{offline}"
    );
    let dir = shots_dir();
    for (file, path, w, h) in [
        ("progress-fleet-desktop.png", "/", 1280, 800),
        ("progress-fleet-phone.png", "/", 390, 844),
        (
            "progress-rollout-desktop.png",
            &format!("/rollouts/{rollout}") as &str,
            1280,
            800,
        ),
    ] {
        let file = dir.join(file);
        screenshot(&dash.url(&format!("{path}?refresh=0")), &file, w, h);
        assert_eq!(png_size(&file), (w, h), "{}", file.display());
    }

    // web-03 confirms, web-04 turns up and takes the target: the rollout converges.
    assert_eq!(activate(&client(3), "web-03", &web03).await, 204);
    let web04 = until_target(&client(4), "web-04", &closure("web-04", 0)).await;
    assert_eq!(activate(&client(4), "web-04", &web04).await, 204);
    for k in keepalive.drain(..) {
        k.abort();
    }
    for i in 0..5 {
        keepalive.push(keep_online(client(i), &name(i), &closure(&name(i), 1)));
    }
    dash.wait_page("the rollout converged", "/", |b| {
        fleet_count(b, "converged") == 5
    });
    let done = dump_dom(&dash.url("/"), None);
    assert!(done.contains("data-state=\"converged\""), "{done}");
    assert_eq!(fleet_count(&done, "converged"), 5, "{done}");
    let trace = dump_dom(&dash.url(&format!("/rollouts/{rollout}")), None);
    assert!(trace.contains("5 of 5 now"), "{trace}");
    for k in keepalive {
        k.abort();
    }
}

#[test]
fn every_dashboard_flag_is_documented() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.md"),
    )
    .unwrap();
    let out = Command::new(bin("nixfleet"))
        .args(["dashboard", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '<', ',']).next())
        .filter(|f| *f != "help")
        .collect();
    assert!(flags.len() >= 9, "{flags:?}");
    for flag in flags {
        assert!(
            doc.contains(&format!("`--{flag}")),
            "nixfleet dashboard --{flag} is not in docs/dashboard.md"
        );
    }
}

/// `nixfleet demo --keep-running` serves the dashboard of its fleet and prints where.
/// Needs Nix, like the other demo tests.
#[test]
fn demo_keep_running_serves_the_dashboard() {
    assert!(
        nixfleet_harness::nix::nix_available(),
        "the demo tests need Nix (apt-get install -y nix-bin)"
    );
    bin("nixfleet-control-plane");
    bin("nixfleet-agent");
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("nixfleet"))
        .args(["demo", "--yes", "--fast", "--keep-running", "--dir"])
        .arg(tmp.path().join("demo"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop(Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Stop(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(600))
            .unwrap_or_else(|_| {
                panic!("no dashboard line; the demo printed:\n{}", seen.join("\n"))
            });
        if let Some(rest) = line.split("Dashboard: http://").nth(1) {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
        seen.push(line);
    };
    let page = http_get(addr, "/").unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(!page.body.contains("banner error"), "{}", page.body);
    assert!(fleet_count(&page.body, "converged") >= 1, "{}", page.body);
    assert!(page.body.contains("Channel stable"), "{}", page.body);
    // Ctrl-C stops the demo, the dashboard with it.
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the demo did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        http_get(addr, "/").is_err(),
        "the dashboard outlived the demo"
    );
}
