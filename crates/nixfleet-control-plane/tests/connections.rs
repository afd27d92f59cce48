//! Hostile connections against the real control-plane binary: idle HTTP/2 and HTTP/1.1
//! connections by the thousand under a small open-file limit, a source over its cap, and
//! the idle limit on both protocols.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nixfleet_harness::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The client preface and an empty SETTINGS frame: all an idle HTTP/2 client sends.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[derive(Clone, Copy, Debug)]
enum Idle {
    /// TLS with ALPN h2, the preface and SETTINGS, then nothing.
    H2,
    /// TLS with ALPN http/1.1, one request, then nothing (a kept-alive connection).
    H1,
    /// TLS, then nothing at all.
    Silent,
}

fn connector(pki: &Pki, alpn: &[u8]) -> TlsConnector {
    let mut config = nixfleet_pki::client_tls_config(&pki.read("etc/ca.pem"), None).unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Opens one idle connection from `source`; an error is what the server's refusal or
/// eviction looks like from outside.
async fn open_idle(
    h2: &TlsConnector,
    h1: &TlsConnector,
    source: Ipv4Addr,
    port: u16,
    kind: Idle,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket
        .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await?;
    let connector = match kind {
        Idle::H2 => h2,
        Idle::H1 | Idle::Silent => h1,
    };
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    match kind {
        Idle::H2 => tls.write_all(H2_PREFACE).await?,
        Idle::H1 => {
            tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await?
        }
        Idle::Silent => {}
    }
    tls.flush().await?;
    Ok(tls)
}

/// Resolves when the server closes the connection; returns how long that took.
async fn until_closed(mut tls: TlsStream<tokio::net::TcpStream>, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), tls.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            // The server's SETTINGS or the answer to the one request.
            Ok(Ok(_)) => {}
        }
    }
}

/// Raises this process's open-file limit so it can hold thousands of sockets.
fn raise_open_files(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    assert!(
        lim.rlim_cur >= want,
        "this test holds {want} sockets but the open-file limit is {}; run it as root or raise the hard limit",
        lim.rlim_cur
    );
}

