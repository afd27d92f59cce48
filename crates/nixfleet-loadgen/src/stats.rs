//! What a run measured: counters, HDR latency histograms, errors by kind, and the
//! summary printed for people and written as JSON for scripts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::ErrorKind;

/// Latencies are recorded in microseconds up to a minute, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub struct Stats {
    pub started: Instant,
    pub hosts: usize,
    pub checkins_ok: AtomicU64,
    pub confirms_ok: AtomicU64,
    pub confirms_gone: AtomicU64,
    pub reports_ok: AtomicU64,
    pub targets_received: AtomicU64,
    pub rollbacks_received: AtomicU64,
    pub activations_failed: AtomicU64,
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    proofs_ok: AtomicU64,
    proofs_refused: AtomicU64,
    proof_bytes: AtomicU64,
    proof_bytes_max: AtomicU64,
    proof_verify: Mutex<Histogram<u64>>,
    first_refusal: OnceLock<String>,
    visible: AtomicUsize,
    all_visible_after: OnceLock<Duration>,
    checkin_latency: Mutex<Histogram<u64>>,
    checkin_latency_measured: Mutex<Histogram<u64>>,
    confirm_latency: Mutex<Histogram<u64>>,
    connect_latency: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<ErrorKind, u64>>,
    /// Check-ins completed in each second of the run.
    per_second: Vec<AtomicU64>,
    warmup: Duration,
    checkins_measured: AtomicU64,
    /// This process's CPU time when the run started (certificate minting is before).
    cpu_at_start: Option<f64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stats {
    pub fn new(hosts: usize, duration: Duration, warmup: Duration) -> Stats {
        Stats {
            started: Instant::now(),
            hosts,
            checkins_ok: AtomicU64::new(0),
            confirms_ok: AtomicU64::new(0),
            confirms_gone: AtomicU64::new(0),
            reports_ok: AtomicU64::new(0),
            targets_received: AtomicU64::new(0),
            rollbacks_received: AtomicU64::new(0),
            activations_failed: AtomicU64::new(0),
            tls_full: AtomicU64::new(0),
            tls_resumed: AtomicU64::new(0),
            proofs_ok: AtomicU64::new(0),
            proofs_refused: AtomicU64::new(0),
            proof_bytes: AtomicU64::new(0),
            proof_bytes_max: AtomicU64::new(0),
            proof_verify: Mutex::new(histogram()),
            first_refusal: OnceLock::new(),
            visible: AtomicUsize::new(0),
            all_visible_after: OnceLock::new(),
            checkin_latency: Mutex::new(histogram()),
            checkin_latency_measured: Mutex::new(histogram()),
            confirm_latency: Mutex::new(histogram()),
            connect_latency: Mutex::new(histogram()),
            errors: Mutex::new(BTreeMap::new()),
            per_second: (0..duration.as_secs() + 60)
                .map(|_| AtomicU64::new(0))
                .collect(),
            warmup,
            checkins_measured: AtomicU64::new(0),
            cpu_at_start: process_cpu_secs(),
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// A host's first successful check-in.
    pub fn host_visible(&self) {
        if self.visible.fetch_add(1, Relaxed) + 1 == self.hosts {
            let _ = self.all_visible_after.set(self.started.elapsed());
        }
    }

    pub fn checkin_ok(&self, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let elapsed = self.started.elapsed();
        self.checkins_ok.fetch_add(1, Relaxed);
        if let Some(slot) = self.per_second.get(elapsed.as_secs() as usize) {
            slot.fetch_add(1, Relaxed);
        }
        let _ = lock(&self.checkin_latency).record(micros.max(1));
        if elapsed >= self.warmup {
            self.checkins_measured.fetch_add(1, Relaxed);
            let _ = lock(&self.checkin_latency_measured).record(micros.max(1));
        }
    }

    pub fn confirm_latency(&self, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let _ = lock(&self.confirm_latency).record(micros.max(1));
    }

    /// TCP connect plus TLS handshake, when a request opened a connection.
    pub fn connect_latency(&self, latency: Duration) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let _ = lock(&self.connect_latency).record(micros.max(1));
    }

    /// A host proof fetched (`bytes`: the answer's head and body) and passed through the
    /// agent's gate in `verify`.
    pub fn proof(&self, verify: Duration, bytes: usize, believed: bool) {
        let micros = verify.as_micros().min(u128::from(u64::MAX)) as u64;
        let _ = lock(&self.proof_verify).record(micros.max(1));
        self.proof_bytes.fetch_add(bytes as u64, Relaxed);
        self.proof_bytes_max.fetch_max(bytes as u64, Relaxed);
        Stats::inc(if believed {
            &self.proofs_ok
        } else {
            &self.proofs_refused
        });
    }

    /// The first reason a gate refused, for the summary.
    pub fn refusal(&self, reason: &str) {
        let _ = self.first_refusal.set(reason.to_owned());
    }

    pub fn error(&self, kind: ErrorKind) {
        *lock(&self.errors).entry(kind).or_default() += 1;
    }

    pub fn summary(&self, config: RunInfo, elapsed: Duration) -> Summary {
        let measured_secs = elapsed.saturating_sub(self.warmup).as_secs_f64();
        let measured = self.checkins_measured.load(Relaxed);
        let whole = lock(&self.checkin_latency).clone();
        let steady = lock(&self.checkin_latency_measured).clone();
        let full_seconds = elapsed.as_secs() as usize;
        let mut per_second: Vec<u64> = self.per_second[..full_seconds.min(self.per_second.len())]
            .iter()
            .skip(self.warmup.as_secs() as usize)
            .map(|c| c.load(Relaxed))
            .collect();
        per_second.sort_unstable();
        let errors: BTreeMap<String, u64> = lock(&self.errors)
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        Summary {
            run: config,
            elapsed_secs: elapsed.as_secs_f64(),
            checkins_ok: self.checkins_ok.load(Relaxed),
            checkins_per_sec: if measured_secs > 0.0 {
                measured as f64 / measured_secs
            } else {
                0.0
            },
            checkins_per_sec_peak: per_second.last().copied().unwrap_or(0),
            checkins_per_sec_median: per_second.get(per_second.len() / 2).copied().unwrap_or(0),
            latency_ms: Percentiles::of(&steady),
            latency_ms_whole_run: Percentiles::of(&whole),
            confirm_latency_ms: Percentiles::of(&lock(&self.confirm_latency)),
            connect_latency_ms: Percentiles::of(&lock(&self.connect_latency)),
            confirms_ok: self.confirms_ok.load(Relaxed),
            confirms_gone: self.confirms_gone.load(Relaxed),
            reports_ok: self.reports_ok.load(Relaxed),
            targets_received: self.targets_received.load(Relaxed),
            rollbacks_received: self.rollbacks_received.load(Relaxed),
            activations_failed: self.activations_failed.load(Relaxed),
            tls_handshakes_full: self.tls_full.load(Relaxed),
            tls_handshakes_resumed: self.tls_resumed.load(Relaxed),
            proofs: Proofs {
                verified: self.proofs_ok.load(Relaxed),
                refused: self.proofs_refused.load(Relaxed),
                first_refusal: self.first_refusal.get().cloned(),
                bytes_total: self.proof_bytes.load(Relaxed),
                bytes_max: self.proof_bytes_max.load(Relaxed),
                verify_ms: Percentiles::of(&lock(&self.proof_verify)),
            },
            hosts_visible: self.visible.load(Relaxed),
            all_visible_secs: self.all_visible_after.get().map(Duration::as_secs_f64),
            errors_total: errors.values().sum(),
            errors,
            loadgen_cpu_secs: process_cpu_secs()
                .zip(self.cpu_at_start)
                .map(|(end, start)| end - start),
        }
    }
}

/// The run's settings, echoed in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub hosts: usize,
    pub mode: String,
    pub interval_secs: Option<f64>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub failure_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run: RunInfo,
    pub elapsed_secs: f64,
    /// Every check-in answered 200, warm-up included (what the CP's counter saw).
    pub checkins_ok: u64,
    /// Check-ins per second after the warm-up.
    pub checkins_per_sec: f64,
    pub checkins_per_sec_peak: u64,
    pub checkins_per_sec_median: u64,
    /// Check-in latency after the warm-up (connect and handshake included when the mode
    /// opens a connection per check-in).
    pub latency_ms: Percentiles,
    pub latency_ms_whole_run: Percentiles,
    pub confirm_latency_ms: Percentiles,
    /// TCP connect and TLS handshake alone (the part of a check-in before the request).
    pub connect_latency_ms: Percentiles,
    pub confirms_ok: u64,
    pub confirms_gone: u64,
    pub reports_ok: u64,
    pub targets_received: u64,
    pub rollbacks_received: u64,
    pub activations_failed: u64,
    pub tls_handshakes_full: u64,
    pub tls_handshakes_resumed: u64,
    /// What dispatched hosts fetched to believe their target (with `--trust-file`).
    pub proofs: Proofs,
    pub hosts_visible: usize,
    /// From the start of the run until every host had one successful check-in.
    pub all_visible_secs: Option<f64>,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    /// CPU time (user + system) of this process during the run (minting excluded).
    pub loadgen_cpu_secs: Option<f64>,
}

