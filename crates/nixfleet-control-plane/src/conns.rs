//! Connection accounting for the HTTPS listener: a cap on open connections overall and per
//! source address, an idle limit that holds for HTTP/1.1 and HTTP/2 alike, and, when the
//! overall cap is reached, room made by closing the connection idle the longest.
//!
//! A connection is idle while none of its requests is in flight (a response counts as in
//! flight until its body is sent). That covers the TLS handshake, a kept-alive HTTP/1.1
//! connection between requests, and an HTTP/2 connection with no open stream, which hyper
//! would otherwise keep for as long as the peer answers pings.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Descriptors kept back from the connection cap for the database, the audit log,
/// artifact fetches and the event hook.
const RESERVED_FILES: u64 = 128;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// 0: no limit per source.
    pub max_per_source: usize,
    pub idle: Duration,
}

impl Limits {
    /// `--max-connections 0` means: as many as the open-file limit leaves room for.
    pub fn resolve(max_connections: u64, max_per_source: u64, idle: Duration) -> (Limits, u64) {
        let files = open_file_limit();
        let auto = files.saturating_sub(RESERVED_FILES.max(files / 8)).max(16);
        let max = if max_connections == 0 {
            auto
        } else {
            max_connections
        };
        let limits = Limits {
            max_connections: usize::try_from(max).unwrap_or(usize::MAX),
            max_per_source: usize::try_from(max_per_source).unwrap_or(usize::MAX),
            idle,
        };
        (limits, files)
    }
}

/// Raises the soft open-file limit to the hard one (the soft default of 1,024 is far
/// below what a control plane serving thousands of agents needs) and returns it.
fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    lim.rlim_cur
}

/// Connections from one IPv6 /64 count as one source: whoever holds one address of a
/// prefix usually holds all of it.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut seg = v6.segments();
            seg[4..].fill(0);
            IpAddr::V6(seg.into())
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    Overall,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PerSource => "per-source",
            Refusal::Overall => "overall",
        }
    }
}

pub struct Registry {
    limits: Limits,
    metrics: Arc<Metrics>,
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
    per_source: HashMap<IpAddr, usize>,
}

pub struct Conn {
    id: u64,
    source: IpAddr,
    in_flight: AtomicUsize,
    /// Milliseconds since the registry's epoch when the connection last became idle.
    idle_since: AtomicU64,
    /// Fired to make the connection's task drop it.
    close: Notify,
}

impl Conn {
    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, registry: &Arc<Registry>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight {
            conn: self.clone(),
            registry: registry.clone(),
        }
    }

    /// Resolves once the registry has closed this connection (idle too long, or the
    /// oldest idle one when the cap was reached).
    pub async fn closed(&self) {
        self.close.notified().await
    }
}

pub struct InFlight {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.registry.now_ms(), Relaxed);
        self.conn.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A connection's place under the caps; dropping it frees the place.
pub struct Slot {
    pub conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        self.registry
            .forget(&mut inner, self.conn.id, self.conn.source);
    }
}

