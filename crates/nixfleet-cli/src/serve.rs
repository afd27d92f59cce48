//! A small static HTTP server over a directory, on loopback: the demo's "forge" (signed
//! artifacts) and its Nix binary cache. GET and HEAD only, ETags for the control plane's
//! conditional polls, timeouts on every connection, and no path outside the directory.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixfleet_trust::jcs;

/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads longer than this are refused (nothing here needs more).
const MAX_HEAD_LINES: usize = 64;

/// Serves `root` on `127.0.0.1:port` until dropped.
pub struct StaticServer {
    pub port: u16,
    pub root: PathBuf,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl StaticServer {
    /// Binds a free loopback port and starts serving `root`.
    pub fn start(root: &Path) -> std::io::Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        // Non-blocking accept, so that the thread notices `stop` without a connection.
        listener.set_nonblocking(true)?;
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, down2, stop2) = (root.to_path_buf(), down.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (dir, down) = (dir.clone(), down2.clone());
                        std::thread::spawn(move || serve_one(stream, &dir, &down));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(StaticServer {
            port,
            root: root.to_path_buf(),
            down,
            stop,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// While down, every request gets 503 (a forge outage).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The file under `root` that a request path names, or `None` when the path tries to
/// leave `root` (`..`, absolute components, backslashes, escapes).
pub fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    let path = request_path.split(['?', '#']).next().unwrap_or("");
    let relative = path.strip_prefix('/')?;
    if relative.contains(['%', '\\', '\0']) {
        return None;
    }
    let relative = Path::new(relative);
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return None;
    }
    Some(root.join(relative))
}

fn serve_one(stream: TcpStream, root: &Path, down: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(reader) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(reader);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut if_none_match = None;
    for _ in 0..MAX_HEAD_LINES {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("if-none-match:") {
            if_none_match = Some(v.trim().to_owned());
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let mut stream = stream;
    let head_only = method == "HEAD";
    let mut reply = |status: &str, headers: &str, body: &[u8]| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        );
        if !head_only {
            let _ = stream.write_all(body);
        }
    };
    if method != "GET" && !head_only {
        return reply("405 Method Not Allowed", "Allow: GET, HEAD\r\n", b"");
    }
    if down.load(Ordering::Relaxed) {
        return reply("503 Service Unavailable", "", b"down");
    }
    let Some(file) = resolve(root, path) else {
        return reply("400 Bad Request", "", b"bad path");
    };
    match std::fs::read(&file) {
        Ok(body) => {
            let etag = format!("\"{}\"", jcs::sha256_hex(&body));
            let headers = format!("ETag: {etag}\r\n");
            if if_none_match.as_deref() == Some(etag.as_str()) {
                reply("304 Not Modified", &headers, b"");
            } else {
                reply("200 OK", &headers, &body);
            }
        }
        Err(_) => reply("404 Not Found", "", b"not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/srv/forge");
        assert_eq!(
            resolve(root, "/rollouts/a.json?x=1"),
            Some(root.join("rollouts/a.json"))
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../b",
            "/%2e%2e/x",
            "/a\\..\\b",
            "relative",
            "//etc/passwd",
        ] {
            assert_eq!(resolve(root, bad), None, "{bad}");
        }
    }

    #[test]
    fn serves_files_with_etags_and_refuses_traversal() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
        let server = StaticServer::start(dir.path()).unwrap();
        let get = |path: &str, extra: &str| {
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out).unwrap();
            out
        };
        let ok = get("/a.txt", "");
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("hello"), "{ok}");
        let etag = ok
            .lines()
            .find_map(|l| l.strip_prefix("ETag: "))
            .unwrap()
            .to_owned();
        let cached = get("/a.txt", &format!("If-None-Match: {etag}\r\n"));
        assert!(cached.starts_with("HTTP/1.1 304"), "{cached}");
        assert!(get("/../a.txt", "").starts_with("HTTP/1.1 400"));
        assert!(get("/missing", "").starts_with("HTTP/1.1 404"));
        server.set_down(true);
        assert!(get("/a.txt", "").starts_with("HTTP/1.1 503"));
    }
}
