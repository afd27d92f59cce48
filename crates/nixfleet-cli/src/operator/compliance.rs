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

pub fn render(report: &ComplianceReport, now: OffsetDateTime, style: &Style) -> String {
    let mut rows = Vec::new();
    for host in &report.hosts {
        let mode = format!("{} [{}]", host.mode, host.frameworks.join(" "));
        let pending = if host.pending {
            " (newer evidence pending)"
        } else {
            ""
        };
        let Some(summary) = &host.summary else {
            rows.push(vec![
                host.hostname.clone(),
                host.channel.clone(),
                mode,
                "-".into(),
                format!("no evidence{pending}"),
                String::new(),
                String::new(),
                String::new(),
            ]);
            continue;
        };
        let collected = format!(
            "{} ({})",
            render::ago(now, summary.collected_at),
            render::short_closures(Some(&summary.closure_hash), None).0
        );
        let list = controls(host);
        if list.is_empty() {
            rows.push(vec![
                host.hostname.clone(),
                host.channel.clone(),
                mode.clone(),
                "-".into(),
                format!("no controls{pending}"),
                String::new(),
                collected.clone(),
                String::new(),
            ]);
        }
        for c in list {
            let articles: Vec<String> = c
                .articles
                .iter()
                .map(|(fw, a)| format!("{fw} {}", a.join(" ")))
                .collect();
            let status = match c.status {
                ControlStatus::Pass => "pass".to_owned(),
                ControlStatus::Fail => "FAIL".to_owned(),
                ControlStatus::Error => "ERROR".to_owned(),
            };
            rows.push(vec![
                host.hostname.clone(),
                host.channel.clone(),
                mode.clone(),
                c.id.clone(),
                format!("{status}{pending}"),
                articles.join("; "),
                collected.clone(),
                render::elide(&c.output_hash, 20),
            ]);
        }
    }
    let failing: usize = report
        .hosts
        .iter()
        .filter(|h| h.summary.as_ref().is_some_and(|s| !s.failing.is_empty()))
        .count();
    let missing = report.hosts.iter().filter(|h| h.summary.is_none()).count();
    let mut out = render::table(
        &[
            "HOST",
            "CHANNEL",
            "MODE",
            "CONTROL",
            "STATUS",
            "ARTICLES",
            "COLLECTED",
            "OUTPUT",
        ],
        &[5],
        &rows,
        style,
    );
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
