//! `nixfleet dashboard`: a read-only web page of the fleet, served on loopback. Each
//! page is rendered on the server from the control plane's operator API (see [`page`]);
//! a few lines of JavaScript re-fetch the page every few seconds and swap its `<main>`
//! (a `<noscript>` meta refresh does the same without JavaScript).

pub mod page;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nixfleet_proto::api::{
    ChannelStatus, Healthz, HostDetail, HostStatus, RolloutEventRecord, RolloutStatus,
};
use time::OffsetDateTime;

use self::page::{Chrome, HostFilter};
use super::client::OperatorClient;
use super::config::ConnectionArgs;
use super::OperatorError;

/// The address served when `--listen` is not given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Seconds between refreshes when `--refresh-secs` is not given.
pub const DEFAULT_REFRESH_SECS: u64 = 5;

/// Only this page's own stylesheet and script; no inline code, no other origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const CSS: &str = include_str!("dashboard.css");
const JS: &str = include_str!("dashboard.js");

#[derive(Debug, Clone)]
pub struct DashboardArgs {
    pub listen: SocketAddr,
    /// Serve on an address other than loopback (anyone who reaches it sees the fleet
    /// with the operator's certificate).
    pub allow_remote: bool,
    pub refresh_secs: u64,
}

struct Server {
    client: OperatorClient,
    control_plane: String,
    /// The longest a page waits for the control plane, all its requests together (each
    /// request has the connection's own timeout too).
    page_timeout: Duration,
    refresh_secs: u64,
    allow_remote: bool,
    seq: AtomicU64,
}

/// Resolves the connection as `nixfleet status` does, binds, prints the address and
/// serves until Ctrl-C.
pub fn run(args: &DashboardArgs, connection: &ConnectionArgs) -> Result<(), OperatorError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| OperatorError::Runtime(e.to_string()))?;
    let (server, listener) = bind(&runtime, args, connection)?;
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        // Tests and scripts read the address from this line.
        let _ = writeln!(
            out,
            "nixfleet dashboard: http://{}/ (control plane {}); Ctrl-C to stop",
            listener.addr, server.control_plane
        );
        let _ = out.flush();
    }
    runtime.block_on(async {
        let stop = tokio::signal::ctrl_c();
        serve(server, listener.socket, stop).await;
    });
    Ok(())
}

/// Serves the dashboard on `runtime` in the background (`nixfleet demo --keep-running`)
/// until the runtime stops; returns the address it listens on.
pub fn spawn(
    runtime: &tokio::runtime::Runtime,
    args: &DashboardArgs,
    connection: &ConnectionArgs,
) -> Result<SocketAddr, OperatorError> {
    let (server, listener) = bind(runtime, args, connection)?;
    runtime.spawn(serve(server, listener.socket, std::future::pending::<()>()));
    Ok(listener.addr)
}

struct Bound {
    socket: tokio::net::TcpListener,
    addr: SocketAddr,
}

fn bind(
    runtime: &tokio::runtime::Runtime,
    args: &DashboardArgs,
    connection: &ConnectionArgs,
) -> Result<(Arc<Server>, Bound), OperatorError> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        return Err(OperatorError::NotLoopback {
            addr: args.listen.to_string(),
        });
    }
    let env = |name: &str| std::env::var(name).ok();
    let conn = super::config::resolve(connection, &env)?;
    // The client's connection pool and the listener belong to the runtime they run on.
    let _guard = runtime.enter();
    let client = OperatorClient::new(&conn)?;
    let listen_error = |e: std::io::Error| OperatorError::Listen {
        addr: args.listen.to_string(),
        detail: e.to_string(),
    };
    let std_listener = std::net::TcpListener::bind(args.listen).map_err(listen_error)?;
    std_listener.set_nonblocking(true).map_err(listen_error)?;
    let addr = std_listener.local_addr().map_err(listen_error)?;
    let socket = tokio::net::TcpListener::from_std(std_listener).map_err(listen_error)?;
    let server = Arc::new(Server {
        client,
        control_plane: conn.url.clone(),
        page_timeout: conn.timeout.saturating_mul(3),
        refresh_secs: args.refresh_secs,
        allow_remote: args.allow_remote,
        seq: AtomicU64::new(0),
    });
    Ok((server, Bound { socket, addr }))
}

