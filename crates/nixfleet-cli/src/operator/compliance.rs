//! `nixfleet compliance report` and `nixfleet compliance evidence`: the fleet's newest
//! host-signed compliance evidence, as the control plane stored it.

use nixfleet_proto::api::{ComplianceReport, HostCompliance};
use nixfleet_proto::compliance::{ControlEvidence, ControlStatus, EvidenceRequest};
use time::OffsetDateTime;

use super::client::OperatorClient;
use super::render::{self, Style};
use super::{check_name, OperatorError};

/// mkFleet's name for ANSSI-BP-028 and the control library's (docs/compliance.md).
fn canonical_framework(name: &str) -> &str {
    match name {
        "anssi-bp028" => "anssi",
        other => other,
    }
}

/// The report, limited to `channel` (by the control plane) and to `framework`: in each
/// host's evidence only the controls that cite it, and only the hosts left with such a
/// control or whose channel selects the framework (those without evidence show as such).
pub async fn report(
    client: &OperatorClient,
    channel: Option<&str>,
    framework: Option<&str>,
) -> Result<ComplianceReport, OperatorError> {
    let path = match channel {
        Some(c) => {
            check_name(c)?;
            format!("/v1/compliance?channel={c}")
        }
        None => "/v1/compliance".to_owned(),
    };
    let mut report: ComplianceReport = client.get_json(&path).await?;
    if let Some(fw) = framework.map(canonical_framework) {
        for host in &mut report.hosts {
            if let Some(controls) = host
                .evidence
                .as_mut()
                .and_then(|e| e.pointer_mut("/evidence/controls"))
                .and_then(|c| c.as_array_mut())
            {
                controls.retain(|c| c["articles"].get(fw).is_some());
            }
        }
        report.hosts.retain(|h| {
            h.frameworks.iter().any(|f| canonical_framework(f) == fw) || !controls(h).is_empty()
        });
    }
    Ok(report)
}

/// The controls of a host's stored evidence, parsed; empty when it has none.
fn controls(host: &HostCompliance) -> Vec<ControlEvidence> {
    host.evidence
        .as_ref()
        .and_then(|e| e.get("evidence"))
        .and_then(|e| e.get("controls"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// Per host, a line (channel, mode, frameworks, when and on which closure), then one row
/// per control: status, id, output hash, articles.
pub fn render(report: &ComplianceReport, now: OffsetDateTime, style: &Style) -> String {
    let mut out = Vec::new();
    for host in &report.hosts {
        let pending = if host.pending {
            "; newer evidence pending"
        } else {
            ""
        };
        let head = match &host.summary {
            None => format!("no evidence{pending}"),
            Some(s) => format!(
                "{} evidence collected {} on {}{pending}",
                s.mode.as_str(),
                render::ago(now, s.collected_at),
                render::short_closures(Some(&s.closure_hash), None).0
            ),
        };
        let line = format!(
            "{}  channel {} ({} [{}]): {head}",
            host.hostname,
            host.channel,
            host.mode,
            host.frameworks.join(" ")
        );
        out.push(render::elide(&line, style.width));
        let rows: Vec<Vec<String>> = controls(host)
            .into_iter()
            .map(|c| {
                let articles: Vec<String> = c
                    .articles
                    .iter()
                    .map(|(fw, a)| format!("{fw} {}", a.join(" ")))
                    .collect();
                let status = match c.status {
                    ControlStatus::Pass => "pass",
                    ControlStatus::Fail => "FAIL",
                    ControlStatus::Error => "ERROR",
                };
                vec![
                    format!("  {status}"),
                    c.id.clone(),
                    render::elide(&c.output_hash, 19),
                    articles.join("; "),
                ]
            })
            .collect();
        if !rows.is_empty() {
            out.extend(render::table_wrapping_last(
                &["  STATUS", "CONTROL", "OUTPUT", "ARTICLES"],
                &[3],
                &rows,
                style,
            ));
        }
    }
    let failing = report
        .hosts
        .iter()
        .filter(|h| h.summary.as_ref().is_some_and(|s| !s.failing.is_empty()))
        .count();
    let missing = report.hosts.iter().filter(|h| h.summary.is_none()).count();
    out.push(format!(
        "{} host(s): {failing} with failing controls, {missing} without evidence",
        report.hosts.len()
    ));
    out.join("\n") + "\n"
}

/// A host's newest evidence as it signed it, for `nixfleet verify evidence`.
pub async fn evidence(client: &OperatorClient, host: &str) -> Result<String, OperatorError> {
    check_name(host)?;
    let path = format!("/v1/hosts/{host}/evidence");
    let value: serde_json::Value = client.get_json(&path).await?;
    // Checked for shape here so that a file saved from it is evidence, not an error page.
    serde_json::from_value::<EvidenceRequest>(value.clone()).map_err(|e| {
        OperatorError::BadAnswer {
            url: client.url(&path),
            detail: e.to_string(),
        }
    })?;
    Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixfleet_proto::compliance::{
        ComplianceMode, ComplianceSummary, EvidenceTrigger, FailingControl,
    };
    use time::macros::datetime;

    fn host(name: &str, evidence: Option<serde_json::Value>) -> HostCompliance {
        HostCompliance {
            hostname: name.into(),
            channel: "stable".into(),
            mode: "enforce".into(),
            frameworks: vec!["cis".into()],
            pending: evidence.is_none(),
            summary: evidence.as_ref().map(|_| ComplianceSummary {
                evidence_id: "e".repeat(64),
                rollout_id: None,
                closure_hash: "0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-01".into(),
                mode: ComplianceMode::Enforce,
                trigger: EvidenceTrigger::Drift,
                collected_at: datetime!(2026-12-04 09:45:00 UTC),
                passed: 1,
                failing: vec![FailingControl {
                    id: "auditd-enabled".into(),
                    status: ControlStatus::Fail,
                }],
            }),
            evidence,
        }
    }

    #[test]
    fn the_text_report_fits_80_columns_and_names_host_control_and_articles() {
        let control = |id: &str, status: &str, articles: serde_json::Value| {
            serde_json::json!({"id": id, "status": status, "articles": articles,
                "outputHash": format!("sha256:{}", "a".repeat(64)),
                "collectedAt": "2026-12-04T09:45:00Z"})
        };
        let evidence = serde_json::json!({"evidence": {"controls": [
            control("auditd-enabled", "fail", serde_json::json!({"cis": ["4.1.1.2"], "nis2": ["21.2.b"], "iso27001": ["A.8.15"], "anssi": ["R73"], "dora": ["10.1"]})),
            control("ssh-root-login-key-only", "pass", serde_json::json!({"cis": ["5.2.8"]})),
        ]}});
        let report = ComplianceReport {
            hosts: vec![host("web-01", Some(evidence)), host("web-02", None)],
        };
        let text = render(
            &report,
            datetime!(2026-12-04 10:00:00 UTC),
            &Style {
                width: 80,
                colour: false,
            },
        );
        assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");
        assert!(
            text.contains(
                "web-01  channel stable (enforce [cis]): enforce evidence collected 15m ago"
            ),
            "{text}"
        );
        assert!(text.contains("FAIL    auditd-enabled"), "{text}");
        assert!(text.contains("dora 10.1"), "{text}");
        assert!(
            text.contains(
                "web-02  channel stable (enforce [cis]): no evidence; newer evidence pending"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("2 host(s): 1 with failing controls, 1 without evidence\n"),
            "{text}"
        );
    }
}
