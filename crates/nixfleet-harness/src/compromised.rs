//! A compromised control plane: it holds the CP's server certificate (as an attacker who
//! stole the CP's disk would) and the host's certificate, relays every request to the real
//! control plane, and lies where the test says: it rewrites check-in answers, serves
//! rollout manifests of its choosing (any manifest CI ever signed) and replaces confirm
//! answers. Everything an agent must not believe without CI's signature.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use nixfleet_trust::keys::PrivateKey;
use serde_json::Value;

use crate::{Client, Pki};

type Rewrite = Box<dyn Fn(&mut Value) + Send + Sync>;

#[derive(Default)]
struct Lies {
    checkin: Option<Rewrite>,
    confirm_status: Option<u16>,
    manifest_dirs: Vec<PathBuf>,
}

pub struct CompromisedCp {
    pub port: u16,
    lies: Arc<Mutex<Lies>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Relay {
    pki: Pki,
    upstream_port: u16,
    host_cert: PathBuf,
    host_key: PrivateKey,
    lies: Arc<Mutex<Lies>>,
}

impl CompromisedCp {
    /// Listens on a free port and relays to the real CP on `upstream_port`, as the host
    /// whose certificate is (once enrolled) at `host_cert`.
    pub fn start(
        pki: &Pki,
        upstream_port: u16,
        host_cert: PathBuf,
        host_key: &PrivateKey,
    ) -> CompromisedCp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let lies = Arc::new(Mutex::new(Lies::default()));
        let relay = Arc::new(Relay {
            pki: Pki {
                dir: pki.dir.clone(),
            },
            upstream_port,
            host_cert,
            host_key: host_key.clone(),
            lies: lies.clone(),
        });
        let tls = nixfleet_pki::server_tls_config(
            &pki.read("etc/server-cert.pem"),
            &pki.read("etc/server-key.pem"),
            &pki.read("etc/ca.pem"),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = tokio::select! {
                        accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                        _ = &mut rx => break,
                    };
                    let (acceptor, relay) = (acceptor.clone(), relay.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let service = hyper::service::service_fn(move |req| {
                            let relay = relay.clone();
                            async move { Ok::<_, Infallible>(relay.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                    });
                }
            });
        });
        CompromisedCp {
            port,
            lies,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Rewrites every 200 check-in answer with `f`.
    pub fn rewrite_checkin(&self, f: impl Fn(&mut Value) + Send + Sync + 'static) {
        self.lies.lock().unwrap().checkin = Some(Box::new(f));
    }

    /// Answers every confirm with `status` instead of relaying it.
    pub fn answer_confirm(&self, status: Option<u16>) {
        self.lies.lock().unwrap().confirm_status = status;
    }

    /// Serves `rollouts/<id>.json(.sig)` from this release directory too, and host proofs
    /// built from its `<id>.hosts.json` (for a host the rollout lacks, a neighbour's).
    pub fn serve_manifests_from(&self, dir: PathBuf) {
        self.lies.lock().unwrap().manifest_dirs.push(dir);
    }
}

impl Drop for CompromisedCp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reply(status: u16, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A real proof from a release directory: `host`'s when the rollout includes it, else the
/// first host's (a neighbour's real entry, validly proved, offered to `host`).
fn proof_from(rollouts: &std::path::Path, id: &str, host: &str) -> Option<Vec<u8>> {
    let manifest = std::fs::read_to_string(rollouts.join(format!("{id}.json"))).ok()?;
    let signature = std::fs::read(rollouts.join(format!("{id}.json.sig"))).ok()?;
    let hosts: nixfleet_proto::RolloutHosts =
        serde_json::from_slice(&std::fs::read(rollouts.join(format!("{id}.hosts.json"))).ok()?)
            .ok()?;
    let set = &hosts.host_set;
    let tree = nixfleet_trust::hostset::tree(set);
    let name = if set.iter().any(|e| e.hostname == host) {
        host
    } else {
        set.first()?.hostname.as_str()
    };
    let proof = nixfleet_trust::hostset::host_proof(id, &manifest, &signature, set, &tree, name)?;
    serde_json::to_vec(&proof).ok()
}

impl Relay {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        if let Some(rest) = path.strip_prefix("/v1/rollouts/") {
            if let Some((id, host)) = rest.split_once("/hosts/") {
                let dirs = self.lies.lock().unwrap().manifest_dirs.clone();
                for dir in dirs {
                    if let Some(proof) = proof_from(&dir.join("rollouts"), id, host) {
                        return reply(200, proof);
                    }
                }
            }
            let (id, file) = match rest.strip_suffix("/sig") {
                Some(id) => (id, format!("{id}.json.sig")),
                None => (rest, format!("{rest}.json")),
            };
            let dirs = self.lies.lock().unwrap().manifest_dirs.clone();
            for dir in dirs {
                if let Ok(bytes) = std::fs::read(dir.join("rollouts").join(&file)) {
                    let _ = id;
                    return reply(200, bytes);
                }
            }
        }
        if path == "/v1/agent/confirm" {
            if let Some(status) = self.lies.lock().unwrap().confirm_status {
                return reply(
                    status,
                    br#"{"error":"the dispatch is unknown or failed; roll back"}"#.to_vec(),
                );
            }
        }
        let client = if path == "/v1/enroll" {
            Client::anonymous(&self.pki, self.upstream_port)
        } else {
            let Ok(cert) = std::fs::read_to_string(&self.host_cert) else {
                return reply(401, br#"{"error":"no host certificate yet"}"#.to_vec());
            };
            Client::new(&self.pki, self.upstream_port, Some((&cert, &self.host_key)))
        };
        let body = (!body.is_empty()).then_some(body);
        match client
            .try_request(method, &path, body, &[("x-nixfleet-protocol", "1")])
            .await
        {
            Ok(r) if path == "/v1/agent/checkin" && r.status == 200 => {
                let mut value: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                if let Some(f) = &self.lies.lock().unwrap().checkin {
                    f(&mut value);
                }
                reply(200, value.to_string().into_bytes())
            }
            Ok(r) => reply(r.status, r.body),
            Err(e) => reply(502, e.into_bytes()),
        }
    }
}
