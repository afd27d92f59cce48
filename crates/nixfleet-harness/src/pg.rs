//! Throw-away PostgreSQL databases for the high-availability tests, one per test, on the
//! server `scripts/test-postgres` sets up. Everything goes through the `psql` command, so
//! the harness needs no database driver.

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const ENV: &str = "NIXFLEET_TEST_DATABASE_URL";

/// The admin URL of the test server (a superuser connected to the `postgres` database).
pub fn admin_url() -> String {
    match checked_admin_url(std::env::var(ENV).ok()) {
        Ok(url) => url,
        Err(e) => panic!("{e}"),
    }
}

fn checked_admin_url(value: Option<String>) -> Result<String, String> {
    match value {
        // Anything else (say, a tool's chatter captured with the URL) would make psql
        // fall back to the local socket and fail far from the cause.
        Some(url)
            if (url.starts_with("postgres://") || url.starts_with("postgresql://"))
                && !url.contains(char::is_whitespace) =>
        {
            Ok(url)
        }
        Some(url) if !url.is_empty() => Err(format!(
            "{ENV} is not a single postgres:// URL: {:?}; it should be exactly what \
             scripts/test-postgres prints",
            redact(&url)
        )),
        _ => Err(format!(
            "{ENV} is not set; run scripts/test-postgres and export its output \
             (scripts/test does both)"
        )),
    }
}

/// Runs `sql` against the database at `url`; rows of fields, NULL as "". Panics with
/// psql's stderr on failure.
pub fn query(url: &str, sql: &str) -> Vec<Vec<String>> {
    match try_query(url, sql) {
        Ok(rows) => rows,
        Err(e) => panic!("psql {sql:?} on {}: {e}", redact(url)),
    }
}

fn try_query(url: &str, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let out = Command::new("psql")
        // -q leaves out command tags ("CREATE TABLE"), so only result rows are printed.
        .args(["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"])
        .args(["-d", url, "-c", sql])
        // A server that is down fails the test in seconds rather than hanging it.
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .map_err(|e| format!("cannot run psql ({e}); apt-get install -y postgresql-client"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // An empty line is a row of one NULL or empty value, so it is kept.
    Ok(text
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let (head, rest) = split_authority(url);
    match rest.0.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{head}{user}:***@{host}{}", rest.1)
        }
        None => url.to_owned(),
    }
}

/// Splits `scheme://authority/path?query` into (`scheme://`, (authority, `/path?query`)).
fn split_authority(url: &str) -> (&str, (&str, &str)) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    (head, rest.split_at(end))
}

/// `url` with its database replaced by `db` (query parameters kept).
pub fn url_with_database(url: &str, db: &str) -> String {
    let (head, (authority, tail)) = split_authority(url);
    let params = tail.find('?').map_or("", |i| &tail[i..]);
    format!("{head}{authority}/{db}{params}")
}

/// `url` with its port replaced by (or set to) `port`, e.g. to reach the server through a
/// [`crate::relay::TcpRelay`].
pub fn url_with_port(url: &str, port: u16) -> String {
    let (head, (authority, tail)) = split_authority(url);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (&authority[..=u.len()], h),
        None => ("", authority),
    };
    // An IPv6 literal carries colons of its own: the port follows the closing bracket.
    let host = if hostport.starts_with('[') {
        hostport.find(']').map_or(hostport, |i| &hostport[..=i])
    } else {
        hostport.split(':').next().unwrap_or(hostport)
    };
    format!("{head}{userinfo}{host}:{port}{tail}")
}

/// The server's address in `url` (port 5432 when none is given): what a
/// [`crate::relay::TcpRelay`] forwards to.
pub fn server_addr(url: &str) -> SocketAddr {
    let (_, (authority, _)) = split_authority(url);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let with_port = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:5432")
    } else {
        hostport.to_owned()
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve the server of {}", redact(url)))
}

