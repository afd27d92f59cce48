//! The load generator against the real control plane: 200 hosts for 20 s, half keeping
//! their connection, half reconnecting with TLS resumption, through a rollout of a new
//! closure. No request may fail, and the counts the load generator reports must be the
//! ones the control plane's own /metrics counted.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nixfleet_harness::{
    free_port, release_with_fallback, sign_revocations, Cp, CpOptions, Forge, Pki,
};
use nixfleet_loadgen::conn::Endpoint;
use nixfleet_loadgen::fleet::{self, Shape};
use nixfleet_loadgen::identity;
use nixfleet_loadgen::run::{self, Mode, RunConfig};
use serde_json::json;

const HOSTS: usize = 200;
const COMMIT: &str = "2222222222222222222222222222222222222222";

fn metrics(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_hosts_for_twenty_seconds_agree_with_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path());
    let shape = Shape::new(HOSTS, "smoke");
    let fleet = fleet::fleet_json(&shape).unwrap();
    // Hosts run generation 1; the release moves every host to generation 2.
    let closures = fleet::closures_json(&shape, 2, 1, &[]);
    let forge_dir = tmp.path().join("forge");
    release_with_fallback(&pki, &forge_dir, &fleet, &closures, COMMIT, &[]);
    sign_revocations(&pki, &forge_dir, json!([]));
    let forge = Forge::start(&forge_dir);
    let metrics_port = free_port();
    let opts = CpOptions {
        extra: vec![
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
        ],
        ..CpOptions::default()
    };
    let mut cp = Cp::start(&pki, &forge, &tmp.path().join("state"), &opts);
    cp.wait_ready(&pki);

    let ca_pem = pki.read("etc/fleet-ca-cert.pem");
    let ca = nixfleet_pki::FleetCa::from_pem(&ca_pem, &pki.read("etc/fleet-ca-key.pem")).unwrap();
    let names: Vec<String> = (0..HOSTS).map(fleet::hostname).collect();
    let ids = identity::mint(
        &ca,
        "smoke",
        &names,
        time::OffsetDateTime::now_utc(),
        time::Duration::days(1),
        2,
    )
    .unwrap();
    let (first, second): (Vec<_>, Vec<_>) = ids.into_iter().partition(|id| {
        id.hostname
            .trim_start_matches("host-")
            .parse::<usize>()
            .unwrap()
            % 2
            == 0
    });
    let addr: SocketAddr = format!("127.0.0.1:{}", cp.port).parse().unwrap();
    let trust = std::sync::Arc::new(
        nixfleet_trust::verify::read_trust_file(
            &pki.path("etc/trust.json"),
            &nixfleet_trust::verify::Limits::default(),
        )
        .unwrap(),
    );
    let config = |mode| RunConfig {
        endpoint: Endpoint::new(addr, "localhost").unwrap(),
        ca_pem: ca_pem.clone(),
        mode,
        interval: Some(Duration::from_secs(1)),
        jitter: 0.1,
        start_spread: Duration::from_secs(2),
        duration: Duration::from_secs(20),
        warmup: Duration::ZERO,
        activate_delay: Duration::from_millis(500),
        failure_rate: 0.0,
        timeout: Duration::from_secs(10),
        generation: 1,
        confirmed: true,
        trust: Some(trust.clone()),
    };
    let (keep_alive, resume) = tokio::join!(
        run::run(config(Mode::KeepAlive), first),
        run::run(config(Mode::Resume), second)
    );
    let (keep_alive, resume) = (keep_alive.unwrap(), resume.unwrap());
    println!("{}\n{}", keep_alive.human(), resume.human());

    for s in [&keep_alive, &resume] {
        assert_eq!(s.errors_total, 0, "errors: {:?}", s.errors);
        // Every activation was believed from the host's own proof, through the agent's gate.
        let p = &s.proofs;
        assert_eq!(p.refused, 0, "{:?}", p.first_refusal);
        assert!(
            p.verified >= s.confirms_ok,
            "{} proofs, {} confirms",
            p.verified,
            s.confirms_ok
        );
        assert!(p.bytes_max <= 4096, "{} bytes", p.bytes_max);
        assert_eq!(s.hosts_visible, HOSTS / 2);
        assert!(s.all_visible_secs.is_some());
        assert!(
            s.checkins_ok >= (HOSTS / 2 * 10) as u64,
            "{}",
            s.checkins_ok
        );
    }
    // Keep-alive opens one connection per host; resume mode resumes after the first.
    assert_eq!(keep_alive.tls_handshakes_full, (HOSTS / 2) as u64);
    assert_eq!(resume.tls_handshakes_full, (HOSTS / 2) as u64);
    assert!(resume.tls_handshakes_resumed > 0);
    assert!(
        resume.confirms_ok + keep_alive.confirms_ok > 0,
        "the rollout never reached a host"
    );

    let text = metrics(metrics_port);
    assert_eq!(
        metric(&text, "nixfleet_checkins_total{result=\"ok\"}"),
        keep_alive.checkins_ok + resume.checkins_ok
    );
    assert_eq!(
        metric(&text, "nixfleet_checkins_total{result=\"refused\"}"),
        0
    );
    assert_eq!(
        metric(&text, "nixfleet_confirms_total{result=\"accepted\"}"),
        keep_alive.confirms_ok + resume.confirms_ok
    );
    assert_eq!(
        metric(&text, "nixfleet_targets_sent_total"),
        keep_alive.targets_received + resume.targets_received
    );
    assert_eq!(metric(&text, "nixfleet_hosts_seen"), HOSTS as u64);
    assert!(metric(&text, "nixfleet_reconcile_tick_duration_seconds_count") > 0);
    let in_flight_max = metric(&text, "nixfleet_hosts_in_flight_max");
    assert!(
        (1..=HOSTS as u64).contains(&in_flight_max),
        "{in_flight_max}"
    );
    assert_eq!(cp.terminate(), Some(0));
}
