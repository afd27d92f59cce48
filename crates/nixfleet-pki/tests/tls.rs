//! Real rustls handshakes over loopback TCP with the configurations the control plane and
//! the agent use: the server sees who the client is, anonymous clients still connect,
//! foreign certificates are refused, and sessions resume. Plus curl as the runbook runs it.

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration as StdDuration;

use common::{der, enroll, host_key};
use nixfleet_pki::rustls::{
    ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection, StreamOwned,
};
use nixfleet_pki::{
    client_tls_config, issue_operator_cert, issue_server_cert, server_tls_config, ClientIdentity,
    Role,
};
use nixfleet_trust::keys::PrivateKey;
use rustls_pki_types::ServerName;
use time::{Duration, OffsetDateTime};

const TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// What the server saw of one connection.
#[derive(Debug)]
struct Seen {
    peer: Option<Vec<u8>>,
    alpn: Option<Vec<u8>>,
    kind: Option<HandshakeKind>,
}

/// A fleet CA with a server certificate for localhost, valid at the real clock.
struct Fleet {
    ca: common::Ca,
    server: Arc<ServerConfig>,
}

fn fleet() -> Fleet {
    let now = OffsetDateTime::now_utc() - Duration::minutes(1);
    let ca = common::ca_at(now);
    let sans = ["localhost", "127.0.0.1"].map(String::from);
    let (cert, key) = issue_server_cert(&ca.ca, &sans, now, Duration::days(1)).unwrap();
    let server = Arc::new(server_tls_config(&cert, &key, ca.ca.cert_pem()).unwrap());
    Fleet { ca, server }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc() - Duration::minutes(1)
}

/// Accepts `connections` connections; for each, reads "ping\n" and answers "pong\n".
fn serve(
    config: Arc<ServerConfig>,
    connections: usize,
) -> (SocketAddr, JoinHandle<Vec<Result<Seen, String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        (0..connections)
            .map(|_| {
                let (socket, _) = listener.accept().map_err(|e| e.to_string())?;
                socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                let conn = ServerConnection::new(config.clone()).map_err(|e| e.to_string())?;
                let mut tls = StreamOwned::new(conn, socket);
                let mut ping = [0u8; 5];
                tls.read_exact(&mut ping).map_err(|e| e.to_string())?;
                assert_eq!(&ping, b"ping\n");
                tls.write_all(b"pong\n").map_err(|e| e.to_string())?;
                tls.flush().map_err(|e| e.to_string())?;
                let seen = Seen {
                    peer: tls
                        .conn
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|cert| cert.as_ref().to_vec()),
                    alpn: tls.conn.alpn_protocol().map(<[u8]>::to_vec),
                    kind: tls.conn.handshake_kind(),
                };
                tls.conn.send_close_notify();
                let _ = tls.flush();
                Ok(seen)
            })
            .collect()
    });
    (addr, handle)
}

/// Connects as `localhost`, sends "ping\n", expects "pong\n"; returns the handshake kind.
fn ping(config: &Arc<ClientConfig>, addr: SocketAddr) -> Result<Option<HandshakeKind>, String> {
    let socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, socket);
    tls.write_all(b"ping\n").map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut pong = [0u8; 5];
    tls.read_exact(&mut pong).map_err(|e| e.to_string())?;
    assert_eq!(&pong, b"pong\n");
    Ok(tls.conn.handshake_kind())
}

#[test]
fn host_certificate_with_the_ssh_key_identifies_the_host() {
    let fleet = fleet();
    let key = host_key();
    let issued = enroll(&fleet.ca.ca, "web-01", &key, now());
    let mut client =
        client_tls_config(fleet.ca.ca.cert_pem(), Some((&issued.cert_pem, &key))).unwrap();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let client = Arc::new(client);

    let (addr, server) = serve(fleet.server.clone(), 2);
    assert_eq!(ping(&client, addr).unwrap(), Some(HandshakeKind::Full));
    // The same client config resumes, and the resumed session still carries the identity.
    let second = ping(&client, addr).unwrap();
    let seen: Vec<Seen> = server
        .join()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(second, Some(HandshakeKind::Resumed));
    assert_eq!(seen[1].kind, Some(HandshakeKind::Resumed));

    for seen in &seen {
        let peer = seen
            .peer
            .as_ref()
            .expect("the server sees the client certificate");
        assert_eq!(peer, &der(&issued.cert_pem));
        let identity = ClientIdentity::from_der(peer).unwrap();
        assert_eq!(
            identity.role,
            Role::Host {
                hostname: "web-01".to_owned()
            }
        );
        assert_eq!(identity.serial_hex, issued.serial_hex);
        assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]));
    }
}