/// A fresh, empty database on the test server, dropped (connections and all) on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A new database named after `prefix`, this process and a counter, so parallel tests
    /// and concurrent test binaries never share one.
    pub fn create(prefix: &str) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // The clock tells apart a reused pid from a run that crashed before cleaning up.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut clean: String = prefix
            .to_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if !clean.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
            clean.insert_str(0, "t_");
        }
        let suffix = format!("_{}_{n}_{nanos:08x}", std::process::id());
        // PostgreSQL truncates identifiers at 63 bytes; keep the unique suffix intact.
        clean.truncate(63 - suffix.len());
        let name = clean + &suffix;
        let db = TestDb {
            url: url_with_database(&admin_url(), &name),
            name,
        };
        query(&admin_url(), &format!("CREATE DATABASE \"{}\"", db.name));
        db
    }

    /// Runs `sql` against this database; rows of fields, NULL as "".
    pub fn query(&self, sql: &str) -> Vec<Vec<String>> {
        query(&self.url, sql)
    }

    /// Drops the database, terminating the sessions still connected to it (the loss of
    /// the database in a disaster-recovery test).
    pub fn drop_database(&self) {
        query(
            &admin_url(),
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
        );
    }

    /// Drops the database and creates it again, empty, under the same name and URL.
    pub fn recreate(&self) {
        self.drop_database();
        query(&admin_url(), &format!("CREATE DATABASE \"{}\"", self.name));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // No panic here: a drop during a failing test's unwind would abort the process.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Ok(url) = std::env::var(ENV) {
            if let Err(e) = try_query(&url, &sql) {
                eprintln!("could not drop test database {}: {e}", self.name);
            }
        }
    }
}

/// A private PostgreSQL server that accepts only TLS connections (`hostssl` in its
/// pg_hba.conf, trust authentication), with the given server certificate and key. It runs
/// as the `postgres` system user (so the tests must run as root), from a temporary data
/// directory, and is stopped and removed on drop.
pub struct TlsServer {
    pub port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

fn postgres_bin(name: &str) -> std::path::PathBuf {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin").join(name))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no /usr/lib/postgresql/*/bin/{name}; apt-get install -y postgresql")
    })
}

fn as_postgres(program: &std::path::Path) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(program);
    cmd
}

impl TlsServer {
    /// Starts the server; `user` is its superuser (no password: trust over TLS).
    pub fn start(cert_pem: &str, key_pem: &str, user: &str) -> TlsServer {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nixfleet-pg-tls-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("TlsServer: create its directory");
        std::fs::write(dir.join("server.crt"), cert_pem).expect("TlsServer: write server.crt");
        std::fs::write(dir.join("server.key"), key_pem).expect("TlsServer: write server.key");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("TlsServer: run chown");
        assert!(chown.success(), "TlsServer needs root (chown to postgres)");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("TlsServer: chmod server.key");
        let data = dir.join("data");
        let out = as_postgres(&postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", user, "--auth=trust", "--no-sync"])
            .output()
            .expect("TlsServer: run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // TLS connections only: a plain one matches no line and is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .expect("TlsServer: write pg_hba.conf");
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("postgres.log")).expect("TlsServer: log");
        let child = as_postgres(&postgres_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "ssl=on", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                dir.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!("ssl_key_file={}", dir.join("server.key").display()))
            .stdout(log.try_clone().expect("TlsServer: log"))
            .stderr(log)
            .spawn()
            .expect("TlsServer: start postgres");
        let server = TlsServer {
            port,
            dir,
            child: Some(child),
        };
        let start = std::time::Instant::now();
        while !Command::new(postgres_bin("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "private PostgreSQL not ready after 30 s:\n{}",
                server.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT to the postmaster itself (not to runuser) is a fast shutdown.
            let postmaster = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_else(|| child.id().to_string());
            let _ = Command::new("kill").args(["-INT", &postmaster]).status();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::checked_admin_url;

    #[test]
    fn the_admin_url_must_be_exactly_one_postgres_url() {
        let url = "postgres://nixfleet:nixfleet@127.0.0.1:5432/postgres";
        assert_eq!(checked_admin_url(Some(url.into())).as_deref(), Ok(url));
        let chatter = format!("Removed stale pid file.\n{url}");
        let err = checked_admin_url(Some(chatter)).unwrap_err();
        assert!(err.contains("not a single postgres:// URL"), "{err}");
        assert!(
            !err.contains("nixfleet:nixfleet@"),
            "password leaked: {err}"
        );
        let err = checked_admin_url(None).unwrap_err();
        assert!(err.contains("is not set"), "{err}");
    }
}
