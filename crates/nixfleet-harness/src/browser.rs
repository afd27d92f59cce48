//! A real browser for tests: headless Chromium (Debian package `chromium`) loading a
//! page and handing back its DOM after scripts ran, or a screenshot. Also a plain HTTP
//! GET for waiting on a page without starting a browser.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `chromium` binary, if installed.
pub fn chromium() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    })
}

/// Runs headless Chromium with `args` (and a throwaway profile); returns its stdout.
/// Panics after 90 s or when it fails.
fn run_chromium(args: &[String]) -> String {
    let bin = chromium().expect("chromium is not installed (apt-get install -y chromium)");
    let profile = tempfile::tempdir().unwrap();
    let out_file = profile.path().join("stdout");
    let err_file = profile.path().join("stderr");
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("p").display()
        ))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {args:?} took over 90 s:\n{}",
                std::fs::read_to_string(&err_file).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium {args:?}: {status}\n{}",
        std::fs::read_to_string(&err_file).unwrap_or_default()
    );
    std::fs::read_to_string(&out_file).unwrap()
}

/// The DOM of `url` once loaded and its scripts have had `virtual_ms` of (virtual) time.
pub fn dump_dom(url: &str, virtual_ms: Option<u64>) -> String {
    let mut args = vec!["--dump-dom".to_owned()];
    if let Some(ms) = virtual_ms {
        args.push(format!("--virtual-time-budget={ms}"));
    }
    args.push(url.to_owned());
    run_chromium(&args)
}

/// A PNG of `url` at `width`×`height` CSS pixels, written to `path`.
pub fn screenshot(url: &str, path: &Path, width: u32, height: u32) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let _ = std::fs::remove_file(path);
    run_chromium(&[
        format!("--screenshot={}", path.display()),
        format!("--window-size={width},{height}"),
        url.to_owned(),
    ]);
    assert!(
        path.exists(),
        "chromium wrote no screenshot to {}",
        path.display()
    );
}

/// The width and height of a PNG file, from its header.
pub fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (word(16), word(20))
}

/// A plain HTTP/1.0 answer: status, lower-cased headers, body.
pub struct Page {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from a plain-HTTP server on `addr` (the dashboard), with `host` as the
/// Host header. Err when the server does not answer.
pub fn http_get_as(addr: SocketAddr, host: &str, path: &str) -> Result<Page, String> {
    http_request(addr, "GET", host, path)
}

/// `METHOD path` (no body) from a plain-HTTP server on `addr`, with `host` as the Host
/// header. Err when the server does not answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
) -> Result<Page, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Page {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// `GET path` from `addr` as a browser on this machine would ask it.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Page, String> {
    http_get_as(addr, &addr.to_string(), path)
}
