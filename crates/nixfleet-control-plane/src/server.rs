//! The HTTPS listener: TLS with optional client certificates, the caller's identity put on
//! each request, header and request timeouts, and a graceful drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
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
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
            let service = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn =
                builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(secs = drain.as_secs(), "drain timeout reached; closing remaining connections"),
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
