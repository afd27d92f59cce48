//! The HTTPS listener: TLS with optional client certificates, the caller's identity put on
//! each request, connection caps and idle limits for HTTP/1.1 and HTTP/2 (see `conns`),
//! header and request timeouts, and a graceful drain on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use nixfleet_pki::rustls::ServerConfig;
use nixfleet_pki::ClientIdentity;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::conns::{Refusal, Registry};

/// Who is on the other end of the connection, from the verified client certificate.
#[derive(Debug, Clone)]
pub enum Peer {
    /// No client certificate (allowed at the handshake: /healthz, /v1/enroll).
    Anonymous,
    Identified(Arc<ClientIdentity>),
    /// Chains to the fleet CA but carries no usable role.
    Unusable(String),
}

/// A TLS handshake that takes longer than this is dropped: a slow client cannot hold a
/// connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Also the idle limit of a kept-alive connection: the wait for the next request's head
/// starts when the previous response is sent. Agents drop idle connections sooner (5 s).
/// `conns` applies the same limit to HTTP/2 and to connections that never send a request.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings while streams are open: a peer that stops answering is dropped even in
/// the middle of a request.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents send one request at a time; operators a few.
const H2_MAX_STREAMS: u32 = 32;
/// The same bound as HTTP/1.1's header buffer.
const H2_MAX_HEADER_LIST: u32 = 64 << 10;
/// How often connections idle past the limit are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let sweeper = tokio::spawn({
        let registry = registry.clone();
        async move {
            let mut every = tokio::time::interval(IDLE_SWEEP);
            loop {
                every.tick().await;
                let closed = registry.close_idle();
                if closed > 0 {
                    tracing::debug!(closed, "closed connections idle for 10 s or more");
                }
            }
        }
    });
    let mut refusals = RefusalLog::default();
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let slot = match registry.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                // Dropping the socket closes it before any TLS work is done.
                refusals.note(&registry, remote, refusal);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        let registry = registry.clone();
        tokio::spawn(async move {
            let conn = slot.conn.clone();
            let serve = async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let peer = peer_of(&tls);
                let tracked = slot.conn.clone();
                let service =
                    tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        // In flight until the response body has been sent (or dropped).
                        let in_flight = tracked.begin(&registry);
                        req.extensions_mut().insert(peer.clone());
                        let app = app.clone();
                        async move {
                            let response = app.oneshot(req).await?;
                            Ok::<_, Infallible>(response.map(|body| {
                                Body::new(body.map_frame(move |frame| {
                                    let _held = &in_flight;
                                    frame
                                }))
                            }))
                        }
                    });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(H2_PING_INTERVAL)
                    .keep_alive_timeout(H2_PING_TIMEOUT)
                    .max_concurrent_streams(H2_MAX_STREAMS)
                    .max_header_list_size(H2_MAX_HEADER_LIST);
                let conn =
                    builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                drop(slot);
            };
            tokio::select! {
                _ = serve => {}
                _ = conn.closed() => tracing::debug!(%remote, "idle connection closed"),
            }
        });
    }
    sweeper.abort();
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(secs = drain.as_secs(), "drain timeout reached; closing remaining connections"),
    }
}

/// Refused connections are logged at most once per interval, so a flood cannot flood the
/// log; every refusal is counted in /metrics.
#[derive(Default)]
struct RefusalLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, registry: &Registry, remote: std::net::SocketAddr, refusal: Refusal) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            tracing::debug!(%remote, reason = refusal.reason(), "connection refused");
            return;
        }
        let limits = registry.limits();
        let why = match refusal {
            Refusal::PerSource => format!(
                "{remote} already holds --max-connections-per-source ({}) connections",
                limits.max_per_source
            ),
            Refusal::Overall => format!(
                "all {} connections (--max-connections) have a request in flight",
                limits.max_connections
            ),
        };
        tracing::warn!(
            refused = self.since,
            "connection refused: {why}; raise the limit if this is legitimate load (see nixfleet_connections_refused_total)"
        );
        self.last = Some(std::time::Instant::now());
        self.since = 0;
    }
}

fn peer_of(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Peer {
    let (_, conn) = tls.get_ref();
    match conn.peer_certificates().and_then(|c| c.first()) {
        None => Peer::Anonymous,
        Some(cert) => match ClientIdentity::from_der(cert.as_ref()) {
            Ok(id) => Peer::Identified(Arc::new(id)),
            Err(e) => Peer::Unusable(e.to_string()),
        },
    }
}

/// Plain HTTP (the optional loopback metrics listener).
pub async fn serve_plain(listener: TcpListener, app: Router, mut shutdown: watch::Receiver<bool>) {
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    });
    if let Err(e) = serve.await {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}