/// Host proofs: fetched, verified by the agent's gate, their size and verification time.
#[derive(Debug, Clone, Serialize)]
pub struct Proofs {
    pub verified: u64,
    pub refused: u64,
    pub first_refusal: Option<String>,
    /// HTTP head and body of every proof answer (TLS records not included).
    pub bytes_total: u64,
    pub bytes_max: u64,
    pub verify_ms: Percentiles,
}

impl Summary {
    pub fn human(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "{} hosts, {} mode, {:.1} s: {} check-ins ok, {:.0}/s (median second {}, peak {})\n\
             check-in latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             connect + handshake ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
             TLS handshakes: {} full, {} resumed\n\
             targets {}  confirms {} (gone {})  activation failures {}  reports {}  rollbacks {}\n\
             hosts visible {}/{}{}\n\
             errors: {}",
            self.run.hosts,
            self.run.mode,
            self.elapsed_secs,
            self.checkins_ok,
            self.checkins_per_sec,
            self.checkins_per_sec_median,
            self.checkins_per_sec_peak,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.connect_latency_ms.p50,
            self.connect_latency_ms.p99,
            self.connect_latency_ms.p999,
            self.connect_latency_ms.max,
            self.tls_handshakes_full,
            self.tls_handshakes_resumed,
            self.targets_received,
            self.confirms_ok,
            self.confirms_gone,
            self.activations_failed,
            self.reports_ok,
            self.rollbacks_received,
            self.hosts_visible,
            self.run.hosts,
            self.all_visible_secs
                .map(|s| format!(" (all after {s:.1} s)"))
                .unwrap_or_default(),
            self.errors_total,
        );
        for (kind, n) in &self.errors {
            out.push_str(&format!("  {kind} {n}"));
        }
        let p = &self.proofs;
        if p.verified + p.refused > 0 {
            out.push_str(&format!(
                "\nhost proofs: {} verified, {} refused; {} bytes in all, {} at most; verify ms p50 {:.3}  p99 {:.3}  max {:.3}",
                p.verified, p.refused, p.bytes_total, p.bytes_max, p.verify_ms.p50, p.verify_ms.p99, p.verify_ms.max
            ));
            if let Some(r) = &p.first_refusal {
                out.push_str(&format!("\nfirst refusal: {r}"));
            }
        }
        if let Some(cpu) = self.loadgen_cpu_secs {
            out.push_str(&format!("\nload generator CPU: {cpu:.1} s"));
        }
        out
    }
}

/// utime + stime of this process from /proc (Linux; clock ticks are 1/100 s there).
pub fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields after it are fixed.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
