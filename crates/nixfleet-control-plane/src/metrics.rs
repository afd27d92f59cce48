//! Prometheus counters, kept as atomics so the check-in path never takes a lock for them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use time::OffsetDateTime;

use crate::clock::unix;

/// Request latency buckets, seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];
/// Reconcile tick duration buckets, seconds (the target is a tick under 200 ms).
const TICK_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    pub checkins_ok: AtomicU64,
    pub checkins_refused: AtomicU64,
    pub targets_sent: AtomicU64,
    pub rollbacks_sent: AtomicU64,
    pub confirms_ok: AtomicU64,
    pub confirms_gone: AtomicU64,
    pub enrollments: AtomicU64,
    pub renewals: AtomicU64,
    pub reports: AtomicU64,
    pub reports_dropped_size: AtomicU64,
    pub reports_dropped_rate: AtomicU64,
    pub evidence_ok: AtomicU64,
    pub evidence_refused_signature: AtomicU64,
    pub evidence_refused_host: AtomicU64,
    pub evidence_refused_replay: AtomicU64,
    pub evidence_refused_shape: AtomicU64,
    pub evidence_refused_before_activation: AtomicU64,
    pub evidence_refused_future: AtomicU64,
    pub evidence_refused_rate: AtomicU64,
    pub channel_refs_ok: AtomicU64,
    pub channel_refs_failed: AtomicU64,
    pub channel_refs_last_success: AtomicU64,
    pub revocations_ok: AtomicU64,
    pub revocations_failed: AtomicU64,
    pub revocations_last_success: AtomicU64,
    pub hook_ok: AtomicU64,
    pub hook_failed: AtomicU64,
    pub hook_dropped: AtomicU64,
    pub revoked_refusals: AtomicU64,
    pub host_proofs_served: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused_per_source: AtomicU64,
    pub connections_refused_overall: AtomicU64,
    pub connections_closed_idle: AtomicU64,
    pub connections_closed_evicted: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    tick_buckets: [AtomicU64; TICK_BUCKETS.len()],
    tick_count: AtomicU64,
    tick_sum_micros: AtomicU64,
    /// Hosts Dispatched through Healthy after the last tick, and the most seen since start:
    /// only a tick dispatches, so the maximum over ticks is the peak in flight.
    pub hosts_in_flight: AtomicU64,
    pub hosts_in_flight_max: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn observe_latency(&self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    pub fn observe_tick(&self, seconds: f64, in_flight: u64) {
        for (i, bound) in TICK_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.tick_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.tick_count.fetch_add(1, Relaxed);
        self.tick_sum_micros
            .fetch_add((seconds * 1e6) as u64, Relaxed);
        self.hosts_in_flight.store(in_flight, Relaxed);
        self.hosts_in_flight_max.fetch_max(in_flight, Relaxed);
    }

    /// Prometheus text exposition; gauges that come from state are passed in.
    pub fn render(
        &self,
        fleet_signed_at: Option<OffsetDateTime>,
        revocations: usize,
        hosts_seen: usize,
    ) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, labels: &[(&str, &AtomicU64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, value) in labels {
                let _ = writeln!(out, "{name}{label} {}", value.load(Relaxed));
            }
        };
        counter(
            "nixfleet_checkins_total",
            "Agent check-ins by result.",
            &[
                ("{result=\"ok\"}", &self.checkins_ok),
                ("{result=\"refused\"}", &self.checkins_refused),
            ],
        );
        counter(
            "nixfleet_targets_sent_total",
            "Check-in answers carrying a target.",
            &[("", &self.targets_sent)],
        );
        counter(
            "nixfleet_rollbacks_sent_total",
            "Check-in answers carrying a rollback signal.",
            &[("", &self.rollbacks_sent)],
        );
        counter(
            "nixfleet_confirms_total",
            "Activation confirms by result.",
            &[
                ("{result=\"accepted\"}", &self.confirms_ok),
                ("{result=\"gone\"}", &self.confirms_gone),
            ],
        );
        counter(
            "nixfleet_enrollments_total",
            "Certificates issued at enrollment.",
            &[("", &self.enrollments)],
        );
        counter(
            "nixfleet_renewals_total",
            "Certificates issued at renewal.",
            &[("", &self.renewals)],
        );
        counter(
            "nixfleet_reports_total",
            "Host reports stored.",
            &[("", &self.reports)],
        );
        counter(
            "nixfleet_reports_dropped_total",
            "Host reports refused, by reason: over the size limit (422) or the per-host rate (429).",
            &[
                ("{reason=\"size\"}", &self.reports_dropped_size),
                ("{reason=\"rate\"}", &self.reports_dropped_rate),
            ],
        );
        counter(
            "nixfleet_compliance_evidence_total",
            "Host-signed compliance evidence verified and stored (a resend of the stored evidence is not counted).",
            &[("", &self.evidence_ok)],
        );
        counter(
            "nixfleet_compliance_evidence_refused_total",
            "Compliance evidence refused, by reason: signature (401), host (another host's, 403), replay (older than the stored, 409), shape (400/413), before-activation (422), future (dated ahead of this clock, 422), rate (429).",
            &[
                ("{reason=\"signature\"}", &self.evidence_refused_signature),
                ("{reason=\"host\"}", &self.evidence_refused_host),
                ("{reason=\"replay\"}", &self.evidence_refused_replay),
                ("{reason=\"shape\"}", &self.evidence_refused_shape),
                (
                    "{reason=\"before-activation\"}",
                    &self.evidence_refused_before_activation,
                ),
                ("{reason=\"future\"}", &self.evidence_refused_future),
                ("{reason=\"rate\"}", &self.evidence_refused_rate),
            ],
        );
        counter(
            "nixfleet_polls_total",
            "Artifact polls by artifact and result.",
            &[
                (
                    "{artifact=\"channel-refs\",result=\"ok\"}",
                    &self.channel_refs_ok,
                ),
                (
                    "{artifact=\"channel-refs\",result=\"failed\"}",
                    &self.channel_refs_failed,
                ),
                (
                    "{artifact=\"revocations\",result=\"ok\"}",
                    &self.revocations_ok,
                ),
                (
                    "{artifact=\"revocations\",result=\"failed\"}",
                    &self.revocations_failed,
                ),
            ],
        );
        counter(
            "nixfleet_event_hook_runs_total",
            "Runs of --event-hook by result (dropped: the hook fell too far behind).",
            &[
                ("{result=\"ok\"}", &self.hook_ok),
                ("{result=\"failed\"}", &self.hook_failed),
                ("{result=\"dropped\"}", &self.hook_dropped),
            ],
        );
        counter(
            "nixfleet_revoked_certificate_refusals_total",
            "Agent requests refused because the host's certificate is revoked (401).",
            &[("", &self.revoked_refusals)],
        );
        counter(
            "nixfleet_host_proofs_served_total",
            "Host inclusion proofs served (GET /v1/rollouts/{id}/hosts/{host}).",
            &[("", &self.host_proofs_served)],
        );
        counter(
            "nixfleet_connections_refused_total",
            "Connections closed unserved: the source address held --max-connections-per-source, or all --max-connections had a request in flight.",
            &[
                ("{reason=\"per-source\"}", &self.connections_refused_per_source),
                ("{reason=\"overall\"}", &self.connections_refused_overall),
            ],
        );
        counter(
            "nixfleet_connections_closed_total",
            "Connections the control plane closed: idle for 10 s, or the longest idle one when --max-connections was reached.",
            &[
                ("{reason=\"idle\"}", &self.connections_closed_idle),
                ("{reason=\"evicted\"}", &self.connections_closed_evicted),
            ],
        );
        let _ = writeln!(out, "# HELP nixfleet_connections_open Open HTTPS connections.\n# TYPE nixfleet_connections_open gauge\nnixfleet_connections_open {}", self.connections_open.load(Relaxed));
        let _ = writeln!(out, "# HELP nixfleet_poll_last_success_timestamp_seconds Last successful poll.\n# TYPE nixfleet_poll_last_success_timestamp_seconds gauge");
        let _ = writeln!(
            out,
            "nixfleet_poll_last_success_timestamp_seconds{{artifact=\"channel-refs\"}} {}",
            self.channel_refs_last_success.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "nixfleet_poll_last_success_timestamp_seconds{{artifact=\"revocations\"}} {}",
            self.revocations_last_success.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP nixfleet_fleet_signed_at_timestamp_seconds signedAt of the verified fleet.\n# TYPE nixfleet_fleet_signed_at_timestamp_seconds gauge");
        let _ = writeln!(
            out,
            "nixfleet_fleet_signed_at_timestamp_seconds {}",
            fleet_signed_at.map(unix).unwrap_or(0)
        );
        let _ = writeln!(out, "# HELP nixfleet_cert_revocations Entries in the applied revocation list.\n# TYPE nixfleet_cert_revocations gauge\nnixfleet_cert_revocations {revocations}");
        let _ = writeln!(out, "# HELP nixfleet_hosts_seen Hosts that checked in since start.\n# TYPE nixfleet_hosts_seen gauge\nnixfleet_hosts_seen {hosts_seen}");
        let _ = writeln!(out, "# HELP nixfleet_request_duration_seconds Request latency.\n# TYPE nixfleet_request_duration_seconds histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "nixfleet_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "nixfleet_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "nixfleet_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "nixfleet_request_duration_seconds_count {count}");
        let _ = writeln!(out, "# HELP nixfleet_reconcile_tick_duration_seconds Reconcile tick duration, persistence included.\n# TYPE nixfleet_reconcile_tick_duration_seconds histogram");
        for (i, bound) in TICK_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "nixfleet_reconcile_tick_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.tick_buckets[i].load(Relaxed)
            );
        }
        let ticks = self.tick_count.load(Relaxed);
        let _ = writeln!(
            out,
            "nixfleet_reconcile_tick_duration_seconds_bucket{{le=\"+Inf\"}} {ticks}"
        );
        let _ = writeln!(
            out,
            "nixfleet_reconcile_tick_duration_seconds_sum {}",
            self.tick_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "nixfleet_reconcile_tick_duration_seconds_count {ticks}"
        );
        let _ = writeln!(out, "# HELP nixfleet_hosts_in_flight Hosts Dispatched through Healthy (as disruption budgets count them) after the last tick.\n# TYPE nixfleet_hosts_in_flight gauge\nnixfleet_hosts_in_flight {}", self.hosts_in_flight.load(Relaxed));
        let _ = writeln!(out, "# HELP nixfleet_hosts_in_flight_max The most hosts in flight after any tick since start.\n# TYPE nixfleet_hosts_in_flight_max gauge\nnixfleet_hosts_in_flight_max {}", self.hosts_in_flight_max.load(Relaxed));
        out
    }
}