async fn serve<S: std::future::Future>(
    server: Arc<Server>,
    listener: tokio::net::TcpListener,
    stop: S,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("nixfleet dashboard: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(handle(&server, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Whether a `Host` header names this machine (a page from another site that resolves
/// its own name to 127.0.0.1 must not read the fleet: DNS rebinding).
pub fn host_is_local(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    r
}

const HTML: &str = "text/html; charset=utf-8";

/// `a=b&c=d` with `+` and `%XX` decoded.
pub fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(server: &Server, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !server.allow_remote {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !host_is_local(host) {
            return response(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "this dashboard answers only to localhost addresses\n",
            );
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "the dashboard is read-only\n",
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path().to_owned();
    let params = query_params(req.uri().query().unwrap_or(""));
    match path.as_str() {
        "/dashboard.css" => return response(StatusCode::OK, "text/css; charset=utf-8", CSS),
        "/dashboard.js" => return response(StatusCode::OK, "text/javascript; charset=utf-8", JS),
        "/favicon.ico" => return response(StatusCode::NOT_FOUND, "text/plain", ""),
        _ => {}
    }
    let refresh_secs = params
        .iter()
        .rev()
        .find(|(k, _)| k == "refresh")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .map_or(server.refresh_secs, |s| s.min(3600));
    let chrome = Chrome {
        control_plane: &server.control_plane,
        now: OffsetDateTime::now_utc(),
        refresh_secs,
        seq: server.seq.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let view = async {
        Some(match segs.as_slice() {
            [""] => fleet_view(server, &chrome).await,
            ["hosts"] | ["hosts", ""] => {
                let filter = HostFilter::from_query(&params);
                server
                    .client
                    .get_json::<Vec<HostStatus>>("/v1/hosts")
                    .await
                    .map(|hosts| page::hosts(&chrome, &hosts, &filter))
            }
            ["hosts", name] => host_view(server, &chrome, name).await,
            ["rollouts"] | ["rollouts", ""] => server
                .client
                .get_json::<Vec<RolloutStatus>>("/v1/rollouts")
                .await
                .map(|list| page::rollouts(&chrome, &list)),
            ["rollouts", id] => rollout_view(server, &chrome, id).await,
            _ => return None,
        })
    };
    let result = match tokio::time::timeout(server.page_timeout, view).await {
        Ok(Some(result)) => result,
        Ok(None) => {
            let body = page::page(
                &chrome,
                page::Nav::None,
                "Not found",
                "",
                "<p>No such page. The views are Fleet, Hosts and Rollouts.</p>\n",
            );
            return response(StatusCode::NOT_FOUND, HTML, body);
        }
        Err(_) => Err(OperatorError::Timeout {
            url: server.control_plane.clone(),
            secs: server.page_timeout.as_secs(),
        }),
    };
    match result {
        Ok(body) => response(StatusCode::OK, HTML, body),
        Err(e) => {
            let status = match e {
                OperatorError::NotFound { .. }
                | OperatorError::NoSuchRollout { .. }
                | OperatorError::BadName { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            };
            let body = page::page(
                &chrome,
                page::Nav::None,
                "Error",
                "",
                &page::error_banner(&e.to_string()),
            );
            response(status, HTML, body)
        }
    }
}

async fn fleet_view(server: &Server, chrome: &Chrome<'_>) -> Result<String, OperatorError> {
    let c = &server.client;
    let health: Healthz = c.get_json("/healthz").await?;
    let hosts: Vec<HostStatus> = c.get_json("/v1/hosts").await?;
    let all: Vec<RolloutStatus> = c.get_json("/v1/rollouts").await?;
    let mut names: BTreeSet<String> = hosts.iter().map(|h| h.channel.clone()).collect();
    names.extend(all.iter().map(|r| r.channel.clone()));
    let mut channels = Vec::new();
    for name in names {
        let status = match c
            .get_json::<ChannelStatus>(&format!("/v1/channels/{}", page::url_part(&name)))
            .await
        {
            Ok(s) => Some(s),
            Err(OperatorError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let newest = all
            .iter()
            .filter(|r| r.channel == name)
            .max_by_key(|r| r.opened_at)
            .cloned();
        let trace = match &newest {
            Some(r) => c
                .get_json::<Vec<RolloutEventRecord>>(&format!(
                    "/v1/rollouts/{}/trace",
                    page::url_part(&r.rollout_id)
                ))
                .await
                .or_else(|e| match e {
                    OperatorError::NotFound { .. } => Ok(Vec::new()),
                    e => Err(e),
                })?,
            None => Vec::new(),
        };
        channels.push(page::ChannelView {
            name,
            status,
            rollout: newest,
            trace,
        });
    }
    Ok(page::fleet(
        chrome,
        &page::FleetData {
            health,
            hosts,
            channels,
        },
    ))
}

async fn host_view(
    server: &Server,
    chrome: &Chrome<'_>,
    name: &str,
) -> Result<String, OperatorError> {
    super::check_name(name)?;
    let detail: HostDetail = server
        .client
        .get_json(&format!("/v1/hosts/{}", page::url_part(name)))
        .await?;
    Ok(page::host(chrome, &detail))
}

async fn rollout_view(
    server: &Server,
    chrome: &Chrome<'_>,
    query: &str,
) -> Result<String, OperatorError> {
    let list: Vec<RolloutStatus> = server.client.get_json("/v1/rollouts").await?;
    let id = super::resolve_rollout(query, &list)?;
    let events: Vec<RolloutEventRecord> = server
        .client
        .get_json(&format!("/v1/rollouts/{}/trace", page::url_part(&id)))
        .await?;
    let rollout = list.iter().find(|r| r.rollout_id == id);
    let hosts: Vec<HostStatus> = server.client.get_json("/v1/hosts").await?;
    let channel_hosts = rollout.map_or(0, |r| {
        hosts.iter().filter(|h| h.channel == r.channel).count()
    });
    Ok(page::rollout(chrome, &id, rollout, &events, channel_hosts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_host_headers_are_served() {
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(host_is_local(ok), "{ok}");
        }
        for bad in ["evil.example:8080", "10.0.0.1:8080", "", "[::2]:80"] {
            assert!(!host_is_local(bad), "{bad}");
        }
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_params("state=failed&q=web+01%3C&x"),
            vec![
                ("state".to_owned(), "failed".to_owned()),
                ("q".to_owned(), "web 01<".to_owned()),
                ("x".to_owned(), String::new())
            ]
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
