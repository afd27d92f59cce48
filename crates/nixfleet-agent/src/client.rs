//! HTTPS to the control plane: mTLS with the host key, the protocol header on every
//! request, a timeout on every call and a size limit on every answer.

use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nixfleet_proto::wire::{ErrorBody, PROTOCOL_HEADER, PROTOCOL_MAJOR};
use nixfleet_trust::keys::PrivateKey;

/// Largest answer read from the control plane (a manifest for a very large fleet).
const MAX_BODY: usize = 32 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error(
        "{method} {url} got no answer within {secs} s; is the control plane up and reachable?"
    )]
    Timeout {
        method: String,
        url: String,
        secs: u64,
    },
    #[error("{method} {url} failed: {detail}; check the URL, the network and that the control plane's certificate chains to --ca-cert")]
    Transport {
        method: String,
        url: String,
        detail: String,
    },
    #[error("TLS set-up for {url} failed: {detail}; check --ca-cert and the host certificate")]
    Tls { url: String, detail: String },
}

/// A reply with a status the caller interprets.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The control plane's error message, or the raw body.
    pub fn message(&self) -> String {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| {
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(300)
                    .collect()
            })
    }
}

#[derive(Clone)]
pub struct CpClient {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    timeout: Duration,
}

impl CpClient {
    /// A client presenting `identity` (certificate PEM and the host key), or none for
    /// enrollment.
    pub fn new(
        base_url: &str,
        ca_pem: &str,
        identity: Option<(&str, &PrivateKey)>,
        timeout: Duration,
    ) -> Result<CpClient, NetError> {
        let config =
            nixfleet_pki::client_tls_config(ca_pem, identity).map_err(|e| NetError::Tls {
                url: base_url.to_owned(),
                detail: e.to_string(),
            })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(CpClient {
            http: Client::builder(TokioExecutor::new())
                // Under the control plane's 10 s idle limit, so the agent never sends on
                // a connection the server is closing at that moment.
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
            base: base_url.trim_end_matches('/').to_owned(),
            timeout,
        })
    }

    /// The same client (and connection pool) with requests cut off after `timeout`, when
    /// that is sooner than the configured timeout.
    pub fn within(&self, timeout: Duration) -> CpClient {
        CpClient {
            timeout: self.timeout.min(timeout),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Result<Reply, NetError> {
        self.send(Method::GET, path, None).await
    }

    pub async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<Reply, NetError> {
        let bytes = serde_json::to_vec(body).map_err(|e| NetError::Transport {
            method: "POST".into(),
            url: self.url(path),
            detail: e.to_string(),
        })?;
        self.send(Method::POST, path, Some(bytes)).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, NetError> {
        let url = self.url(path);
        let transport = |detail: String| NetError::Transport {
            method: method.to_string(),
            url: url.clone(),
            detail,
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(PROTOCOL_HEADER, PROTOCOL_MAJOR.to_string());
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(req)
                .await
                .map_err(|e| transport(nixfleet_pki::error_chain(&e)))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}")))?
                .to_bytes()
                .to_vec();
            Ok(Reply { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| NetError::Timeout {
                method: method.to_string(),
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })?
    }
}
