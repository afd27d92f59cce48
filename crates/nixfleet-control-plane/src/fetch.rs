//! Bounded HTTP(S) fetches of signed artifacts: a timeout on the whole exchange, a size
//! limit on the body, an optional bearer token, and conditional requests.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{header, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not an http(s) URL")]
    BadUrl { url: String },
    #[error("{url}: no answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {detail}")]
    Transport { url: String, detail: String },
    #[error("{url}: body larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("could not read token file {path}: {detail}")]
    TokenFile { path: String, detail: String },
}

/// Validators from the last successful fetch, for conditional requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

#[derive(Debug)]
pub enum Fetched {
    NotModified,
    Body {
        bytes: Bytes,
        validators: Validators,
    },
}

#[derive(Clone)]
pub struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(timeout: Duration) -> Result<Fetcher, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("could not load the system's CA certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Ok(Fetcher { client, timeout })
    }

    pub async fn get(
        &self,
        url: &str,
        bearer: Option<&str>,
        validators: Option<&Validators>,
        limit: usize,
    ) -> Result<Fetched, FetchError> {
        let uri: hyper::Uri = url.parse().map_err(|_| FetchError::BadUrl {
            url: url.to_owned(),
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(FetchError::BadUrl {
                url: url.to_owned(),
            });
        }
        let mut request = Request::get(uri).header(
            header::USER_AGENT,
            concat!("nixfleet-control-plane/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(v) = validators {
            if let Some(etag) = &v.etag {
                request = request.header(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = &v.last_modified {
                request = request.header(header::IF_MODIFIED_SINCE, lm);
            }
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| FetchError::Transport {
                url: url.to_owned(),
                detail: e.to_string(),
            })?;
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| FetchError::Transport {
                        url: url.to_owned(),
                        detail: nixfleet_pki::error_chain(&e),
                    })?;
            let status = response.status();
            if status == StatusCode::NOT_MODIFIED {
                return Ok(Fetched::NotModified);
            }
            if !status.is_success() {
                return Err(FetchError::Status {
                    url: url.to_owned(),
                    status: status.as_u16(),
                });
            }
            let header = |name| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let validators = Validators {
                etag: header(header::ETAG),
                last_modified: header(header::LAST_MODIFIED),
            };
            let body = Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        FetchError::TooLarge {
                            url: url.to_owned(),
                            limit,
                        }
                    } else {
                        FetchError::Transport {
                            url: url.to_owned(),
                            detail: e.to_string(),
                        }
                    }
                })?;
            Ok(Fetched::Body {
                bytes: body.to_bytes(),
                validators,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.to_owned(),
                secs: self.timeout.as_secs(),
            })?
    }
}

/// Reads a bearer token file (trimmed); read on every poll so a rotated token is used.
pub fn read_token(path: &std::path::Path) -> Result<String, FetchError> {
    let text = std::fs::read_to_string(path).map_err(|e| FetchError::TokenFile {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    Ok(text.trim().to_owned())
}