#[test]
fn operator_certificate_and_anonymous_clients() {
    let fleet = fleet();
    let (cert, key_pem) =
        issue_operator_cert(&fleet.ca.ca, "alice", now(), Duration::days(1)).unwrap();
    let key = PrivateKey::from_pem(&key_pem).unwrap();
    let operator =
        Arc::new(client_tls_config(fleet.ca.ca.cert_pem(), Some((&cert, &key))).unwrap());
    let mut anonymous = client_tls_config(fleet.ca.ca.cert_pem(), None).unwrap();
    anonymous.alpn_protocols = vec![b"http/1.1".to_vec()];
    let anonymous = Arc::new(anonymous);

    let (addr, server) = serve(fleet.server.clone(), 2);
    ping(&operator, addr).unwrap();
    ping(&anonymous, addr).unwrap();
    let seen = server.join().unwrap();
    let operator_seen = seen[0].as_ref().unwrap();
    let identity = ClientIdentity::from_der(operator_seen.peer.as_ref().unwrap()).unwrap();
    assert_eq!(identity.operator_name(), Some("alice"));
    // Without ALPN from the client, none is negotiated (HTTP/1.1 by default).
    assert_eq!(operator_seen.alpn, None);

    let anonymous_seen = seen[1].as_ref().unwrap();
    assert!(anonymous_seen.peer.is_none());
    assert_eq!(anonymous_seen.alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[test]
fn certificates_from_another_ca_are_refused() {
    let fleet = fleet();
    let other = common::ca_at(now());
    let key = host_key();
    let foreign = enroll(&other.ca, "web-01", &key, now());
    let client = Arc::new(
        client_tls_config(fleet.ca.ca.cert_pem(), Some((&foreign.cert_pem, &key))).unwrap(),
    );
    let (addr, server) = serve(fleet.server.clone(), 1);
    let _ = ping(&client, addr);
    let result = server.join().unwrap().remove(0);
    // Both test CAs share a name, so webpki finds the wrong issuer and its signature fails.
    let err = result.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");

    // And a client trusting another CA refuses the control plane.
    let (addr, server) = serve(fleet.server.clone(), 1);
    let misled = Arc::new(client_tls_config(other.ca.cert_pem(), None).unwrap());
    let err = ping(&misled, addr).unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
    let _ = server.join();
}

#[test]
fn bad_inputs_are_typed_errors() {
    let fleet = fleet();
    let (cert, key) = issue_server_cert(
        &fleet.ca.ca,
        &["localhost".to_owned()],
        now(),
        Duration::days(1),
    )
    .unwrap();
    let (_, other_key) = issue_server_cert(
        &fleet.ca.ca,
        &["localhost".to_owned()],
        now(),
        Duration::days(1),
    )
    .unwrap();
    assert!(matches!(
        server_tls_config("", &key, fleet.ca.ca.cert_pem()),
        Err(nixfleet_pki::PkiError::CertificatePem { .. })
    ));
    assert!(matches!(
        server_tls_config(&cert, "", fleet.ca.ca.cert_pem()),
        Err(nixfleet_pki::PkiError::PrivateKeyPem { .. })
    ));
    assert!(matches!(
        server_tls_config(&cert, &key, "nothing"),
        Err(nixfleet_pki::PkiError::CertificatePem { .. })
    ));
    assert!(matches!(
        server_tls_config(&cert, &other_key, fleet.ca.ca.cert_pem()),
        Err(nixfleet_pki::PkiError::Tls(_))
    ));
    let stranger = host_key();
    let issued = enroll(&fleet.ca.ca, "web-01", &host_key(), now());
    assert!(matches!(
        client_tls_config(fleet.ca.ca.cert_pem(), Some((&issued.cert_pem, &stranger))),
        Err(nixfleet_pki::PkiError::Tls(_))
    ));
}

/// The runbook's `curl --cacert ca.pem --cert CLIENT --key KEY https://localhost:8443/…`.
#[test]
fn curl_presents_an_operator_certificate() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed; skipping the curl interop check");
        return;
    }
    let fleet = fleet();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = issue_operator_cert(&fleet.ca.ca, "alice", now(), Duration::days(1)).unwrap();
    std::fs::write(dir.path().join("ca.pem"), fleet.ca.ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("operator-cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("operator-key.pem"), key).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = fleet.server.clone();
    let server = thread::spawn(move || -> Result<Option<String>, String> {
        let (socket, _) = listener.accept().map_err(|e| e.to_string())?;
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        let conn = ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = BufReader::new(StreamOwned::new(conn, socket));
        // Read the request head; answer with who the caller is.
        let mut line = String::new();
        loop {
            line.clear();
            tls.read_line(&mut line).map_err(|e| e.to_string())?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let tls = tls.get_mut();
        let who = tls
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| ClientIdentity::from_der(cert.as_ref()).ok())
            .and_then(|id| id.operator_name().map(str::to_owned));
        let body = format!("{{\"operator\":\"{}\"}}", who.clone().unwrap_or_default());
        write!(
            tls,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        tls.conn.send_close_notify();
        tls.flush().map_err(|e| e.to_string())?;
        Ok(who)
    });

    let out = Command::new("curl")
        .current_dir(dir.path())
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "10",
            "--cacert",
            "ca.pem",
            "--cert",
            "operator-cert.pem",
            "--key",
            "operator-key.pem",
            &format!("https://localhost:{port}/v1/channels/stable"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "{\"operator\":\"alice\"}"
    );
    assert_eq!(server.join().unwrap().unwrap().as_deref(), Some("alice"));
}