/// Gauges of the fleet's stored compliance evidence, from the hosts' summaries (computed
/// at scrape from memory). A summary names only the controls that did not pass, so the
/// per-control gauge counts failures and errors; passes are counted per host and in all.
pub fn render_compliance(summaries: &[nixfleet_proto::compliance::ComplianceSummary]) -> String {
    use std::collections::BTreeMap;
    let mut per_control: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let (mut hosts_pass, mut hosts_fail, mut passed) = (0u64, 0u64, 0u64);
    for summary in summaries {
        passed += u64::from(summary.passed);
        if summary.failing.is_empty() {
            hosts_pass += 1;
        } else {
            hosts_fail += 1;
        }
        for control in &summary.failing {
            *per_control
                .entry((control.id.as_str(), control.status.as_str()))
                .or_default() += 1;
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "# HELP nixfleet_compliance_controls Hosts whose stored evidence has the control in this status (fail or error).\n# TYPE nixfleet_compliance_controls gauge");
    for ((control, status), hosts) in per_control {
        let _ = writeln!(
            out,
            "nixfleet_compliance_controls{{control=\"{}\",status=\"{status}\"}} {hosts}",
            label_value(control)
        );
    }
    let _ = writeln!(out, "# HELP nixfleet_compliance_hosts Hosts with stored compliance evidence, by result: pass (every control passed) or fail (at least one failed or erred).\n# TYPE nixfleet_compliance_hosts gauge\nnixfleet_compliance_hosts{{result=\"pass\"}} {hosts_pass}\nnixfleet_compliance_hosts{{result=\"fail\"}} {hosts_fail}");
    let _ = writeln!(out, "# HELP nixfleet_compliance_controls_passed Passing control results over every host's stored evidence.\n# TYPE nixfleet_compliance_controls_passed gauge\nnixfleet_compliance_controls_passed {passed}");
    out
}

/// A Prometheus label value: control ids are checked at verification (`[a-z0-9-]`), but
/// the exposition must not break on anything a database hands back.
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_in_the_metrics_reference() {
        let text = Metrics::default().render(None, 0, 0) + &render_compliance(&[]);
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/metrics.md"
        ))
        .unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.len() > 10, "{text}");
        for name in names {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is missing from docs/metrics.md"
            );
        }
    }
}