async fn healthz_within(pki: &Pki, port: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    let reply = tokio::time::timeout(
        limit,
        Client::anonymous(pki, port).try_request(hyper::Method::GET, "/healthz", None, &[]),
    )
    .await
    .unwrap_or_else(|_| panic!("/healthz did not answer within {limit:?}"))
    .unwrap_or_else(|e| panic!("/healthz failed: {e}"));
    assert_eq!(reply.status, 200);
    started.elapsed()
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_while_five_thousand_idle_connections_are_held_under_1024_files() {
    const HOSTILE: usize = 5000;
    const SOURCES: u8 = 40;
    raise_open_files(HOSTILE as u64 + 1024);
    let s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let opts = CpOptions {
        open_files: Some(1024),
        ..CpOptions::default()
    };
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &opts);
    cp.wait_ready(&s.pki);
    assert!(
        cp.log_text().contains("open_file_limit=1024"),
        "{}",
        cp.log_text()
    );

    let h2 = connector(&s.pki, b"h2");
    let h1 = connector(&s.pki, b"http/1.1");
    let held = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(HOSTILE)));
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attack = {
        let (held, refused, opened) = (held.clone(), refused.clone(), opened.clone());
        tokio::spawn(async move {
            // 64 at a time from 40 addresses (127.0.0.2 to .41), so the overall cap, not
            // the per-source one, is what they run into.
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let (h2, h1, held, refused, opened, next) = (
                    h2.clone(),
                    h1.clone(),
                    held.clone(),
                    refused.clone(),
                    opened.clone(),
                    next.clone(),
                );
                workers.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= HOSTILE {
                            return;
                        }
                        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES as usize) as u8);
                        let kind = if i % 2 == 0 { Idle::H2 } else { Idle::H1 };
                        match open_idle(&h2, &h1, source, port, kind).await {
                            Ok(tls) => {
                                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                held.lock().await.push(tls);
                            }
                            Err(_) => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        })
    };

    // While the connections pile up, and after: a new client is answered within 1 s.
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while !attack.is_finished() {
        slowest = slowest.max(healthz_within(&s.pki, port, Duration::from_secs(1)).await);
        probes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    attack.await.unwrap();
    let opened = opened.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        opened >= 1024,
        "the attack should get past the old 1,024-file wall; opened {opened}, refused {}",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    for _ in 0..5 {
        slowest = slowest.max(healthz_within(&s.pki, port, Duration::from_secs(1)).await);
        probes += 1;
    }
    assert!(probes >= 6, "the attack finished before any probe ran");

    let text =
        String::from_utf8(Client::operator(&s.pki, port).get("/metrics").await.body).unwrap();
    let open = metric(&text, "nixfleet_connections_open");
    let evicted = metric(
        &text,
        "nixfleet_connections_closed_total{reason=\"evicted\"}",
    );
    assert!(
        open < 1024,
        "open connections {open} must stay under the file limit"
    );
    let idle = metric(&text, "nixfleet_connections_closed_total{reason=\"idle\"}");
    // Every connection the attack opened is open, or was closed to make room or as idle.
    assert!(
        (open + evicted + idle) as usize >= opened && evicted > 0,
        "{opened} opened: {open} open, {evicted} evicted, {idle} closed as idle"
    );
    // The control plane never ran out of descriptors.
    assert!(
        !cp.log_text().contains("accept failed"),
        "{}",
        cp.log_text()
    );
    eprintln!(
        "{opened} idle connections opened, {evicted} evicted, {open} open at the end; slowest /healthz of {probes}: {slowest:?}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_over_its_connection_cap_is_refused_and_others_are_served() {
    let s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let opts = CpOptions {
        extra: vec!["--max-connections-per-source".into(), "20".into()],
        ..CpOptions::default()
    };
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &opts);
    cp.wait_ready(&s.pki);
    let h2 = connector(&s.pki, b"h2");
    let h1 = connector(&s.pki, b"http/1.1");
    let greedy = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        match open_idle(&h2, &h1, greedy, port, Idle::Silent).await {
            Ok(tls) => held.push(tls),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (20, 10));
    healthz_within(&s.pki, port, Duration::from_secs(1)).await;
    let text =
        String::from_utf8(Client::operator(&s.pki, port).get("/metrics").await.body).unwrap();
    assert_eq!(
        metric(
            &text,
            "nixfleet_connections_refused_total{reason=\"per-source\"}"
        ),
        10
    );
    wait_for("the refusal is logged once", Duration::from_secs(5), || {
        cp.log_text().contains("connection refused: 127.0.0.2:")
    });
    assert_eq!(
        cp.log_text().matches("connection refused:").count(),
        1,
        "a flood of refusals must not flood the log"
    );
    // A place freed is a place to take.
    held.pop();
    wait_for_async(
        "a freed place is reused",
        Duration::from_secs(5),
        || async {
            open_idle(&h2, &h1, greedy, port, Idle::Silent)
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_http2_and_silent_connections_are_closed_after_ten_seconds_like_http1() {
    let s = Setup::new(&["web-01"], canary_policy("halt", 0), json!([]));
    let state = s.pki.path("var");
    let port = free_port();
    let mut cp = Cp::start_on(&s.pki, &s.forge, port, &state, &CpOptions::default());
    cp.wait_ready(&s.pki);
    let h2 = connector(&s.pki, b"h2");
    let h1 = connector(&s.pki, b"http/1.1");
    let local = Ipv4Addr::LOCALHOST;
    let (a, b, c) = tokio::join!(
        open_idle(&h2, &h1, local, port, Idle::H2),
        open_idle(&h2, &h1, local, port, Idle::H1),
        open_idle(&h2, &h1, local, port, Idle::Silent),
    );
    let limit = Duration::from_secs(20);
    let (a, b, c) = tokio::join!(
        until_closed(a.unwrap(), limit),
        until_closed(b.unwrap(), limit),
        until_closed(c.unwrap(), limit),
    );
    for (kind, after) in [("h2", a), ("http/1.1", b), ("silent", c)] {
        // Agents drop idle connections after 5 s: the server must not close them sooner.
        assert!(
            after >= Duration::from_secs(9) && after <= Duration::from_secs(13),
            "{kind} connection closed after {after:?}, not after the 10 s idle limit"
        );
    }
}
