//! An enrollment burst: bootstrap tokens and CSRs are prepared first (not timed), then
//! sent to `/v1/enroll` from `concurrency` connections as fast as the control plane
//! answers; afterwards some tokens are replayed, and every replay must get 409.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use nixfleet_proto::token::{BootstrapToken, TokenClaims, TOKEN_VERSION};
use nixfleet_proto::wire::EnrollRequest;
use nixfleet_trust::jcs;
use nixfleet_trust::keys::{self, PrivateKey};
use serde::Serialize;
use time::OffsetDateTime;

use crate::conn::{self, Conn, Endpoint};
use crate::fleet::host_key;
use crate::stats::{histogram, process_cpu_secs, Percentiles};
use crate::{ErrorKind, LoadgenError};

pub struct EnrollConfig {
    pub endpoint: Endpoint,
    pub ca_pem: String,
    pub org_root_key: PrivateKey,
    pub hosts: usize,
    pub seed: String,
    pub concurrency: usize,
    pub timeout: Duration,
    /// How many used tokens to send again afterwards.
    pub replays: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnrollSummary {
    pub hosts: usize,
    pub concurrency: usize,
    pub enrolled: u64,
    pub elapsed_secs: f64,
    pub enrollments_per_sec: f64,
    pub latency_ms: Percentiles,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    pub replays_sent: u64,
    /// Replays answered 409 (the nonce was already claimed).
    pub replays_refused: u64,
    /// Replays that got a certificate: must be zero.
    pub replays_accepted: u64,
    pub loadgen_cpu_secs: Option<f64>,
}

impl EnrollSummary {
    pub fn human(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "{} enrollments over {} connections in {:.2} s: {:.0}/s\n\
             latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n\
             replays: {} sent, {} refused with 409, {} accepted\n\
             errors: {}",
            self.enrolled,
            self.concurrency,
            self.elapsed_secs,
            self.enrollments_per_sec,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            self.replays_sent,
            self.replays_refused,
            self.replays_accepted,
            self.errors_total
        );
        for (kind, n) in &self.errors {
            out.push_str(&format!("  {kind} {n}"));
        }
        out
    }
}

pub fn enroll_hostname(index: usize) -> String {
    format!("enroll-{index:06}")
}

/// The `/v1/enroll` body for one host, with a fresh token.
fn enroll_body(
    org_root_key: &PrivateKey,
    seed: &str,
    hostname: &str,
    now: OffsetDateTime,
) -> Result<Vec<u8>, LoadgenError> {
    let key = host_key(seed, hostname);
    let key_error = |detail: String| LoadgenError::Key {
        what: format!("the host key of {hostname}"),
        detail,
    };
    let fingerprint =
        keys::ssh_fingerprint_of(&key.public_key()).map_err(|e| key_error(e.to_string()))?;
    let mut nonce = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut nonce);
    let claims = TokenClaims {
        hostname: hostname.to_owned(),
        expected_pubkey_fingerprint: fingerprint,
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
        nonce: hex::encode(nonce),
    };
    let canonical = jcs::to_canonical(&claims).map_err(|e| key_error(e.to_string()))?;
    let token = BootstrapToken {
        version: TOKEN_VERSION,
        signature: base64::engine::general_purpose::STANDARD.encode(org_root_key.sign(&canonical)),
        claims,
    };
    let csr_pem =
        nixfleet_pki::build_host_csr(hostname, &key).map_err(|source| LoadgenError::Pki {
            what: format!("cannot build a CSR for {hostname}"),
            source,
        })?;
    Ok(serde_json::to_vec(&EnrollRequest { token, csr_pem })?)
}

struct Shared {
    bodies: Vec<Vec<u8>>,
    next: AtomicUsize,
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    enrolled: AtomicUsize,
}

async fn post(
    conn: &mut Option<Conn>,
    config: &EnrollConfig,
    tls: &Arc<nixfleet_pki::rustls::ClientConfig>,
    body: Vec<u8>,
) -> Result<u16, ErrorKind> {
    let attempt = async {
        if !conn.as_ref().is_some_and(Conn::is_usable) {
            *conn = Some(conn::connect(&config.endpoint, tls.clone()).await?);
        }
        match conn.as_mut() {
            Some(c) => c
                .post(&config.endpoint, "/v1/enroll", body, false)
                .await
                .map(|(s, _)| s),
            None => Err(ErrorKind::Request),
        }
    };
    let result = match tokio::time::timeout(config.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ErrorKind::Timeout),
    };
    if result.is_err() {
        *conn = None;
    }
    result
}

pub async fn run(config: EnrollConfig) -> Result<EnrollSummary, LoadgenError> {
    let now = OffsetDateTime::now_utc();
    let bodies = (0..config.hosts)
        .map(|i| enroll_body(&config.org_root_key, &config.seed, &enroll_hostname(i), now))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = conn::anonymous_tls(&config.ca_pem)?;
    let shared = Arc::new(Shared {
        bodies,
        next: AtomicUsize::new(0),
        latency: Mutex::new(histogram()),
        errors: Mutex::new(BTreeMap::new()),
        enrolled: AtomicUsize::new(0),
    });
    let config = Arc::new(config);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.max(1) {
        let (shared, config, tls) = (shared.clone(), config.clone(), tls.clone());
        tasks.spawn(async move {
            let mut conn = None;
            loop {
                let i = shared.next.fetch_add(1, Relaxed);
                let Some(body) = shared.bodies.get(i) else {
                    return;
                };
                let t = Instant::now();
                let result = post(&mut conn, &config, &tls, body.clone()).await;
                let kind = match result {
                    Ok(200) => {
                        shared.enrolled.fetch_add(1, Relaxed);
                        let micros = t.elapsed().as_micros() as u64;
                        let _ = shared
                            .latency
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(micros.max(1));
                        continue;
                    }
                    Ok(status) => ErrorKind::Status(status),
                    Err(kind) => kind,
                };
                *shared
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(kind.to_string())
                    .or_default() += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();

    let (mut refused, mut accepted, mut sent) = (0u64, 0u64, 0u64);
    let mut conn = None;
    for body in shared.bodies.iter().take(config.replays) {
        sent += 1;
        match post(&mut conn, &config, &tls, body.clone()).await {
            Ok(409) => refused += 1,
            Ok(200) => accepted += 1,
            Ok(status) => {
                *shared
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(format!("replay-http-{status}"))
                    .or_default() += 1
            }
            Err(kind) => {
                *shared
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(format!("replay-{kind}"))
                    .or_default() += 1
            }
        }
    }
    let enrolled = shared.enrolled.load(Relaxed) as u64;
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let latency = shared
        .latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(EnrollSummary {
        hosts: config.hosts,
        concurrency: config.concurrency,
        enrolled,
        elapsed_secs: elapsed.as_secs_f64(),
        enrollments_per_sec: enrolled as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: Percentiles::of(&latency),
        errors_total: errors.values().sum(),
        errors,
        replays_sent: sent,
        replays_refused: refused,
        replays_accepted: accepted,
        loadgen_cpu_secs: process_cpu_secs(),
    })
}
