//! The high-availability test infrastructure itself: throw-away PostgreSQL databases, the
//! cuttable TCP relay, and HAProxy in front of several backends.
//! The database tests need NIXFLEET_TEST_DATABASE_URL (scripts/test-postgres prints it).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixfleet_harness::haproxy::{Check, Haproxy};
use nixfleet_harness::pg::{self, TestDb};
use nixfleet_harness::relay::TcpRelay;
use nixfleet_harness::wait_for;

/// A line echo server on loopback: answers each line with "<id> <line>", so a test can
/// tell which backend answered. Stops accepting on drop.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(id: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let id = id.to_owned();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let id = id.clone();
                    std::thread::spawn(move || {
                        let mut writer = conn.try_clone().unwrap();
                        let mut line = String::new();
                        let mut reader = BufReader::new(conn);
                        while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                            if writer.write_all(format!("{id} {line}").as_bytes()).is_err() {
                                break;
                            }
                            line.clear();
                        }
                    });
                }
            })
        };
        Echo {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept so the thread sees `stop` and closes the listener.
        let _ = TcpStream::connect(self.addr());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connection that sends lines and reads the answers; `None` once it is cut.
struct Line {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Line {
    fn open(port: u16) -> Option<Line> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        // A hang fails the test instead of blocking it.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Some(Line {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        })
    }

    fn ask(&mut self, msg: &str) -> Option<String> {
        self.writer.write_all(format!("{msg}\n").as_bytes()).ok()?;
        self.read()
    }

    /// The next answer line; `None` on EOF or reset. A timeout is neither: it panics.
    fn read(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end().to_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no answer and no close within 5 s")
            }
            Err(_) => None,
        }
    }
}

/// One question on a fresh connection.
fn exchange(port: u16, msg: &str) -> Option<String> {
    Line::open(port)?.ask(msg)
}

fn databases() -> Vec<String> {
    pg::query(&pg::admin_url(), "SELECT datname FROM pg_database")
        .into_iter()
        .map(|row| row[0].clone())
        .collect()
}