impl Registry {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            metrics,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing done under the lock can leave the maps half-updated.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, inner: &mut Inner, id: u64, source: IpAddr) {
        if inner.open.remove(&id).is_none() {
            return;
        }
        if let Some(n) = inner.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                inner.per_source.remove(&source);
            }
        }
        self.metrics
            .connections_open
            .store(inner.open.len() as u64, Relaxed);
    }

    /// Takes a place for a new connection from `ip`, or says why there is none. At the
    /// overall cap the connection idle the longest is closed to make room; only when every
    /// connection has a request in flight is the new one refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = source_key(ip);
        let mut inner = self.lock();
        let from_source = inner.per_source.get(&source).copied().unwrap_or(0);
        if self.limits.max_per_source > 0 && from_source >= self.limits.max_per_source {
            Metrics::inc(&self.metrics.connections_refused_per_source);
            return Err(Refusal::PerSource);
        }
        if inner.open.len() >= self.limits.max_connections {
            let victim = inner
                .open
                .values()
                .filter(|c| c.in_flight.load(Relaxed) == 0)
                .min_by_key(|c| c.idle_since.load(Relaxed))
                .cloned();
            let Some(victim) = victim else {
                Metrics::inc(&self.metrics.connections_refused_overall);
                return Err(Refusal::Overall);
            };
            self.forget(&mut inner, victim.id, victim.source);
            victim.close.notify_one();
            Metrics::inc(&self.metrics.connections_closed_evicted);
        }
        inner.next_id += 1;
        let conn = Arc::new(Conn {
            id: inner.next_id,
            source,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        inner.open.insert(conn.id, conn.clone());
        *inner.per_source.entry(source).or_insert(0) += 1;
        self.metrics
            .connections_open
            .store(inner.open.len() as u64, Relaxed);
        Ok(Slot {
            conn,
            registry: self.clone(),
        })
    }

    /// Closes every connection idle for longer than the limit; returns how many.
    pub fn close_idle(&self) -> usize {
        let limit = u64::try_from(self.limits.idle.as_millis()).unwrap_or(u64::MAX);
        let now = self.now_ms();
        let mut inner = self.lock();
        let stale: Vec<Arc<Conn>> = inner
            .open
            .values()
            .filter(|c| {
                c.in_flight.load(Relaxed) == 0
                    && now.saturating_sub(c.idle_since.load(Relaxed)) >= limit
            })
            .cloned()
            .collect();
        for conn in &stale {
            self.forget(&mut inner, conn.id, conn.source);
            conn.close.notify_one();
        }
        self.metrics
            .connections_closed_idle
            .fetch_add(stale.len() as u64, Relaxed);
        stale.len()
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize, per_source: usize) -> Arc<Registry> {
        Registry::new(
            Limits {
                max_connections: max,
                max_per_source: per_source,
                idle: Duration::from_millis(0),
            },
            Arc::new(Metrics::default()),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_over_its_cap_is_refused_and_others_are_not() {
        let r = registry(10, 2);
        let _a = r.admit(ip("10.0.0.1")).unwrap();
        let b = r.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(r.admit(ip("10.0.0.1")).err(), Some(Refusal::PerSource));
        let _c = r.admit(ip("10.0.0.2")).unwrap();
        drop(b);
        let _d = r.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(r.metrics.connections_refused_per_source.load(Relaxed), 1);
        assert_eq!(r.metrics.connections_open.load(Relaxed), 3);
    }

    #[test]
    fn addresses_of_one_v6_prefix_and_mapped_v4_count_as_one_source() {
        let r = registry(10, 1);
        let _a = r.admit(ip("2001:db8::1")).unwrap();
        assert!(r.admit(ip("2001:db8::ffff:2")).is_err());
        assert!(r.admit(ip("2001:db8:0:1::1")).is_ok());
        let _b = r.admit(ip("192.0.2.1")).unwrap();
        assert!(r.admit(ip("::ffff:192.0.2.1")).is_err());
    }

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let r = registry(2, 0);
        let first = r.admit(ip("10.0.0.1")).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let second = r.admit(ip("10.0.0.1")).unwrap();
        let _third = r.admit(ip("10.0.0.2")).unwrap();
        // The first was closed: its task is woken, and its place is free already.
        assert!(futures_ready(first.conn.closed()));
        assert!(!futures_ready(second.conn.closed()));
        assert_eq!(r.metrics.connections_open.load(Relaxed), 2);
        assert_eq!(r.metrics.connections_closed_evicted.load(Relaxed), 1);
        drop(first);
        assert_eq!(r.metrics.connections_open.load(Relaxed), 2);
    }

    #[test]
    fn busy_connections_are_never_closed_to_make_room() {
        let r = registry(1, 0);
        let busy = r.admit(ip("10.0.0.1")).unwrap();
        let request = busy.conn.begin(&r);
        assert_eq!(r.admit(ip("10.0.0.2")).err(), Some(Refusal::Overall));
        assert_eq!(r.close_idle(), 0);
        drop(request);
        assert_eq!(r.close_idle(), 1);
        assert!(futures_ready(busy.conn.closed()));
        assert!(r.admit(ip("10.0.0.2")).is_ok());
    }

    fn futures_ready(fut: impl std::future::Future<Output = ()>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(fut);
        fut.as_mut().poll(&mut cx).is_ready()
    }
}
