//! HTTPS to the control plane's operator routes: mTLS with the operator certificate,
//! a timeout on every request and a size limit on every answer.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nixfleet_proto::wire::ErrorBody;
use nixfleet_trust::keys::PrivateKey;
use serde::de::DeserializeOwned;

use super::config::Connection;
use super::OperatorError;

/// Largest answer read (the hosts of a very large fleet).
const MAX_BODY: usize = 64 << 20;

pub struct OperatorClient {
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    base: String,
    timeout: Duration,
}

fn read_pem(what: &'static str, path: &std::path::Path) -> Result<String, OperatorError> {
    std::fs::read_to_string(path).map_err(|source| OperatorError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl OperatorClient {
    pub fn new(conn: &Connection) -> Result<OperatorClient, OperatorError> {
        let ca = read_pem("fleet CA certificate", &conn.ca_cert)?;
        let cert = read_pem("operator certificate", &conn.cert)?;
        let key_pem = read_pem("operator key", &conn.key)?;
        let key = PrivateKey::from_pem(&key_pem).map_err(|e| OperatorError::Credentials {
            detail: format!("{}: {e}", conn.key.display()),
        })?;
        let tls = nixfleet_pki::client_tls_config(&ca, Some((&cert, &key))).map_err(|e| {
            OperatorError::Credentials {
                detail: format!(
                    "{} / {} / {}: {e}",
                    conn.ca_cert.display(),
                    conn.cert.display(),
                    conn.key.display()
                ),
            }
        })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(conn.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(OperatorClient {
            http: Client::builder(TokioExecutor::new()).build(connector),
            base: conn.url.clone(),
            timeout: conn.timeout,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GETs `path` and parses the answer as `T`.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, OperatorError> {
        let url = self.url(path);
        let req = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .body(Empty::new())
            .map_err(|e| OperatorError::Unreachable {
                url: url.clone(),
                detail: e.to_string(),
                hint: "",
            })?;
        let exchange = async {
            let response = self
                .http
                .request(req)
                .await
                .map_err(|e| transport(&url, &e))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| OperatorError::Unreachable {
                    url: url.clone(),
                    detail: format!("the answer was cut off: {e}"),
                    hint: "",
                })?
                .to_bytes();
            Ok::<_, OperatorError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| OperatorError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })??;
        if status != 200 {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).chars().take(300).collect());
            return Err(OperatorError::from_status(url, status, message));
        }
        serde_json::from_slice(&body).map_err(|e| OperatorError::BadAnswer {
            url,
            detail: e.to_string(),
        })
    }
}

/// A connection-level failure, with a hint for the failures operators meet.
fn transport(url: &str, e: &hyper_util::client::legacy::Error) -> OperatorError {
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    let lower = detail.to_ascii_lowercase();
    let hint = if lower.contains("connection refused") {
        "is the control plane running, and is the URL's port right?"
    } else if lower.contains("invalid peer certificate") || lower.contains("unknownissuer") {
        "the control plane's certificate does not chain to --ca-cert, or its name does not match the URL"
    } else if lower.contains("certificate") || lower.contains("alert") {
        "the control plane refused the operator certificate at the handshake; check --cert and --key"
    } else if lower.contains("dns") || lower.contains("lookup") {
        "check the host name in the URL"
    } else {
        "check the URL and the network"
    };
    OperatorError::Unreachable {
        url: url.to_owned(),
        detail,
        hint,
    }
}