#[test]
fn url_rewriting_keeps_credentials_host_and_parameters() {
    let url = "postgres://nixfleet:nixfleet@127.0.0.1:5432/postgres";
    assert_eq!(
        pg::url_with_port(url, 6543),
        "postgres://nixfleet:nixfleet@127.0.0.1:6543/postgres"
    );
    assert_eq!(
        pg::url_with_port("postgresql://u:p@db.example:5432/x?sslmode=disable", 1),
        "postgresql://u:p@db.example:1/x?sslmode=disable"
    );
    assert_eq!(
        pg::url_with_port("postgres://u@[::1]:5432/x", 7),
        "postgres://u@[::1]:7/x"
    );
    assert_eq!(
        pg::url_with_port("postgres://u@localhost/x", 7),
        "postgres://u@localhost:7/x"
    );
    assert_eq!(
        pg::url_with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t_1"),
        "postgres://u:p@h:5432/t_1?sslmode=disable"
    );
    assert_eq!(
        pg::url_with_database("postgres://u:p@h:5432", "t_1"),
        "postgres://u:p@h:5432/t_1"
    );
    assert_eq!(
        pg::server_addr(url),
        SocketAddr::from(([127, 0, 0, 1], 5432))
    );
    assert_eq!(
        pg::server_addr("postgres://u@[::1]/x"),
        "[::1]:5432".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn test_databases_are_fresh_queryable_recreatable_and_dropped() {
    let db = TestDb::create("Infra-Test");
    let other = TestDb::create("Infra-Test");
    assert_ne!(db.name, other.name);
    for name in [&db.name, &other.name] {
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.starts_with("infra_test_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
    }
    assert!(db.url.ends_with(&format!("/{}", db.name)), "{}", db.url);
    assert!(databases().contains(&db.name));

    db.query("CREATE TABLE t (id int, note text); INSERT INTO t VALUES (1, 'x'), (2, NULL)");
    assert_eq!(
        db.query("SELECT id, note FROM t ORDER BY id"),
        vec![vec!["1", "x"], vec!["2", ""]]
    );
    // Each database is its own: the other one has no table t.
    assert_eq!(other.query("SELECT to_regclass('t')"), vec![vec![""]]);

    // A session still connected (a replica, in the recovery test) does not stop it.
    let mut session = Command::new("psql")
        .args(["-X", "-q", "-d", &db.url, "-c", "SELECT pg_sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sessions = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
        db.name
    );
    wait_for("the psql session", Duration::from_secs(10), || {
        pg::query(&pg::admin_url(), &sessions) == vec![vec!["1"]]
    });
    db.recreate();
    assert_eq!(db.query("SELECT to_regclass('t')"), vec![vec![""]]);
    assert_eq!(
        db.query("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
        vec![vec!["0"]]
    );
    // Its session was terminated, not waited for.
    wait_for("psql to exit", Duration::from_secs(10), || {
        session.try_wait().unwrap().is_some()
    });

    db.drop_database();
    assert!(!databases().contains(&db.name));
    let name = other.name.clone();
    drop(other);
    assert!(!databases().contains(&name));
    // Dropping after drop_database is harmless.
    drop(db);
}

#[test]
#[should_panic(expected = "psql")]
fn a_failing_query_panics_with_the_error() {
    let db = TestDb::create("infra_fail");
    db.query("SELECT * FROM no_such_table");
}

#[test]
fn the_relay_forwards_until_severed_and_again_once_restored() {
    let echo = Echo::start("e");
    let relay = TcpRelay::start(echo.addr());

    let mut first = Line::open(relay.port).unwrap();
    let mut second = Line::open(relay.port).unwrap();
    assert_eq!(first.ask("one").as_deref(), Some("e one"));
    assert_eq!(second.ask("two").as_deref(), Some("e two"));
    // More than a socket buffer's worth goes through intact.
    let long = "x".repeat(1 << 20);
    assert_eq!(first.ask(&long), Some(format!("e {long}")));
    assert_eq!(relay.live_connections(), 2);

    relay.sever();
    assert_eq!(relay.live_connections(), 0);
    // Established connections are cut: EOF or reset, no answer.
    assert_eq!(first.read(), None);
    assert_eq!(second.ask("after").as_deref(), None);
    // New ones are accepted and closed at once.
    for _ in 0..3 {
        assert_eq!(exchange(relay.port, "new"), None);
    }

    relay.restore();
    assert_eq!(exchange(relay.port, "back").as_deref(), Some("e back"));
    let mut third = Line::open(relay.port).unwrap();
    assert_eq!(third.ask("three").as_deref(), Some("e three"));

    // Dropped, it no longer forwards anything.
    let port = relay.port;
    drop(relay);
    assert_eq!(exchange(port, "gone"), None);
    assert_eq!(third.read(), None);
}

#[test]
fn the_relay_reaches_postgres() {
    let db = TestDb::create("infra_relay");
    let relay = TcpRelay::start(pg::server_addr(&db.url));
    let through = pg::url_with_port(&db.url, relay.port);
    assert_eq!(pg::query(&through, "SELECT 1"), vec![vec!["1"]]);
    relay.sever();
    let cut = Command::new("psql")
        .args(["-X", "-d", &through, "-c", "SELECT 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .unwrap();
    assert!(!cut.status.success());
    relay.restore();
    assert_eq!(pg::query(&through, "SELECT 1"), vec![vec!["1"]]);
}

#[test]
fn haproxy_config_has_the_documented_shape() {
    let cfg = Haproxy::config_text(8443, &[9001, 9002]);
    for line in [
        "maxconn 20000",
        "mode tcp",
        "timeout connect 2s",
        "timeout client 120s",
        "timeout server 120s",
        "bind 127.0.0.1:8443",
        "balance roundrobin",
        "option redispatch",
        "retries 2",
        "server cp1 127.0.0.1:9001 check check-ssl verify none inter 500ms fall 2 rise 1",
        "server cp2 127.0.0.1:9002 check check-ssl verify none inter 500ms fall 2 rise 1",
    ] {
        assert!(
            cfg.lines().any(|l| l.trim() == line),
            "{line} missing:\n{cfg}"
        );
    }
    assert!(!cfg.contains("daemon"), "{cfg}");
}

#[test]
fn haproxy_round_robins_and_routes_around_a_dead_backend() {
    let dir = tempfile::tempdir().unwrap();
    let a = Echo::start("a");
    let b = Echo::start("b");
    let haproxy = Haproxy::start_with(dir.path(), &[a.port, b.port], Check::Tcp);
    assert!(haproxy.config.exists());

    // Both servers are in rotation once HAProxy has checked them.
    let mut seen = std::collections::BTreeSet::new();
    wait_for("both backends to answer", Duration::from_secs(10), || {
        if let Some(answer) = exchange(haproxy.port, "hi") {
            seen.insert(answer);
        }
        seen.len() == 2
    });
    let answers: Vec<String> = (0..6)
        .map(|_| exchange(haproxy.port, "hi").expect("an answer through haproxy"))
        .collect();
    let from_a = answers.iter().filter(|s| *s == "a hi").count();
    let from_b = answers.iter().filter(|s| *s == "b hi").count();
    assert_eq!((from_a, from_b), (3, 3), "{answers:?}");
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{answers:?}");

    // A connection through HAProxy stays with its backend.
    let mut line = Line::open(haproxy.port).unwrap();
    let first = line.ask("x").unwrap();
    assert_eq!(line.ask("x").unwrap(), first);

    // With one backend gone, every new connection lands on the other.
    drop(a);
    for _ in 0..6 {
        assert_eq!(
            exchange(haproxy.port, "hi").as_deref(),
            Some("b hi"),
            "{}",
            haproxy.log_text()
        );
    }
    wait_for("haproxy to mark cp1 down", Duration::from_secs(10), || {
        haproxy.log_text().contains("cp1 is DOWN")
    });
    drop(b);
}
