//! One agent's HTTPS connection to the control plane: TCP, TLS (mTLS with the host's
//! certificate, resuming its last session when it has one), HTTP/1.1. Every step is
//! bounded by the caller's timeout and every answer by [`BODY_LIMIT`].

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use nixfleet_pki::rustls::client::Resumption;
use nixfleet_pki::rustls::{ClientConfig, HandshakeKind};
use nixfleet_proto::wire::{PROTOCOL_HEADER, PROTOCOL_MAJOR};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::HostIdentity;
use crate::{ErrorKind, LoadgenError};

/// Agent answers are a few hundred bytes; anything this large is refused unread.
pub const BODY_LIMIT: usize = 64 << 10;

/// Where the control plane listens and the name its certificate carries.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub authority: String,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, server_name: &str) -> Result<Endpoint, LoadgenError> {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            LoadgenError::Usage(format!(
                "--server-name {server_name:?} is not a DNS name or IP: {e}"
            ))
        })?;
        Ok(Endpoint {
            addr,
            server_name: name,
            authority: format!("{server_name}:{}", addr.port()),
        })
    }
}

/// The TLS client configuration of one host: its own certificate and its own session
/// store (a resumed session carries the identity it was made with, so hosts never share
/// one). The store holds one server's tickets only, to keep 100,000 hosts small.
pub fn host_tls(ca_pem: &str, id: &HostIdentity) -> Result<Arc<ClientConfig>, LoadgenError> {
    let mut config = nixfleet_pki::client_tls_config(ca_pem, Some((&id.cert_pem, &id.key)))
        .map_err(|source| LoadgenError::Pki {
            what: format!("TLS client configuration for {}", id.hostname),
            source,
        })?;
    config.resumption = Resumption::in_memory_sessions(1);
    Ok(Arc::new(config))
}

/// An anonymous client (enrollment).
pub fn anonymous_tls(ca_pem: &str) -> Result<Arc<ClientConfig>, LoadgenError> {
    let config =
        nixfleet_pki::client_tls_config(ca_pem, None).map_err(|source| LoadgenError::Pki {
            what: "TLS client configuration".into(),
            source,
        })?;
    Ok(Arc::new(config))
}

pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// The TLS handshake resumed an earlier session.
    pub resumed: bool,
}

pub async fn connect(endpoint: &Endpoint, tls: Arc<ClientConfig>) -> Result<Conn, ErrorKind> {
    let tcp = TcpStream::connect(endpoint.addr)
        .await
        .map_err(|_| ErrorKind::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(tls)
        .connect(endpoint.server_name.clone(), tcp)
        .await
        .map_err(|_| ErrorKind::Tls)?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::Request)?;
    tokio::spawn(async move {
        // Ends when the server closes or the sender is dropped; errors show at the sender.
        let _ = connection.await;
    });
    Ok(Conn { sender, resumed })
}

impl Conn {
    pub fn is_usable(&self) -> bool {
        !self.sender.is_closed()
    }

    /// POSTs JSON; `close` asks the server to close the connection after answering.
    pub async fn post(
        &mut self,
        endpoint: &Endpoint,
        path: &str,
        body: Vec<u8>,
        close: bool,
    ) -> Result<(u16, Bytes), ErrorKind> {
        let (status, body, _) = self.request(endpoint, Some(body), path, close).await?;
        Ok((status, body))
    }

    /// GETs `path`; also returns the size of the answer's status line and headers.
    pub async fn get(
        &mut self,
        endpoint: &Endpoint,
        path: &str,
        close: bool,
    ) -> Result<(u16, Bytes, usize), ErrorKind> {
        self.request(endpoint, None, path, close).await
    }

    async fn request(
        &mut self,
        endpoint: &Endpoint,
        body: Option<Vec<u8>>,
        path: &str,
        close: bool,
    ) -> Result<(u16, Bytes, usize), ErrorKind> {
        let mut req = match body {
            Some(_) => Request::post(path),
            None => Request::get(path),
        }
        .header(hyper::header::HOST, &endpoint.authority)
        .header(PROTOCOL_HEADER, PROTOCOL_MAJOR.to_string());
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let body = body.unwrap_or_default();
        if close {
            req = req.header(hyper::header::CONNECTION, "close");
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| ErrorKind::Request)?;
        self.sender.ready().await.map_err(|_| ErrorKind::Request)?;
        let response = self
            .sender
            .send_request(req)
            .await
            .map_err(|_| ErrorKind::Request)?;
        let status = response.status().as_u16();
        // "HTTP/1.1 200 OK\r\n", each "name: value\r\n", the blank line.
        let head = 17
            + response
                .headers()
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>()
            + 2;
        let body = Limited::new(response.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ErrorKind::Decode
                } else {
                    ErrorKind::Request
                }
            })?
            .to_bytes();
        Ok((status, body, head))
    }
}
